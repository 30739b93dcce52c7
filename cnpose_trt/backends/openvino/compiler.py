"""OpenVINO's build step: the precision graph becomes the engine file as it is (OpenVINO compiles it at
load: runtime.py says why the ONNX graph and no model cache), then it is compiled here and checked:
FP32 and BF16 against PyTorch (BF16 within BF16_LIMITS of the decoded joints), INT8 against the FP32
graph on real crops, like ONNX Runtime's INT8.

A build step (tests/test_layout.py puts every backends.<name>.compiler module in the build room):
imported only by the backend's thin compile() when an engine is built, never by the runtime.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...build.verify import accuracy_inputs, joint_error
from ...errors import BuildError
from .runtime import BF16_FLAGS, DEVICE, bf16_problem, compile_config, cpu_flags, import_openvino

if TYPE_CHECKING:
    from ...build.builder import BuildJob

# Rel. L2 error between an FP32 engine and PyTorch above which the build is refused: OpenVINO's f32
# agreed with PyTorch to 7e-7 (XS) and 9e-7 (M) on the 2-core EPYC, so 1e-3 only trips on a broken graph.
PARITY_LIMIT = 1e-3
# The largest decoded-joint shift of a BF16 engine from PyTorch float32 a build accepts on verify.ACCURACY_SAMPLES
# synthetic crops, as a share of the heatmap's side (cells = share x 32 for XS/S, x 64 for M/L). Measured on the
# 2-core EPYC (avx512_bf16), random weights, seeds 0-2: max 0.082-0.159 cells of 32 (XS), 0.110-0.330 of 64 (M),
# i.e. up to 0.0050 / 0.0052 of the side; mean up to 0.052 / 0.088 cells (0.0016 / 0.0014 of the side); the
# shipped trained XS model: max 0.094, mean 0.013 cells of 32. About twice the largest: a wrong engine (an f32
# hint lost, another network's graph) moves joints by whole cells.
BF16_LIMITS = {"max_cells": 0.011, "mean_cells": 0.0033}


def bf16_limits(spec: Any) -> dict[str, float]:
    """BF16_LIMITS in heatmap cells of this spec's map."""
    return {k: share * spec.heatmap_size for k, share in BF16_LIMITS.items()}


def ov_runner(path: Path, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    """An OpenVINO CPU compiled model over an ONNX file, as a function of the input batch."""
    ov = import_openvino()
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), DEVICE, compile_config(precision, 0))
    request = compiled.create_infer_request()
    return lambda x: np.asarray(request.infer({0: x}, share_outputs=False)[0])


def _torch_heatmaps(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def compile(job: BuildJob, built: Path) -> dict[str, Any]:
    """Write the precision graph as the engine file, compile it with OpenVINO and check it. Returns what
    the sidecar records (openvino: inference precision, the CPU's bf16 flags, compile seconds).

    Raises:
        BuildError: bf16 on a CPU without AMX-BF16 / AVX512-BF16, a graph OpenVINO cannot compile,
            or an engine off PyTorch beyond its limit.
    """
    if job.precision == "bf16" and (problem := bf16_problem()):
        raise BuildError(problem)
    if job.graph is None:
        raise BuildError("the openvino backend compiles an ONNX precision graph, and none was made")
    hint = compile_config(job.precision, 0)["INFERENCE_PRECISION_HINT"]
    job.say(f"[4/5] compiling the graph with OpenVINO (CPU, inference precision {hint})")
    shutil.copyfile(job.graph, built)
    started = time.perf_counter()
    try:
        run = ov_runner(built, job.precision)
    except Exception as exc:  # OpenVINO's own exception types
        raise BuildError(f"OpenVINO cannot compile the {job.precision} graph: {str(exc)[:300]}") from None
    record = {"openvino": {"inference_precision": hint,
                           "cpu_bf16_flags": sorted(cpu_flags() & set(BF16_FLAGS)),
                           "compile_seconds": round(time.perf_counter() - started, 3)}}
    job.say("[5/5] checking the engine")
    x = accuracy_inputs(job.spec)
    heat = run(x)
    if not np.isfinite(heat).all():
        raise BuildError(f"the {job.precision} openvino engine produces non-finite heatmaps")
    if job.precision == "fp32":
        ref = _torch_heatmaps(job.model, x[:2]).astype(np.float64)
        err = float(np.linalg.norm(heat[:2].astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))
        if not err <= PARITY_LIMIT:
            raise BuildError(f"built engine disagrees with PyTorch: rel. L2 error {err:.2e} > {PARITY_LIMIT}")
        job.say(f"      rel. L2 error vs PyTorch: {err:.1e}")
        return {**record, "parity_rel_l2_vs_torch": err}
    if job.precision == "bf16":
        acc = joint_error(_torch_heatmaps(job.model, x), heat, job.spec)
        over = [f"{k} {acc[k]:.3f} > {limit:.3f}" for k, limit in bf16_limits(job.spec).items() if not acc[k] <= limit]
        if over:
            raise BuildError(f"the bf16 engine's joints are off PyTorch's by more than bf16 allows on "
                             f"{acc['samples']} crops: {', '.join(over)} cells")
        job.say(f"      decoded joints vs PyTorch: mean {acc['mean_cells']:.3f} cells, max {acc['max_cells']:.3f} "
                f"cells on {acc['samples']} synthetic crops")
        return {**record, "accuracy_vs_torch": acc}
    assert job.fp32_graph is not None  # the int8 graph came from it (builder._precision_graph)
    acc = joint_error(ov_runner(job.fp32_graph, "fp32")(x), heat, job.spec)
    job.say(f"      decoded joints vs FP32: mean {acc['mean_cells']:.3f} cells ({acc['mean_mm']:.1f} mm), "
            f"max {acc['max_cells']:.3f} cells on {acc['samples']} synthetic crops")
    return {**record, "accuracy_vs_fp32": acc}

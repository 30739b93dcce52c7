"""ONNX Runtime's build step: the precision graph optimised into the engine file (EXTENDED
fusions), then checked: FP32 against PyTorch, FP16 and INT8 against the FP32 graph on real crops;
for INT8, kernel_counts reads what the loaded session really runs.

A build step (tests/test_layout.py puts every backends.<name>.compiler module in the build room):
imported only by the backend's thin compile() when an engine is built, never by the runtime.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...build.verify import accuracy_inputs, joint_error, ort_runner, parity, root_parity
from ...errors import BuildError
from ...spec import model_of
from ..graph_facts import read_graph_facts
from .runtime import INT8_SCHEME, NO_VNNI_NOTICE, cpu_has_vnni

if TYPE_CHECKING:
    from ...build.builder import BuildJob

log = logging.getLogger(__name__)

# Below this share of convolutions running as quantized kernels, an int8 build says so.
MIN_QUANTIZED_CONV_SHARE = 0.9
# Fused quantized nodes the engine file itself holds (EXTENDED fusions): recorded at build, checked at load.
ENGINE_FILE_FUSED_OPS = ("QLinearConv", "QLinearAdd")
_QUANTIZED_CONV_OPS = ("QLinearConv", "ConvInteger", "NhwcQLinearConv")
_FLOAT_CONV_OPS = ("Conv", "FusedConv")
# Rel. L2 error between an FP32 engine and PyTorch above which the build is refused: FP32
# graphs agree to ~1e-6, so 1e-3 only trips on a broken export.
PARITY_LIMIT = 1e-3


def compile(job: BuildJob, built: Path) -> dict[str, Any]:
    """Optimise the precision graph into the engine file and check it: FP32 against PyTorch, FP16
    and INT8 against the FP32 graph on real crops. Returns what the sidecar records."""
    job.say("[4/5] optimising the graph for onnxruntime")
    optimise(job.graph, built)
    job.say("[5/5] checking the engine")
    if model_of(job.spec) == "rootnet":
        return _check_rootnet(job, built)
    if job.precision == "fp32":
        err = parity(job.model, built)
        if not err <= PARITY_LIMIT:
            raise BuildError(f"built engine disagrees with PyTorch: rel. L2 error {err:.2e} > {PARITY_LIMIT}")
        job.say(f"      rel. L2 error vs PyTorch: {err:.1e}")
        return {"parity_rel_l2_vs_torch": err}
    x = accuracy_inputs(job.spec)
    heat = ort_runner(built)(x)
    if not np.isfinite(heat.astype(np.float32)).all():
        raise BuildError(f"the {job.precision} engine produces non-finite heatmaps")
    acc = joint_error(ort_runner(job.fp32_graph)(x), heat, job.spec)
    job.say(f"      decoded joints vs FP32: mean {acc['mean_cells']:.3f} cells ({acc['mean_mm']:.1f} mm), "
            f"max {acc['max_cells']:.3f} cells on {acc['samples']} synthetic crops")
    extra: dict[str, Any] = {"accuracy_vs_fp32": acc}
    if job.precision == "int8":
        kernels = kernel_counts(built)
        vnni = cpu_has_vnni()
        ops = read_graph_facts(built).ops
        extra["int8_kernels"] = {**kernels, "cpu_vnni": vnni,
                                 "engine_file": {op: ops.get(op, 0) for op in ENGINE_FILE_FUSED_OPS}}
        job.say(f"      ONNX Runtime runs {kernels['quantized_convs']} of "
                f"{kernels['quantized_convs'] + kernels['float_convs']} convolutions quantized, "
                f"{kernels['QLinearAdd']} QLinearAdd")
        if kernels["quantized_conv_share"] < MIN_QUANTIZED_CONV_SHARE:
            log.warning("only %d of %d convolutions of this int8 graph run quantized in ONNX Runtime: INT8 will not "
                        "pay here (the int8_scheme for ONNX Runtime is %s)", kernels["quantized_convs"],
                        kernels["quantized_convs"] + kernels["float_convs"], INT8_SCHEME)
        if not vnni:
            log.warning(NO_VNNI_NOTICE)
    return extra


def _check_rootnet(job: BuildJob, built: Path) -> dict[str, Any]:
    """A RootNet engine in any precision against PyTorch on its roots (verify.ROOT_LIMITS)."""
    err = root_parity(job.model, built, job.precision)
    job.say(f"      roots vs PyTorch: max {err['max_cells']:.1e} cells, gamma max rel. {err['max_gamma_rel']:.1e} "
            f"on {err['samples']} synthetic crops")
    return {"roots_vs_torch": err}


def kernel_counts(path: Path) -> dict[str, Any]:
    """What ONNX Runtime's CPU provider runs for the graph at path, from the model it optimises at
    load (ORT_ENABLE_ALL, as OrtEngine loads it): quantized convolutions (QLinearConv, ConvInteger),
    float ones (Conv, FusedConv, NCHWc Conv), QLinearAdd, and the Q/DQ nodes left unfused."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="cnpose-ort-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        opts.log_severity_level = 3  # its warning that the NCHWc model is hardware specific: known
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ops = read_graph_facts(opts.optimized_model_filepath).ops
    quantized = sum(ops.get(op, 0) for op in _QUANTIZED_CONV_OPS)
    floating = sum(ops.get(op, 0) for op in _FLOAT_CONV_OPS)
    counts: dict[str, Any] = {op: ops.get(op, 0) for op in (*_QUANTIZED_CONV_OPS, *_FLOAT_CONV_OPS, "QLinearAdd",
                                                            "QuantizeLinear", "DequantizeLinear")}
    counts.update(quantized_convs=quantized, float_convs=floating,
                  quantized_conv_share=round(quantized / max(1, quantized + floating), 4))
    return counts


def optimise(src: Path, dst: Path) -> None:
    """Write src with ONNX Runtime's layout-neutral (EXTENDED) fusions applied to dst."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])

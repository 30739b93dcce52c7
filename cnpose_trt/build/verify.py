"""How builds and benchmarks check an engine: real input crops, parity with PyTorch, the
decoded-joint difference between two heatmap batches, and a RootNet engine's roots against PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..ops.decoding import decode
from ..spec import BBOX_3D_DEPTH_MM, RootNetSpec, VariantSpec
from .precision import calibration_batches

ACCURACY_SAMPLES = 8  # synthetic crops on which FP16/INT8 engines are compared with FP32


def accuracy_inputs(spec: VariantSpec | RootNetSpec, count: int = ACCURACY_SAMPLES, seed: int = 123) -> np.ndarray:
    """(count, 3, S, S) float32 normalised crops of generated scenes in upstream's input convention:
    the common input of precision comparisons, build checks and benchmarks."""
    rng = np.random.default_rng(seed)
    return np.concatenate(list(calibration_batches([("synthetic", rng)], count, count, spec.input_size)))


def ort_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A plain ONNX Runtime CPU session over an ONNX file, as a function of the input batch."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def parity(model: Any, engine_file: Path) -> float:
    """Rel. L2 error of an ONNX engine's heatmaps against the PyTorch model on 2 real crops."""
    import torch

    x = accuracy_inputs(model.spec, 2)  # real crops: the network's input spans about -2.1 .. 1136
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy().astype(np.float64)
    out = ort_runner(engine_file)(x).astype(np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def joint_error(heat_ref: np.ndarray, heat: np.ndarray, spec: VariantSpec) -> dict[str, float]:
    """Decoded-joint difference of two heatmap batches, in heatmap cells and in mm.

    mm assume the usual 3D box of bbox_3d_shape = 2000 mm per side spread over the W x H x D
    volume: a cell is 2000/W mm in x, 2000/H mm in y, 2000/D mm in z.
    """
    a = decode(np.ascontiguousarray(heat_ref), spec.joints, spec.depth_dim).cells.astype(np.float64)
    b = decode(np.ascontiguousarray(heat), spec.joints, spec.depth_dim).cells.astype(np.float64)
    d = b - a
    cells = np.linalg.norm(d, axis=-1)
    size = spec.heatmap_size
    mm = np.linalg.norm(d * (BBOX_3D_DEPTH_MM / np.array([size, size, spec.depth_dim])), axis=-1)
    return {"mean_cells": float(cells.mean()), "max_cells": float(cells.max()), "mean_mm": float(mm.mean()),
            "max_mm": float(mm.max()), "samples": int(len(a))}


# The largest deviation of a RootNet engine's roots from PyTorch (float32) a build accepts, per precision, on
# the ACCURACY_SAMPLES synthetic crops: x, y in output cells (0..63) and gamma relative to its RMS. Measured on
# the 2-core EPYC (ONNX Runtime 1.x CPU; max over 8 / 16 synthetic crops and the 5 golden crops, random weights
# with fitted BatchNorm statistics and the golden weights): fp32 2.7e-3 cells, 8e-5 gamma; fp16 (the head kept
# float32, config.ROOTNET_KEEP_FP32) 3.1 cells (random weights: flat maps), 0.5 cells (golden weights), 4.2e-2
# gamma; int8 (ort-u8s8, 16 synthetic calibration crops) 21 cells, 2.1 gamma (random), 17 cells, 0.28 gamma
# (golden weights). fp32 is held to float32 (a broken export is off by whole cells); fp16 with headroom; int8 on
# weights like these only to half the map: the limit refuses a broken graph, not a poor calibration (which
# the sidecar's roots_vs_torch shows; calibrate on real people with --calib-images).
ROOT_LIMITS = {"fp32": {"max_cells": 1e-2, "max_gamma_rel": 1e-3},
               "fp16": {"max_cells": 4.0, "max_gamma_rel": 0.1},
               "int8": {"max_cells": 32.0, "max_gamma_rel": 4.0}}


def root_error(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Deviation of (N, 3) roots (x, y cells, gamma) from reference roots: the largest |dx|, |dy| in cells
    and the largest |d gamma| relative to the reference's RMS gamma (a per-sample ratio would blow up where
    random weights put gamma near 0; for trained weights, gamma > 0, it is close to the relative error),
    and their means."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    cells = np.abs(out[:, :2] - ref[:, :2]).max(axis=1)
    gamma = np.abs(out[:, 2] - ref[:, 2]) / max(float(np.sqrt(np.mean(ref[:, 2] ** 2))), 1e-12)
    return {"max_cells": float(cells.max()), "mean_cells": float(cells.mean()), "max_gamma_rel": float(gamma.max()),
            "mean_gamma_rel": float(gamma.mean()), "samples": int(len(ref))}


def root_parity(model: Any, engine_file: Path, precision: str, count: int = ACCURACY_SAMPLES) -> dict[str, float]:
    """A RootNet ONNX engine's roots against the PyTorch model on `count` real crops, and the build's
    limit for its precision (ROOT_LIMITS) applied.

    Raises:
        BuildError: non-finite roots, or a deviation beyond ROOT_LIMITS[precision].
    """
    import torch

    from ..errors import BuildError

    x = accuracy_inputs(model.spec, count)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = ort_runner(engine_file)(x)
    if not np.isfinite(out).all():
        raise BuildError(f"the {precision} RootNet engine produces non-finite roots")
    err = root_error(ref, out)
    over = [f"{k} {err[k]:.2e} > {limit}" for k, limit in ROOT_LIMITS[precision].items() if not err[k] <= limit]
    if over:
        raise BuildError(f"the {precision} RootNet engine disagrees with PyTorch on {count} crops: {', '.join(over)}")
    return err

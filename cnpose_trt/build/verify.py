"""How builds and benchmarks check an engine: real input crops, parity with PyTorch, and the
decoded-joint difference between two heatmap batches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..ops.decoding import decode
from ..spec import BBOX_3D_DEPTH_MM, VariantSpec
from .precision import calibration_batches

ACCURACY_SAMPLES = 8  # synthetic crops on which FP16/INT8 engines are compared with FP32


def accuracy_inputs(spec: VariantSpec, count: int = ACCURACY_SAMPLES, seed: int = 123) -> np.ndarray:
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

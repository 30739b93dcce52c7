"""cnpose_trt: fast, checked ConvNeXtPose inference (ONNX Runtime on the CPU, TensorRT on NVIDIA GPUs).

Heavy or optional dependencies (torch, onnx, onnxruntime, tensorrt, cuda-python) are imported
only by the functions that need them, so `import cnpose_trt` is light.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .errors import BuildError, CheckpointError, CnposeError, EngineError

# The decode API is bound eagerly (it needs numpy only); its module is `ops.decoding`, so that the
# function cnpose_trt.decode is never shadowed by a submodule of the same name. The rooms (ops, io,
# nn, backends, runtime, build, pipeline, batch, eval, cli) and their import direction: README "Layout".
from .ops.decoding import Decoded, DeviceArray, decode, soft_argmax_reference
from .spec import FLIP_PAIRS, JOINT_NAMES, SKELETON, VARIANTS, VariantSpec, custom_spec, get_spec

_LAZY = {
    "build_model": "nn.model", "count_parameters": "nn.model",
    "load_checkpoint": "nn.checkpoint", "detect_variant": "nn.checkpoint", "detect_spec": "nn.checkpoint",
    "save_checkpoint": "nn.checkpoint",
    "export_onnx": "build.export", "build_engine": "build.builder",
    "BuildConfig": "config", "EngineRequest": "config", "TrtOptions": "config",
    "load_engine": "runtime.engine", "Engine": "runtime.engine", "open_engine": "runtime.open",
    "estimate": "pipeline.estimator", "PoseResult": "pipeline.results", "PoseEstimator": "pipeline.estimator",
    "crop_normalize": "ops.cropping", "estimate_roots": "pipeline.roots",
}

__all__ = ["decode", "Decoded", "DeviceArray", "soft_argmax_reference",
           "VARIANTS", "VariantSpec", "JOINT_NAMES", "FLIP_PAIRS", "SKELETON", "custom_spec", "get_spec",
           "CnposeError", "CheckpointError", "EngineError", "BuildError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cnpose_trt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

"""What an engine is made from and how it is opened, as dataclasses checked once and passed whole.

BuildConfig holds build_engine's options (the variant, weights, backend, precision, batch and
calibration settings); EngineRequest says how a caller wants its engine: a built engine file, or a
BuildConfig to build (or reuse from the cache), plus the options to load it with. Every command
and API that needs an engine hands an EngineRequest to runtime.open_engine, so getting an engine
is written once. A leaf of the package (spec and checks only): every room may hold these.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import checks
from .spec import DEFAULT_OPSET, MODELS, VariantSpec

DEFAULT_MAX_BATCH = 32  # the largest batch an engine is built for unless told otherwise
MAX_BUILD_BATCH = 4096  # the largest engine profile build_engine makes
# bf16: the FP32 graph compiled with bfloat16 inference; the openvino backend builds it, on CPUs with AMX-BF16
# or AVX512-BF16 (backends/openvino/runtime.py says why those flags).
PRECISIONS = ("fp32", "fp16", "int8", "bf16")
# Node-name prefixes (as torch.onnx names them) kept out of INT8 by default: pose heads lose
# accuracy when the heatmap conv and the layer feeding it are quantized.
DEFAULT_INT8_EXCLUDE = ("/head/final_layer/", "/head/deconv_layers_3/")
# RootNet's: the 1x1 xy_layer whose logits feed the 4096-cell softmax, and the depth_layer giving gamma
# (build_engine uses these when int8_exclude is left at DEFAULT_INT8_EXCLUDE).
ROOTNET_INT8_EXCLUDE = ("/root/xy_layer/", "/root/depth_layer/")
# RootNet's head after the backbone, kept in float32 in every FP16 RootNet engine (on top of keep_fp32):
# the 1x1 xy_layer and depth_layer (cheap), the softmax over 4096 cells (each p ~ 2.4e-4, near
# float16's subnormals at 6e-5), its row/column sums and the expectation over cells 0..63 (float16's
# step at 63 is 0.03 cells) with its cell indices (Cast, Range: the converter blocks Range, so the Casts
# feeding it stay float32 too), the global average giving gamma, and the output Concat (the roots stay float32).
ROOTNET_KEEP_FP32 = ("/root/xy_layer/", "/root/depth_layer/", "/root/Flatten", "/root/Softmax", "/root/Reshape",
                     "/root/ReduceSum", "/root/Mul", "/root/ReduceMean", "/root/Concat", "/root/Cast", "/root/Range")


@dataclasses.dataclass(frozen=True)
class TrtOptions:
    """TensorRT builder settings (part of a TensorRT engine's cache key)."""

    opt_batch: int | None = None  # default: max_batch // 2, at least 1
    workspace_mb: int = 4096
    opt_level: int = 3
    version_compatible: bool = False
    hardware_compatible: bool = False
    tf32: bool = False  # let float32 layers use TF32 (off: true float32)


def _path(name: str, value: Any) -> str | Path | None:
    if value is not None and not isinstance(value, (str, Path)):
        raise ValueError(f"{name} must be a path (str or Path) or None, got {value!r}")
    return value


def _names(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of node-name prefixes (strings), got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """build_engine's options (see its docstring for each); checked when made.

    variant: "XS", "S", "M", "L" or a VariantSpec; None with a checkpoint (read from its shapes).
    checkpoint: weights file; None: deterministic random weights from `seed` (benchmarks only).
    model: the network, "convnextpose" (the pose network, a variant) or "rootnet" (one configuration:
        no variant; an official RootNet snapshot or random weights with fitted BatchNorm statistics).
    """

    variant: str | VariantSpec | None = None
    checkpoint: str | Path | None = None
    backend: str = "auto"
    precision: str = "fp32"
    max_batch: int = DEFAULT_MAX_BATCH
    out_dir: str | Path | None = None
    force: bool = False
    opset: int | None = None
    seed: int = 0
    keep_fp32: Sequence[str] = ()
    fp16_output: bool = True
    calib_images: str | Path | None = None
    calib_boxes: str | Path | None = None
    calib_count: int = 64
    calib_method: str = "entropy"
    calib_synthetic: bool = False
    int8_exclude: Sequence[str] = DEFAULT_INT8_EXCLUDE
    int8_scheme: str | None = None
    trt: TrtOptions | None = None
    model: str = "convnextpose"

    def __post_init__(self) -> None:
        checks.one_of("model", self.model, MODELS)
        if self.model == "rootnet" and self.variant is not None:
            raise ValueError(f"variant is a ConvNeXtPose option; RootNet has one configuration (ResNet-50), "
                             f"got variant={self.variant!r} with model='rootnet'")
        if self.variant is not None and not isinstance(self.variant, (str, VariantSpec)):
            raise ValueError(f"variant must be a variant name (XS, S, M, L), a VariantSpec or None, "
                             f"got {self.variant!r}")
        for name in ("checkpoint", "out_dir", "calib_images", "calib_boxes"):
            _path(name, getattr(self, name))
        if not isinstance(self.backend, str):
            raise ValueError(f"backend must be a backend name (a string), got {self.backend!r}")
        checks.one_of("precision", self.precision, PRECISIONS)
        checks.integer("max_batch", self.max_batch, 1, MAX_BUILD_BATCH)
        for name in ("force", "fp16_output", "calib_synthetic"):
            checks.flag(name, getattr(self, name))
        if self.opset is not None and (not checks.is_integer(self.opset) or self.opset < DEFAULT_OPSET):
            raise ValueError(f"opset must be {DEFAULT_OPSET} or newer, got {self.opset}")
        checks.integer("seed", self.seed, 0)
        object.__setattr__(self, "keep_fp32", _names("keep_fp32", self.keep_fp32))
        object.__setattr__(self, "int8_exclude", _names("int8_exclude", self.int8_exclude))
        trt = TrtOptions() if self.trt is None else self.trt
        if not isinstance(trt, TrtOptions):
            raise ValueError(f"trt must be a TrtOptions, got {self.trt!r}")
        object.__setattr__(self, "trt", trt)
        checks.integer("opt_batch", self.opt_batch, 1, self.max_batch)

    @property
    def opt_batch(self) -> int:
        """The batch TensorRT tunes for: trt.opt_batch, else max_batch // 2 (at least 1)."""
        assert self.trt is not None  # set in __post_init__
        return self.trt.opt_batch or max(1, self.max_batch // 2)

    def absolute(self) -> BuildConfig:
        """The same config with its paths absolute (Ray workers build from it in another folder)."""
        paths = {name: os.path.abspath(value) for name in ("checkpoint", "out_dir", "calib_images", "calib_boxes")
                 if (value := getattr(self, name)) is not None}
        return dataclasses.replace(self, **paths)


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    """How a caller gets its engine: `engine`, a built engine file (or its .json sidecar), or `build`,
    a BuildConfig built or reused from the cache; `load`: load_engine's options (threads, spinning,
    device, ...; checked by the backend that loads it)."""

    engine: str | Path | None = None
    build: BuildConfig | None = None
    load: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.engine is None) == (self.build is None):
            raise ValueError("an EngineRequest names either engine (a built engine file) or build (a BuildConfig), "
                             f"exactly one; got engine={self.engine!r}, build={self.build!r}")
        _path("engine", self.engine)
        if self.build is not None and not isinstance(self.build, BuildConfig):
            raise ValueError(f"build must be a BuildConfig, got {self.build!r}")
        if not isinstance(self.load, Mapping) or not all(isinstance(k, str) for k in self.load):
            raise ValueError(f"load must be a mapping of load_engine options, got {self.load!r}")
        object.__setattr__(self, "load", dict(self.load))

"""Array plumbing shared by the decode (decoding, _device) and the crop kernel (cropping): the
packed result type, raw device pointers, which library an array comes from, per-image values.

Its own module so that decoding and _device do not import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import checks
from ..spec import FLIP_PAIRS
from .geometry import flip_permutation

OUT_FIELDS = 10  # packed output: x, y, z (cells), confidence, x_px, y_px, depth_mm, X, Y, Z (camera mm)


def compiled():
    """The compiled module cnpose_trt._C, or None when the package was installed without it."""
    try:
        from .. import _C
    except ImportError:
        return None
    return _C


class Decoded:
    """Result of decode(): one packed float32 (N, J, 10) buffer and views on it.

    Fields not requested (image without boxes, camera without intrinsics) are None.
    """

    __slots__ = ("packed", "has_image", "has_camera")

    def __init__(self, packed: Any, has_image: bool, has_camera: bool) -> None:
        self.packed, self.has_image, self.has_camera = packed, has_image, has_camera

    @property
    def cells(self) -> Any:
        """(N, J, 3) x, y, z in heatmap cells."""
        return self.packed[..., 0:3]

    @property
    def confidence(self) -> Any:
        """(N, J) peak probability of each joint's softmax, in (0, 1]."""
        return self.packed[..., 3]

    @property
    def image(self) -> Any:
        """(N, J, 3) x_px, y_px, depth_mm (root-relative without root_depth), or None."""
        return self.packed[..., 4:7] if self.has_image else None

    @property
    def camera(self) -> Any:
        """(N, J, 3) X, Y, Z in camera mm, or None."""
        return self.packed[..., 7:10] if self.has_camera else None


class DeviceArray:
    """A raw CUDA device pointer with shape and dtype, e.g. a TensorRT output binding.

    Exposes __cuda_array_interface__ (v3); dtype may be "float32", "float16" or "bfloat16"
    (heatmaps, buffers), or "uint8" (images for crop_normalize).
    The memory is not owned: keep it alive until the stream that uses it is done. (Its subclass
    backends.device.OwnedDeviceArray is the one that owns a buffer: a TensorRT engine's output.)
    """

    _TYPESTR = {"float32": "<f4", "float16": "<f2", "bfloat16": "<V2", "uint8": "|u1"}

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: str = "float32") -> None:
        checks.integer("ptr", ptr, 1, hint="a device address")
        if dtype not in self._TYPESTR:
            raise TypeError(f"dtype must be one of {', '.join(self._TYPESTR)}, got {dtype!r}")
        self.ptr, self.shape, self.dtype = int(ptr), tuple(int(s) for s in shape), dtype

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self._TYPESTR[self.dtype], "data": (self.ptr, False),
                "strides": None, "version": 3}


def is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def is_cupy(x: Any) -> bool:
    return type(x).__module__.startswith("cupy")


def flip_perm(joints: int, flipped: Any, flip_pairs: Sequence[tuple[int, int]] | None) -> list[int] | None:
    if flipped is None:
        return None
    return flip_permutation(joints, FLIP_PAIRS if flip_pairs is None else flip_pairs).tolist()


def per_image(name: str, value: Any, n: int, tail: tuple[int, ...]) -> np.ndarray | None:
    """Host float32 (n, *tail) from an array-like; a single row broadcasts to every image."""
    if value is None:
        return None
    if is_torch(value):
        value = value.detach().cpu().numpy()
    elif is_cupy(value):
        value = value.get()
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be numeric, got {type(value).__name__}") from None
    if arr.shape == tail:
        arr = np.broadcast_to(arr, (n, *tail))
    return np.ascontiguousarray(arr)



"""GPU side of decode() and crop_normalize(): turn torch / cupy / __cuda_array_interface__
objects into pointers.

Imported only for device inputs; torch and cupy are imported only if the input is theirs
(or, for raw pointers without `out`, to allocate the result).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .. import checks
from .arrays import OUT_FIELDS, Decoded, DeviceArray, compiled
from .arrays import flip_perm as _flip_perm
from .arrays import is_cupy as _is_cupy
from .arrays import is_torch as _is_torch
from .arrays import per_image as _per_image

_CAI_DTYPES = {"<f4": "float32", "<f2": "float16"}

# Held by a CUDA graph capture (TorchEngine) and by each nvJPEG decode (Uploader): torchvision's
# decoder launches on a default-priority pool stream of its own, and torch.cuda.graph captures on
# one from the same pool (32 handed out in rotation), so in a program whose draws line up they are
# the same stream, and a decode on a prep thread during a capture would be captured into the graph
# or invalidate it (forced on an H200 by a reviewer: 20 captures invalidated without the lock, none
# with it). It also keeps two engines' captures, which share torch's capture stream, apart.
GRAPH_CAPTURE_LOCK = threading.Lock()


def torch_stream(handle: int, device: Any) -> Any:
    """The torch stream object for a raw CUDA stream handle on `device`. Handle 0 is the legacy
    default stream: torch.cuda.ExternalStream(0) would give a new pool stream instead (torch takes
    a null pointer as "none given"), which does not order with work on stream 0."""
    import torch

    current = torch.cuda.current_stream(device)
    if current.cuda_stream == handle:
        return current
    if handle == 0:
        return torch.cuda.default_stream(device)
    return torch.cuda.ExternalStream(handle, device=device)


class _Buf:
    """What the kernel needs of one device array: pointer, shape, dtype name, owner library."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj = obj
        if _is_torch(obj):
            import torch

            names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
            if obj.dtype not in names:
                raise TypeError(f"{name} dtype must be float32, float16 or bfloat16, got {obj.dtype}")
            if not obj.is_cuda:
                raise ValueError(f"{name} is on the host ({obj.device}) while heatmaps are on the GPU")
            if not obj.is_contiguous():
                raise ValueError(f"{name} must be C-contiguous (call .contiguous())")
            self.ptr, self.shape, self.dtype, self.lib = obj.data_ptr(), tuple(obj.shape), names[obj.dtype], "torch"
            self.device = obj.device.index
            return
        cai = getattr(obj, "__cuda_array_interface__", None)
        if cai is None:
            raise TypeError(f"{name} must be a device array like heatmaps (torch, cupy, __cuda_array_interface__), "
                            f"got {type(obj).__name__}")
        shape = tuple(int(s) for s in cai["shape"])
        if isinstance(obj, DeviceArray):
            dtype = obj.dtype
        else:
            dtype = _CAI_DTYPES.get(cai["typestr"])
            if dtype is None:
                raise TypeError(f"{name} dtype must be float32, float16 or bfloat16, got typestr {cai['typestr']!r}")
        itemsize = 4 if dtype == "float32" else 2
        strides = cai.get("strides")
        if strides is not None and tuple(strides) != _c_strides(shape, itemsize):
            raise ValueError(f"{name} must be C-contiguous, got strides {tuple(strides)} for shape {shape}")
        self.ptr, self.shape, self.dtype = int(cai["data"][0]), shape, dtype
        self.lib = "cupy" if _is_cupy(obj) else "raw"
        self.device = None


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    out, acc = [], itemsize
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))


def from_dlpack(obj: Any) -> Any:
    """A DLPack producer as a torch tensor (or cupy array without torch), zero-copy."""
    try:
        import torch

        return torch.from_dlpack(obj)
    except ImportError:
        pass
    try:
        import cupy

        return cupy.from_dlpack(obj)
    except ImportError:
        raise TypeError("DLPack inputs need torch or cupy installed to be read") from None


def _default_stream(buf: _Buf | _Image) -> int:
    if buf.lib == "torch":
        import torch

        return int(torch.cuda.current_stream(buf.obj.device).cuda_stream)
    if buf.lib == "cupy":
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)
    return 0


def _alloc_like(buf: _Buf | _Image, shape: tuple[int, ...], host: np.ndarray | None, stream: int,
                dtype: str = "float32", what: str = "a float32 (N, J, 10) device buffer") -> Any:
    """A device array in the input's library (on `stream`), empty (of `dtype`) or holding `host`."""
    if buf.lib in ("torch", "raw") and (buf.lib == "torch" or _has("torch")):
        import torch

        device = buf.obj.device if buf.lib == "torch" else torch.device("cuda", _pointer_device(buf))
        with torch.cuda.stream(torch_stream(stream, device)):
            if host is None:
                return torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            # Pinned staging + non_blocking: the copy is stream-ordered, no host sync.
            return torch.from_numpy(host).pin_memory().to(device, non_blocking=True)
    if buf.lib == "cupy" or _has("cupy"):
        import cupy

        with cupy.cuda.Stream.null if stream == 0 else cupy.cuda.ExternalStream(stream):
            return cupy.empty(shape, dtype=dtype) if host is None else cupy.asarray(host)
    raise ValueError(f"pass out= ({what}): neither torch nor cupy is installed to allocate one for a raw device "
                     "pointer")


def _pointer_device(buf: _Buf | _Image) -> int:
    return int(compiled().cuda_pointer_device(buf.ptr))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _cuda_module(doing: str, verb: str) -> Any:
    """The compiled module, which must be built with CUDA for GPU work."""
    lib = compiled()
    if lib is None:
        raise RuntimeError(f"cnpose_trt._C is not built: GPU {doing} needs the compiled extension "
                           "(pip install -e . where nvcc is found)")
    if not lib.built_with_cuda:
        raise RuntimeError("cnpose_trt._C was built without CUDA: reinstall where nvcc is found (or with "
                           f"CNPOSE_TRT_CUDA=1) to {verb} on the GPU")
    return lib


def decode_device(heatmaps, joints, depth_dim, boxes, root_depth, intrinsics, flipped, flip_pairs, out, stream,
                  depth_range_mm) -> Decoded:
    lib = _cuda_module("decoding", "decode")
    hm = _Buf(heatmaps, "heatmaps")
    if len(hm.shape) != 4:
        raise ValueError(f"heatmaps must have 4 dimensions (N, J*D, H, W), got {len(hm.shape)}")
    n = hm.shape[0]
    if stream is None:
        stream = _default_stream(hm)
    checks.integer("stream", stream, 0, hint="a CUDA stream handle, 0: default stream", error=TypeError)
    fl = None
    if flipped is not None:
        fl = _Buf(flipped, "flipped")
        if fl.shape != hm.shape or fl.dtype != hm.dtype:
            raise ValueError(f"flipped must match heatmaps {hm.shape} {hm.dtype}, got {fl.shape} {fl.dtype}")
    perm = _flip_perm(int(joints), flipped, flip_pairs)
    keep = []  # device temporaries: alive until the call returns; stream-ordered frees after that

    def post(name: str, value: Any, tail: tuple[int, ...]) -> int:
        if value is None:
            return 0
        if _is_torch(value) and value.is_cuda or hasattr(value, "__cuda_array_interface__"):
            buf = _Buf(value, name)
            if buf.dtype != "float32" or buf.shape != (n, *tail):
                raise ValueError(f"{name} must be float32 with shape {(n, *tail)}, got {buf.dtype} {buf.shape}")
            keep.append(value)
            return buf.ptr
        host = _per_image(name, value, n, tail)
        if host.shape != (n, *tail):
            raise ValueError(f"{name} must have shape {(n, *tail)}, got {host.shape}")
        if not np.isfinite(host).all():
            raise ValueError(f"{name} must be finite")
        dev = _alloc_like(hm, host.shape, host, int(stream))
        keep.append(dev)
        return _Buf(dev, name).ptr

    b = post("boxes", boxes, (4,))
    r = post("root_depth", root_depth, ())
    k = post("intrinsics", intrinsics, (4,))
    if out is None:
        joints_n = int(joints)
        out = _alloc_like(hm, (n, joints_n, OUT_FIELDS), None, int(stream))
    ob = _Buf(out, "out")
    if ob.dtype != "float32" or len(ob.shape) != 3 or ob.shape[2] != OUT_FIELDS:
        raise ValueError(f"out must be a float32 (N, J, {OUT_FIELDS}) device array, got {ob.dtype} {ob.shape}")
    if ob.shape[:2] != (n, int(joints)):
        raise ValueError(f"out must have shape ({n}, {joints}, {OUT_FIELDS}), got {ob.shape}")
    lib.decode_device(hm.ptr, list(hm.shape), hm.dtype, int(joints), depth_dim, out=ob.ptr,
                      flipped=0 if fl is None else fl.ptr, flip_perm=perm, boxes=b, root_depth=r, intrinsics=k,
                      stream=int(stream), depth_range_mm=float(depth_range_mm))
    return Decoded(out, b != 0, k != 0)


# ------------------------------------------------------------------------------------------ crop

class _Image:
    """What the crop kernel needs of one device image: pointer, (H, W), row stride, owner library."""

    def __init__(self, obj: Any, i: int) -> None:
        self.obj = obj
        what = f"images[{i}]"
        if _is_torch(obj):
            import torch

            if obj.dtype != torch.uint8:
                raise TypeError(f"{what} must be uint8 RGB, got {obj.dtype}")
            if not obj.is_cuda:
                raise ValueError(f"{what} is on the host ({obj.device}) while images[0] is on the GPU")
            shape, strides = tuple(obj.shape), tuple(obj.stride())
            self.ptr, self.lib, self.device = obj.data_ptr(), "torch", obj.device.index
        else:
            cai = getattr(obj, "__cuda_array_interface__", None)
            if cai is None:
                raise TypeError(f"{what} must be a device array like images[0] (torch, cupy, "
                                f"__cuda_array_interface__), got {type(obj).__name__}")
            if cai["typestr"] not in ("|u1", "<u1", ">u1"):
                raise TypeError(f"{what} must be uint8 RGB, got typestr {cai['typestr']!r}")
            shape = tuple(int(s) for s in cai["shape"])
            strides = cai.get("strides")
            strides = _c_strides(shape, 1) if strides is None else tuple(int(s) for s in strides)
            self.ptr, self.lib, self.device = int(cai["data"][0]), "cupy" if _is_cupy(obj) else "raw", None
        if len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"{what} must have shape (H, W, 3) RGB, got {shape}")
        if strides[1:] != (3, 1) or strides[0] < 3 * shape[1]:
            raise ValueError(f"{what} must have interleaved RGB pixels (byte strides (row, 3, 1), row >= 3 * W), "
                             f"got {strides}: make it contiguous first (a temporary copy here could be freed "
                             "before the kernel runs)")
        self.hw, self.row_stride = (shape[0], shape[1]), strides[0]


def crop_device(images: list[Any], index: Any, affines: Any, size: int, flip: Any, dtype: str | None, out: Any,
                stream: int | None, mean: Any, std: Any, round_pixels: bool = False) -> Any:
    """crop_normalize for device images: enqueue the CUDA kernel on `stream`, no host sync."""
    lib = _cuda_module("cropping", "crop")
    ims = [_Image(im, i) for i, im in enumerate(images)]
    first = ims[0]  # what the stream and allocation helpers read: obj, lib, ptr
    if stream is None:
        stream = _default_stream(first)
    checks.integer("stream", stream, 0, hint="a CUDA stream handle, 0: default stream", error=TypeError)
    p = int(np.shape(index)[0]) if np.ndim(index) == 1 else -1
    if out is None:
        name = dtype or "float32"
        out = _alloc_like(first, (max(p, 0), 3, size, size), None, int(stream), name,
                          "a float32 or float16 (P, 3, S, S) device buffer")
    ob = _Buf(out, "out")
    if ob.dtype not in ("float32", "float16"):
        raise TypeError(f"out must be float32 or float16, got {ob.dtype}")
    if dtype is not None and ob.dtype != dtype:
        raise ValueError(f"dtype='{dtype}' does not match out's dtype {ob.dtype}")
    if ob.shape != (p, 3, size, size):
        raise ValueError(f"out must have shape ({p}, 3, {size}, {size}) (P, 3, size, size), got {ob.shape}")
    lib.crop_device([im.ptr for im in ims], [im.hw for im in ims], [im.row_stride for im in ims], index, affines,
                    size=size, flip=flip, mean=mean, std=std, out=ob.ptr, out_dtype=ob.dtype, round_pixels=round_pixels,
                    stream=int(stream))
    return out

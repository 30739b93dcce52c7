"""Heatmaps -> joints: the soft-argmax (integral regression), in NumPy.

`soft_argmax_reference` is the float64 oracle the compiled kernel is tested against.
Contract, shared with csrc/: for image n and joint j the D*H*W logits of channels
j*D .. j*D+D-1 form one softmax; x, y, z are the expected w, h, d (0-based heatmap cells);
confidence is the peak probability max p = 1 / sum(exp(logit - max)). A volume holding NaN
or +inf, or only -inf, has no well-defined distribution: its x, y, z and confidence are NaN.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import checks
from ..spec import BBOX_3D_DEPTH_MM, FLIP_PAIRS, NUM_JOINTS
from ._device import decode_device, from_dlpack
from .arrays import OUT_FIELDS, Decoded, DeviceArray, compiled, is_cupy
from .arrays import flip_perm as _flip_perm
from .arrays import is_torch as _is_torch
from .arrays import per_image as _per_image
from .geometry import (
    as_array,
    cells_to_image,
    check_intrinsics,
    check_root_depth,
    flip_back,
    flip_permutation,
    image_to_camera,
)

__all__ = ["OUT_FIELDS", "Decoded", "DeviceArray", "compiled", "decode", "soft_argmax_reference"]

log = logging.getLogger(__name__)


def check_heatmaps(heatmaps: np.ndarray, joints: int, depth_dim: int | None) -> tuple[int, int, int, int, int]:
    """Validate a (N, J*D, H, W) array; returns (N, J, D, H, W)."""
    if not isinstance(heatmaps, np.ndarray):
        raise TypeError(f"heatmaps must be a numpy array, got {type(heatmaps).__name__}")
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must have 4 dimensions (N, J*D, H, W), got {heatmaps.ndim}")
    if heatmaps.dtype.kind != "f":
        raise TypeError(f"heatmaps must be float32, float16 or float64, got {heatmaps.dtype}")
    checks.integer("joints", joints, 1)
    n, c, h, w = heatmaps.shape
    if c % joints:
        raise ValueError(f"heatmaps channels ({c}) must be divisible by joints ({joints})")
    d = c // joints if depth_dim is None else depth_dim
    if not checks.is_integer(d) or d <= 0 or d * joints != c:
        raise ValueError(f"depth_dim must be a positive integer with joints * depth_dim == {c} channels, "
                         f"got depth_dim={depth_dim!r}, joints={joints}")
    if min(n, h, w) <= 0:
        raise ValueError(f"heatmaps must not be empty, got shape {heatmaps.shape}")
    return n, int(joints), int(d), h, w


def soft_argmax_reference(heatmaps: np.ndarray, joints: int = NUM_JOINTS, depth_dim: int | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Soft-argmax in float64, image by image.

    Args:
        heatmaps: (N, J*D, H, W) floating array.
    Returns:
        (coords (N, J, 3) float64 as x, y, z in cells, confidence (N, J) float64).
    """
    n, j, d, h, w = check_heatmaps(heatmaps, joints, depth_dim)
    coords = np.empty((n, j, 3), np.float64)
    conf = np.empty((n, j), np.float64)
    grids = [np.arange(k, dtype=np.float64) for k in (w, h, d)]
    with np.errstate(invalid="ignore", over="ignore"):
        for i in range(n):  # one image at a time bounds the float64 temporaries
            vol = heatmaps[i].astype(np.float64).reshape(j, d, h, w)
            peak = vol.max(axis=(1, 2, 3), keepdims=True)
            e = np.exp(vol - peak)
            total = e.sum(axis=(1, 2, 3))
            coords[i, :, 0] = e.sum(axis=(1, 2)) @ grids[0] / total
            coords[i, :, 1] = e.sum(axis=(1, 3)) @ grids[1] / total
            coords[i, :, 2] = e.sum(axis=(2, 3)) @ grids[2] / total
            conf[i] = 1.0 / total
            bad = ~np.isfinite(peak.reshape(j))  # NaN, +inf, or a volume of -inf only
            coords[i, bad] = np.nan
            conf[i, bad] = np.nan
    return coords, conf



def soft_argmax_torch(heatmaps: Any, joints: int = NUM_JOINTS, depth_dim: int | None = None) -> tuple[Any, Any]:
    """The upstream PyTorch formulation: reshape, softmax, three marginal sums (in the input dtype).

    What users of the reference code run today; the baseline of the decode benchmarks.
    Returns (coords (N, J, 3), confidence (N, J)) as torch tensors on the input's device.
    """
    import torch

    n, c, h, w = heatmaps.shape
    d = c // joints if depth_dim is None else depth_dim
    p = torch.softmax(heatmaps.reshape(n, joints, d * h * w), dim=2)
    conf = p.amax(dim=2)
    p = p.reshape(n, joints, d, h, w)
    kw = {"dtype": heatmaps.dtype, "device": heatmaps.device}
    x = (p.sum(dim=(2, 3)) * torch.arange(w, **kw)).sum(dim=2)
    y = (p.sum(dim=(2, 4)) * torch.arange(h, **kw)).sum(dim=2)
    z = (p.sum(dim=(3, 4)) * torch.arange(d, **kw)).sum(dim=2)
    return torch.stack((x, y, z), dim=2), conf

# ---------------------------------------------------------------------------------------------
# The public decode: compiled fused kernel (CPU or CUDA), NumPy fallback without the extension.
# ---------------------------------------------------------------------------------------------

_DTYPE_NAMES = ("float32", "float16", "bfloat16")
_warned_fallback = False


def _fallback(heatmaps: np.ndarray, joints: int, depth_dim: int | None, boxes, root, intr, flipped, flip_pairs,
              depth_range_mm: float, out: np.ndarray | None) -> np.ndarray:
    """NumPy path with the compiled kernel's contract (used when _C is not built)."""
    global _warned_fallback
    if not _warned_fallback:
        log.warning("cnpose_trt._C is not built: decoding with the NumPy reference (slow)")
        _warned_fallback = True
    n, j, d, h, w = check_heatmaps(heatmaps, joints, depth_dim)
    if flipped is not None and flipped.shape != heatmaps.shape:
        raise ValueError(f"flipped must have the shape of heatmaps {heatmaps.shape}, got {flipped.shape}")
    coords, conf = soft_argmax_reference(heatmaps, j, d)
    if flipped is not None:
        pairs = FLIP_PAIRS if flip_pairs is None else flip_pairs
        fcoords, fconf = soft_argmax_reference(flipped, j, d)
        coords = (coords + flip_back(fcoords, w, pairs)) / 2
        conf = (conf + fconf[:, flip_permutation(j, pairs)]) / 2
    res = np.full((n, j, OUT_FIELDS), np.nan, np.float32) if out is None else out
    res[..., 0:3], res[..., 3] = coords, conf
    if boxes is not None:
        image = cells_to_image(coords, as_array("boxes", boxes, (4,), n), (h, w), d, root,
                               depth_range_mm=depth_range_mm)
        res[..., 4:7] = image
        if intr is not None:
            res[..., 7:10] = image_to_camera(image, intr)
    return res


def decode(heatmaps: Any, joints: int = NUM_JOINTS, depth_dim: int | None = None, *, boxes: Any = None,
           root_depth: Any = None, intrinsics: Any = None, flipped: Any = None,
           flip_pairs: Sequence[tuple[int, int]] | None = None, out: Any = None, stream: int | None = None,
           depth_range_mm: float = BBOX_3D_DEPTH_MM, threads: int = 0) -> Decoded:
    """Fused single-pass soft-argmax with post-processing, on the CPU or the GPU.

    Args:
        heatmaps: (N, J*D, H, W) float32/float16/bfloat16, C-contiguous: a numpy array (CPU; any
            byte order, big-endian is converted), a
            torch tensor (CPU or CUDA), a cupy array, any __cuda_array_interface__ or DLPack
            object, or a DeviceArray wrapping a raw device pointer (TensorRT output buffers).
        joints, depth_dim: J and D (D defaults to channels / J).
        boxes: (N, 4) square crop boxes x, y, w, h in image px -> the image frame.
        root_depth: (N,) root depth in mm (needs boxes; default 0: root-relative depth).
        intrinsics: (N, 4) fx, fy, cx, cy -> camera mm (needs boxes).
        flipped: heatmaps of the horizontally flipped crops (same shape): averaged in
            (x -> W - 1 - x, left/right swapped by flip_pairs, default the 18-joint pairs).
        out: optional float32 (N, J, 10) buffer on the heatmaps' device to write into (host
            heatmaps: a numpy array or CPU torch tensor, either library for either input); it
            must not overlap the inputs. Returned as .packed.
        stream: CUDA stream handle (int) to enqueue on; default: the library's current stream
            (torch, cupy) or the legacy default stream (raw pointers). No host sync inside; on
            the GPU, pass boxes/root_depth/intrinsics as device arrays to keep it fully async.
        threads: CPU threads (0: all cores); capped at 4 per core and at the work items, and
            fewer if the system refuses to create threads.
    Returns:
        Decoded: .cells (N, J, 3), .confidence (N, J), .image and .camera (N, J, 3) or None,
        .packed (N, J, 10), in the input's library and on its device. A joint whose volume
        holds NaN or +inf, or only -inf, decodes to NaN.
    Raises:
        ValueError, TypeError: naming the argument and what is allowed.
        RuntimeError: a GPU input with the extension built without CUDA.
    """
    if flip_pairs is not None and flipped is None:
        raise ValueError("flip_pairs is only meaningful with flipped heatmaps")
    if isinstance(heatmaps, np.ndarray):
        heatmaps, flipped = _native_order(heatmaps), _native_order(flipped)
        return _decode_host(heatmaps, joints, depth_dim, boxes, root_depth, intrinsics, flipped, flip_pairs, out,
                            depth_range_mm, threads)
    if _is_torch(heatmaps) and not heatmaps.is_cuda:
        return _decode_torch_cpu(heatmaps, joints, depth_dim, boxes, root_depth, intrinsics, flipped, flip_pairs,
                                 out, depth_range_mm, threads)
    if _is_torch(heatmaps) or hasattr(heatmaps, "__cuda_array_interface__"):
        return decode_device(heatmaps, joints, depth_dim, boxes, root_depth, intrinsics, flipped, flip_pairs, out,
                             stream, depth_range_mm)
    if hasattr(heatmaps, "__dlpack__"):
        return decode(from_dlpack(heatmaps), joints, depth_dim, boxes=boxes, root_depth=root_depth,
                      intrinsics=intrinsics, flipped=None if flipped is None else from_dlpack(flipped),
                      flip_pairs=flip_pairs, out=out, stream=stream, depth_range_mm=depth_range_mm, threads=threads)
    raise TypeError("heatmaps must be a numpy array, a torch tensor, a cupy array, a __cuda_array_interface__ or "
                    f"DLPack object, or a DeviceArray; got {type(heatmaps).__name__}")


def _native_order(a: Any) -> Any:
    """A numpy array in the machine's byte order: big-endian input is converted (a copy), not misread."""
    if isinstance(a, np.ndarray) and not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


def _host_out(out: Any) -> np.ndarray | None:
    """The numpy view of a host `out` (numpy array or CPU torch tensor)."""
    if out is None or isinstance(out, np.ndarray):
        return out
    if _is_torch(out):
        if out.is_cuda:
            raise TypeError("out is a CUDA tensor while heatmaps are on the host: pass a host array (numpy or CPU "
                            "torch float32 (N, J, 10))")
        return out.detach().numpy()
    raise TypeError(f"out must be a float32 numpy array or CPU torch tensor (N, J, 10) for host heatmaps, got "
                    f"{type(out).__name__}")


def _decode_host(heatmaps, joints, depth_dim, boxes, root_depth, intrinsics, flipped, flip_pairs, out,
                 depth_range_mm, threads) -> Decoded:
    checks.integer("joints", joints, 1)
    n = heatmaps.shape[0] if heatmaps.ndim else 0
    _check_post_values(root_depth, intrinsics)
    b = _per_image("boxes", boxes, n, (4,))
    r = _per_image("root_depth", root_depth, n, ())
    k = _per_image("intrinsics", intrinsics, n, (4,))
    if flipped is not None and not isinstance(flipped, np.ndarray):
        raise TypeError(f"flipped must be a numpy array like heatmaps, got {type(flipped).__name__}")
    perm = _flip_perm(int(joints), flipped, flip_pairs)
    user_out, out = out, _host_out(out)
    lib = compiled()
    if lib is None:
        if r is not None and b is None:
            raise ValueError("root_depth needs boxes (depth in mm is computed with the image frame)")
        if k is not None and b is None:
            raise ValueError("intrinsics need boxes (camera coordinates start from image pixels)")
        if not 0 < float(depth_range_mm) <= float(np.finfo(np.float32).max):
            raise ValueError(f"depth_range_mm must be a positive number that fits float32, got {depth_range_mm}")
        packed = _fallback(heatmaps, joints, depth_dim, b, r, k, flipped, flip_pairs, depth_range_mm, out)
    else:
        packed = lib.decode_host(heatmaps, int(joints), depth_dim, flipped=flipped, flip_perm=perm, boxes=b,
                                 root_depth=r, intrinsics=k, out=out, depth_range_mm=float(depth_range_mm),
                                 threads=int(threads))
    return Decoded(packed if user_out is None else user_out, b is not None, k is not None)


def _check_post_values(root_depth: Any, intrinsics: Any) -> None:
    """root_depth >= 0 (0: root-relative) and intrinsics a camera's, checked in float64 before the
    float32 conversion turns 1e300 into inf (geometry.check_root_depth, check_intrinsics)."""
    for name, value, check in (("root_depth", root_depth, lambda v: check_root_depth(v, zero=True)),
                               ("intrinsics", intrinsics, check_intrinsics)):
        if value is None:
            continue
        if _is_torch(value):
            value = value.detach().cpu().numpy()
        elif is_cupy(value):
            value = value.get()
        try:
            arr = np.asarray(value, np.float64)
        except (TypeError, ValueError, OverflowError):
            raise TypeError(f"{name} must be numeric, got {type(value).__name__}") from None
        check(arr)


def _decode_torch_cpu(heatmaps, joints, depth_dim, boxes, root_depth, intrinsics, flipped, flip_pairs, out,
                      depth_range_mm, threads) -> Decoded:
    import torch

    def host(t):
        if t is None:
            return None
        if not t.is_contiguous():
            raise ValueError("heatmaps must be C-contiguous (call .contiguous())")
        return (t.float() if t.dtype == torch.bfloat16 else t).detach().numpy()

    res = _decode_host(host(heatmaps), joints, depth_dim, boxes, root_depth, intrinsics, host(flipped), flip_pairs,
                       out, depth_range_mm, threads)
    packed = out if out is not None else torch.from_numpy(res.packed)
    return Decoded(packed, res.has_image, res.has_camera)

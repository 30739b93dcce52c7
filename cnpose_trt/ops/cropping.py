"""Image -> network input in one pass: crop each person, warp to S x S, normalise, NCHW.

`crop_normalize` runs the fused kernel of cnpose_trt._C (csrc/crop/crop.h): on the CPU (AVX-512 /
AVX2 / portable, threads, GIL released) for host images, on the GPU (the caller's stream, no
host sync) for device images, writing straight into a caller-given buffer such as the
engine's input binding. Per person p, cut from images[image_index[p]] with the affine map
affines[p] (image px -> crop px, as geometry.crop_matrices makes them):

    out[p, c, v, u] = (bilinear sample of channel c at M_p^-1 (u', v) - mean[c]) / std[c]
    u' = S - 1 - u for a flipped person (mirrored crop), else u

with pixel centres at integer coordinates and taps outside the image black (0): the sample
convention of cv2.warpAffine(image, M, (S, S), INTER_LINEAR, BORDER_CONSTANT 0), computed in
floating point. cv2 rounds its uint8 result to integers, so the two differ by at most half a
grey level (OpenCV >= 4.11), plus up to 1/64 px of position times the local gradient where
OpenCV snaps the position to 1/32 px (up to 4.10): tests/test_crop.py bounds both. With
round_pixels=True the kernel rounds the sample to an integer grey level as cv2's uint8 result
is, and reproduces cv2 + NumPy crops except at values within float32 noise of k + 1/2 (about
2 in 100,000): what upstream's own crops are, so joints match upstream's golden ones (the
unrounded crops move them by up to 0.44 px on the random-weight golden network). mean and std
apply to 0..255 pixel values (spec.PIXEL_MEAN / PIXEL_STD, not scaled to [0, 1]).

Without the compiled extension the same call runs a cv2 + NumPy path (slower, with a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import checks
from ..spec import INPUT_SIZE, PIXEL_MEAN, PIXEL_STD
from ._device import crop_device
from .arrays import compiled
from .arrays import is_cupy as _is_cupy
from .arrays import is_torch as _is_torch

log = logging.getLogger(__name__)

_OUT_DTYPES = ("float32", "float16")
_warned_fallback = False
# cv2.warpAffine indexes with 32-bit integers and keeps coordinates in 16-bit ones: larger sources
# go through the NumPy warp.
_CV2_MAX_BYTES = 2**31 - 1
_CV2_MAX_SIDE = 32767


def check_image(image: object, name: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 or float RGB with values in 0..255; errors name the argument `name`."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (H, W, 3) RGB, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3) RGB, got {image.shape}")
    if image.dtype != np.uint8 and image.dtype.kind != "f":
        raise TypeError(f"{name} must be uint8 or float (0..255), got {image.dtype}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"{name} must not be empty, got shape {image.shape}")
    if image.dtype.kind == "f":
        lo, hi = float(np.min(image)), float(np.max(image))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
            raise ValueError(f"{name} values must be finite and in 0..255, got a {image.dtype} image spanning "
                             f"{lo} .. {hi}")
        if 0 < hi <= 1:
            raise ValueError(f"{name} values must be in 0..255, got a {image.dtype} image with maximum {hi}: it looks "
                             "scaled to 0..1 (multiply by 255, or pass uint8)")
    return image


def _compiled():
    return compiled()


def _dtype_name(dtype: Any) -> str:
    """'float32' or 'float16' from a numpy / torch dtype or a name."""
    name = str(dtype)
    if name.startswith("torch."):
        name = name[len("torch."):]
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    if name in ("float", "float32"):
        return "float32"
    if name in ("half", "float16"):
        return "float16"
    raise TypeError(f"dtype must be float32 or float16, got {dtype!r}")


def _image_list(images: Any) -> list[Any]:
    """images as a list: a list/tuple as it is, one (H, W, 3) array as [it], (N, H, W, 3) as N views."""
    if isinstance(images, (list, tuple)):
        return list(images)
    shape = getattr(images, "shape", None)
    if shape is None:
        raise TypeError(f"images must be a list of (H, W, 3) uint8 arrays or one array, got {type(images).__name__}")
    if len(shape) == 3:
        return [images]
    if len(shape) == 4:
        return [images[i] for i in range(shape[0])]
    raise ValueError(f"images must be (H, W, 3), (N, H, W, 3) or a list of (H, W, 3) arrays, got shape {tuple(shape)}")


def _on_device(x: Any) -> bool:
    if _is_torch(x):
        return bool(x.is_cuda)
    return hasattr(x, "__cuda_array_interface__")


def crop_normalize(images: Any, image_index: Any, affines: Any, size: int = INPUT_SIZE, flip: Any = False,
                   dtype: Any = None, out: Any = None, threads: int | None = None, stream: int | None = None, *,
                   round_pixels: bool = False, mean: Sequence[float] = PIXEL_MEAN, std: Sequence[float] = PIXEL_STD,
                   isa: str = "auto") -> Any:
    """Crop, warp and normalise P people into the network input (P, 3, size, size), one pass.

    Args:
        images: (H, W, 3) uint8 RGB images, any sizes: a list, one (H, W, 3) array or an
            (N, H, W, 3) array; numpy arrays or CPU torch tensors (CPU kernel), or CUDA torch
            tensors, cupy arrays, __cuda_array_interface__ objects or DeviceArray(ptr, (H, W, 3),
            "uint8") (GPU kernel). Rows may be strided (views of larger images); host arrays
            with another layout are copied, device arrays must have (row, 3, 1) byte strides.
            Float host images (0..255) take the cv2 path.
        image_index: (P,) integer index into images of each person (None: every person from
            the only image).
        affines: (P, 2, 3) maps image px -> crop px (geometry.crop_matrices), read on the host.
        size: S, the crop side.
        flip: mirror the crops horizontally (the flip test): a bool, or (P,) bools per person.
        dtype: float32 or float16 output (numpy / torch dtype or name); default: out's dtype,
            else float32.
        out: (P, 3, S, S) C-contiguous buffer to write into, beside the images (host array for
            host images, device array for device images); must not overlap them.
        threads: CPU threads (None or 0: all cores).
        stream: CUDA stream handle (int); default: the images' library's current stream.
        round_pixels: round each sample to an integer grey level before normalising, as the
            uint8 result of cv2.warpAffine is (crops equal to cv2 + NumPy's but for rare ties).
        mean, std: per-channel normalisation on 0..255 values (default spec.PIXEL_MEAN/STD).
        isa: CPU kernel, 'auto', 'avx512', 'avx2' or 'portable' (tests and benchmarks).
    Returns:
        out, or a new (P, 3, S, S) array in the images' library and on their device.
    Raises:
        ValueError, TypeError: naming the argument and what is allowed.
        RuntimeError: device images with the extension built without CUDA.
    """
    imgs = _image_list(images)
    if image_index is None:
        if len(imgs) != 1:
            raise ValueError(f"image_index may be left out only with one image, got {len(imgs)} images")
        n_aff = np.shape(affines)[0] if np.ndim(affines) == 3 else 1
        image_index = np.zeros(n_aff, np.int64)
    checks.integer("size", size, error=TypeError)
    name = None if dtype is None else _dtype_name(dtype)
    if threads is None:
        threads = 0
    checks.integer("threads", threads, error=TypeError, hint="0: one per core")
    flip_arg = _flip_arg(flip)
    if not isinstance(round_pixels, (bool, np.bool_)):
        raise TypeError(f"round_pixels must be a bool, got {round_pixels!r}")
    index = _host(image_index)
    aff = _host(affines)
    if np.size(index) == 0 and np.size(aff) == 0:  # no people: an empty (0, 3, S, S) result
        index, aff = np.zeros(0, np.int64), np.zeros((0, 2, 3))
    if imgs and _on_device(imgs[0]):
        return crop_device(imgs, index, aff, int(size), flip_arg, name, out, stream, mean, std, bool(round_pixels))
    if any(_on_device(im) for im in imgs):
        raise ValueError("images must all be on the host or all on the GPU")
    return _crop_host(imgs, index, aff, int(size), flip_arg, name, out, int(threads), mean, std, isa,
                      bool(round_pixels))


def _flip_arg(flip: Any) -> Any:
    if isinstance(flip, (bool, np.bool_)):
        return bool(flip)
    arr = np.asarray(_host(flip))
    if arr.dtype != np.bool_:
        raise TypeError(f"flip must be a bool or a bool array of shape (P,), got {arr.dtype}")
    return arr


def _host(x: Any) -> Any:
    """A host array-like (torch / cupy arrays are copied to the host)."""
    if _is_torch(x):
        return x.detach().cpu().numpy()
    if _is_cupy(x):
        return x.get()
    return x


def _host_image(im: Any, i: int) -> np.ndarray:
    if _is_torch(im):
        im = im.detach().numpy()
    if not isinstance(im, np.ndarray):
        raise TypeError(f"images[{i}] must be a numpy array or torch tensor (H, W, 3), got {type(im).__name__}")
    if im.ndim == 3 and im.dtype == np.uint8 and im.shape[2] == 3 and min(im.shape[:2]) > 0:
        if im.strides[1:] != (3, 1) or im.strides[0] < 3 * im.shape[1]:
            log.debug("images[%d] with strides %s copied to interleaved RGB rows", i, im.strides)
            im = np.ascontiguousarray(im)
    return im


def _crop_host(imgs: list[Any], index: Any, affines: Any, size: int, flip: Any, dtype: str | None, out: Any,
               threads: int, mean: Sequence[float], std: Sequence[float], isa: str, round_pixels: bool) -> Any:
    host = [_host_image(im, i) for i, im in enumerate(imgs)]
    torch_io = bool(imgs) and _is_torch(imgs[0])
    np_out = out
    if out is not None and _is_torch(out):
        if out.is_cuda:
            raise TypeError("out is on the GPU while images are on the host: pass a host array (or device images)")
        np_out = out.detach().numpy()
    elif out is not None and not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array or a CPU torch tensor like the images, got {type(out).__name__}")
    lib = _compiled()
    if lib is None or any(im.dtype != np.uint8 for im in host):
        res = _crop_fallback(host, index, affines, size, flip, dtype, np_out, mean, std, round_pixels,
                             warn=lib is None)
    else:
        res = lib.crop_host(host, index, affines, size=size, flip=flip, mean=mean, std=std, out=np_out, dtype=dtype,
                            round_pixels=round_pixels, threads=threads, isa=isa)
    if out is not None:
        return out
    if torch_io:
        import torch

        return torch.from_numpy(res)
    return res


# -------------------------------------------------------------------------------------------------
# Fallback without the compiled extension (and for float images): cv2.warpAffine + NumPy.
# -------------------------------------------------------------------------------------------------

def _check_fallback_args(images: list[np.ndarray], index: Any, affines: Any, size: int, flip: Any, dtype: str | None,
                         out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:

    for i, im in enumerate(images):
        check_image(im, f"images[{i}]")
    idx = np.asarray(index)
    if idx.dtype.kind not in "iu":
        raise TypeError("image_index must be an integer array of shape (P,)")
    if idx.ndim != 1:
        raise ValueError(f"image_index must have shape (P,), got {idx.ndim} dimensions")
    p = len(idx)
    try:
        aff = np.asarray(affines, np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"affines must be a numeric array of shape ({p}, 2, 3)") from None
    if aff.shape != (p, 2, 3):
        raise ValueError(f"affines must have shape ({p}, 2, 3), got {aff.shape}")
    if not np.isfinite(aff).all():
        raise ValueError("affines must be finite")
    if not 1 <= size <= 16384:
        raise ValueError(f"size must be an integer in 1..16384, got {size}")
    for i, k in enumerate(idx):
        if not 0 <= k < len(images):
            raise ValueError(f"image_index[{i}] = {k} is not an index of the {len(images)} images")
    flips = np.broadcast_to(np.asarray(flip, bool), (p,)) if isinstance(flip, bool) else flip
    if flips.shape != (p,):
        raise ValueError(f"flip must have shape ({p},), got {flips.shape}")
    name = dtype or ("float32" if out is None else _dtype_name(out.dtype))
    if out is not None:
        if out.shape != (p, 3, size, size):
            raise ValueError(f"out must have shape ({p}, 3, {size}, {size}) (P, 3, size, size), got {out.shape}")
        if _dtype_name(out.dtype) != name:
            raise ValueError(f"dtype='{name}' does not match out's dtype {out.dtype}")
    return idx, aff, flips, name


def _inverse(m: np.ndarray) -> np.ndarray:
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    if det == 0 or not np.isfinite(1.0 / det):
        raise ValueError(f"affine map {m.tolist()} is not invertible")
    a = np.array([[m[1, 1], -m[0, 1]], [-m[1, 0], m[0, 0]]]) / det
    return np.column_stack([a, -a @ m[:, 2]])


def _warp_numpy(image: np.ndarray, inv: np.ndarray, size: int) -> np.ndarray:
    """Bilinear warp (crop px -> image px map `inv`), black border, float64 (S, S, 3)."""
    h, w = image.shape[:2]
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    x = np.clip(inv[0, 0] * u + inv[0, 1] * v + inv[0, 2], -2, w)
    y = np.clip(inv[1, 0] * u + inv[1, 1] * v + inv[1, 2], -2, h)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    res = np.zeros((size, size, 3))
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            tap = np.zeros((size, size, 3))
            tap[ok] = image[yy[ok], xx[ok]]
            res += wy * wx * tap
    return res


def _warp_one(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """cv2.warpAffine of the part of `image` the crop reads (float32 (S, S, 3))."""
    import cv2

    inv = _inverse(m)
    corners = inv @ np.array([[0, size - 1, 0, size - 1], [0, 0, size - 1, size - 1], [1, 1, 1, 1]], np.float64)
    h, w = image.shape[:2]
    x_lo = int(np.clip(np.floor(corners[0].min()) - 1, 0, w))
    x_hi = int(np.clip(np.floor(corners[0].max()) + 3, 0, w))
    y_lo = int(np.clip(np.floor(corners[1].min()) - 1, 0, h))
    y_hi = int(np.clip(np.floor(corners[1].max()) + 3, 0, h))
    if x_hi <= x_lo or y_hi <= y_lo:
        return np.zeros((size, size, 3), np.float32)
    sub = image[y_lo:y_hi, x_lo:x_hi]
    shifted = m.copy()
    shifted[:, 2] += m[:, :2] @ np.array([x_lo, y_lo], np.float64)
    if sub.shape[0] * sub.strides[0] > _CV2_MAX_BYTES or max(sub.shape[:2]) > _CV2_MAX_SIDE:
        inv_sub = inv.copy()
        inv_sub[:, 2] -= (x_lo, y_lo)
        return _warp_numpy(sub, inv_sub, size).astype(np.float32)
    if sub.dtype != np.uint8 and sub.dtype != np.float32:
        sub = sub.astype(np.float32)
    crop = cv2.warpAffine(sub, shifted, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))
    return crop.astype(np.float32)


def _crop_fallback(images: list[np.ndarray], index: Any, affines: Any, size: int, flip: Any, dtype: str | None,
                   out: np.ndarray | None, mean: Sequence[float], std: Sequence[float], round_pixels: bool,
                   warn: bool) -> np.ndarray:
    """The crop_normalize contract with cv2.warpAffine (uint8 results are rounded to integers:
    round_pixels holds for them either way)."""
    global _warned_fallback
    if warn and not _warned_fallback:
        log.warning("cnpose_trt._C is not built: cropping with cv2 + NumPy (slow)")
        _warned_fallback = True
    idx, aff, flips, name = _check_fallback_args(images, index, affines, size, flip, dtype, out)
    mean_a = np.asarray(mean, np.float32).reshape(3)
    inv_std = (1.0 / np.asarray(std, np.float64)).astype(np.float32).reshape(3)
    res = np.empty((len(idx), 3, size, size), name) if out is None else out
    for p, (k, m) in enumerate(zip(idx, aff, strict=True)):
        crop = _warp_one(images[k], m, size)
        if round_pixels:
            crop = np.rint(crop)
        if flips[p]:
            crop = crop[:, ::-1]
        res[p] = ((crop - mean_a) * inv_std).transpose(2, 0, 1)
    return res

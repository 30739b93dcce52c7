"""cnpose_trt._C: the compiled kernels of csrc/, the fused soft-argmax decode and the fused
crop-and-normalise. Use cnpose_trt.decode() and cnpose_trt.cropping.crop_normalize() normally.

Contract (csrc/decode/softargmax.h): heatmaps (N, J*D, H, W), C-contiguous, float32 / float16 /
bfloat16. For image n and joint j the D*H*W logits form one softmax p; the decode writes a
float32 (N, J, 10) array per joint:
    [0:3] x, y, z in heatmap cells (expectations of w, h, d; 0-based)
    [3]   confidence = max p = 1 / sum(exp(logit - max))
    [4:7] x_px, y_px, depth_mm   (with boxes; depth root-relative without root_depth; else NaN)
    [7:10] X, Y, Z camera mm     (with intrinsics; else NaN)
One pass over the data (streaming softmax). A joint whose volume holds NaN or +inf, or only
-inf, decodes to NaN. Every argument is validated before any pointer is touched: ValueError
for shapes and values, TypeError for types.

Crop contract (csrc/crop/crop.h): person p is cut from images[image_index[p]] (uint8 RGB, HWC) with
the inverse of affines[p] (image px -> crop px): out[p, c, v, u] = (bilinear sample of channel
c at M^-1 (u', v), black outside - mean[c]) / std[c], u' = S - 1 - u when flipped; the sample
convention of cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT 0), in floating point.

CPU threads: 0 means one per processor; at most 4 per processor and one per work item; a
thread the system refuses means fewer threads (the calling thread always works), never an
abort.
"""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

OUT_FIELDS: int
built_with_cuda: bool
MAX_FLIP_JOINTS_CUDA: int
MAX_CROP_SIZE: int

def cpu_has_avx2() -> bool:
    """Whether the AVX2+FMA+F16C kernel runs on this processor."""

def cpu_has_avx512() -> bool:
    """Whether the AVX-512 (F, BW, VL) kernel runs on this processor."""

def cpu_isa() -> str:
    """The kernel decode_host uses with isa='auto': 'avx512', 'avx2' or 'portable'."""

def hardware_threads() -> int:
    """Processors the CPU kernels count with threads=0."""

def _set_thread_spawn_limit(n: int) -> None:
    """Testing only: the CPU kernels may create n more threads, then creation fails as a
    refusing system's would (-1: no limit)."""

def cuda_device_count() -> int:
    """Visible CUDA devices (0 when built without CUDA or without a driver)."""

def cuda_pointer_device(ptr: int) -> int:
    """Device ordinal of a CUDA device pointer. ValueError for host pointers; RuntimeError
    when built without CUDA."""

def memory_read_probe(buf: npt.NDArray[np.generic], threads: int = 0) -> int:
    """Sum a C-contiguous buffer as 64-bit words on `threads` threads (0: all cores): the
    memory read bandwidth reference of the benchmarks."""

def decode_host(
    heatmaps: npt.NDArray[np.generic],
    joints: int = 18,
    depth_dim: int | None = None,
    *,
    flipped: npt.NDArray[np.generic] | None = None,
    flip_perm: Sequence[int] | None = None,
    boxes: npt.ArrayLike | None = None,
    root_depth: npt.ArrayLike | None = None,
    intrinsics: npt.ArrayLike | None = None,
    out: npt.NDArray[np.float32] | None = None,
    depth_range_mm: float = 2000.0,
    threads: int = 0,
    isa: str = "auto",
) -> npt.NDArray[np.float32]:
    """Decode host heatmaps into a float32 (N, J, 10) array (`out` if given), GIL released.

    heatmaps (and out) must be in the machine's byte order; out must not overlap any input;
    depth_range_mm must fit float32.

    flipped: heatmaps of the mirrored crops, with flip_perm (J,) the permutation that swaps
    left and right joints; the result averages both (x -> W - 1 - x for the flipped ones).
    boxes (N, 4) x, y, w, h; root_depth (N,) mm; intrinsics (N, 4) fx, fy, cx, cy (need boxes).
    isa: 'auto', 'avx512', 'avx2' or 'portable' (ValueError if the processor lacks it).
    """

def decode_device(
    heatmaps: int,
    shape: Sequence[int],
    dtype: str,
    joints: int = 18,
    depth_dim: int | None = None,
    *,
    out: int,
    flipped: int = 0,
    flip_perm: Sequence[int] | None = None,
    boxes: int = 0,
    root_depth: int = 0,
    intrinsics: int = 0,
    stream: int = 0,
    depth_range_mm: float = 2000.0,
) -> None:
    """Enqueue the decode of device heatmaps on `stream`: raw device pointers (int), shape
    (N, J*D, H, W), dtype 'float32' | 'float16' | 'bfloat16'; out is a float32 (N, J, 10)
    device buffer; boxes/root_depth/intrinsics are float32 device buffers or 0. No host sync.
    All buffers must be device memory on one GPU (ValueError otherwise), out must not overlap
    the inputs. RuntimeError when built without CUDA."""

def crop_host(
    images: Sequence[npt.NDArray[np.uint8]],
    image_index: npt.ArrayLike,
    affines: npt.ArrayLike,
    *,
    size: int = 256,
    flip: bool | npt.ArrayLike = False,
    mean: npt.ArrayLike,
    std: npt.ArrayLike,
    out: npt.NDArray[np.floating] | None = None,
    dtype: str | None = None,
    round_pixels: bool = False,
    threads: int = 0,
    isa: str = "auto",
) -> npt.NDArray[np.floating]:
    """Crop, warp and normalise people from host images into (P, 3, size, size), GIL released.

    images: list of (H, W, 3) uint8 RGB arrays, byte strides (row, 3, 1) with row >= 3 * W
    (views of larger images are fine; any size, 64-bit offsets). image_index (P,) integers;
    affines (P, 2, 3) image px -> crop px (invertible; crop corners within 2^30 px); flip a
    bool or (P,) bools; mean, std (3,) on 0..255 values; out float32/float16 (P, 3, S, S),
    C-contiguous, not overlapping the images (else allocated with dtype, default float32).
    round_pixels: round each sample to an integer grey level (half to even) before normalising,
    as cv2.warpAffine's uint8 result is.
    isa: 'auto', 'avx512', 'avx2' or 'portable' (ValueError if the processor lacks it).
    """

def crop_device(
    image_ptrs: Sequence[int],
    image_hw: Sequence[tuple[int, int]],
    row_strides: Sequence[int],
    image_index: npt.ArrayLike,
    affines: npt.ArrayLike,
    *,
    size: int = 256,
    flip: bool | npt.ArrayLike = False,
    mean: npt.ArrayLike,
    std: npt.ArrayLike,
    out: int,
    out_dtype: str = "float32",
    round_pixels: bool = False,
    stream: int = 0,
) -> None:
    """Enqueue the crop of device uint8 RGB images (raw pointers, heights and widths, row
    strides in bytes) into a float32/float16 (P, 3, size, size) device buffer on `stream`. The
    people travel in the launch parameters (host image_index, affines, flip): no device
    allocation, no host sync. RuntimeError when built without CUDA."""

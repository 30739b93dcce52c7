"""cnpose_trt._C: the compiled fused soft-argmax decode (csrc/). Use cnpose_trt.decode() normally.

Contract (csrc/softargmax.h): heatmaps (N, J*D, H, W), C-contiguous, float32 / float16 /
bfloat16. For image n and joint j the D*H*W logits form one softmax p; the decode writes a
float32 (N, J, 10) array per joint:
    [0:3] x, y, z in heatmap cells (expectations of w, h, d; 0-based)
    [3]   confidence = max p = 1 / sum(exp(logit - max))
    [4:7] x_px, y_px, depth_mm   (with boxes; depth root-relative without root_depth; else NaN)
    [7:10] X, Y, Z camera mm     (with intrinsics; else NaN)
One pass over the data (streaming softmax). A joint whose volume holds NaN or +inf, or only
-inf, decodes to NaN. Every argument is validated before any pointer is touched: ValueError
for shapes and values, TypeError for types.
"""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

OUT_FIELDS: int
built_with_cuda: bool
MAX_FLIP_JOINTS_CUDA: int

def cpu_has_avx2() -> bool:
    """Whether the AVX2+FMA+F16C kernel runs on this processor."""

def cpu_has_avx512() -> bool:
    """Whether the AVX-512 (F, BW, VL) kernel runs on this processor."""

def cpu_isa() -> str:
    """The kernel decode_host uses with isa='auto': 'avx512', 'avx2' or 'portable'."""

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
    All buffers must be device memory on one GPU (ValueError otherwise). RuntimeError when
    built without CUDA."""

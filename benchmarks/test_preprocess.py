"""Preprocessing throughput (people/s): the fused crop-and-normalise kernel vs the cv2 + NumPy path
(cnpose_trt.io.preprocess.crop_people: cv2.warpAffine per person, then normalise and transpose in
NumPy), measured in the same run.

    python -m pytest benchmarks/test_preprocess.py --benchmark-only              # CPU (and GPU if present)
    python -m pytest benchmarks/test_preprocess.py -k cuda --benchmark-only      # GPU only

One call crops CNPOSE_BENCH_PEOPLE people (default 16) of typical sizes (boxes of 150-700 px,
crops 1.25x larger) from one 1920x1080 RGB image into (P, 3, 256, 256) float32. CPU: every
kernel is forced with the ISA switch (portable, AVX2, AVX-512 where the processor has it)
besides the auto-picked one, all threads for every contender (cv2 uses its own pool, the
fused kernel threads=0). GPU: the fused CUDA kernel with the image already on the device and
with its upload included, against the cv2 + NumPy host path followed by the upload of its
result (what a GPU pipeline without the kernel does); 20 calls per timed round.
The summary's img/s column is people/s here. CNPOSE_BENCH_THREADS=N runs every CPU contender on N
threads (cv2.setNumThreads(N) for the baseline; default: all cores); with N=1 everything runs on the
calling thread and `--benchmark-timer time.thread_time` measures CPU time (robust on a shared machine).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import compiled_or_skip as _C
from conftest import cuda_or_skip as _cuda

from cnpose_trt.ops.cropping import crop_normalize
from cnpose_trt.ops.geometry import crop_matrices

PEOPLE = int(os.environ.get("CNPOSE_BENCH_PEOPLE", "16"))
ROUNDS = int(os.environ.get("CNPOSE_BENCH_ROUNDS", "7"))
SIZE = 256
INNER = 20
THREADS = int(os.environ.get("CNPOSE_BENCH_THREADS", "0"))  # 0: all cores
ISAS = ["portable", "avx2", "avx512"]


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(1080, 1920, 3) uint8 image, (P, 4) square crop boxes, (P, 2, 3) crop maps."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    side = rng.uniform(150, 700, PEOPLE) * 1.25
    boxes = np.column_stack([rng.uniform(-100, 1920 - side / 2), rng.uniform(-100, 1080 - side / 2), side, side])
    return image, boxes, crop_matrices(boxes, SIZE)


# ----------------------------------------------------------------------------------------- CPU

GROUP_CPU = f"preprocess-cpu-P{PEOPLE}-S{SIZE}"


def test_cpu_cv2_numpy(benchmark):
    import cv2

    from cnpose_trt.io.preprocess import crop_people

    if THREADS:
        cv2.setNumThreads(THREADS)
    image, boxes, _ = _scene()
    benchmark.group = GROUP_CPU
    benchmark.extra_info.update(role="baseline", backend=f"cv2.warpAffine + NumPy ({cv2.getNumThreads()} thr)",
                                images=PEOPLE)
    out = benchmark.pedantic(crop_people, args=(image, boxes, SIZE), rounds=ROUNDS, warmup_rounds=1)
    assert out.shape == (PEOPLE, 3, SIZE, SIZE)


@pytest.mark.parametrize("dtype, round_pixels", [("float32", False), ("float16", False), ("float32", True)])
def test_cpu_fused(benchmark, dtype, round_pixels):
    lib = _C()
    image, _, mats = _scene()
    out = np.empty((PEOPLE, 3, SIZE, SIZE), dtype)
    benchmark.group = GROUP_CPU
    benchmark.extra_info.update(role="candidate", images=PEOPLE,
                                backend=f"fused-cpu-{lib.cpu_isa()}-{dtype}{'-round' if round_pixels else ''}")
    benchmark.pedantic(crop_normalize, args=(image, None, mats, SIZE),
                       kwargs={"out": out, "round_pixels": round_pixels, "threads": THREADS}, rounds=ROUNDS,
                       warmup_rounds=1)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_fused_isa(benchmark, isa):
    """Each kernel forced with the ISA switch (an AVX-512 machine also measures its AVX2 kernel)."""
    lib = _C()
    if isa != "portable" and not getattr(lib, f"cpu_has_{isa}")():
        pytest.skip(f"this processor lacks {isa}")
    image, _, mats = _scene()
    out = np.empty((PEOPLE, 3, SIZE, SIZE), np.float32)
    benchmark.group = GROUP_CPU
    benchmark.extra_info.update(role="candidate", backend=f"fused-cpu-{isa}-float32 (forced)", images=PEOPLE,
                                isa=isa)
    benchmark.pedantic(crop_normalize, args=(image, None, mats, SIZE),
                       kwargs={"out": out, "isa": isa, "threads": THREADS}, rounds=ROUNDS, warmup_rounds=1)
    assert np.isfinite(out).all()


# ----------------------------------------------------------------------------------------- GPU

def _timed(torch, fn):
    """One benchmark round = INNER calls then a sync; reported per call via images."""
    def run():
        for _ in range(INNER):
            fn()
        torch.cuda.synchronize()
    return run


GROUP_GPU = f"preprocess-cuda-P{PEOPLE}-S{SIZE}"


@pytest.mark.cuda
def test_cuda_cv2_numpy_then_upload(benchmark):
    torch = _cuda()
    import cv2

    from cnpose_trt.io.preprocess import crop_people

    image, boxes, _ = _scene()
    dst = torch.empty(PEOPLE, 3, SIZE, SIZE, device="cuda")
    pinned = torch.empty(PEOPLE, 3, SIZE, SIZE).pin_memory()

    def host_path():
        pinned.numpy()[...] = crop_people(image, boxes, SIZE)
        dst.copy_(pinned, non_blocking=True)

    benchmark.group = GROUP_GPU
    benchmark.extra_info.update(role="baseline", images=PEOPLE * INNER,
                                backend=f"cv2 + NumPy + upload ({cv2.getNumThreads()} thr)")
    benchmark.pedantic(_timed(torch, host_path), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_fused(benchmark, dtype):
    torch = _cuda()
    image, _, mats = _scene()
    dev = torch.from_numpy(image).cuda()
    out = torch.empty(PEOPLE, 3, SIZE, SIZE, device="cuda", dtype=getattr(torch, dtype))
    benchmark.group = GROUP_GPU
    benchmark.extra_info.update(role="candidate", backend=f"fused-cuda-{dtype} (image on device)",
                                images=PEOPLE * INNER)
    benchmark.pedantic(_timed(torch, lambda: crop_normalize(dev, None, mats, SIZE, out=out)), rounds=ROUNDS,
                       warmup_rounds=1)
    assert torch.isfinite(out).all()


@pytest.mark.cuda
def test_cuda_fused_with_upload(benchmark):
    torch = _cuda()
    image, _, mats = _scene()
    pinned = torch.from_numpy(image).pin_memory()
    dev = torch.empty_like(pinned, device="cuda")
    out = torch.empty(PEOPLE, 3, SIZE, SIZE, device="cuda")

    def upload_and_crop():
        dev.copy_(pinned, non_blocking=True)
        crop_normalize(dev, None, mats, SIZE, out=out)

    benchmark.group = GROUP_GPU
    benchmark.extra_info.update(role="candidate", backend="fused-cuda-float32 + image upload",
                                images=PEOPLE * INNER)
    benchmark.pedantic(_timed(torch, upload_and_crop), rounds=ROUNDS, warmup_rounds=1)

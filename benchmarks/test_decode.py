"""Decode throughput per head configuration: fused single-pass kernel vs the PyTorch reference,
and as a share of the memory bandwidth measured in the same run.

    python -m pytest benchmarks/test_decode.py --benchmark-only            # CPU (and GPU if present)
    CNPOSE_BENCH_GPU_BATCH=64 python -m pytest benchmarks/test_decode.py -k cuda --benchmark-only

CPU: batch 8 (CNPOSE_BENCH_CPU_BATCH); the bandwidth reference reads an equally large buffer
with as many threads as the decode uses. CNPOSE_BENCH_THREADS=N runs every contender on N
threads (default: all cores); with N=1 everything runs on the calling thread, so
`--benchmark-timer time.thread_time` measures CPU time, which a shared machine's other
processes do not inflate the way they inflate wall time. Besides the kernel picked for the processor, each
kernel in CNPOSE_BENCH_ISAS (default avx2,avx512) is forced with the ISA switch, so an AVX-512
machine also measures the AVX2 kernel that AVX2-only processors run. GPU: batch 64 (CNPOSE_BENCH_GPU_BATCH); the
bandwidth reference is a device-to-device copy of an equally large buffer (read + write).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import compiled_or_skip as _C
from conftest import cuda_or_skip as _cuda

from cnpose_trt.ops.decoding import decode, soft_argmax_torch

CPU_BATCH = int(os.environ.get("CNPOSE_BENCH_CPU_BATCH", "8"))
THREADS = int(os.environ.get("CNPOSE_BENCH_THREADS", "0"))  # 0: all cores
GPU_BATCH = int(os.environ.get("CNPOSE_BENCH_GPU_BATCH", "64"))
HEADS = {"2UP-D32": (32, 32), "3UP-D64": (64, 64)}  # heatmap config: (D, H=W); XS/S and M/L
HEAD_LIST = os.environ.get("CNPOSE_BENCH_HEADS", ",".join(HEADS)).split(",")
ROUNDS = int(os.environ.get("CNPOSE_BENCH_ROUNDS", "7"))
# Forced kernels measured besides the auto-picked one (CNPOSE_BENCH_ISAS=avx2,portable to add the portable one).
ISAS = os.environ.get("CNPOSE_BENCH_ISAS", "avx2,avx512").split(",")
JOINTS = 18


def _heatmaps(head: str, batch: int) -> np.ndarray:
    d, s = HEADS[head]
    return (np.random.default_rng(0).standard_normal((batch, JOINTS * d, s, s)) * 3).astype(np.float32)


# ----------------------------------------------------------------------------------------- CPU

@pytest.mark.parametrize("head", HEAD_LIST)
def test_cpu_torch_reference(benchmark, head):
    torch = pytest.importorskip("torch")
    if THREADS:
        torch.set_num_threads(THREADS)
    hm = torch.from_numpy(_heatmaps(head, CPU_BATCH))
    benchmark.group = f"decode-cpu-{head}-b{CPU_BATCH}"
    benchmark.extra_info.update(role="baseline", backend=f"torch-ref-fp32 ({torch.get_num_threads()} thr)",
                                images=CPU_BATCH, bytes=hm.numel() * 4)
    with torch.inference_mode():
        benchmark.pedantic(soft_argmax_torch, args=(hm, JOINTS), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("head", HEAD_LIST)
def test_cpu_fused(benchmark, head, dtype):
    lib = _C()
    hm = _heatmaps(head, CPU_BATCH).astype(dtype)
    benchmark.group = f"decode-cpu-{head}-b{CPU_BATCH}"
    isa = lib.cpu_isa()
    benchmark.extra_info.update(role="candidate", backend=f"fused-cpu-{isa}-{dtype}", images=CPU_BATCH,
                                bytes=hm.nbytes)
    res = benchmark.pedantic(decode, args=(hm, JOINTS), kwargs={"threads": THREADS}, rounds=ROUNDS, warmup_rounds=1)
    assert np.isfinite(res.cells).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("head", HEAD_LIST)
def test_cpu_fused_isa(benchmark, head, isa):
    """Each kernel forced with the ISA switch (an AVX-512 machine also measures its AVX2 kernel)."""
    lib = _C()
    if isa != "portable" and not getattr(lib, f"cpu_has_{isa}")():
        pytest.skip(f"this processor lacks {isa}")
    hm = _heatmaps(head, CPU_BATCH)
    benchmark.group = f"decode-cpu-{head}-b{CPU_BATCH}"
    benchmark.extra_info.update(role="candidate", backend=f"fused-cpu-{isa}-float32 (forced)", images=CPU_BATCH,
                                bytes=hm.nbytes, isa=isa)
    out = benchmark.pedantic(lib.decode_host, args=(hm, JOINTS), kwargs={"isa": isa, "threads": THREADS},
                             rounds=ROUNDS, warmup_rounds=1)
    assert np.isfinite(out[..., :4]).all()


# Arithmetic rate without the memory: one 64x64x64 joint volume (1 MB, it stays in L2) decoded
# 20 times per round. On a shared machine whose memory bus is saturated by other work, the
# batch groups above run at the read rate whatever the kernel does; this one still separates them.
IN_CACHE_GROUP = "decode-cpu-in-cache-1MB-x20"


def test_cpu_in_cache_torch_reference(benchmark):
    torch = pytest.importorskip("torch")
    if THREADS:
        torch.set_num_threads(THREADS)
    hm = torch.from_numpy(_heatmaps("3UP-D64", 1)[:, :64].copy())
    benchmark.group = IN_CACHE_GROUP
    benchmark.extra_info.update(role="baseline", backend=f"torch-ref-fp32 ({torch.get_num_threads()} thr)",
                                images=20, bytes=hm.numel() * 4 * 20)
    with torch.inference_mode():
        benchmark.pedantic(lambda: [soft_argmax_torch(hm, 1) for _ in range(20)], rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_in_cache(benchmark, isa):
    lib = _C()
    if isa != "portable" and not getattr(lib, f"cpu_has_{isa}")():
        pytest.skip(f"this processor lacks {isa}")
    hm = _heatmaps("3UP-D64", 1)[:, :64].copy()
    benchmark.group = IN_CACHE_GROUP
    benchmark.extra_info.update(role="candidate", backend=f"fused-cpu-{isa}-float32 (forced)", images=20,
                                bytes=hm.nbytes * 20, isa=isa)
    benchmark.pedantic(lambda: [lib.decode_host(hm, 1, isa=isa, threads=THREADS) for _ in range(20)],
                       rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("head", HEAD_LIST)
def test_cpu_read_bandwidth(benchmark, head):
    lib = _C()
    buf = _heatmaps(head, CPU_BATCH)
    benchmark.group = f"decode-cpu-{head}-b{CPU_BATCH}"
    benchmark.extra_info.update(role="bandwidth", backend=f"memory read ({THREADS or os.cpu_count()} thr)",
                                images=CPU_BATCH, bytes=buf.nbytes)
    benchmark.pedantic(lib.memory_read_probe, args=(buf, THREADS), rounds=ROUNDS, warmup_rounds=1)


# ----------------------------------------------------------------------------------------- GPU

def _timed(torch, fn, inner: int = 20):
    """One benchmark round = `inner` launches then a sync; reported per launch via images."""
    def run():
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()
    return run


INNER = 20


@pytest.mark.cuda
@pytest.mark.parametrize("head", HEAD_LIST)
def test_cuda_torch_reference(benchmark, head):
    torch = _cuda()
    hm = torch.from_numpy(_heatmaps(head, GPU_BATCH)).cuda()
    benchmark.group = f"decode-cuda-{head}-b{GPU_BATCH}"
    benchmark.extra_info.update(role="baseline", backend="torch-ref-fp32 (cuda)", images=GPU_BATCH * INNER,
                                bytes=hm.numel() * 4 * INNER)
    with torch.inference_mode():
        benchmark.pedantic(_timed(torch, lambda: soft_argmax_torch(hm, JOINTS), INNER), rounds=ROUNDS,
                           warmup_rounds=1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("head", HEAD_LIST)
def test_cuda_fused(benchmark, head, dtype):
    torch = _cuda()
    hm = torch.from_numpy(_heatmaps(head, GPU_BATCH)).cuda().to(getattr(torch, dtype))
    out = torch.empty(GPU_BATCH, JOINTS, 10, device="cuda")
    benchmark.group = f"decode-cuda-{head}-b{GPU_BATCH}"
    benchmark.extra_info.update(role="candidate", backend=f"fused-cuda-{dtype}", images=GPU_BATCH * INNER,
                                bytes=hm.numel() * hm.element_size() * INNER)
    benchmark.pedantic(_timed(torch, lambda: decode(hm, JOINTS, out=out), INNER), rounds=ROUNDS, warmup_rounds=1)
    assert torch.isfinite(out[..., :4]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("head", HEAD_LIST)
def test_cuda_copy_bandwidth(benchmark, head):
    torch = _cuda()
    src = torch.from_numpy(_heatmaps(head, GPU_BATCH)).cuda()
    dst = torch.empty_like(src)
    benchmark.group = f"decode-cuda-{head}-b{GPU_BATCH}"
    benchmark.extra_info.update(role="bandwidth", backend="device-to-device copy (r+w)", images=GPU_BATCH * INNER,
                                bytes=2 * src.numel() * 4 * INNER)
    benchmark.pedantic(_timed(torch, lambda: dst.copy_(src), INNER), rounds=ROUNDS, warmup_rounds=1)

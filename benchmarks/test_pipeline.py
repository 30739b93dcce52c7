"""Throughput and latency per head configuration: engine only, preprocessing only, end to end.

    python -m pytest benchmarks/test_pipeline.py --benchmark-only
    CNPOSE_BENCH_VARIANTS=M CNPOSE_BENCH_BATCHES=8 python -m pytest benchmarks/test_pipeline.py --benchmark-only

Groups: engine-<head>-<variant>-b<N> and e2e-<head>-<variant>-b<N> (batch 1, 8 and 32 by
default), preprocess-b<N>. Baselines, measured in the same run: PyTorch eager (engine only), and
PyTorch eager plus the upstream soft-argmax and geometry (end to end: the way users of the
reference code run it). Candidates: the onnxruntime engine in fp32, fp16 and int8 (int8
calibrated on generated scenes: benchmarking only), the torch engine; on a GPU also torch
CUDA fp16, and TensorRT fp32/fp16/int8 where TensorRT is installed. Backends or precisions not
present here are skipped with the reason.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
from conftest import slowdown

from cnpose_trt import VARIANTS
from cnpose_trt.build.verify import accuracy_inputs

torch = pytest.importorskip("torch")
VARIANT_LIST = os.environ.get("CNPOSE_BENCH_VARIANTS", "XS,S,M,L").split(",")
BATCHES = [int(b) for b in os.environ.get("CNPOSE_BENCH_BATCHES", "1,8,32").split(",")]
ROUNDS = int(os.environ.get("CNPOSE_BENCH_ROUNDS", "3"))
CANDIDATES = ["onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8", "torch-fp32", "torch-cuda-fp16",
              "tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"]


@functools.cache
def scenes(batch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`batch` generated 480x640 images with one person each (one batch of people)."""
    from cnpose_trt.io.draw import demo_image

    img, box = demo_image()
    rng = np.random.default_rng(batch)
    images = [np.ascontiguousarray(np.roll(img, int(rng.integers(-60, 60)), axis=1)) for _ in range(batch)]
    return images, [np.asarray([box], np.float64) for _ in range(batch)]


@functools.cache
def engine_for(name: str, backend: str, precision: str, out_dir: str, max_batch: int):
    from cnpose_trt import build_engine, load_engine
    from cnpose_trt.backends.tensorrt import available as tensorrt_available

    if backend == "tensorrt" and not tensorrt_available():
        pytest.skip("TensorRT or a CUDA device is not present")
    if backend == "torch-cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device for the torch CUDA path")
        built = build_engine(name, backend="torch", precision=precision, out_dir=out_dir, max_batch=max_batch)
        return load_engine(built.path, device="cuda", cuda_graphs=True)
    kw = {"calib_synthetic": True, "calib_count": 16} if precision == "int8" else {}
    built = build_engine(name, backend=backend, precision=precision, out_dir=out_dir, max_batch=max_batch, **kw)
    return load_engine(built.path)


def upstream_predict(model, images, boxes):
    """The reference-code way: crops, PyTorch eager forward, PyTorch soft-argmax, NumPy geometry."""
    from cnpose_trt.io.preprocess import prepare
    from cnpose_trt.ops.decoding import soft_argmax_torch
    from cnpose_trt.ops.geometry import cells_to_image

    crops, crop_boxes = zip(*(prepare(img, b) for img, b in zip(images, boxes, strict=True)), strict=True)
    with torch.inference_mode():
        heat = model(torch.from_numpy(np.concatenate(crops)))
        cells, _ = soft_argmax_torch(heat, model.spec.joints, model.spec.depth_dim)
    s = model.spec
    return cells_to_image(cells.double().numpy(), np.concatenate(crop_boxes), (s.heatmap_size,) * 2, s.depth_dim)


def _group(kind: str, name: str, batch: int) -> str:
    return f"{kind}-{VARIANTS[name].head_tag}-{name}-b{batch}"


def _split(candidate: str) -> tuple[str, str]:
    backend, precision = candidate.rsplit("-", 1)
    return backend, precision


@pytest.mark.parametrize("batch", BATCHES)
def test_preprocess(benchmark, batch):
    from cnpose_trt.io.preprocess import prepare

    images, boxes = scenes(batch)
    benchmark.group = f"preprocess-b{batch}"
    benchmark.extra_info.update(role="candidate", backend="opencv warpAffine + normalise", images=batch)
    benchmark.pedantic(slowdown(lambda: [prepare(i, b) for i, b in zip(images, boxes, strict=True)]),
                       rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", VARIANT_LIST)
def test_engine_torch_eager_baseline(benchmark, name, batch):
    from cnpose_trt.nn.model import build_model

    with pytest.warns(UserWarning):
        model = build_model(name)
    x = torch.from_numpy(accuracy_inputs(VARIANTS[name], batch))
    benchmark.group = _group("engine", name, batch)
    benchmark.extra_info.update(role="baseline", backend="torch eager fp32", images=batch)

    def run():
        with torch.inference_mode():
            return model(x)

    benchmark.pedantic(slowdown(run), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", VARIANT_LIST)
def test_engine(benchmark, name, batch, candidate, bench_engine_dir):
    backend, precision = _split(candidate)
    engine = engine_for(name, backend, precision, str(bench_engine_dir), max(BATCHES))
    x = accuracy_inputs(VARIANTS[name], batch)  # real crops in upstream's input convention
    benchmark.group = _group("engine", name, batch)
    benchmark.extra_info.update(role="candidate", backend=f"{backend} {precision}", images=batch)
    benchmark.pedantic(slowdown(engine.infer), args=(x,), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", VARIANT_LIST)
def test_e2e_upstream_baseline(benchmark, name, batch):
    from cnpose_trt.nn.model import build_model

    with pytest.warns(UserWarning):
        model = build_model(name)
    images, boxes = scenes(batch)
    benchmark.group = _group("e2e", name, batch)
    benchmark.extra_info.update(role="baseline", backend="torch eager + ref soft-argmax", images=batch)
    out = benchmark.pedantic(slowdown(upstream_predict), args=(model, images, boxes), rounds=ROUNDS, warmup_rounds=1)
    assert out.shape == (batch, 18, 3)


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", VARIANT_LIST)
def test_e2e(benchmark, name, batch, candidate, bench_engine_dir):
    from cnpose_trt.pipeline.estimator import PoseEstimator

    backend, precision = _split(candidate)
    est = PoseEstimator(engine_for(name, backend, precision, str(bench_engine_dir), max(BATCHES)))
    images, boxes = scenes(batch)
    benchmark.group = _group("e2e", name, batch)
    est.predict(images, boxes)  # warm the thread pools' first use out of the timings
    est.timings.reset()
    res = benchmark.pedantic(slowdown(est.predict), args=(images, boxes), rounds=ROUNDS, warmup_rounds=1)
    shares = est.timings.shares()
    benchmark.extra_info.update(role="candidate", backend=f"PoseEstimator {backend} {precision}", images=batch,
                                stage_shares={k: round(v, 4) for k, v in shares.items()})
    assert len(res) == batch

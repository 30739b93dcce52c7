"""Batch jobs: `cnpose-trt batch` (local, and on a local Ray cluster) against PoseEstimator.predict_iter
alone on the same images already decoded, all in one run.

    python -m pytest benchmarks/test_batch.py --benchmark-only
    CNPOSE_BENCH_BATCH_IMAGES=96 python -m pytest benchmarks/test_batch.py --benchmark-only

Group batch-XS-cpu-n<N>: N generated 640x480 JPEG files with one person each, XS engine
(onnxruntime fp32, max batch 8). Baseline: predict_iter over the images decoded beforehand (no
file reading, no output). Candidates: batch.run reading and decoding the files on reader
threads and writing Parquet parts (a fresh output folder each round), and the same job with
--ray on a local 2-CPU Ray cluster started here (2 actors x 1 CPU; actor start-up and engine
shipping included: that is what a job pays). The local candidate's setup also times the
baseline just before each of its rounds, so `interleaved` in its extra_info compares the two
under the same load (this machine is shared).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import statistics
import time

import numpy as np
import pytest
from conftest import slowdown

pytest.importorskip("pyarrow")
pytest.importorskip("torch")  # builds the engine

IMAGES = int(os.environ.get("CNPOSE_BENCH_BATCH_IMAGES", "48"))
ROUNDS = int(os.environ.get("CNPOSE_BENCH_ROUNDS", "3"))
MAX_BATCH = 8
GROUP = f"batch-XS-cpu-n{IMAGES}"


@functools.cache
def _engine(out_dir: str):
    from cnpose_trt import build_engine, load_engine

    return load_engine(build_engine("XS", out_dir=out_dir, max_batch=MAX_BATCH).path)


@pytest.fixture(scope="module")
def job(tmp_path_factory, bench_engine_dir):
    """(engine, manifest, output root, decoded items): IMAGES JPEG files of 640x480 with one person."""
    from cnpose_trt.io.draw import demo_image, save_image
    from cnpose_trt.io.preprocess import load_image

    folder = tmp_path_factory.mktemp("batch_bench")
    base, box = demo_image()
    rng = np.random.default_rng(0)
    lines, items = [], []
    for i in range(IMAGES):
        shift = int(rng.integers(-120, 120))
        path = save_image(folder / f"frame{i:05d}.jpg", np.ascontiguousarray(np.roll(base, shift, axis=1)))
        b = [box[0] + shift, box[1], box[2], box[3]]
        lines.append(json.dumps({"image": path.name, "boxes": [b]}))
        items.append((load_image(path), np.asarray([b], np.float64)))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return _engine(str(bench_engine_dir)), manifest, tmp_path_factory.mktemp("batch_out"), items


_counter = itertools.count()


def _fresh(root):
    out = root / f"run{next(_counter)}"
    shutil.rmtree(out, ignore_errors=True)
    return out


def test_batch_predict_iter_baseline(benchmark, job):
    from cnpose_trt.pipeline.estimator import PoseEstimator

    engine, _, _, items = job
    est = PoseEstimator(engine)
    benchmark.group = GROUP
    benchmark.extra_info.update(role="baseline", backend="PoseEstimator.predict_iter, decoded images",
                                images=IMAGES)
    out = benchmark.pedantic(slowdown(lambda: list(est.predict_iter(items))), rounds=ROUNDS, warmup_rounds=1)
    assert len(out) == IMAGES


def test_batch_local(benchmark, job):
    from cnpose_trt.batch import job as batch
    from cnpose_trt.pipeline.estimator import PoseEstimator

    engine, manifest, root, items = job
    est = PoseEstimator(engine)
    baseline_s: list[float] = []
    cpu: dict[str, list[float]] = {"baseline": [], "batch": []}  # this process's CPU ms per image (all threads)
    summaries: list = []

    def setup():
        started, cpu0 = time.perf_counter(), time.process_time()
        list(est.predict_iter(items))
        baseline_s.append(time.perf_counter() - started)
        cpu["baseline"].append((time.process_time() - cpu0) * 1e3 / IMAGES)
        return (_fresh(root),), {}

    def run(out):
        cpu0 = time.process_time()
        summaries.append(batch.run(manifest, out, engine=engine, progress=False))
        cpu["batch"].append((time.process_time() - cpu0) * 1e3 / IMAGES)

    benchmark.group = GROUP
    benchmark.extra_info.update(role="candidate", backend="cnpose-trt batch, local (JPEG files -> Parquet)",
                                images=IMAGES)
    benchmark.pedantic(slowdown(run), setup=setup, rounds=ROUNDS, warmup_rounds=1)
    timed = summaries[-ROUNDS:] if len(summaries) >= ROUNDS else summaries
    assert all(s.images == IMAGES and s.people == IMAGES and s.errors == 0 for s in timed)
    base = statistics.median(IMAGES / s for s in baseline_s[-len(timed):])
    cand = statistics.median(s.images_per_s for s in timed)
    benchmark.extra_info["interleaved"] = {
        "baseline_img_s_median": round(base, 2), "batch_img_s_median": round(cand, 2),
        "ratio": round(cand / base, 4), "rounds": len(timed),
        "baseline_img_s": [round(IMAGES / s, 2) for s in baseline_s],
        "batch_img_s": [s.images_per_s for s in summaries],
        "cpu_ms_per_image": {k: [round(v, 2) for v in vs] for k, vs in cpu.items()}}
    print(f"\ninterleaved: predict_iter {base:.1f} img/s, batch {cand:.1f} img/s: {cand / base:.1%}; CPU ms per image "
          f"{statistics.median(cpu['baseline']):.1f} vs {statistics.median(cpu['batch']):.1f}")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_batch_ray_local_cluster(benchmark, job, ray_cluster):
    from cnpose_trt.batch import job as batch

    engine, manifest, root, _ = job
    summaries: list = []

    def run(out):
        summaries.append(batch.run(manifest, out, engine=engine, progress=False, ray=True, ray_actors=2,
                                   ray_batch_size=MAX_BATCH))

    benchmark.group = GROUP
    benchmark.extra_info.update(role="candidate", backend="cnpose-trt batch --ray (2-CPU cluster, 2 actors)",
                                images=IMAGES)
    benchmark.pedantic(slowdown(run), setup=lambda: ((_fresh(root),), {}), rounds=ROUNDS, warmup_rounds=1)
    assert all(s.images == IMAGES and s.people == IMAGES for s in summaries)
    benchmark.extra_info["batch_img_s"] = [s.images_per_s for s in summaries]

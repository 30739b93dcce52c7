"""Video batch jobs: `cnpose-trt batch` on a video with its detections against PoseEstimator.predict_iter
on the same frames decoded into memory beforehand, in one run (issue 24's target: batch >= 90%).

    python -m pytest benchmarks/test_batch_video.py --benchmark-only -s
    CNPOSE_BENCH_VIDEO_FRAMES=200 python -m pytest benchmarks/test_batch_video.py --benchmark-only -s

Group batch-video-XS-cpu-n<N>: a synthetic video of N frames, 256x256, one person a frame (mp4v, the
default .mp4 codec), its detections file in per-frame form; XS engine (onnxruntime fp32, max batch 8).
Baseline: predict_iter over the frames decoded beforehand (no video reading, no output). Candidate:
batch.run on a manifest of one record {"video", "detections"}: the manifest expanded, the frames
decoded in one pass by the reader threads, Parquet parts written (a fresh output folder each round).
The candidate's setup times the baseline just before each of its rounds, so `interleaved` in its
extra_info compares the two under the same load (this machine is shared).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import statistics
import time

import pytest
from conftest import slowdown

pytest.importorskip("pyarrow")
pytest.importorskip("cv2")
pytest.importorskip("torch")  # builds the engine

FRAMES = int(os.environ.get("CNPOSE_BENCH_VIDEO_FRAMES", "1000"))
ROUNDS = int(os.environ.get("CNPOSE_BENCH_ROUNDS", "3"))
MAX_BATCH = 8
GROUP = f"batch-video-XS-cpu-n{FRAMES}"


@functools.cache
def _engine(out_dir: str):
    from cnpose_trt import build_engine, load_engine

    return load_engine(build_engine("XS", out_dir=out_dir, max_batch=MAX_BATCH).path)


@pytest.fixture(scope="module")
def video_job(tmp_path_factory, bench_engine_dir):
    """(engine, manifest, output root, items): the video, its manifest, and its frames decoded with their boxes."""
    from cnpose_trt.io.video import make_synthetic_video, read_frames

    folder = tmp_path_factory.mktemp("video_bench")
    scenes = make_synthetic_video(folder / "clip.mp4", FRAMES, seed=5, width=256, height=256, people=1,
                                  keep_images=False)
    (folder / "dets.json").write_text(json.dumps({str(i): s.boxes.tolist() for i, s in enumerate(scenes)}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text(json.dumps({"video": "clip.mp4", "detections": "dets.json"}) + "\n")
    items = [(image, scenes[i].boxes) for i, image in read_frames(folder / "clip.mp4")]
    assert len(items) == FRAMES
    return _engine(str(bench_engine_dir)), manifest, tmp_path_factory.mktemp("video_out"), items


_counter = itertools.count()


def _fresh(root):
    out = root / f"run{next(_counter)}"
    shutil.rmtree(out, ignore_errors=True)
    return out


def test_video_predict_iter_baseline(benchmark, video_job):
    from cnpose_trt.pipeline.estimator import PoseEstimator

    engine, _, _, items = video_job
    est = PoseEstimator(engine)
    benchmark.group = GROUP
    benchmark.extra_info.update(role="baseline", backend="PoseEstimator.predict_iter, decoded frames",
                                images=FRAMES)
    out = benchmark.pedantic(slowdown(lambda: list(est.predict_iter(items))), rounds=ROUNDS, warmup_rounds=1)
    assert len(out) == FRAMES


def test_video_batch_local(benchmark, video_job):
    from cnpose_trt.batch import job as batch
    from cnpose_trt.pipeline.estimator import PoseEstimator

    engine, manifest, root, items = video_job
    est = PoseEstimator(engine)
    baseline_s: list[float] = []
    cpu: dict[str, list[float]] = {"baseline": [], "batch": []}  # this process's CPU ms per frame (all threads)
    summaries: list = []

    def setup():
        started, cpu0 = time.perf_counter(), time.process_time()
        list(est.predict_iter(items))
        baseline_s.append(time.perf_counter() - started)
        cpu["baseline"].append((time.process_time() - cpu0) * 1e3 / FRAMES)
        return (_fresh(root),), {}

    def run(out):
        cpu0 = time.process_time()
        summaries.append(batch.run(manifest, out, engine=engine, progress=False))
        cpu["batch"].append((time.process_time() - cpu0) * 1e3 / FRAMES)

    benchmark.group = GROUP
    benchmark.extra_info.update(role="candidate", backend="cnpose-trt batch, local (mp4 video -> Parquet)",
                                images=FRAMES)
    benchmark.pedantic(slowdown(run), setup=setup, rounds=ROUNDS, warmup_rounds=1)
    timed = summaries[-ROUNDS:] if len(summaries) >= ROUNDS else summaries
    assert all(s.images == FRAMES and s.people == FRAMES and s.errors == 0 for s in timed)
    base = statistics.median(FRAMES / s for s in baseline_s[-len(timed):])
    cand = statistics.median(s.images_per_s for s in timed)
    benchmark.extra_info["interleaved"] = {
        "baseline_frames_s_median": round(base, 2), "batch_frames_s_median": round(cand, 2),
        "ratio": round(cand / base, 4), "rounds": len(timed),
        "baseline_frames_s": [round(FRAMES / s, 2) for s in baseline_s],
        "batch_frames_s": [s.images_per_s for s in summaries],
        "cpu_ms_per_frame": {k: [round(v, 2) for v in vs] for k, vs in cpu.items()}}
    print(f"\ninterleaved ({FRAMES} frames 256x256, {len(timed)} rounds): predict_iter {base:.1f} frames/s, batch "
          f"{cand:.1f} frames/s: {cand / base:.1%}; per round predict_iter "
          f"{[round(FRAMES / s, 1) for s in baseline_s]}, batch {[s.images_per_s for s in summaries]}; CPU ms per "
          f"frame {statistics.median(cpu['baseline']):.1f} vs {statistics.median(cpu['batch']):.1f}")

"""The host side of the device-resident GPU path, alone: how many images/s the CPU can hand to
the GPU through PoseEstimator when the GPU is not the limit.

No GPU is used or imitated beyond this: the engine's enqueue_device is replaced by a stand-in
that takes the call (checks its arguments, makes the crop kernel's image views) and enqueues
nothing, and staging runs on host memory (gpu_stage.HostStager: the real staging ring logic
and the real memcpy into it). What remains is all the per-image and per-batch host work of the
GPU path: item checks, upstream's box rule, crop maps, the copy into the staging ring, batching,
results. Each configuration runs twice in the run: items handed to the prep threads in runs
(prep_chunk auto, the default) and one at a time (prep_chunk 1, the baseline: the pipeline
before runs). The GPU path's end-to-end rate cannot exceed this figure on the same CPU; compare it
with the engine-only rate of benchmarks/gpu_e2e.py. Beside it, in the same run: the copies into
a ring-sized buffer alone, on as many threads (what memory bandwidth allows). Figures name the
processor.

    python benchmarks/host_ceiling.py [--threads 1 2 8] [--batch 64] [--json F] [--no-copy]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Taken:
    def __init__(self, packed: np.ndarray) -> None:
        self.packed = packed

    def result(self) -> np.ndarray:
        return self.packed


def stub_engine(inner):
    """inner with enqueue_device taking calls and enqueuing nothing (labelled stand-in)."""
    from cnpose_trt.runtime.engine import Engine

    class NothingEnqueued(Engine):
        def __init__(self) -> None:
            self.__dict__.update(inner.__dict__)
            self.device = "cuda:0 (stand-in: nothing is enqueued)"

        def enqueue_device(self, fill, n, *, flip=False, boxes=None, root_depth=None, intrinsics=None):
            p, _ = self._device_call(n, flip, boxes, root_depth, intrinsics)
            fill._images()  # the mirror views the GPU fill hands to the crop kernel
            return _Taken(np.zeros((p, self.spec.joints, 10), np.float32))

    return NothingEnqueued()


def copy_alone(items: list, threads: int, slots: int, rounds: int = 3) -> float:
    """Images/s of the copies alone: each image copied into the next slot of a touched buffer of
    `slots` images (as big as the staging ring), on `threads` threads (NumPy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    nbytes = items[0][0].nbytes
    buf = np.ones(slots * nbytes, np.uint8)

    def copy(k: int) -> None:
        img = items[k % len(items)][0]
        np.copyto(buf[(k % slots) * nbytes:(k % slots + 1) * nbytes].reshape(img.shape), img)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(copy, range(slots)))
        start = time.perf_counter()
        list(pool.map(copy, range(rounds * slots)))
        return rounds * slots / (time.perf_counter() - start)


def main() -> int:
    from conftest import cpu_name
    from gpu_e2e import images_with_boxes

    from cnpose_trt import build_engine, load_engine
    from cnpose_trt.pipeline import gpu_stage
    from cnpose_trt.pipeline.estimator import PoseEstimator

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", nargs="+", type=int, default=sorted({1, 2, min(8, os.cpu_count() or 2)}))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=40, help="batches timed per configuration")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-copy", action="store_true",
                    help="diagnostic: stage images without copying their pixels (the host work but the copy)")
    args = ap.parse_args()
    items = images_with_boxes(64)  # the images gpu_e2e.py times end to end
    record = {"what": "host side of the GPU path; engine call is a stand-in that enqueues nothing; no GPU used",
              "cpu": cpu_name(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
              "image": "640x480 uint8, one person each", "batch": args.batch, "results": []}
    usable, uploader, put_many = gpu_stage.usable, gpu_stage.Uploader, gpu_stage.StagingRing.put_many
    gpu_stage.usable, gpu_stage.Uploader = (lambda engine: None), gpu_stage.HostStager
    if args.no_copy:
        def no_copy(ring, images):
            regions = ring.ring.take_many([im.nbytes for im in images])
            return [None if r is None else gpu_stage.Staged(r, tuple(im.shape), im.nbytes)
                    for im, r in zip(images, regions, strict=True)]

        gpu_stage.StagingRing.put_many = no_copy
        record["no_copy"] = True
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inner = load_engine(build_engine("XS", backend="onnxruntime", out_dir=tmp, max_batch=args.batch).path)
            for threads, chunk in [(t, c) for t in args.threads for c in (None, 1)]:
                est = PoseEstimator(stub_engine(inner), prep_threads=threads, prefetch=3, prep_chunk=chunk)
                assert est.device_crops
                n = args.batch * args.batches
                list(est.predict_iter(items[i % 64] for i in range(6 * args.batch)))  # warm-up: ring touched
                wall, cpu = time.perf_counter(), time.process_time()
                got = sum(1 for _ in est.predict_iter(items[i % 64] for i in range(n)))
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                slots = est._uploader.ring.size // items[0][0].nbytes
                row = {"prep_threads": threads, "prep_chunk": chunk or "auto", "img_s": got / wall,
                       "cpu_us_per_image": cpu / got * 1e6,
                       "staging_fallbacks": est.device_stats["staging_fallbacks"],
                       "copies_alone_img_s": copy_alone(items, threads, slots)}
                record["results"].append(row)
                print(f"  prep threads {threads}, items per prep task {row['prep_chunk']}: {row['img_s']:.0f} "
                      f"img/s, {row['cpu_us_per_image']:.0f} us of CPU per image, staging fallbacks "
                      f"{row['staging_fallbacks']}; the copies alone {row['copies_alone_img_s']:.0f} img/s", flush=True)
    finally:
        gpu_stage.usable, gpu_stage.Uploader, gpu_stage.StagingRing.put_many = usable, uploader, put_many
    print(f"host side of the GPU path, {record['cpu']} ({record['cores']} cores), batch {args.batch}: best "
          f"{max(r['img_s'] for r in record['results']):.0f} img/s")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GPU end to end against the engine alone, side by side in one run (issue 11's GPU targets).

Per variant and batch (torch CUDA fp16 + CUDA graphs, max_batch = batch):
- engine only: the network replayed on its own device input buffer, inputs already there,
  timed with CUDA events, no host copies (TorchEngine.forward_static);
- end to end, device crops: PoseEstimator over 640x480 uint8 images, one person each: batched
  staging (memcpy into the pinned ring on the prep threads, one copy per engine call), GPU crop
  into the engine's input, network, fused decode, (P, 18, 10) back;
- the same with staging="per_image" (a pinned allocation, copy and event per image: the way
  measured on an H200 on 2026-11-27 at 7-22% of the engine);
- end to end, host crops (cv2 + NumPy, the path before issue 11), for reference;
- JPEG: decoding 640x480 files on the GPU (torchvision / nvJPEG) vs OpenCV, and the device
  path fed with file paths;
- uploads alone: per-image staging vs the staging ring (memcpy on threads, one copy per 64
  images) vs pageable copies, one and several threads.
Throughput counts images from the first to the last delivered result; p50/p99 are the times
between consecutive batches delivered. Usage: python benchmarks/gpu_e2e.py [--json F] [--quick]
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


def images_with_boxes(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """640x480 textured uint8 images with one person box each (content does not change the work)."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
        img = cv2.resize(small, (640, 480), interpolation=cv2.INTER_LINEAR)
        w, h = rng.uniform(120, 300), rng.uniform(200, 420)
        x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
        out.append((img, np.array([[x, y, w, h]])))
    return out


def engine_only(engine, batch: int, iters: int) -> dict:
    import torch

    buf = engine.input_buffer()
    buf.copy_(torch.randn(buf.shape, device=buf.device, dtype=torch.float32).to(buf.dtype))
    for _ in range(5):
        engine.forward_static(batch)
    torch.cuda.synchronize()
    times = []
    start_all = torch.cuda.Event(enable_timing=True)
    end_all = torch.cuda.Event(enable_timing=True)
    start_all.record()
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        engine.forward_static(batch)
        b.record()
        times.append((a, b))
    end_all.record()
    torch.cuda.synchronize()
    per = np.array([a.elapsed_time(b) for a, b in times])
    total = start_all.elapsed_time(end_all) / 1000
    return {"img_s": batch * iters / total, "p50_ms": float(np.percentile(per, 50)),
            "p99_ms": float(np.percentile(per, 99))}


def end_to_end(estimator, items: list, batch: int, reps: int) -> dict:
    """Images/s and per-batch delivery intervals over reps batches (after 3 warm-up batches)."""
    warm = [items[i % len(items)] for i in range(3 * batch)]
    list(estimator.predict_iter(warm))
    stream = (items[i % len(items)] for i in range(reps * batch))
    stamps = []
    t0 = time.perf_counter()
    for i, _ in enumerate(estimator.predict_iter(stream)):
        if i % batch == batch - 1:
            stamps.append(time.perf_counter())
    total = stamps[-1] - t0
    gaps = np.diff(np.array([t0, *stamps])) * 1000
    steady = gaps[1:] if len(gaps) > 2 else gaps
    return {"img_s": reps * batch / total, "p50_ms": float(np.percentile(steady, 50)),
            "p99_ms": float(np.percentile(steady, 99)),
            "stage_shares": {k: round(v, 3) for k, v in estimator.timings.shares().items()}}


def jpeg_decode(paths: list[Path], device: str) -> dict:
    import torch

    from cnpose_trt.io.preprocess import load_image
    from cnpose_trt.pipeline.gpu_stage import Uploader

    up = Uploader(device, staging="per_image")  # files OpenCV decodes: uploaded, as before
    for p in paths[:4]:
        up.load(p)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for p in paths:
        up.load(p)
    torch.cuda.synchronize()
    gpu = len(paths) / (time.perf_counter() - t)
    t = time.perf_counter()
    for p in paths:
        load_image(p)
    cpu = len(paths) / (time.perf_counter() - t)
    return {"gpu_img_s": gpu, "opencv_img_s": cpu, "gpu_fallbacks": up.gpu_jpeg_failures,
            "gpu_decoder": up._decode_jpeg is not None}


def staging(items: list, device: str, threads: int) -> dict:
    """Uploads alone, images/s: per-image staging (Uploader.upload: pinned allocation, copy, event
    per image), the staging ring (put() on the threads, then one copy_in per 64 images on the
    upload stream, as Fill does) and plain pageable .to(device)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from cnpose_trt.pipeline.gpu_stage import Staged, Uploader

    images = [img for img, _ in items]
    rounds = 4
    per_image = Uploader(device, staging="per_image")
    batched = Uploader(device, ring_images=4 * len(images))

    def ring_round(pool: ThreadPoolExecutor) -> None:
        staged = [s for s, _ in pool.map(batched.stage, images) if isinstance(s, Staged)]
        with torch.cuda.stream(batched.stream):
            batched.ring.copy_in(staged)
            done = torch.cuda.Event()
            done.record(batched.stream)
        batched.release(staged, done)

    ways = {"per image (pinned alloc + copy + event)": lambda pool: list(pool.map(per_image.upload, images)),
            "staging ring (memcpy, one copy per 64)": ring_round,
            "pageable .to(device)": lambda pool: list(pool.map(lambda im: torch.from_numpy(im).to(device), images))}
    out = {}
    for name, fn in ways.items():
        for t in (1, threads):
            with ThreadPoolExecutor(t) as pool:
                fn(pool)  # warm-up
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(rounds):
                    fn(pool)
                torch.cuda.synchronize()
            out[f"{name}, {t} thread(s)"] = rounds * len(images) / (time.perf_counter() - start)
    out["staging ring fallbacks"] = batched.staging_fallbacks
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--variants", nargs="+", default=["XS", "M"])
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 64])
    ap.add_argument("--reps", type=int, default=30, help="batches timed end to end")
    ap.add_argument("--prep-threads", type=int, default=min(8, os.cpu_count() or 2))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.variants, args.batches, args.reps = ["XS"], [32], 8

    import cv2
    import torch

    from cnpose_trt import build_engine, load_engine
    from cnpose_trt.pipeline.estimator import PoseEstimator

    items = images_with_boxes(64)

    def save() -> None:  # after every configuration: a run cut short by its time limit keeps what it measured
        if args.json:
            args.json.write_text(json.dumps(record, indent=1))

    rows, record = [], {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                        "date": time.strftime("%Y-%m-%d"), "prep_threads": args.prep_threads,
                        "image": "640x480 uint8, one person each", "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            for b in args.batches:
                built = build_engine(variant, backend="torch", precision="fp16", max_batch=b, out_dir=tmp)
                eng = load_engine(built.path, device="cuda", cuda_graphs=True)
                only = engine_only(eng, b, iters=max(20, args.reps))
                gpu = PoseEstimator(eng, prep_threads=args.prep_threads, prefetch=3)
                assert gpu.device_crops, gpu.device_crops_unavailable
                e2e = end_to_end(gpu, items, b, args.reps)
                e2e["staging_fallbacks"] = gpu.device_stats["staging_fallbacks"]
                per_image = end_to_end(PoseEstimator(eng, prep_threads=args.prep_threads, prefetch=3,
                                                     staging="per_image"), items, b, args.reps)
                host = end_to_end(PoseEstimator(eng, prep_threads=args.prep_threads, prefetch=3,
                                                crop_method="opencv"), items, b, max(4, args.reps // 3))
                res = {"variant": variant, "batch": b, "engine_only": only, "e2e_device_crops": e2e,
                       "e2e_device_crops_per_image_staging": per_image,
                       "e2e_host_crops": host, "ratio": e2e["img_s"] / only["img_s"],
                       "p99_over_p50": e2e["p99_ms"] / e2e["p50_ms"]}
                record["results"].append(res)
                rows.append(res)
                save()
                eng.close()
                print(f"  {variant} b{b}: engine {only['img_s']:.0f} img/s, e2e {e2e['img_s']:.0f} img/s "
                      f"({res['ratio']:.0%}), p99/p50 {res['p99_over_p50']:.2f}, "
                      f"per-image staging {per_image['img_s']:.0f}, host crops {host['img_s']:.0f}",
                      flush=True)
        jpg_dir = Path(tmp) / "jpeg"
        jpg_dir.mkdir()
        paths = []
        for i, (img, _) in enumerate(items):
            p = jpg_dir / f"{i:03d}.jpg"
            cv2.imwrite(str(p), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            paths.append(p)
        record["jpeg"] = jpeg_decode(paths, "cuda")
        record["staging_img_s"] = staging(items, "cuda", args.prep_threads)
        save()
        v, b = args.variants[-1], args.batches[-1]
        eng = load_engine(build_engine(v, backend="torch", precision="fp16", max_batch=b, out_dir=tmp).path,
                          device="cuda", cuda_graphs=True)
        files = [(str(p), box) for p, (_, box) in zip(paths, items, strict=True)]
        record["jpeg"]["e2e_files"] = {"variant": v, "batch": b, **end_to_end(
            PoseEstimator(eng, prep_threads=args.prep_threads, prefetch=3), files, b, args.reps)}
    print(f"\n{record['gpu']}, torch {record['torch']}, {record['date']}, prep threads {args.prep_threads}")
    print(f"{'variant':8}{'batch':>6}{'engine img/s':>14}{'e2e img/s':>11}{'e2e/engine':>11}{'p50 ms':>8}"
          f"{'p99 ms':>8}{'p99/p50':>8}{'per-image':>10}{'host-crop':>10}")
    for r in rows:
        e = r["e2e_device_crops"]
        print(f"{r['variant']:8}{r['batch']:>6}{r['engine_only']['img_s']:>14.0f}{e['img_s']:>11.0f}"
              f"{r['ratio']:>11.1%}{e['p50_ms']:>8.2f}{e['p99_ms']:>8.2f}{r['p99_over_p50']:>8.2f}"
              f"{r['e2e_device_crops_per_image_staging']['img_s']:>10.0f}{r['e2e_host_crops']['img_s']:>10.0f}")
    j = record["jpeg"]
    print(f"JPEG 640x480: GPU decode {j['gpu_img_s']:.0f} img/s (nvJPEG via torchvision: {j['gpu_decoder']}, "
          f"fallbacks {j['gpu_fallbacks']}), OpenCV {j['opencv_img_s']:.0f} img/s (one thread); "
          f"e2e from files {j['e2e_files']['variant']} b{j['e2e_files']['batch']}: {j['e2e_files']['img_s']:.0f} img/s")
    print("(e2e: batched staging, the default; per-image: staging='per_image'; host-crop: crop_method='opencv', "
          "all img/s)")
    print("uploads alone (640x480 uint8), img/s: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                              record["staging_img_s"].items()))
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""ONNX Runtime threads and spinning, PoseEstimator end to end (issue 22, item 3), one process.

    python benchmarks/ort_threads.py [--load N] [--json F]

For each variant, one engine per (threads, spinning) setting is loaded, and PoseEstimator.predict
on a batch of images runs for every setting in turn within each round (the order reversed every
other round), so a load change on a shared machine hits all settings alike; median per setting,
and the ratio to the ONNX Runtime defaults (threads 0, spinning on) of the same run.
--load N starts N busy-loop processes for the measurement (a loaded machine) and stops them after.

Sizes come from the environment so CI can smoke-run it (benchmarks/test_ort_threads.py):
CNPOSE_BENCH_VARIANTS (XS,M), CNPOSE_BENCH_BATCH (8), CNPOSE_BENCH_ROUNDS (7),
CNPOSE_BENCH_THREADS (0,1,2).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import cpu_name  # noqa: E402

from cnpose_trt import build_engine, load_engine  # noqa: E402
from cnpose_trt.pipeline.estimator import PoseEstimator  # noqa: E402


def settings() -> dict[str, Any]:
    env = os.environ.get
    return {"variants": env("CNPOSE_BENCH_VARIANTS", "XS,M").split(","), "batch": int(env("CNPOSE_BENCH_BATCH", "8")),
            "rounds": int(env("CNPOSE_BENCH_ROUNDS", "7")),
            "threads": [int(t) for t in env("CNPOSE_BENCH_THREADS", "0,1,2").split(",")]}


def scenes(batch: int) -> tuple[list[Any], list[Any]]:
    import numpy as np

    from cnpose_trt.io.synthetic import synthesize

    shots = [synthesize((1, i), width=640, height=480) for i in range(batch)]
    return [s.image for s in shots], [np.asarray(s.boxes, np.float64) for s in shots]


def run(out_dir: Path, cfg: dict[str, Any], load: int = 0) -> dict[str, Any]:
    rows = []
    images, boxes = scenes(cfg["batch"])
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    try:
        for name in cfg["variants"]:
            built = build_engine(name, backend="onnxruntime", out_dir=out_dir, max_batch=cfg["batch"])
            keys = list(itertools.product(cfg["threads"], (True, False)))
            estimators = {k: PoseEstimator(load_engine(built.path, threads=k[0], spinning=k[1])) for k in keys}
            times: dict[tuple[int, bool], list[float]] = {k: [] for k in keys}
            for est in estimators.values():
                est.predict(images, boxes)
            for r in range(cfg["rounds"]):
                for k in keys if r % 2 == 0 else keys[::-1]:
                    time.sleep(0.05)  # the previous session's spinning threads park before this one runs
                    t0 = time.perf_counter()
                    estimators[k].predict(images, boxes)
                    times[k].append(time.perf_counter() - t0)
            base = statistics.median(times[(0, True)]) if (0, True) in times else None
            for (threads, spinning), ts in times.items():
                med = statistics.median(ts)
                rows.append({"variant": name, "threads": threads, "spinning": spinning, "median_s": round(med, 4),
                             "images_per_s": round(cfg["batch"] / med, 2),
                             "vs_ort_default": None if base is None else round(base / med, 3),
                             "rounds_s": [round(t, 4) for t in ts]})
            for est in estimators.values():
                est.engine.close()
    finally:
        for p in busy:
            p.kill()
            p.wait()
    import onnxruntime

    return {"what": "PoseEstimator.predict end to end (prep, engine, decode), onnxruntime fp32, random weights, "
                    "settings interleaved within each round, median",
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__},
            "busy_loop_processes": load, "settings": cfg, "rows": rows, "date": time.strftime("%Y-%m-%d")}


def table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"{m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}; {result['busy_loop_processes']} "
             f"busy-loop processes; batch {result['settings']['batch']}, {result['settings']['rounds']} rounds",
             "| variant | threads | spinning | img/s | vs threads 0 + spinning on |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['threads']} | {'on' if r['spinning'] else 'off'} | {r['images_per_s']} | "
                     f"{r['vs_ort_default']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", type=int, default=0, help="busy-loop processes running during the measurement")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--engines", type=Path, default=Path(tempfile.gettempdir()) / "cnpose-bench-engines")
    args = p.parse_args(argv)
    result = run(args.engines, settings(), args.load)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

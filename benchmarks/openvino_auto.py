"""OpenVINO against ONNX Runtime on the CPU, and `--backend auto`'s choice (issue 25, item 4), one process.

    python benchmarks/openvino_auto.py [--out benchmarks/results/openvino-auto-DATE.txt]

Per variant (random weights; CNPOSE_BENCH_VARIANTS, default XS,M), batch CNPOSE_BENCH_BATCH (8):
1. engine.infer on the same batch of synthetic crops: ONNX Runtime FP32, OpenVINO FP32 and OpenVINO BF16
   (where the CPU has the bf16 instructions), interleaved rounds (order rotated), medians; multiples of ORT FP32.
2. `auto`: build_engine(backend="auto") measuring (its own timing, on the engines of 1, cached), then its
   choice against the fastest engine it could choose (the admissible ones: ORT FP32, OV FP32, and BF16
   only where it was within auto's accuracy bound), re-timed together afterwards: target >= 0.95.
3. End to end: PoseEstimator.predict on 8 images (640x480, one person box each) with the chosen engine,
   against the same engine's infer on 8 ready crops, interleaved: target >= 0.85.
Rounds: CNPOSE_BENCH_ROUNDS (9). The processor (model name, flags) and versions head the report.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def interleaved(runs: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median ms per call of each run, one warm-up each, then rounds with the order rotated."""
    labels = list(runs)
    for label in labels:
        runs[label]()
    times: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(rounds):
        for i in range(len(labels)):
            label = labels[(i + r) % len(labels)]
            t0 = time.perf_counter()
            runs[label]()
            times[label].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def engines_row(variant: str, out: Path, batch: int, rounds: int, bf16: bool, say: Any) -> tuple[dict, Any]:
    from cnpose_trt import build_engine, load_engine
    from cnpose_trt.build.verify import accuracy_inputs
    from cnpose_trt.spec import get_spec

    kinds = [("onnxruntime", "fp32"), ("openvino", "fp32")] + ([("openvino", "bf16")] if bf16 else [])
    paths = {f"{b} {p}": build_engine(variant, backend=b, precision=p, out_dir=out, max_batch=batch).path
             for b, p in kinds}
    x = accuracy_inputs(get_spec(variant), batch)
    engines = {k: load_engine(p) for k, p in paths.items()}
    ms = interleaved({k: (lambda e=e: e.infer(x)) for k, e in engines.items()}, rounds)
    for e in engines.values():
        e.close()
    base = ms["onnxruntime fp32"]
    for k, v in ms.items():
        say(f"  {variant} {k:18} {v:8.1f} ms/batch  {base / v:5.2f}x ORT FP32")
    return ms, x


def auto_row(variant: str, out: Path, batch: int, rounds: int, ms: dict, x: np.ndarray, say: Any) -> None:
    from cnpose_trt import build_engine, load_engine
    from cnpose_trt.pipeline import PoseEstimator

    os.environ["CNPOSE_TRT_AUTO"] = "measure"
    t0 = time.perf_counter()
    result = build_engine(variant, backend="auto", out_dir=out, max_batch=batch)
    rec = result.meta["auto"]
    label = f"{rec['choice']['backend']} {rec['choice']['precision']}"
    admissible = [f"{c['backend']} {c['precision']}" for c in rec["candidates"] if c["status"] == "measured"]
    say(f"  {variant} auto chose {label} in {time.perf_counter() - t0:.1f} s (builds + timing; its own figures: "
        + ", ".join(f"{c['backend']} {c['precision']} {c.get('ms_per_batch', c.get('reason', ''))}"
                    for c in rec["candidates"] if c["status"] != "skipped") + ")")
    names = {f"{c['backend']} {c['precision']}": c["engine"] for c in rec["candidates"] if c["status"] == "measured"}
    now = {k: load_engine(out / names[k]) for k in admissible}
    again = interleaved({k: (lambda e=e: e.infer(x)) for k, e in now.items()}, rounds)
    for e in now.values():
        e.close()
    fastest = min(admissible, key=lambda k: again[k])
    say(f"  {variant} auto's choice vs the fastest admissible ({fastest}), re-timed together now: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in again.items())
        + f": {again[fastest] / again[label]:.2f}x (target >= 0.95)")
    engine = load_engine(result.path)
    est = PoseEstimator(result.path, prep_threads=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(batch)]
    boxes = [[[200.0 + 10 * i, 60.0, 180.0, 360.0]] for i in range(batch)]
    both = interleaved({"engine": lambda: engine.infer(x), "e2e": lambda: est.predict(images, boxes)}, rounds)
    est.engine.close()
    engine.close()
    say(f"  {variant} end to end {label}: PoseEstimator {both['e2e']:.1f} ms per {batch} people, engine alone "
        f"{both['engine']:.1f} ms: {both['engine'] / both['e2e']:.2f} of the engine (target >= 0.85)")


def main() -> int:
    import onnxruntime

    from cnpose_trt.backends import get
    from cnpose_trt.build.auto import cpu_fingerprint

    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    env = os.environ.get
    variants, batch = env("CNPOSE_BENCH_VARIANTS", "XS,M").split(","), int(env("CNPOSE_BENCH_BATCH", "8"))
    rounds = int(env("CNPOSE_BENCH_ROUNDS", "9"))
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    ov = get("openvino")
    problem = ov.precision_problem("bf16")
    cpu = cpu_fingerprint()
    say(f"# openvino vs onnxruntime and auto's choice, {time.strftime('%Y-%m-%d')}")
    say(f"processor: {cpu['model']}, {cpu['cores']} usable cores, flags that matter: {' '.join(cpu['flags'])}"
        f" (AMX: {'yes' if 'amx_bf16' in cpu['flags'] else 'no'})")
    say(f"versions: onnxruntime {onnxruntime.__version__}, openvino {ov.version()}; batch {batch}, {rounds} "
        "interleaved rounds, medians, random weights")
    say(f"load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())} (a shared machine)")
    if problem:
        say(f"bf16: skipped ({problem})")
    for variant in variants:
        with tempfile.TemporaryDirectory() as tmp:
            # auto reuses the named engines (cache hits) and measures: its record starts empty in this folder
            ms, x = engines_row(variant, Path(tmp), batch, rounds, problem is None, say)
            auto_row(variant, Path(tmp), batch, rounds, ms, x, say)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""INT8 against FP32 on ONNX Runtime's CPU provider (issue 22, item 2), one process, interleaved rounds.

    python benchmarks/int8_cpu.py [--json F] [--md F]

XS is the shipped trained model (cnpose_trt/data): MPJPE of FP32 and INT8 on held-out synthetic
people (evaluate.synthetic_set, seed namespace 1; no flip test, which the shipped model must run
without), INT8 calibrated on synthetic scenes of another seed namespace (precision.CALIB_SEED_NAMESPACE).
M and L have random weights: speed and the decoded-joint shift of INT8 against FP32 on the same crops.
Speed: engine.infer on batch 8 crops of held-out people; the precisions alternate round by round
(so a load change on a shared machine hits both), median per round. XS also runs the TensorRT-shaped
graph (int8_scheme trt-symmetric) on ONNX Runtime, the graph the CPU kernels do not fuse.

Sizes come from the environment so CI can smoke-run it (benchmarks/test_int8_cpu.py):
CNPOSE_BENCH_VARIANTS (XS,M,L), CNPOSE_BENCH_BATCH (8), CNPOSE_BENCH_ROUNDS (7),
CNPOSE_BENCH_INT8_PEOPLE (160 held-out images, one person each), CNPOSE_BENCH_CALIB (64 crops).
"""

from __future__ import annotations

import argparse
import json
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import cpu_name  # noqa: E402

from cnpose_trt import build_engine, load_engine  # noqa: E402
from cnpose_trt.backends.onnxruntime.runtime import cpu_flags, cpu_has_vnni  # noqa: E402


def settings() -> dict[str, Any]:
    env = os.environ.get
    return {"variants": env("CNPOSE_BENCH_VARIANTS", "XS,M,L").split(","), "batch": int(env("CNPOSE_BENCH_BATCH", "8")),
            "rounds": int(env("CNPOSE_BENCH_ROUNDS", "7")), "people": int(env("CNPOSE_BENCH_INT8_PEOPLE", "160")),
            "calib": int(env("CNPOSE_BENCH_CALIB", "64"))}


def held_out_crops(dataset: Any, count: int, size: int) -> np.ndarray:
    """Normalised crops of the first `count` people of the held-out set."""
    from cnpose_trt.io.preprocess import prepare

    crops = []
    for im in dataset.images:
        c, _ = prepare(im.load(), np.asarray(im.boxes, np.float64).reshape(-1, 4), size)
        crops.extend(c)
        if len(crops) >= count:
            break
    return np.stack(crops[:count]).astype(np.float32)


def interleaved(runs: dict[str, Any], x: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each engine, the engines alternating within every round (after one warm-up each)."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for engine in runs.values():
        engine.infer(x)
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for k in order:
            t0 = time.perf_counter()
            runs[k].infer(x)
            times[k].append(time.perf_counter() - t0)
    return times


def run(out_dir: Path, cfg: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    from cnpose_trt.build.verify import joint_error
    from cnpose_trt.eval.evaluate import evaluate, synthetic_set
    from cnpose_trt.shipped import SHIPPED_XS

    batch, rounds = cfg["batch"], cfg["rounds"]
    dataset = synthetic_set(count=cfg["people"])
    rows = []
    for name in cfg["variants"]:
        ckpt = SHIPPED_XS if name == "XS" else None
        common = dict(backend="onnxruntime", out_dir=out_dir, max_batch=batch)
        int8 = dict(precision="int8", calib_synthetic=True, calib_count=cfg["calib"])
        builds = {"fp32": build_engine(name, ckpt, **common),
                  "int8 ort-u8s8": build_engine(name, ckpt, **common, **int8)}
        if name == "XS":
            builds["int8 trt-symmetric"] = build_engine(name, ckpt, **common, **int8, int8_scheme="trt-symmetric")
        engines = {k: load_engine(b.path) for k, b in builds.items()}
        spec = engines["fp32"].spec
        x = held_out_crops(dataset, max(batch, 64), spec.input_size)
        times = interleaved(engines, x[:batch], rounds)
        ref = np.concatenate([engines["fp32"].infer(x[i:i + batch]) for i in range(0, len(x), batch)])
        accuracy = None
        if ckpt is not None:
            report = evaluate(list(engines.values()), dataset, flip=False, labels=list(engines), progress=progress)
            accuracy = {e["label"]: {"mpjpe_mm": e["metrics"]["mpjpe"], "pa_mpjpe_mm": e["metrics"]["pa_mpjpe"],
                                     "people": e["metrics"].get("people", report["dataset"]["people"])}
                        for e in report["engines"]}
        base = statistics.median(times["fp32"])
        for label, engine in engines.items():
            med = statistics.median(times[label])
            row = {"variant": name, "weights": "shipped (trained)" if ckpt else "random", "engine": label,
                   "batch": batch, "median_s": round(med, 4), "images_per_s": round(batch / med, 2),
                   "speed_vs_fp32": round(base / med, 3), "rounds_s": [round(t, 4) for t in times[label]]}
            if label != "fp32":
                heat = np.concatenate([engine.infer(x[i:i + batch]) for i in range(0, len(x), batch)])
                row["joint_shift_vs_fp32"] = {k: round(v, 4) if isinstance(v, float) else v
                                              for k, v in joint_error(ref, heat, spec).items()}
                row["kernels"] = builds[label].meta.get("int8_kernels")
            if accuracy is not None:
                row["accuracy"] = accuracy[label]
                if label != "fp32":
                    row["mpjpe_cost_mm"] = round(accuracy[label]["mpjpe_mm"] - accuracy["fp32"]["mpjpe_mm"], 3)
            rows.append(row)
        for engine in engines.values():
            engine.close()
    import onnxruntime

    flags = cpu_flags()
    return {"what": "ONNX Runtime CPU, INT8 vs FP32, engine.infer, interleaved rounds, one process",
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
                        "vnni": cpu_has_vnni(), "flags": sorted(f for f in flags if "avx512" in f or "vnni" in f
                                                                or f.startswith("amx") or f == "avx2")},
            "settings": cfg, "calibration": "synthetic scenes, seed namespace 3 (held-out set: namespace 1)",
            "held_out": {"images": len(dataset.images), "people": dataset.people, "flip_test": False},
            "rows": rows, "date": time.strftime("%Y-%m-%d")}


def table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# INT8 vs FP32 on ONNX Runtime CPU ({result['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, VNNI: {m['vnni']} ({', '.join(m['flags'])}); "
             f"onnxruntime {m['onnxruntime']}. Batch {result['settings']['batch']}, "
             f"{result['settings']['rounds']} interleaved rounds, median. Held-out: {result['held_out']['people']} "
             f"synthetic people, no flip test. {result['calibration']}.", "",
             "| variant | weights | engine | img/s | vs FP32 | MPJPE mm | cost mm | joint shift vs FP32 mm (mean/max) "
             "| quantized convs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        acc = r.get("accuracy", {}).get("mpjpe_mm")
        shift = r.get("joint_shift_vs_fp32")
        k = r.get("kernels") or {}
        cells = [r["variant"], r["weights"], r["engine"], str(r["images_per_s"]), f"{r['speed_vs_fp32']:.2f}x",
                 "" if acc is None else f"{acc:.1f}", str(r.get("mpjpe_cost_mm", "")),
                 "" if shift is None else f"{shift['mean_mm']:.2f} / {shift['max_mm']:.1f}",
                 "" if not k else f"{k['quantized_convs']}/{k['quantized_convs'] + k['float_convs']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--md", type=Path, help="write the table here")
    p.add_argument("--engines", type=Path, default=Path(tempfile.gettempdir()) / "cnpose-bench-int8-engines")
    args = p.parse_args(argv)
    result = run(args.engines, settings(), progress=True)
    text = table(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.md:
        args.md.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

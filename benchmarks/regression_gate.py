"""Benchmark regression gate: the package's speed as ratios to references measured in the same run.

    python benchmarks/regression_gate.py save    # measure REPEATS times, store ratios + noise
    python benchmarks/regression_gate.py check   # measure again; a table; exit 1 on a regression
    python benchmarks/regression_gate.py demo    # save, then check with a slowdown injected: must fail

Absolute timings on a shared 2-core machine move by half from run to run, so the gate never
compares them. Each pair times a package path and a reference that does the same work without
the package (a bare ONNX Runtime session, cv2 + NumPy, a memory copy), in alternating rounds of
one process, everything on one thread (ORT, the crop and decode kernels, the estimator's prep):
other processes then slow both sides alike, where a multi-threaded side would lose more of a busy
machine than a one-threaded one. A block's ratio is the fastest package round over the fastest
reference round (load only ever adds time). `save` measures REPEATS blocks and stores, per pair,
the median ratio and how far the blocks spread; `check` flags a pair whose ratio grew by more than
its tolerance max(THRESHOLD, 3 x spread) (capped at MAX_TOLERANCE) only when it stays over it in
up to three measurements: one within the tolerance clears it (a real regression persists; a burst
of load does not).

CNPOSE_BENCH_SLOWDOWN_MS=N sleeps N ms in every package call (never in a reference): what a
regression looks like, for `demo`. Environment: ROUNDS (per block, default 9), REPEATS (save's
blocks, default 3), THRESHOLD (default 0.25), MAX_TOLERANCE (default 0.6), GATE_DIR (default
.benchmarks). Exit codes: 0 pass, 1 regression, 2 usage or no baseline.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROUNDS = int(os.environ.get("ROUNDS", "11"))
REPEATS = int(os.environ.get("REPEATS", "3"))
THRESHOLD = float(os.environ.get("THRESHOLD", "0.25").rstrip("%")) / (100 if "%" in os.environ.get(
    "THRESHOLD", "") else 1)
MAX_TOLERANCE = float(os.environ.get("MAX_TOLERANCE", "0.6"))
GATE_DIR = Path(os.environ.get("GATE_DIR", ROOT / ".benchmarks"))
BASELINE = GATE_DIR / "gate-baseline.json"
MIN_CALL_S = 0.02  # a timed call shorter than this is repeated until it is not (timer resolution, jitter)


class Pair:
    """A package path and its same-run reference, both argument-free callables."""

    def __init__(self, name: str, package: Callable[[], object], reference: Callable[[], object],
                 what: str) -> None:
        self.name, self.package, self.reference, self.what = name, package, reference, what
        self.inner = 1

    def calibrate(self) -> None:
        self.package()
        self.reference()
        t = min(_time(self.package, 1), _time(self.reference, 1))
        self.inner = max(1, int(np.ceil(MIN_CALL_S / max(t, 1e-7))))

    def measure(self, rounds: int) -> float:
        """Fastest package round / fastest reference round, in alternating order."""
        pkg, ref = [], []
        for r in range(rounds):
            first, second = (self.package, self.reference) if r % 2 == 0 else (self.reference, self.package)
            a, b = _time(first, self.inner), _time(second, self.inner)
            pkg.append(a if r % 2 == 0 else b)
            ref.append(b if r % 2 == 0 else a)
        return min(pkg) / min(ref)


def _time(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _slowed(fn: Callable[[], object]) -> Callable[[], object]:
    delay = float(os.environ.get("CNPOSE_BENCH_SLOWDOWN_MS", "0")) / 1000
    if delay <= 0:
        return fn

    def slowed() -> object:
        time.sleep(delay)
        return fn()
    return slowed


def _engine_path() -> Path:
    from cnpose_trt import build_engine

    built = build_engine("XS", backend="onnxruntime", precision="fp32", max_batch=2,
                         out_dir=GATE_DIR / "gate-engines")
    return Path(built.path)


def pairs() -> list[Pair]:
    """The gate's subset: XS end to end and engine only, the crop kernel, the CPU decode of 2UP."""
    import cv2
    import onnxruntime as ort

    from cnpose_trt import load_engine
    from cnpose_trt.io.draw import demo_image
    from cnpose_trt.ops.cropping import crop_normalize
    from cnpose_trt.ops.decoding import decode
    from cnpose_trt.ops.geometry import crop_matrices
    from cnpose_trt.pipeline.estimator import PoseEstimator
    from cnpose_trt.spec import PIXEL_MEAN, PIXEL_STD

    cv2.setNumThreads(1)
    path = _engine_path()
    engine = load_engine(path, threads=1)
    opts = ort.SessionOptions()  # the engine's session settings: threads and spinning are not the difference
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if engine.spinning else "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, 3, 256, 256)).astype(np.float32)
    x2 = rng.standard_normal((2, 3, 256, 256)).astype(np.float32)
    est = PoseEstimator(engine, prep_threads=1)
    image, box = demo_image()
    boxes = [np.asarray([box], np.float64)]

    big = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    side = rng.uniform(150, 700, 16) * 1.25
    crop_boxes = np.column_stack([rng.uniform(0, 1920 - side), rng.uniform(0, 1080 - side), side, side])
    mats = crop_matrices(crop_boxes, 256)
    index = np.zeros(16, np.int32)
    out = np.empty((16, 3, 256, 256), np.float32)
    mean, std = np.float32(PIXEL_MEAN), np.float32(PIXEL_STD)

    def cv2_crops() -> None:  # the hand-written way: warpAffine per person, then normalise and transpose
        for i, m in enumerate(mats):
            crop = cv2.warpAffine(big, m, (256, 256), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
            out[i] = ((crop.astype(np.float32) - mean) / std).transpose(2, 0, 1)

    heat = (rng.standard_normal((8, 18 * 32, 32, 32)) * 3).astype(np.float32)
    sink = np.empty_like(heat)
    return [
        Pair("e2e-XS-b1", _slowed(lambda: est.predict([image], boxes)), lambda: session.run(None, {name: x1}),
             "PoseEstimator.predict, 1 person / bare ORT session on a ready crop"),
        Pair("engine-XS-b2", _slowed(lambda: engine.infer(x2)), lambda: session.run(None, {name: x2}),
             "engine.infer / bare ORT session, batch 2"),
        Pair("crop-P16", _slowed(lambda: crop_normalize(big, index, mats, 256, out=out, threads=1)), cv2_crops,
             "fused crop kernel / cv2.warpAffine + NumPy, 16 people from 1080p"),
        Pair("decode-2UP-b8", _slowed(lambda: decode(heat, 18, threads=1)), lambda: np.copyto(sink, heat),
             "fused CPU decode / a copy of the same heatmaps"),
    ]


def _machine() -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from conftest import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} logical CPUs"


def _measure_all(ps: list[Pair], blocks: int) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {p.name: [] for p in ps}
    for b in range(blocks):
        for p in ps:
            found[p.name].append(p.measure(ROUNDS))
        print(f"  block {b + 1}/{blocks}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in found.items()), flush=True)
    return found


def save() -> int:
    ps = pairs()
    for p in ps:
        p.calibrate()
    print(f"measuring {len(ps)} pairs, {REPEATS} blocks of {ROUNDS} rounds")
    found = _measure_all(ps, REPEATS)
    doc = {"machine": _machine(), "saved": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": ROUNDS, "pairs": {}}
    for p in ps:
        vals = found[p.name]
        med = statistics.median(vals)
        spread = max(abs(v - med) for v in vals) / med
        doc["pairs"][p.name] = {"ratio": med, "blocks": vals, "spread": spread, "what": p.what}
    GATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = BASELINE.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(BASELINE)
    print(f"baseline saved to {BASELINE.relative_to(ROOT) if BASELINE.is_relative_to(ROOT) else BASELINE} "
          f"({doc['machine']})")
    return 0


def check() -> int:
    if not BASELINE.exists():
        print(f"regression gate: no baseline at {BASELINE}: run 'bash benchmarks/regression_gate.sh save' first")
        return 2
    base = json.loads(BASELINE.read_text())
    machine = _machine()
    if base.get("machine") != machine:
        print(f"regression gate: the baseline was measured on {base.get('machine')!r}, this is {machine!r}: "
              "save a baseline on this machine first")
        return 2
    ps = [p for p in pairs() if p.name in base["pairs"]]
    for p in ps:
        p.calibrate()
    rows, failed = [], 0
    for p in ps:
        b = base["pairs"][p.name]
        tol = min(MAX_TOLERANCE, max(THRESHOLD, 3 * b["spread"]))
        tries = [p.measure(ROUNDS)]
        while tries[-1] > b["ratio"] * (1 + tol) and len(tries) < 3:
            tries.append(p.measure(ROUNDS))  # confirm: a real regression persists
        now = min(tries)
        change = now / b["ratio"] - 1
        bad = change > tol
        failed += bad
        rows.append((p.name, b["ratio"], now, change, tol, len(tries), "REGRESSED" if bad else "ok"))
    print(f"{'pair':<16}{'baseline':>10}{'now':>10}{'change':>9}{'allowed':>9}{'runs':>6}  verdict")
    for name, r0, r1, ch, tol, n, verdict in rows:
        print(f"{name:<16}{r0:>10.3f}{r1:>10.3f}{ch:>+9.1%}{tol:>+9.1%}{n:>6}  {verdict}")
    print("ratio = package time / reference time, both measured in this run (lower is faster)")
    if failed:
        print(f"regression gate: {failed} of {len(rows)} pairs regressed")
        return 1
    print(f"regression gate: no regression ({len(rows)} pairs)")
    return 0


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "check"
    if cmd == "save":
        return save()
    if cmd == "check":
        return check()
    if cmd == "demo":
        rc = save()
        if rc:
            return rc
        ms = os.environ.get("SLOWDOWN_MS", "40")
        print(f"baseline saved; checking again with CNPOSE_BENCH_SLOWDOWN_MS={ms} injected into the package's calls")
        os.environ["CNPOSE_BENCH_SLOWDOWN_MS"] = ms
        rc = check()
        if rc == 1:
            print("regression gate: the injected slowdown was caught, as it must be")
            return 0
        print(f"regression gate: the injected slowdown was NOT caught (check exit {rc})")
        return 1
    print("usage: regression_gate.py save|check|demo")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

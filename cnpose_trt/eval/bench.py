"""`cnpose-trt bench`: trtexec-style throughput and latency table, and a throughput plot.

For each variant, backend, precision and batch: engine-only latency (p50/p90/p99) and
throughput, end-to-end PoseEstimator latency and throughput on generated scenes, and the
decode's share of the end-to-end stage time. Random weights unless a checkpoint is given:
speed does not depend on the weights.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .. import backends, checks
from ..progress import say

MAX_BATCH = 4096  # the largest engine profile build_engine makes
MEMORY_SHARE = 0.5  # of physical memory that one measurement may plan to use


def _physical_memory() -> int | None:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_args(variants: Sequence[str], batches: Sequence[int], iterations: int, warmup: int) -> None:
    """Refuse settings that cannot be measured, before anything is built.

    A batch needs its input, its heatmaps and the estimator's copies of both, about
    3 x (3*S*S + J*D*H*W) x 4 bytes per person; more than half the physical memory is refused.

    Raises:
        ValueError: naming the option and what is allowed.
    """
    from ..spec import get_spec

    bad = [b for b in batches if not checks.is_integer(b) or not 1 <= b <= MAX_BATCH]
    if bad or not batches:
        raise ValueError(f"--batch must be integers in 1..{MAX_BATCH}, got {bad or list(batches)}")
    if not checks.is_integer(iterations) or iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {iterations!r}")
    if not checks.is_integer(warmup) or warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup!r}")
    memory = _physical_memory()
    if memory is None:
        return
    for variant in variants:
        spec = get_spec(variant)
        per_person = 3 * 4 * (int(np.prod(spec.input_shape)) + int(np.prod(spec.heatmap_shape)))
        need = max(batches) * per_person
        if need > MEMORY_SHARE * memory:
            fits = int(MEMORY_SHARE * memory // per_person)
            raise ValueError(f"--batch {max(batches)} needs about {need / 2**30:.1f} GiB for variant {spec.name}, more "
                             f"than half of this machine's {memory / 2**30:.1f} GiB; use --batch {fits} or less")


def _scenes(batch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from ..io.draw import demo_image

    img, box = demo_image()
    return [img] * batch, [np.asarray([box], np.float64)] * batch


def _crops(images: list[np.ndarray], boxes: list[np.ndarray], dtype: Any) -> np.ndarray:
    """The network inputs end to end feeds the engine: engine-only times the same data (a random-weight
    network's speed can depend on its input values, e.g. through denormals)."""
    from ..io.preprocess import prepare

    return np.ascontiguousarray(np.concatenate([prepare(i, b)[0] for i, b in zip(images, boxes, strict=True)]),
                                dtype=dtype)


def _interleaved(engine_call: Callable[[], Any], e2e_call: Callable[[], Any], iterations: int,
                 warmup: int) -> tuple[np.ndarray, np.ndarray]:
    """Engine-only and end-to-end timings in alternating iterations: load that comes and goes on a
    shared machine lands on both columns alike instead of on whichever ran second."""
    for _ in range(warmup):
        engine_call()
        e2e_call()
    eng, e2e = np.empty(iterations), np.empty(iterations)
    for i in range(iterations):
        first, second = (engine_call, e2e_call) if i % 2 == 0 else (e2e_call, engine_call)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        a, b = t1 - t0, t2 - t1
        eng[i], e2e[i] = (a, b) if i % 2 == 0 else (b, a)
    return eng, e2e


def _stats(seconds: np.ndarray, batch: int) -> dict[str, float]:
    p50, p90, p99 = np.percentile(seconds, [50, 90, 99]) * 1e3
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "img_s": float(batch / seconds.mean())}


# Multiply-accumulates per image of each variant (asserted by tests/test_model.py) and each CPU engine's
# rough speed relative to a NumPy float32 matmul on the same machine: only for the time estimate.
GMACS = {"XS": 0.82, "S": 1.74, "M": 2.79, "L": 4.26}
SPEED_VS_MATMUL = {"onnxruntime": 1.0, "torch": 0.35, "tensorrt": 20.0}
BUILD_S = {"fp32": 15.0, "fp16": 20.0, "int8": 60.0}  # a build that is not cached, on a 2-core CPU


def matmul_gflops(seconds: float = 0.25) -> float:
    """This machine's float32 matmul rate now (GFLOP/s), from a short probe."""
    a = np.random.default_rng(0).random((384, 384), dtype=np.float32)
    a @ a
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        n += 1
    return n * 2 * 384 ** 3 / (time.perf_counter() - t0) / 1e9


def estimate_seconds(variant: str, backend: str, precision: str, batches: Sequence[int], iterations: int,
                     warmup: int, gflops: float) -> float:
    """Rough time for one configuration: a build, then engine and end to end at every batch."""
    per_image = 2 * GMACS.get(variant, 2.79) / (gflops * SPEED_VS_MATMUL.get(backend, 1.0))
    people = sum(batches) * (iterations + warmup + 1) * 2
    return BUILD_S.get(precision, 20.0) + people * per_image * 1.15


def _takes(backend: str) -> tuple[str, ...]:
    """The load options a named backend takes (none for "auto")."""
    return backends.get(backend).LOAD_OPTIONS if backend in backends.NAMES else ()


def _slow_reason(variant: str, backend: str) -> str | None:
    """Configurations that measure nothing a CPU user runs, opt-in with --all."""
    if backend not in backends.NAMES or not backends.get(backend).CPU_IS_REFERENCE or variant in ("XS", "S"):
        return None
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except ImportError:
        return None
    return (f"the torch backend on the CPU is a reference, not an engine: {variant} runs at well under 1 img/s "
            "on 2 cores; --all measures it")


def run_bench(variants: Sequence[str], backends: Sequence[str], precisions: Sequence[str], batches: Sequence[int],
              *, iterations: int = 10, warmup: int = 2, engine_dir: Any = None, checkpoint: Any = None,
              calib_images: Any = None, cuda_graphs: bool = False, budget: float | None = None,
              include_slow: bool = False, progress: Callable[[str], None] | None = None,
              on_row: Callable[[dict[str, Any]], None] | None = None, threads: int | None = None,
              spinning: bool | str | None = None) -> list[dict[str, Any]]:
    """Measure every combination; unsupported ones are reported as skipped rows with the reason.

    Engine-only and end-to-end timings alternate iteration by iteration, on the same inputs. Each
    row goes to `on_row` as soon as it is measured (a run that is cut off keeps what it measured).
    With `budget` (seconds), a configuration whose estimated time would overrun it is skipped with
    the estimate; the estimate is rescaled by what the finished configurations really took.
    threads, spinning: ONNX Runtime session options of the onnxruntime engines (threads also for
    torch engines); None: the defaults.
    """
    from ..backends import session_options
    from ..config import BuildConfig, EngineRequest
    from ..errors import CnposeError
    from ..pipeline.estimator import PoseEstimator
    from ..runtime.open import open_engine
    from ..spec import get_spec

    say = progress or (lambda m: None)
    emit = on_row or (lambda r: None)
    session = session_options(threads, spinning)
    check_args(variants, batches, iterations, warmup)
    if budget is not None and not (checks.is_number(budget) and budget > 0):
        raise ValueError(f"--budget must be a positive number of seconds, got {budget!r}")
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        emit(row)

    combos = [(get_spec(v), b, p) for v in variants for b in backends for p in precisions]
    gflops = matmul_gflops()
    guesses = [estimate_seconds(s.name, b, p, batches, iterations, warmup, gflops) for s, b, p in combos]
    say(f"{len(combos)} configurations x batch {', '.join(map(str, batches))}: about {sum(guesses) / 60:.1f} min "
        f"(a rough estimate from the variants' MACs and a {gflops:.0f} GFLOP/s matmul probe of this machine; "
        "builds that are cached take less)" + (f"; budget {budget:.0f} s" if budget else ""))
    started, spent, guessed = time.perf_counter(), 0.0, 0.0
    for k, ((spec, backend, precision), guess) in enumerate(zip(combos, guesses, strict=True), 1):
        base = {"variant": spec.name, "head": spec.head_tag, "precision": precision,
                "backend": backend + ("+graphs" if cuda_graphs and "cuda_graphs" in _takes(backend) else "")}
        slow = None if include_slow else _slow_reason(spec.name, backend)
        scale = spent / guessed if guessed else 1.0
        elapsed = time.perf_counter() - started
        if slow is None and budget is not None and elapsed + guess * scale > budget:
            slow = f"over --budget {budget:.0f} s: {elapsed:.0f} s spent, this one needs about {guess * scale:.0f} s"
        if slow:
            add({**base, "skipped": slow})
            say(f"[{k}/{len(combos)}] {spec.name} {backend} {precision}: skipped: {slow}")
            continue
        say(f"[{k}/{len(combos)}] {spec.name} {backend} {precision}: building or loading the engine "
            f"(about {guess * scale:.0f} s)")
        t_cfg = time.perf_counter()
        calib = {}
        if precision == "int8":
            calib = {"calib_images": calib_images} if calib_images else {"calib_synthetic": True, "calib_count": 16}
        try:
            options = {k: v for k, v in session.items() if k in _takes(backend)}
            if cuda_graphs and "cuda_graphs" in _takes(backend):
                options["cuda_graphs"] = True
            config = BuildConfig(spec, checkpoint, backend=backend, precision=precision, out_dir=engine_dir,
                                 max_batch=max(batches), **calib)
            engine = open_engine(EngineRequest(build=config, load=options))
        except (CnposeError, ValueError) as exc:
            add({**base, "skipped": str(exc).splitlines()[0]})
            say(f"      skipped: {rows[-1]['skipped']}")
            continue
        est = PoseEstimator(engine)
        for batch in batches:
            images, boxes = _scenes(batch)
            x = _crops(images, boxes, engine.input_dtype)
            est.predict(images, boxes)
            est.timings.reset()
            t_eng, t_e2e = _interleaved(partial(engine.infer, x), partial(est.predict, images, boxes), iterations,
                                        warmup)
            eng, e2e = _stats(t_eng, batch), _stats(t_e2e, batch)
            shares = est.timings.shares()
            add({**base, "batch": batch, "engine": eng, "e2e": e2e, "e2e_of_engine": e2e["img_s"] / eng["img_s"],
                 "decode_share": shares["decode"], "prepare_share": shares["prepare"]})
            say(f"      batch {batch}: engine {eng['img_s']:.1f} img/s, end-to-end {e2e['img_s']:.1f} img/s")
        spent += time.perf_counter() - t_cfg
        guessed += guess
    return rows


TABLE_HEAD = (f"{'variant':<8}{'head':<16}{'backend':<13}{'prec':<6}{'batch':>6}{'engine img/s':>14}"
              f"{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'e2e img/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'e2e/eng':>8}{'decode':>8}")
TABLE_NOTE = ("engine: engine.infer on the batch's ready crops; e2e: PoseEstimator.predict from the images "
              "(crop, engine, decode); both on the same people, in alternating iterations; e2e/eng: their "
              "throughput ratio; decode: the decode's share of the end-to-end stage time")


def format_row(r: dict[str, Any]) -> str:
    lead = f"{r['variant']:<8}{r['head']:<16}{r['backend']:<13}{r['precision']:<6}"
    if "skipped" in r:
        return f"{lead}{'':>6}  skipped: {r['skipped'][:110]}"
    e, t = r["engine"], r["e2e"]
    return (f"{lead}{r['batch']:>6}{e['img_s']:>14.1f}{e['p50_ms']:>9.2f}{e['p90_ms']:>9.2f}"
            f"{e['p99_ms']:>9.2f}{t['img_s']:>11.1f}{t['p50_ms']:>9.2f}{t['p99_ms']:>9.2f}"
            f"{t['img_s'] / e['img_s']:>8.2f}{r['decode_share']:>8.1%}")


def format_table(rows: list[dict[str, Any]]) -> str:
    return "\n".join([TABLE_HEAD, "-" * len(TABLE_HEAD), *map(format_row, rows)])


def plot(rows: list[dict[str, Any]], path: Path, machine: str) -> Path:
    """End-to-end throughput against batch size, one line per head configuration and engine."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if "skipped" not in r:
            key = f"{r['variant']} {r['head']} · {r['backend']} {r['precision']}"
            series.setdefault(key, []).append((r["batch"], r["e2e"]["img_s"]))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in rows if "skipped" not in r})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch (people)")
    ax.set_ylabel("end-to-end images / s")
    ax.set_title(f"cnpose-trt bench: {machine}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def machine_name() -> str:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", " + torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{cpu} ({os.cpu_count()} cores){gpu}"


def main(args: Any) -> int:
    """`cnpose-trt bench`: the table row by row as each configuration finishes, the JSON rewritten after
    every row and the plot written at the end, also when the run is stopped or runs out of budget."""
    from ..cache import finite_json

    machine = machine_name()
    rows: list[dict[str, Any]] = []

    def save_json() -> None:
        if args.json:
            tmp = Path(f"{args.json}.tmp")
            tmp.write_text(finite_json({"machine": machine, "note": TABLE_NOTE, "rows": rows}) + "\n")
            tmp.replace(args.json)

    def on_row(row: dict[str, Any]) -> None:
        rows.append(row)
        print(format_row(row), flush=True)
        save_json()

    print(f"machine: {machine}")
    print(TABLE_NOTE)
    print(TABLE_HEAD)
    print("-" * len(TABLE_HEAD), flush=True)
    try:
        run_bench(args.variant, args.backend, args.precision, args.batch, iterations=args.iterations,
                  warmup=args.warmup, engine_dir=args.engines, checkpoint=args.checkpoint,
                  calib_images=args.calib_images, cuda_graphs=args.cuda_graphs, budget=args.budget,
                  include_slow=args.all, progress=say, on_row=on_row, threads=args.threads, spinning=args.spinning)
    finally:
        if args.json and rows:
            print(f"wrote {args.json}", file=sys.stderr)
        if args.plot and any("skipped" not in r for r in rows):
            plot(rows, Path(args.plot), machine)
            print(f"wrote {args.plot}", file=sys.stderr)
    if rows and all("skipped" in r for r in rows):
        print("error: nothing was measured: every combination was skipped (reasons above)", file=sys.stderr)
        return 1
    return 0

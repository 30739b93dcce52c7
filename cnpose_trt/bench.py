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
from pathlib import Path
from typing import Any

import numpy as np

from .progress import say

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
    from .spec import get_spec

    bad = [b for b in batches if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BATCH]
    if bad or not batches:
        raise ValueError(f"--batch must be integers in 1..{MAX_BATCH}, got {bad or list(batches)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {iterations!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
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
    from .draw import demo_image

    img, box = demo_image()
    return [img] * batch, [np.asarray([box], np.float64)] * batch


def _timed(fn: Callable[..., Any], args: tuple[Any, ...], iterations: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        fn(*args)
    out = np.empty(iterations)
    for i in range(iterations):
        started = time.perf_counter()
        fn(*args)
        out[i] = time.perf_counter() - started
    return out


def _stats(seconds: np.ndarray, batch: int) -> dict[str, float]:
    p50, p90, p99 = np.percentile(seconds, [50, 90, 99]) * 1e3
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "img_s": float(batch / seconds.mean())}


def run_bench(variants: Sequence[str], backends: Sequence[str], precisions: Sequence[str], batches: Sequence[int],
              *, iterations: int = 10, warmup: int = 2, engine_dir: Any = None, checkpoint: Any = None,
              calib_images: Any = None, cuda_graphs: bool = False,
              progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure every combination; unsupported ones are reported as skipped rows with the reason."""
    from .build import build_engine
    from .engine import load_engine
    from .errors import CnposeError
    from .pipeline import PoseEstimator
    from .spec import get_spec

    say = progress or (lambda m: None)
    check_args(variants, batches, iterations, warmup)
    rows: list[dict[str, Any]] = []
    combos = [(v, b, p) for v in variants for b in backends for p in precisions]
    for k, (variant, backend, precision) in enumerate(combos, 1):
        spec = get_spec(variant)
        base = {"variant": spec.name, "head": spec.head_tag, "precision": precision,
                "backend": backend + ("+graphs" if cuda_graphs and backend == "torch" else "")}
        say(f"[{k}/{len(combos)}] {spec.name} {backend} {precision}: building or loading the engine")
        calib = {}
        if precision == "int8":
            calib = {"calib_images": calib_images} if calib_images else {"calib_synthetic": True, "calib_count": 16}
        try:
            built = build_engine(spec, checkpoint, backend=backend, precision=precision, out_dir=engine_dir,
                                 max_batch=max(batches), **calib)
            engine = load_engine(built.path, **({"cuda_graphs": True} if cuda_graphs and backend == "torch" else {}))
        except (CnposeError, ValueError) as exc:
            rows.append({**base, "skipped": str(exc).splitlines()[0]})
            say(f"      skipped: {rows[-1]['skipped']}")
            continue
        est = PoseEstimator(engine)
        for batch in batches:
            x = np.random.default_rng(0).standard_normal((batch, *spec.input_shape)).astype(engine.input_dtype)
            eng = _stats(_timed(engine.infer, (x,), iterations, warmup), batch)
            images, boxes = _scenes(batch)
            est.predict(images, boxes)
            est.timings.reset()
            e2e = _stats(_timed(est.predict, (images, boxes), iterations, warmup), batch)
            shares = est.timings.shares()
            rows.append({**base, "batch": batch, "engine": eng, "e2e": e2e, "decode_share": shares["decode"],
                         "prepare_share": shares["prepare"]})
            say(f"      batch {batch}: engine {eng['img_s']:.1f} img/s, end-to-end {e2e['img_s']:.1f} img/s")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'variant':<8}{'head':<16}{'backend':<13}{'prec':<6}{'batch':>6}{'engine img/s':>14}"
            f"{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'e2e img/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'decode':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = f"{r['variant']:<8}{r['head']:<16}{r['backend']:<13}{r['precision']:<6}"
        if "skipped" in r:
            lines.append(f"{lead}{'':>6}  skipped: {r['skipped'][:90]}")
            continue
        e, t = r["engine"], r["e2e"]
        lines.append(f"{lead}{r['batch']:>6}{e['img_s']:>14.1f}{e['p50_ms']:>9.2f}{e['p90_ms']:>9.2f}"
                     f"{e['p99_ms']:>9.2f}{t['img_s']:>11.1f}{t['p50_ms']:>9.2f}{t['p99_ms']:>9.2f}"
                     f"{r['decode_share']:>8.1%}")
    return "\n".join(lines)


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
    rows = run_bench(args.variant, args.backend, args.precision, args.batch, iterations=args.iterations,
                     warmup=args.warmup, engine_dir=args.engines, checkpoint=args.checkpoint,
                     calib_images=args.calib_images, cuda_graphs=args.cuda_graphs,
                     progress=say)
    from .cli import finite_json

    machine = machine_name()
    print(f"machine: {machine}")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(finite_json({"machine": machine, "rows": rows}) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(rows, Path(args.plot), machine)
        print(f"wrote {args.plot}", file=sys.stderr)
    if rows and all("skipped" in r for r in rows):
        print("error: nothing was measured: every combination was skipped (reasons above)", file=sys.stderr)
        return 1
    return 0

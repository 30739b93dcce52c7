"""`cnpose-trt bench`: the measurements of eval.bench as a table printed row by row, a JSON file
rewritten after every row and a plot of end-to-end throughput against batch size, written also when
the run is stopped or runs out of budget.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..cache import finite_json
from ..eval.bench import check_args, run_bench  # noqa: F401  (check_args: the command's checks, before any build)
from ..progress import say
from .errors import Failed

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
        raise Failed("nothing was measured: every combination was skipped (reasons above)")
    return 0

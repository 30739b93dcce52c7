"""Benchmark plumbing: machine record, and a table of each group against its baseline and its
bandwidth reference, all measured in the same run.

Each benchmark sets `group` and puts in extra_info: role ("baseline", "candidate" or
"bandwidth"), backend, images (per call) and bytes (moved per call: for a candidate the bytes
it must read; for the bandwidth reference the bytes read plus written).
"""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import onnxruntime

    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        from cnpose_trt import _C

        info["cnpose_trt._C"] = (f"isa={_C.cpu_isa()} avx2={_C.cpu_has_avx2()} avx512={_C.cpu_has_avx512()} "
                                 f"cuda={_C.built_with_cuda}")
    except ImportError:
        info["cnpose_trt._C"] = "not built"
    return info


def pytest_benchmark_update_machine_info(config, machine_info):  # noqa: F811 - pytest-benchmark hook
    machine_info["cnpose_trt"] = globals()["machine_info"]()


def _row(bench) -> dict:
    stats = bench.stats
    data = sorted(stats.data if hasattr(stats, "data") else stats.stats.data)  # a session's entry, or the fixture
    info = bench.extra_info
    p50 = float(np.percentile(data, 50))
    return {"group": bench.group, "role": info.get("role", "?"), "backend": info.get("backend", bench.name),
            "p50": p50, "p99": float(np.percentile(data, 99)), "images": info.get("images", 1),
            "bytes": info.get("bytes")}


def summary_rows(benchmarks) -> list[str]:
    rows = [_row(b) for b in benchmarks if b.stats is not None]
    lines = [f"{'group':<36}{'backend':<34}{'role':<10}{'p50 ms':>9}{'p99 ms':>9}{'ms/img':>9}{'img/s':>9}"
             f"{'GB/s':>8}{'speed-up':>9}{'of bw':>7}"]
    for group in sorted({r["group"] for r in rows}):
        members = [r for r in rows if r["group"] == group]
        base = next((r for r in members if r["role"] == "baseline"), None)
        bw = next((r for r in members if r["role"] == "bandwidth"), None)
        for r in members:
            gbs = r["bytes"] / r["p50"] / 1e9 if r["bytes"] else None
            up = f"{base['p50'] / r['p50']:.1f}x" if base and r is not base and r["role"] != "bandwidth" else ""
            share = ""
            if bw and r is not bw and gbs and bw["bytes"]:
                share = f"{gbs / (bw['bytes'] / bw['p50'] / 1e9):.0%}"
            lines.append(f"{group:<36}{r['backend'][:33]:<34}{r['role']:<10}{r['p50'] * 1e3:>9.3f}"
                         f"{r['p99'] * 1e3:>9.3f}{r['p50'] * 1e3 / r['images']:>9.3f}{r['images'] / r['p50']:>9.1f}"
                         f"{(f'{gbs:.1f}' if gbs else ''):>8}{up:>9}{share:>7}")
    return lines


_STARTED = [0.0]


def pytest_collection_modifyitems(session, config, items):
    import time

    _STARTED[0] = time.perf_counter()
    budget = os.environ.get("CNPOSE_BENCH_BUDGET")
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None and items:
        tr.write_line(f"cnpose_trt benchmarks: {len(items)} cases; each finished one is printed as a row and appended "
                      f"to {_jsonl_path()}" + (f"; budget {budget} s (CNPOSE_BENCH_BUDGET)" if budget else ""))


def _jsonl_path() -> str:
    return os.environ.get("CNPOSE_BENCH_JSONL", ".benchmarks/rows.jsonl")


def pytest_runtest_setup(item):
    """CNPOSE_BENCH_BUDGET=SECONDS: cases that would start after the budget is spent are skipped."""
    import time

    budget = os.environ.get("CNPOSE_BENCH_BUDGET")
    if budget and time.perf_counter() - _STARTED[0] > float(budget):
        pytest.skip(f"over CNPOSE_BENCH_BUDGET={budget} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Each benchmark's row goes to the terminal and to a JSON Lines file as soon as it is measured: a
    long run that is cut off keeps everything it finished."""
    yield
    bench = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
    if bench is None or getattr(bench, "stats", None) is None or bench.stats is None:
        return
    import json
    import time

    row = {"test": item.nodeid, **_row(bench), "extra": {k: v for k, v in bench.extra_info.items()
                                                          if isinstance(v, (str, int, float, bool))},
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = _jsonl_path()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    tr = item.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"  {row['group']:<34}{row['backend'][:40]:<42}{row['role']:<10}p50 {row['p50'] * 1e3:9.3f} ms"
                      f"  {row['images'] / row['p50']:9.1f} img/s")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    tr = terminalreporter
    tr.write_sep("=", "cnpose_trt benchmark summary (p50; speed-up vs the group's baseline; "
                      "'of bw' = share of the bandwidth reference; all from this run)")
    tr.write_line(f"machine: {machine_info()}")
    for line in summary_rows(session.benchmarks):
        tr.write_line(line)
    staged = [b for b in session.benchmarks if "stage_shares" in b.extra_info]
    if staged:
        tr.write_line("end-to-end stage shares (PoseEstimator timings: prepare on its threads, infer, decode):")
        for b in staged:
            sh = b.extra_info["stage_shares"]
            tr.write_line(f"  {b.group:<36}{b.extra_info['backend'][:40]:<42} prepare {sh['prepare']:.1%}  "
                          f"infer {sh['infer']:.1%}  decode {sh['decode']:.1%}")
    acc = [b for b in session.benchmarks if "accuracy_vs_fp32" in b.extra_info]
    if acc:
        tr.write_line("decoded-joint error against FP32 on the same inputs (cells; mm with a 2000 mm box):")
        for b in acc:
            a = b.extra_info["accuracy_vs_fp32"]
            tr.write_line(f"  {b.group:<38}{b.extra_info['precision']:<6} mean {a['mean_cells']:.4f} cells "
                          f"({a['mean_mm']:.2f} mm)  max {a['max_cells']:.4f} cells ({a['max_mm']:.2f} mm)  "
                          f"n={a['samples']}x18")


def slowdown(fn):
    """Wrap a benchmarked callable with an injected delay of $CNPOSE_BENCH_SLOWDOWN_MS ms.

    Only for demonstrating that the regression gate fails (benchmarks/regression_gate.sh).
    """
    delay = float(os.environ.get("CNPOSE_BENCH_SLOWDOWN_MS", "0")) / 1000
    if delay <= 0:
        return fn

    def slowed(*args, **kwargs):
        import time

        time.sleep(delay)
        return fn(*args, **kwargs)
    return slowed


@pytest.fixture(scope="session")
def bench_engine_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_engines")


def compiled_or_skip():
    """cnpose_trt._C, or skip the benchmark where it is not built."""
    try:
        from cnpose_trt import _C
    except ImportError:
        pytest.skip("cnpose_trt._C is not built")
    return _C


def cuda_or_skip():
    """torch, or skip where there is no CUDA device or the extension was built without CUDA."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not compiled_or_skip().built_with_cuda:
        pytest.skip("cnpose_trt._C was built without CUDA")
    return torch

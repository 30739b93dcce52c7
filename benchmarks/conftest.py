"""Benchmark plumbing: machine record, per-group ratio table against the baseline in the same run.

Each benchmark puts `group` (the head configuration), `role` ("baseline" or "candidate") and
`images` (per call) in extra_info; after the run a table gives images/s, p50/p99 and the
candidate/baseline speed-up per group.
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
    return info


def pytest_benchmark_update_machine_info(config, machine_info):  # noqa: F811 - pytest-benchmark hook
    machine_info["cnpose_trt"] = globals()["machine_info"]()


def _stats(bench) -> dict:
    data = sorted(bench.stats.data)
    n_img = bench.extra_info.get("images", 1)
    p50 = float(np.percentile(data, 50))
    return {"name": bench.name, "group": bench.group, "role": bench.extra_info.get("role", "?"),
            "backend": bench.extra_info.get("backend", "?"), "p50_ms": p50 * 1e3,
            "p99_ms": float(np.percentile(data, 99)) * 1e3, "img_s": n_img / p50}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = [_stats(b) for b in session.benchmarks if b.stats is not None]
    tr = terminalreporter
    tr.write_sep("=", "cnpose_trt benchmark summary (p50-based; speed-up = candidate vs baseline, same run)")
    tr.write_line(f"machine: {machine_info()}")
    tr.write_line(f"{'group':<34}{'backend':<26}{'role':<10}{'p50 ms':>10}{'p99 ms':>10}{'img/s':>10}{'speed-up':>10}")
    for group in sorted({r["group"] for r in rows}):
        members = [r for r in rows if r["group"] == group]
        base = next((r for r in members if r["role"] == "baseline"), None)
        for r in members:
            up = f"{base['p50_ms'] / r['p50_ms']:.2f}x" if base and r is not base else ""
            tr.write_line(f"{group:<34}{r['backend']:<26}{r['role']:<10}{r['p50_ms']:>10.2f}"
                          f"{r['p99_ms']:>10.2f}{r['img_s']:>10.1f}{up:>10}")


@pytest.fixture(scope="session")
def bench_engine_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_engines")

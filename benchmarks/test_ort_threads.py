"""Smoke run of benchmarks/ort_threads.py (issue 22, item 3) at the sizes the environment gives (CI: tiny).

The full runs (quiet, and with two busy-loop processes) wrote benchmarks/results/ort-threads-*.
"""

from __future__ import annotations

import ort_threads


def test_ort_threads_table(bench_engine_dir):
    cfg = {**ort_threads.settings(), "threads": [0, 1]}
    result = ort_threads.run(bench_engine_dir, cfg, load=1)
    got = {(r["variant"], r["threads"], r["spinning"]) for r in result["rows"]}
    assert got == {(v, t, s) for v in cfg["variants"] for t in (0, 1) for s in (True, False)}
    assert all(r["images_per_s"] > 0 for r in result["rows"]) and "| on |" in ort_threads.table(result)

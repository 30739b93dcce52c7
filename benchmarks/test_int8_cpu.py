"""Smoke run of benchmarks/int8_cpu.py (issue 22, item 2) at the sizes the environment gives (CI: tiny).

The full run (`python benchmarks/int8_cpu.py --json F --md F`) wrote
benchmarks/results/int8-cpu-*.json/.md; here only that it runs and what it reports holds together.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import int8_cpu  # noqa: E402


def test_int8_cpu_table(bench_engine_dir):
    cfg = int8_cpu.settings()
    result = int8_cpu.run(bench_engine_dir, cfg)
    rows = {(r["variant"], r["engine"]): r for r in result["rows"]}
    for name in cfg["variants"]:
        fast = rows[(name, "int8 ort-u8s8")]
        assert rows[(name, "fp32")]["speed_vs_fp32"] == 1.0 and fast["speed_vs_fp32"] > 0
        k = fast["kernels"]
        assert k["quantized_convs"] / (k["quantized_convs"] + k["float_convs"]) >= 0.9, k
        assert fast["joint_shift_vs_fp32"]["samples"] >= cfg["batch"]
    if "XS" in cfg["variants"]:
        assert "mpjpe_cost_mm" in rows[("XS", "int8 ort-u8s8")]
        assert rows[("XS", "fp32")]["weights"].startswith("shipped")
    assert result["machine"]["cpu"] and "| XS |" in int8_cpu.table(result)

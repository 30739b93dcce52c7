"""OpenVINO on the CPU: fp32, bf16 (where the CPU has AMX-BF16 or AVX512-BF16) and int8 engines.

What the registry asks of a backend (backends/__init__.py): availability, version, its part of
the cache key, its capabilities, load and check_engine_file (runtime.py: OvEngine, never imports
torch; openvino itself only when an engine is loaded) and compile (compiler.py: the precision graph
as the engine file, compiled and checked, imported only when an engine is built). An optional
dependency: `pip install 'cnpose_trt[openvino]'`; importing this package does not import openvino.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .runtime import (  # noqa: F401  (the backend's answers to the registry)
    BF16_FLAGS,
    ENGINE_SUFFIX,
    INSTALL_HINT,
    LOAD_OPTIONS,
    NAME,
    OvEngine,
    available,
    bf16_problem,
    check_engine_file,
    load,
    version,
)

if TYPE_CHECKING:
    from ...build.builder import BuildJob

PRECISIONS = ("fp32", "bf16", "int8")
# The symmetric Q/DQ graph (Q/DQ on Conv inputs only), from the same calibration as the other backends:
# OpenVINO ran it 2.86x ORT FP32 on XS and 1.57x on M (batch 8, 2-core EPYC, avx512_vnni), against 1.62x /
# 1.38x for the "ort-u8s8" graph, whose Q/DQ around every Conv output and Add it does not fuse as well.
INT8_SCHEME = "trt-symmetric"
# The networks (spec.MODELS) whose engines it builds and loads.
MODELS = ("convnextpose",)
NEEDS_GRAPH = True
# Capabilities callers ask instead of comparing names: no GPU; the engine file (an ONNX graph) runs on any
# machine with this OpenVINO (bf16 ones where the CPU has the instructions, checked at load); a real engine.
GPU = "never"
PORTABLE_ENGINE = True
CPU_IS_REFERENCE = False


def key_fields(job: BuildJob) -> dict[str, Any]:
    return {"backend_version": version()}


def precision_problem(precision: str) -> str | None:
    """Why this machine cannot build the precision here (bf16 without the CPU's bf16 instructions), or None."""
    return bf16_problem() if precision == "bf16" else None


def compile(job: BuildJob, built: Path) -> dict[str, Any]:
    """The precision graph as the engine file, compiled by OpenVINO and checked (compiler.py, the build
    step); what the sidecar records. (The step's module is not called `compile`: importing it would bind
    the module over this function as the package's attribute.)"""
    from .compiler import compile as build_step

    return build_step(job, built)

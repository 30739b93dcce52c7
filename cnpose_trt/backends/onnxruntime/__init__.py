"""ONNX Runtime on the CPU: the embedded default backend.

What the registry asks of a backend (backends/__init__.py): availability, version, its part of
the cache key, its capabilities, load and check_engine_file (runtime.py: OrtEngine, never imports
torch) and compile (compiler.py: optimise the precision graph into the engine file and check it,
imported only when an engine is built).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .runtime import (  # noqa: F401  (the backend's answers to the registry)
    DEFAULT_SPINNING,
    DEFAULT_THREADS,
    ENGINE_SUFFIX,
    INT8_SCHEME,
    LOAD_OPTIONS,
    NAME,
    OrtEngine,
    available,
    check_engine_file,
    load,
    version,
)

if TYPE_CHECKING:
    from ...build.builder import BuildJob

PRECISIONS = ("fp32", "fp16", "int8")
# The networks (spec.MODELS) whose engines it builds and loads.
MODELS = ("convnextpose", "rootnet")
NEEDS_GRAPH = True
# Capabilities callers ask instead of comparing names: no GPU; an engine file runs on any machine with
# this ONNX Runtime; a real engine on the CPU.
GPU = "never"
PORTABLE_ENGINE = True
CPU_IS_REFERENCE = False


def key_fields(job: BuildJob) -> dict[str, Any]:
    return {"backend_version": version()}


def compile(job: BuildJob, built: Path) -> dict[str, Any]:
    """Optimise the precision graph into the engine file and check it (compiler.py, the build step);
    what the sidecar records. (The step's module is not called `compile`: importing it would bind
    the module over this function as the package's attribute.)"""
    from .compiler import compile as build_step

    return build_step(job, built)

"""PyTorch backend: the network served by PyTorch, on the CPU or a CUDA GPU; the baseline on the
CPU and the GPU path for users without TensorRT.

What the registry asks of a backend (backends/__init__.py): availability, version, its part of
the cache key, its capabilities, load and check_engine_file (runtime.py: TorchEngine, which needs
torch by nature, imported when an engine is loaded) and compile (compiler.py: write the
checkpoint, imported only when an engine is built). Importing this package does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .runtime import (  # noqa: F401  (the backend's answers to the registry)
    ENGINE_SUFFIX,
    LOAD_OPTIONS,
    NAME,
    TorchEngine,
    available,
    check_engine_file,
    load,
    version,
)

if TYPE_CHECKING:
    from ...build.builder import BuildJob

PRECISIONS = ("fp32", "fp16")
# The networks (spec.MODELS) whose engines it builds and loads.
MODELS = ("convnextpose",)
NEEDS_GRAPH = False
# Capabilities callers ask instead of comparing names: a GPU where present; the checkpoint runs anywhere;
# on the CPU it is the PyTorch reference, not an engine (benchmarks make it opt-in there).
GPU = "optional"
PORTABLE_ENGINE = True
CPU_IS_REFERENCE = True


def key_fields(job: BuildJob) -> dict[str, Any]:
    return {"backend_version": version()}


def compile(job: BuildJob, built: Path) -> dict[str, Any]:
    """Write the torch 'engine' (compiler.py, the build step); nothing more for the sidecar. (The
    step's module is not called `compile`: importing it would bind the module over this function
    as the package's attribute.)"""
    from .compiler import compile as build_step

    return build_step(job, built)

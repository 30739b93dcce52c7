"""TensorRT 10.x / 11.x: build a strongly typed engine from a precision graph, and run it.

What the registry asks of a backend (backends/__init__.py): availability, version, its part of
the cache key, its capabilities, load and check_engine_file (runtime.py) and compile (compiler.py,
imported only when an engine is built). Written to the Python API of both major versions (one
code path). Device memory, pinned staging buffers and streams go through cuda-python
(cuda.bindings.runtime, backends/device.py), as NVIDIA's current samples do. Importing this
package needs neither TensorRT nor cuda-python nor torch; doing anything beyond reporting why it
cannot run needs TensorRT and an NVIDIA GPU.

The halves: diagnostics.py (availability, CUDA problems, the logger, GPU identity, plan
compatibility), runtime.py (TrtEngine), session.py (execution contexts, their streams and
buffers), compiler.py (the builder, timing cache, progress monitor: the build step).

Every TensorRT object lives in a variable (or attribute) named after its role: builder,
network, parser, config, profile, cache, stored_cache, plan, runtime, engine, context,
logger. tests/test_tensorrt_names.py maps each role to its TensorRT class and checks every
(class, attribute) used in this package, and the keywords passed, against pairs extracted from
NVIDIA's binding sources of TensorRT 10.16 and 11.1. One process-wide TensorRT logger forwards
TensorRT's messages to Python logging (`cnpose_trt.backends.tensorrt.trt`): warnings and errors
reach stderr, the rest is debug.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .diagnostics import (  # noqa: F401  (the backend's answers to the registry)
    INSTALL_HINT,
    availability,
    available,
    cuda_problem,
    gpu_identity,
    import_trt,
    version,
)
from .runtime import ENGINE_SUFFIX, LOAD_OPTIONS, NAME, TrtEngine, check_engine_file, load  # noqa: F401

if TYPE_CHECKING:
    from ...build.builder import BuildJob

PRECISIONS = ("fp32", "fp16", "int8")
INT8_SCHEME = "trt-symmetric"  # strongly typed: the symmetric Q/DQ graph (precision.py)
# The networks (spec.MODELS) whose engines it builds and loads.
MODELS = ("convnextpose", "rootnet")
NEEDS_GRAPH = True
# Capabilities callers ask instead of comparing names: a GPU is required; a plan is built for one GPU
# model and TensorRT version (built on each worker, not shipped); no CPU path.
GPU = "required"
PORTABLE_ENGINE = False
CPU_IS_REFERENCE = False


def key_fields(job: BuildJob) -> dict[str, Any]:
    """TensorRT's part of the cache key: its version, the GPU, the builder options."""
    return {"backend_version": version(), "device": gpu_identity(), "trt": dataclasses.asdict(job.trt),
            "opt_batch": job.opt_batch}


def compile(job: BuildJob, built: Path) -> dict[str, Any]:
    """Build the strongly typed engine from the precision graph (compiler.py, the build step);
    the record for the sidecar. (The step's module is not called `compile`: importing it would bind
    the module over this function as the package's attribute.)"""
    from .compiler import compile as build_step

    return build_step(job, built)

"""TensorRT's build step: parse the precision graph into a strongly typed network, build and
serialize the plan (with a shared timing cache and, on a terminal, a progress monitor), then
deserialize it and run it once on accuracy inputs; non-finite output refuses the build.

A build step (tests/test_layout.py puts every backends.<name>.compiler module in the build room):
imported only by the backend's thin compile() when an engine is built, never by the runtime.

Design choices (and why):
- The network is created with the STRONGLY_TYPED flag (ignored by 11.x, where every network is
  strongly typed), so FP16 and INT8 come from the ONNX graph (precision.py), never from builder
  flags that TensorRT 11 removed.
- TF32 is cleared for every build unless asked for (`tf32=True`): float32 layers of any
  precision's graph then compute in true float32, as the fp32 accuracy budget assumes.
  Clearing TF32 is allowed on strongly typed networks in 10.x and 11.x (trtexec's --noTF32
  does so with --stronglyTyped, and 11.x is always strongly typed).
- A timing cache that TensorRT rejects (another GPU or TensorRT version) is replaced by this
  build's cache, not merged: NVIDIA warns that a cache combined across devices
  (ITimingCache.combine with ignore_mismatch) may give functional or performance bugs, and a
  replaced cache is valid for the GPU that builds here. Engine folders shared by different
  GPUs therefore keep only the latest GPU's timings (correct, only slower to build).
- Comparing the built engine's joints with FP32 is the caller's job.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...build.verify import accuracy_inputs
from ...cache import atomic_write, file_lock
from ...errors import BuildError, EngineError
from ...spec import INPUT_NAME
from ..base import check_engine_io
from .diagnostics import check_build_options, create, gpu_identity, import_trt, trt_logger
from .runtime import deserialize, read_io
from .session import Session

if TYPE_CHECKING:
    from ...build.builder import BuildJob

log = logging.getLogger(__name__)


def compile(job: BuildJob, built: Path) -> dict[str, Any]:
    """Build the strongly typed engine from the precision graph; it is then run once on real crops
    and refused if its output is not finite (the record says so under build_check)."""
    job.say("[4/5] building the TensorRT engine (strongly typed)")
    opts = job.trt  # TrtOptions (named so the TensorRT name check does not read it as the module)
    record = build(job.graph, built, input_name=INPUT_NAME, input_shape=(job.max_batch, *job.spec.input_shape),
                   max_batch=job.max_batch, opt_batch=job.opt_batch, workspace_mb=opts.workspace_mb,
                   opt_level=opts.opt_level, timing_cache=job.out / "tensorrt.timing-cache",
                   version_compatible=opts.version_compatible, hardware_compatible=opts.hardware_compatible,
                   show_progress=job.show_progress, tf32=opts.tf32, check_inputs=accuracy_inputs(job.spec))
    job.say("[5/5] checked: the engine ran once on real crops, finite output")
    return {"tensorrt_build": record}


def check_finite(heatmaps: np.ndarray) -> dict[str, Any]:
    """The build-time run's verdict on (N, J*D, H, W) heatmaps: a summary, or BuildError if any
    value is NaN or infinite (e.g. FP16 overflow)."""
    h = np.asarray(heatmaps, np.float32)
    nan, inf = int(np.isnan(h).sum()), int(np.isinf(h).sum())
    if nan or inf:
        raise BuildError(f"the TensorRT engine produced non-finite heatmaps on the {len(h)} accuracy inputs "
                         f"({nan} NaN, {inf} inf of {h.size} values); the engine is not cached. An FP16 graph may "
                         "overflow: keep the offending layers in float32 (--keep-fp32) or build fp32")
    return {"inputs": int(len(h)), "finite": True, "min": float(h.min()), "max": float(h.max())}



def _progress_monitor(trt: Any) -> Any:
    class _Monitor(trt.IProgressMonitor):
        """Prints TensorRT's build phases to stderr (called from TensorRT's threads)."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                self._steps[phase_name] = num_steps
                if parent_phase is None:
                    print(f"      TensorRT: {phase_name} ({num_steps} steps)", file=sys.stderr, flush=True)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                self._steps.pop(phase_name, None)

    return _Monitor()


def _attach_timing_cache(config: Any, path: Path) -> tuple[Any, str]:
    """Give the build the stored timing cache, or a new one where TensorRT rejects the stored one.

    Returns (cache, status): status "reused", "created" (no file) or "replaced" (made by another
    GPU or TensorRT version: this build's cache overwrites it, see the module docstring).
    """
    stored = path.read_bytes() if path.is_file() else b""
    if stored:
        stored_cache = config.create_timing_cache(stored)
        if stored_cache is not None and config.set_timing_cache(stored_cache, ignore_mismatch=False):
            return stored_cache, "reused"
        log.warning("timing cache %s was made by another GPU or TensorRT version: building with a new one, "
                    "which replaces it", path)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("TensorRT could not create a timing cache; building without one")
        return None, "none"
    return cache, "replaced" if stored else "created"


def build(onnx_path: Path, engine_path_tmp: Path, *, input_name: str, input_shape: tuple[int, ...],
          max_batch: int, opt_batch: int, workspace_mb: int, opt_level: int, timing_cache: Path,
          version_compatible: bool, hardware_compatible: bool, check_inputs: np.ndarray, tf32: bool = False,
          show_progress: bool = True) -> dict[str, Any]:
    """Parse the graph into a strongly typed network, serialize an engine to engine_path_tmp,
    then deserialize it and run it once on check_inputs (N, 3, S, S).

    Returns:
        the build record for the sidecar (versions, GPU, options, timing cache status, and the
        build-time run's summary under "build_check").
    Raises:
        BuildError: TensorRT missing or unable to start, parser errors (all listed), an
            AMPERE_PLUS build below compute capability 8.0, a failed build, or non-finite
            output of the built engine.
    """
    trt = import_trt()
    here = gpu_identity()
    check_build_options(hardware_compatible, here)
    logger = trt_logger(trt)
    builder = create(trt.Builder, "a builder", BuildError, logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    if network is None:
        raise BuildError("TensorRT could not create a strongly typed network (see the TensorRT log above)")
    parser = create(trt.OnnxParser, "an ONNX parser", BuildError, network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError("TensorRT's ONNX parser rejected the graph:\n  " + "\n  ".join(errors or ["(no detail)"]))
    config = builder.create_builder_config()
    if config is None:
        raise BuildError("TensorRT could not create a builder config (see the TensorRT log above)")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.builder_optimization_level = opt_level
    if tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: float32 layers would round inputs to 10 bits
    profile = builder.create_optimization_profile()
    if profile is None:
        raise BuildError("TensorRT could not create an optimization profile")
    tail = tuple(input_shape[1:])
    profile.set_shape(input_name, (1, *tail), (opt_batch, *tail), (max_batch, *tail))
    if config.add_optimization_profile(profile) < 0:
        raise BuildError(f"invalid optimization profile: batch 1..{max_batch}, opt {opt_batch}")
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    # The monitor must outlive every TensorRT object that uses it: this local lives to the return.
    monitor = _progress_monitor(trt) if show_progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    started = time.perf_counter()
    with file_lock(timing_cache.with_name(timing_cache.name + ".lock")):
        cache, cache_status = _attach_timing_cache(config, timing_cache)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BuildError("TensorRT failed to build the engine (see the TensorRT log above)")
        cache = config.get_timing_cache()
        if cache is not None:
            atomic_write(timing_cache, bytes(cache.serialize()))
    plan_bytes = bytes(plan)
    del plan
    build_seconds = time.perf_counter() - started
    check = _run_built_plan(trt, plan_bytes, version_compatible, input_name, tail, max_batch, check_inputs)
    atomic_write(engine_path_tmp, plan_bytes)
    return {"tensorrt": trt.__version__, **here, "opt_batch": opt_batch, "workspace_mb": workspace_mb,
            "builder_optimization_level": opt_level, "version_compatible": version_compatible,
            "hardware_compatible": hardware_compatible, "tf32": bool(tf32), "timing_cache": cache_status,
            "build_seconds": round(build_seconds, 2), "build_check": check}


def _run_built_plan(trt: Any, plan: bytes, version_compatible: bool, input_name: str, input_shape: tuple[int, ...],
                    max_batch: int, inputs: np.ndarray) -> dict[str, Any]:
    """Deserialize the plan just built, run it on inputs (N, 3, S, S) in batches, check the output."""
    try:
        runtime, engine = deserialize(trt, plan, version_compatible, "the engine just built")
    except EngineError as exc:
        raise BuildError(str(exc)) from None
    found = read_io(trt, engine)
    if found["inputs"] != [input_name] or len(found["outputs"]) != 1:
        raise BuildError(f"the engine just built has inputs {found['inputs']} and outputs {found['outputs']}, "
                         f"expected [{input_name}] and one output")
    output_name, out, dtypes = found["outputs"][0], found["output"], (found["input"]["dtype"], found["output"]["dtype"])
    if not set(dtypes) <= {"float32", "float16"}:
        raise BuildError(f"the engine just built reads/writes {dtypes}; float32 or float16 expected")
    try:  # the engine's own output shape; the rest as the caller asked
        check_engine_io(found, "just built", input_name=input_name, output_name=output_name,
                        input_shape=input_shape, output_shape=tuple(out["shape"][1:]), max_batch=max_batch,
                        input_dtype=dtypes[0], output_dtype=dtypes[1])
    except EngineError as exc:
        raise BuildError(str(exc)) from None
    session = Session(runtime, engine, input_name=input_name, output_name=output_name, input_shape=input_shape,
                      output_shape=tuple(out["shape"][1:]), max_batch=max_batch, input_dtype=np.dtype(dtypes[0]),
                      output_dtype=np.dtype(dtypes[1]), max_contexts=1)
    started = time.perf_counter()
    try:
        x = np.ascontiguousarray(inputs, dtype=session.input_dtype)
        heat = np.concatenate([session.run(x[i:i + max_batch]) for i in range(0, len(x), max_batch)])
    except EngineError as exc:
        raise BuildError(f"the engine just built cannot run: {exc}") from None
    finally:
        session.close()
    return {**check_finite(heat), "seconds": round(time.perf_counter() - started, 3)}

"""TensorRT 10.x / 11.x: build a strongly typed engine from a precision graph, and run it.

Written to the Python API of both major versions (one code path): the network is created with
the STRONGLY_TYPED flag (ignored by 11.x, where every network is strongly typed), so FP16 and
INT8 come from the ONNX graph (precision.py), never from builder flags that TensorRT 11 removed.
Device memory, pinned staging buffers and streams go through cuda-python
(cuda.bindings.runtime), as NVIDIA's current samples do. The module is self-contained: it is
imported only when TensorRT is used and needs an NVIDIA GPU to do anything beyond reporting why
it cannot.

Every TensorRT object lives in a variable (or attribute) named after its role: builder,
network, parser, config, profile, cache, stored_cache, plan, runtime, engine, context,
logger. tests/test_tensorrt_names.py maps each role to its TensorRT class and checks every
(class, attribute) used here, and the keywords passed, against pairs extracted from NVIDIA's
binding sources of TensorRT 10.16 and 11.1.

Design choices (and why):
- TF32 is cleared for every build unless asked for (`tf32=True`): float32 layers of any
  precision's graph then compute in true float32, as the fp32 accuracy budget assumes.
  Clearing TF32 is allowed on strongly typed networks in 10.x and 11.x (trtexec's --noTF32
  does so with --stronglyTyped, and 11.x is always strongly typed).
- A timing cache that TensorRT rejects (another GPU or TensorRT version) is replaced by this
  build's cache, not merged: NVIDIA warns that a cache combined across devices
  (ITimingCache.combine with ignore_mismatch) may give functional or performance bugs, and a
  replaced cache is valid for the GPU that builds here. Engine folders shared by different
  GPUs therefore keep only the latest GPU's timings (correct, only slower to build).
- `engine_host_code_allowed` is set only for plans whose verified sidecar says they are
  version compatible: such a plan embeds a lean runtime (host code) that TensorRT executes.
- Version-compatible plans load on the same major version with a runtime at least as new as
  the builder; hardware-compatible (AMPERE_PLUS) plans are built and loaded only on compute
  capability 8.0 or newer; all other plans need the exact TensorRT version and the same GPU.
- Execution contexts come from a bounded pool (default 2, `max_contexts`): one context can run
  while the next batch is staged, and each context costs its own activation memory
  (static allocation, TensorRT's default). A call waits for a free context; `close()` (or
  `with engine:`) frees contexts, streams and buffers.
- One process-wide TensorRT logger forwards TensorRT's messages to Python logging
  (`cnpose_trt.tensorrt_backend.trt`): warnings and errors reach stderr, the rest is debug.
- Streams are plain cudaStreamCreate streams, one per context; every copy and the engine run on
  it, and a failed call synchronises it before its pinned buffers can be reused.
- After a build the plan is deserialized and run once on accuracy inputs; non-finite output
  refuses the build (BuildError). Comparing its joints with FP32 is the caller's job.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BuildError, CnposeError, EngineError
from .base import Engine, check_engine_io, check_options

if TYPE_CHECKING:
    from ..build.builder import BuildJob

log = logging.getLogger(__name__)
trt_log = logging.getLogger(__name__ + ".trt")  # TensorRT's own messages

INSTALL_HINT = ("TensorRT is not installed. On a machine with an NVIDIA GPU and driver: "
                "pip install 'cnpose_trt[tensorrt-cu12]' (CUDA 12 drivers) or 'cnpose_trt[tensorrt-cu13]' "
                "(CUDA 13, R580+ drivers); each pairs TensorRT with the cuda-python of the same CUDA major")
CUDA_PYTHON_HINT = ("cuda-python (cuda.bindings.runtime, 12.6.1 or newer) is not installed: "
                    "pip install 'cnpose_trt[tensorrt-cu12]' or 'cnpose_trt[tensorrt-cu13]'")

NAME = "tensorrt"
ENGINE_SUFFIX = ".engine"
PRECISIONS = ("fp32", "fp16", "int8")
INT8_SCHEME = "trt-symmetric"  # strongly typed: the symmetric Q/DQ graph (precision.py)
NEEDS_GRAPH = True
# Capabilities callers ask instead of comparing names: a GPU is required; a plan is built for one GPU
# model and TensorRT version (built on each worker, not shipped); no CPU path.
GPU = "required"
PORTABLE_ENGINE = False
CPU_IS_REFERENCE = False

# Options TrtEngine takes (load_engine(path, **options)); backends.check_options refuses the rest.
DEFAULT_MAX_CONTEXTS = 2
MAX_CONTEXTS_LIMIT = 64
LOAD_OPTIONS = ("max_contexts",)
HARDWARE_COMPATIBLE_MIN_CC = (8, 0)  # AMPERE_PLUS
NULLPTR = "factory function returned nullptr"  # pybind11's TypeError when a TensorRT factory fails


# --------------------------------------------------------------------------------------------
# Imports and CUDA diagnostics


def import_trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildError(INSTALL_HINT) from None
    return trt


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise EngineError(CUDA_PYTHON_HINT) from None
    return cudart


def _error_text(err: Any) -> str:
    """'cudaErrorName: description' of a cudaError_t."""
    cudart = _cudart()
    name = cudart.cudaGetErrorName(err)[1]
    text = cudart.cudaGetErrorString(err)[1]
    decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else str(b)
    return f"{decode(name)}: {decode(text)}"


def _check(result: Any, what: str) -> Any:
    """cuda-python calls return (err, *values): raise on an error, return the values."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineError(f"{what} failed: {_error_text(err)}")
    return values[0] if len(values) == 1 else values


_native_getter: Callable[[Any], int] | None = None


def native_handle(obj: Any) -> int:
    """The integer handle of a cuda-python object (cudaStream_t, ...).

    cuda-bindings 12.9.1 / 13.0 deprecate int(obj) for cuda.bindings.utils.get_cuda_native_handle;
    older bindings have only int(obj).
    """
    global _native_getter
    if _native_getter is None:
        try:
            from cuda.bindings.utils import get_cuda_native_handle as getter
        except ImportError:
            getter = int
        _native_getter = getter
    return int(_native_getter(obj))


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}" if code > 0 else "none"


def cuda_problem() -> str | None:
    """Why no CUDA device is usable through cuda-python, or None when one is.

    Names the CUDA error and, where the driver is older than the bindings need, both versions.
    """
    try:
        cudart = _cudart()
    except EngineError as exc:
        return str(exc)
    err, count = cudart.cudaGetDeviceCount()
    if err == cudart.cudaError_t.cudaSuccess:
        return None if count and count > 0 else "cudaGetDeviceCount found no CUDA device (CUDA_VISIBLE_DEVICES?)"
    problem = f"cudaGetDeviceCount failed with {_error_text(err)}"
    d_err, driver = cudart.cudaDriverGetVersion()
    r_err, bindings = cudart.cudaRuntimeGetVersion()
    if d_err == cudart.cudaError_t.cudaSuccess and r_err == cudart.cudaError_t.cudaSuccess:
        problem += (f" (the driver supports CUDA {_cuda_version(driver)}, "
                    f"cuda-python is built for CUDA {_cuda_version(bindings)}")
        if driver <= 0:
            problem += "; is the NVIDIA driver installed?"
        elif driver // 1000 < bindings // 1000:
            problem += "; update the driver"
            if driver // 1000 in (12, 13):
                problem += (", or install the cuda-python of the driver's CUDA major: "
                            f"pip install 'cnpose_trt[tensorrt-cu{driver // 1000}]'")
        problem += ")"
    return problem


def availability() -> tuple[bool, str]:
    """(usable, why): TensorRT importable and a CUDA device usable through cuda-python."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "tensorrt":
            return False, "TensorRT is not installed"
        return False, f"TensorRT is installed but cannot be imported: {exc}"
    version = getattr(trt, "__version__", "?")
    problem = cuda_problem()
    if problem is not None:
        return False, f"TensorRT {version} is installed but no CUDA device is usable: {problem}"
    return True, f"TensorRT {version} with a CUDA device"


_warned: set[str] = set()


def available() -> bool:
    """TensorRT importable and a CUDA device usable. When TensorRT is installed but unusable
    (driver too old for the cuda-python bindings, no device, broken install), says why once
    per reason as a warning, so `--backend auto` never falls back to ONNX Runtime silently."""
    ok, why = availability()
    if not ok:
        if why != "TensorRT is not installed" and why not in _warned:
            _warned.add(why)
            log.warning("not using TensorRT: %s", why)
        else:
            log.debug("not using TensorRT: %s", why)
    return ok


# --------------------------------------------------------------------------------------------
# TensorRT objects shared by build and load


_logger: Any = None
_logger_lock = threading.Lock()


def trt_logger(trt: Any) -> Any:
    """The one TensorRT logger of this process (TensorRT warns when several are used)."""
    global _logger
    with _logger_lock:
        if _logger is None:
            levels = {trt.ILogger.INTERNAL_ERROR: logging.ERROR, trt.ILogger.ERROR: logging.ERROR,
                      trt.ILogger.WARNING: logging.WARNING, trt.ILogger.INFO: logging.DEBUG,
                      trt.ILogger.VERBOSE: logging.DEBUG}

            class _ForwardingLogger(trt.ILogger):
                """Forwards to Python logging; called from TensorRT's threads (pybind takes the GIL)."""

                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    level = levels.get(severity, logging.DEBUG)
                    if trt_log.isEnabledFor(level):
                        trt_log.log(level, "%s", msg)

            _logger = _ForwardingLogger()
        return _logger


def _create(factory: Callable[..., Any], what: str, error_type: type[CnposeError], *args: Any) -> Any:
    """Call a TensorRT factory constructor (trt.Builder, trt.Runtime, trt.OnnxParser).

    pybind11 turns the factory's nullptr into TypeError("factory function returned nullptr");
    that becomes `error_type` with the CUDA diagnosis. Other TypeErrors are bugs and propagate.
    """
    try:
        return factory(*args)
    except TypeError as exc:
        if NULLPTR not in str(exc):
            raise
        cause = cuda_problem() or ("the GPU may be out of memory or held by another process in exclusive mode; "
                                   "see the TensorRT log above")
        raise error_type(f"TensorRT could not create {what} ({exc}): {cause}") from None


def gpu_identity() -> dict[str, Any]:
    """Name and compute capability of the current GPU (part of a TensorRT engine's cache key)."""
    cudart = _cudart()
    device = _check(cudart.cudaGetDevice(), "cudaGetDevice")
    props = _check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}"}


def _cc(value: Any) -> tuple[int, int] | None:
    m = re.fullmatch(r"(\d+)\.(\d+)", str(value))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _version(value: Any) -> tuple[int, ...] | None:
    m = re.match(r"(\d+(?:\.\d+)*)", str(value)) if isinstance(value, str) else None
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def check_build_options(hardware_compatible: bool, here: dict[str, Any]) -> None:
    """Refuse an AMPERE_PLUS (hardware-compatible) build on a GPU older than compute capability 8.0."""
    cc = _cc(here.get("compute_capability"))
    if hardware_compatible and (cc is None or cc < HARDWARE_COMPATIBLE_MIN_CC):
        raise BuildError(f"hardware-compatible engines (AMPERE_PLUS) can only be built on compute capability "
                         f"8.0 or newer; this GPU, {here.get('gpu')}, is sm {here.get('compute_capability')}: "
                         "build without --hardware-compatible")


def check_plan_compatible(built: dict[str, Any], runtime_version: str, here: dict[str, Any], path: Any) -> None:
    """Refuse a plan this TensorRT runtime and GPU cannot run, saying why (EngineError).

    built: the sidecar's tensorrt_build record; here: gpu_identity() of this GPU.
    """
    have, mine = built.get("tensorrt"), runtime_version
    built_v, mine_v = _version(have), _version(mine)
    if built_v is None:
        raise EngineError(f"engine {path}: its metadata lacks the TensorRT version it was built with; rebuild with "
                          "--force")
    if built.get("version_compatible"):
        if mine_v is None or mine_v[0] != built_v[0] or mine_v < built_v:
            raise EngineError(f"engine {path} is version compatible, built with TensorRT {have}: it runs on TensorRT "
                              f"{built_v[0]}.x at least as new as that, this is {mine}; rebuild with this TensorRT")
    elif have != mine:
        raise EngineError(f"engine {path} was built with TensorRT {have}, this is {mine}: rebuild with --force "
                          "(or build with --version-compatible for newer runtimes of the same major version)")
    cc = _cc(here.get("compute_capability"))
    if built.get("hardware_compatible"):
        if cc is None or cc < HARDWARE_COMPATIBLE_MIN_CC:
            raise EngineError(f"engine {path} is hardware compatible (AMPERE_PLUS): it runs on compute capability "
                              f"8.0 or newer, this GPU, {here.get('gpu')}, is sm {here.get('compute_capability')}; "
                              "rebuild on this GPU without --hardware-compatible")
    elif here.get("gpu") != built.get("gpu") or here.get("compute_capability") != built.get("compute_capability"):
        raise EngineError(f"engine {path} was built for {built.get('gpu')} (sm {built.get('compute_capability')}), "
                          f"this is {here.get('gpu')} (sm {here.get('compute_capability')}): rebuild on this GPU "
                          "(or build with --hardware-compatible on an Ampere or newer GPU)")


# The I/O check every backend shares (backends/base.py); TensorRT fills in profiles, format and location.
check_io = check_engine_io


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


def _dims(dims: Any) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _np_dtype(trt: Any, dtype: Any) -> str:
    try:
        return np.dtype(trt.nptype(dtype)).name
    except (TypeError, KeyError, ValueError):
        return str(dtype)


def _read_io(trt: Any, engine: Any) -> dict[str, Any]:
    """What a deserialized engine says about its I/O (the `found` of check_io)."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    found: dict[str, Any] = {
        "inputs": [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT],
        "outputs": [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT],
        "profiles": engine.num_optimization_profiles}
    for role, group in (("input", found["inputs"]), ("output", found["outputs"])):
        if len(group) != 1:
            continue
        name = group[0]
        found[role] = {"name": name, "shape": _dims(engine.get_tensor_shape(name)),
                       "dtype": _np_dtype(trt, engine.get_tensor_dtype(name)),
                       "linear": engine.get_tensor_format(name) == trt.TensorFormat.LINEAR,
                       "on_device": engine.get_tensor_location(name) == trt.TensorLocation.DEVICE}
    if len(found["inputs"]) == 1 and found["profiles"] >= 1:
        found["input"]["profile"] = [_dims(s) for s in engine.get_tensor_profile_shape(found["inputs"][0], 0)]
    return found


def _deserialize(trt: Any, plan: bytes, version_compatible: bool, what: str) -> tuple[Any, Any]:
    """(runtime, engine) of a serialized plan; the runtime is kept with the engine."""
    runtime = _create(trt.Runtime, "a runtime", EngineError, trt_logger(trt))
    if version_compatible:
        # A version-compatible plan embeds a lean runtime (host code): TensorRT refuses it unless allowed.
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineError(f"TensorRT could not deserialize {what} (see the TensorRT log above): damaged, or built by "
                          "another TensorRT version or for another GPU; rebuild with --force")
    return runtime, engine


# --------------------------------------------------------------------------------------------
# Build


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
    from ..cache import atomic_write, file_lock

    trt = import_trt()
    here = gpu_identity()
    check_build_options(hardware_compatible, here)
    logger = trt_logger(trt)
    builder = _create(trt.Builder, "a builder", BuildError, logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    if network is None:
        raise BuildError("TensorRT could not create a strongly typed network (see the TensorRT log above)")
    parser = _create(trt.OnnxParser, "an ONNX parser", BuildError, network, logger)
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
        runtime, engine = _deserialize(trt, plan, version_compatible, "the engine just built")
    except EngineError as exc:
        raise BuildError(str(exc)) from None
    found = _read_io(trt, engine)
    if found["inputs"] != [input_name] or len(found["outputs"]) != 1:
        raise BuildError(f"the engine just built has inputs {found['inputs']} and outputs {found['outputs']}, "
                         f"expected [{input_name}] and one output")
    output_name, out, dtypes = found["outputs"][0], found["output"], (found["input"]["dtype"], found["output"]["dtype"])
    if not set(dtypes) <= {"float32", "float16"}:
        raise BuildError(f"the engine just built reads/writes {dtypes}; float32 or float16 expected")
    try:  # the engine's own output shape; the rest as the caller asked
        check_io(found, "just built", input_name=input_name, output_name=output_name, input_shape=input_shape,
                 output_shape=tuple(out["shape"][1:]), max_batch=max_batch, input_dtype=dtypes[0],
                 output_dtype=dtypes[1])
    except EngineError as exc:
        raise BuildError(str(exc)) from None
    session = _Session(runtime, engine, input_name=input_name, output_name=output_name, input_shape=input_shape,
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


# --------------------------------------------------------------------------------------------
# Run


class _DeviceBuffer:
    """cudaMalloc'd memory, freed by close() (or with its owner); never handed out as a temporary."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.ptr = int(_check(_cudart().cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def close(self) -> None:
        if getattr(self, "ptr", 0):
            ptr, self.ptr = self.ptr, 0
            _cudart().cudaFree(ptr)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class _HostBuffer:
    """Pinned host memory viewed as a numpy array (async copies need page-locked memory)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        count = int(np.prod(shape))
        nbytes = count * np.dtype(dtype).itemsize
        self.ptr = int(_check(_cudart().cudaMallocHost(max(nbytes, 1)), "cudaMallocHost"))
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(self.ptr)
        self.array: np.ndarray | None = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def close(self) -> None:
        if getattr(self, "ptr", 0):
            ptr, self.ptr, self.array = self.ptr, 0, None
            _cudart().cudaFreeHost(ptr)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class _Slot:
    """One execution context with its stream and buffers sized for max_batch.

    Every buffer handed to TensorRT or the decode lives here, so it outlives the stream's work.
    Tensor addresses never change, so they are set once.
    """

    def __init__(self, session: _Session) -> None:
        self._owned: list[Any] = []
        self.stream = None
        self.context = None
        self.decode_buffers: tuple[_HostBuffer, _DeviceBuffer, _HostBuffer, _DeviceBuffer] | None = None
        try:
            cudart = _cudart()
            self.context = session.engine.create_execution_context()
            if self.context is None:
                raise EngineError("TensorRT could not create an execution context (out of GPU memory?)")
            self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
            self.stream_handle = native_handle(self.stream)
            b = session.max_batch
            in_shape, out_shape = (b, *session.input_shape), (b, *session.output_shape)
            self.h_in = self._own(_HostBuffer(in_shape, session.input_dtype))
            self.d_in = self._own(_DeviceBuffer(self.h_in.array.nbytes))
            self.h_out = self._own(_HostBuffer(out_shape, session.output_dtype))
            self.d_out = self._own(_DeviceBuffer(self.h_out.array.nbytes))
            for name, buffer in ((session.input_name, self.d_in), (session.output_name, self.d_out)):
                if not self.context.set_tensor_address(name, buffer.ptr):
                    raise EngineError(f"TensorRT rejected the address of tensor {name}")
        except BaseException:
            self.close()
            raise

    def _own(self, buffer: Any) -> Any:
        self._owned.append(buffer)
        return buffer

    def copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        cudart = _cudart()
        _check(cudart.cudaMemcpyAsync(dst, src, nbytes, getattr(cudart.cudaMemcpyKind, kind), self.stream), kind)

    def synchronize(self) -> None:
        _check(_cudart().cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def decode(self, max_batch: int, joints: int, fields: int) -> tuple[_HostBuffer, _DeviceBuffer, _HostBuffer,
                                                                       _DeviceBuffer]:
        """(h_dec, d_dec, h_post, d_post), made on first use: the decoded (max_batch, J, fields)
        result and the post-processing inputs, rows 0-3 boxes, 4 root depth, 5-8 intrinsics."""
        if self.decode_buffers is None:
            h_dec = self._own(_HostBuffer((max_batch, joints, fields), np.dtype(np.float32)))
            d_dec = self._own(_DeviceBuffer(h_dec.array.nbytes))
            h_post = self._own(_HostBuffer((9, max_batch), np.dtype(np.float32)))
            d_post = self._own(_DeviceBuffer(h_post.array.nbytes))
            self.decode_buffers = (h_dec, d_dec, h_post, d_post)
        return self.decode_buffers

    def close(self) -> None:
        """Free the context first (it may reference the buffers), then buffers, then the stream."""
        self.context = None
        for buffer in reversed(self._owned):
            with contextlib.suppress(Exception):
                buffer.close()
        self._owned = []
        if self.stream is not None:
            stream, self.stream = self.stream, None
            with contextlib.suppress(Exception):
                _cudart().cudaStreamDestroy(stream)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class _SlotPool:
    """At most `size` slots made by `make()`, shared by all threads: a caller waits for a free one.

    A slot whose call failed is synchronised (its stream may still copy into its pinned buffers)
    before anyone reuses it; if even that fails, it is closed and a new one made later.
    """

    def __init__(self, make: Callable[[], Any], size: int) -> None:
        self._make, self._size = make, size
        self._idle: list[Any] = []
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()

    @property
    def created(self) -> int:
        with self._cond:
            return self._count

    @contextlib.contextmanager
    def use(self) -> Iterator[Any]:
        slot = self._acquire()
        reusable = False
        try:
            yield slot
            reusable = True
        finally:
            if not reusable:
                reusable = self._settle(slot)
            self._release(slot, reusable)

    @staticmethod
    def _settle(slot: Any) -> bool:
        try:
            slot.synchronize()
        except Exception as exc:
            log.warning("discarding a TensorRT execution context whose stream could not be synchronised: %s", exc)
            return False
        return True

    def _acquire(self) -> Any:
        with self._cond:
            while True:
                if self._closed:
                    raise EngineError("this TensorRT engine was closed")
                if self._idle:
                    return self._idle.pop()
                if self._count < self._size:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            return self._make()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _release(self, slot: Any, reusable: bool) -> None:
        with self._cond:
            keep = reusable and not self._closed
            if keep:
                self._idle.append(slot)
            else:
                self._count -= 1
            self._cond.notify()
        if not keep:
            slot.close()

    def close(self) -> None:
        """Close idle slots now and busy ones when their call returns; later calls raise EngineError."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for slot in idle:
            slot.close()


class _Session:
    """A deserialized engine (and its runtime) with a bounded pool of slots. Shapes are per image."""

    def __init__(self, runtime: Any, engine: Any, *, input_name: str, output_name: str,
                 input_shape: tuple[int, ...], output_shape: tuple[int, ...], max_batch: int,
                 input_dtype: np.dtype, output_dtype: np.dtype, max_contexts: int) -> None:
        self.runtime, self.engine = runtime, engine
        self.input_name, self.output_name = input_name, output_name
        self.input_shape, self.output_shape = tuple(input_shape), tuple(output_shape)
        self.input_dtype, self.output_dtype = np.dtype(input_dtype), np.dtype(output_dtype)
        self.max_batch = max_batch
        self.pool = _SlotPool(lambda: _Slot(self), max_contexts)

    def enqueue(self, slot: _Slot, images: np.ndarray | None = None, *, n: int | None = None,
                fill: Callable[[Any, int], Any] | None = None) -> int:
        """Load the input and run the engine on the slot's stream; returns the batch size.

        The input is `images` (host, copied in through the slot's pinned buffer) or, with `fill`,
        written on the device: fill(input binding as a DeviceArray (n, 3, S, S), stream handle).
        """
        n = len(images) if images is not None else int(n or 0)
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"a TensorRT call takes 1..{self.max_batch} images, got {n}")
        context = slot.context
        shape = (n, *self.input_shape)
        if not context.set_input_shape(self.input_name, shape):
            raise EngineError(f"TensorRT rejected input shape {shape} (profile: batch 1..{self.max_batch})")
        if fill is not None:
            from ..ops.decoding import DeviceArray

            fill(DeviceArray(slot.d_in.ptr, shape, self.input_dtype.name), slot.stream_handle)
        else:
            slot.h_in.array[:n] = images
            slot.copy(slot.d_in.ptr, slot.h_in.ptr, images.nbytes, "cudaMemcpyHostToDevice")
        # From here on the stream reads h_in: a failure must synchronise before the slot is reused (_SlotPool).
        if not context.execute_async_v3(slot.stream_handle):
            raise EngineError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        return n

    def run(self, images: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) -> (n, J*D, H, W) heatmaps on the host, n <= max_batch."""
        with self.pool.use() as slot:
            n = self.enqueue(slot, images)
            out = slot.h_out.array[:n]
            slot.copy(slot.h_out.ptr, slot.d_out.ptr, out.nbytes, "cudaMemcpyDeviceToHost")
            slot.synchronize()
            return out.copy()

    def close(self) -> None:
        self.pool.close()


def version() -> str:
    return str(import_trt().__version__)


def key_fields(job: BuildJob) -> dict[str, Any]:
    """TensorRT's part of the cache key: its version, the GPU, the builder options."""
    import dataclasses

    return {"backend_version": version(), "device": gpu_identity(), "trt": dataclasses.asdict(job.trt),
            "opt_batch": job.opt_batch}


def compile(job: BuildJob, built: Path) -> dict[str, Any]:
    """Build the strongly typed engine from the precision graph; it is then run once on real crops
    and refused if its output is not finite (the record says so under build_check)."""
    from ..build.verify import accuracy_inputs
    from ..spec import INPUT_NAME

    job.say("[4/5] building the TensorRT engine (strongly typed)")
    opts = job.trt  # TrtOptions (named so the TensorRT name check does not read it as the module)
    record = build(job.graph, built, input_name=INPUT_NAME, input_shape=(job.max_batch, *job.spec.input_shape),
                   max_batch=job.max_batch, opt_batch=job.opt_batch, workspace_mb=opts.workspace_mb,
                   opt_level=opts.opt_level, timing_cache=job.out / "tensorrt.timing-cache",
                   version_compatible=opts.version_compatible, hardware_compatible=opts.hardware_compatible,
                   show_progress=job.show_progress, tf32=opts.tf32, check_inputs=accuracy_inputs(job.spec))
    job.say("[5/5] checked: the engine ran once on real crops, finite output")
    return {"tensorrt_build": record}


def check_engine_file(path: Path, meta: dict[str, Any]) -> None:
    """Nothing to read cheaply: a plan's contents are only known once deserialized on a GPU, where
    TrtEngine compares its I/O (names, shapes, dtypes, profile: the variant's head) with the sidecar.
    Its sha256 and the sidecar's own consistency are checked before (engine.load_engine)."""


def load(path: Path, meta: dict[str, Any], **options: Any) -> Engine:
    return TrtEngine(path, meta, **options)


class _OwnedDeviceArray:
    """A device array that owns its memory (infer_device's result); __cuda_array_interface__ v3."""

    def __init__(self, buffer: _DeviceBuffer, shape: tuple[int, ...], dtype: str) -> None:
        from ..ops.decoding import DeviceArray

        self._buffer = buffer
        self._view = DeviceArray(buffer.ptr, shape, dtype)
        self.shape, self.dtype, self.ptr = self._view.shape, dtype, buffer.ptr

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return self._view.__cuda_array_interface__


class TrtEngine(Engine):
    """A deserialized TensorRT engine, safe to share between threads: calls take one of at most
    `max_contexts` execution contexts (each with its stream and buffers) and wait for a free one.

    Use `with load_engine(path) as engine:` or call close() to free GPU memory deterministically.
    """

    backend = NAME
    options = LOAD_OPTIONS
    device = "cuda"

    def __init__(self, path: Path, meta: dict[str, Any], **options: Any) -> None:
        max_contexts = _load_options(options)
        super().__init__(path, meta)
        try:
            trt = import_trt()
        except BuildError as exc:
            raise EngineError(f"{path} is a TensorRT engine: {exc}") from None
        built = meta.get("tensorrt_build")
        if not isinstance(built, dict):
            raise EngineError(f"engine metadata of {path} lacks its tensorrt_build record; rebuild with --force")
        check_plan_compatible(built, trt.__version__, gpu_identity(), path)
        runtime, engine = _deserialize(trt, path.read_bytes(), bool(built.get("version_compatible")), str(path))
        check_io(_read_io(trt, engine), path, input_name=self.input_name, output_name=self.output_name,
                 input_shape=self.spec.input_shape, output_shape=self.spec.heatmap_shape, max_batch=self.max_batch,
                 input_dtype=self.input_dtype.name, output_dtype=self.output_dtype.name)
        self._session = _Session(runtime, engine, input_name=self.input_name, output_name=self.output_name,
                                 input_shape=self.spec.input_shape, output_shape=self.spec.heatmap_shape,
                                 max_batch=self.max_batch, input_dtype=self.input_dtype,
                                 output_dtype=self.output_dtype, max_contexts=max_contexts)
        self.max_contexts = max_contexts

    def close(self) -> None:
        """Free execution contexts, streams and buffers (calls in flight finish first); idempotent."""
        self._session.close()

    def __enter__(self) -> TrtEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self._session.run(images)

    def infer_device(self, images: np.ndarray) -> Any:
        """Heatmaps left on the GPU: a DeviceArray over device memory owned by the returned object
        (freed when it is garbage collected), filled on the engine's stream and synchronised."""
        images = self.check_input(images)
        per_image = int(np.prod(self.spec.heatmap_shape)) * self.output_dtype.itemsize
        owned = _DeviceBuffer(len(images) * per_image)
        for i in range(0, len(images), self.max_batch):
            chunk = images[i:i + self.max_batch]
            with self._session.pool.use() as slot:
                self._session.enqueue(slot, chunk)
                slot.copy(owned.ptr + i * per_image, slot.d_out.ptr, len(chunk) * per_image,
                          "cudaMemcpyDeviceToDevice")
                slot.synchronize()
        return _OwnedDeviceArray(owned, (len(images), *self.spec.heatmap_shape), self.output_dtype.name)

    def _infer_decode(self, images: np.ndarray, post: dict[str, np.ndarray | None], flip: bool) -> np.ndarray:
        """Engine, then the fused decode on the same stream straight from the output buffer (the
        flip test's mirrored half included); only the (P, J, 10) result comes back."""
        return self._decode_call(len(images), post, flip, images=images)

    def enqueue_device(self, fill: Any, n: int, *, flip: bool = False, boxes: Any = None, root_depth: Any = None,
                       intrinsics: Any = None) -> Any:
        """Engine.enqueue_device: fill writes the input binding on the slot's stream, then the engine
        and the fused decode run as in infer_decode. The call waits for its result before it returns
        the slot (overlap across calls comes from max_contexts slots used by several threads)."""
        _, post = self._device_call(n, flip, boxes, root_depth, intrinsics)
        return _Done(self._decode_call(int(n), post, flip, fill=fill))

    def _decode_call(self, n: int, post: dict[str, np.ndarray | None], flip: bool, *,
                     images: np.ndarray | None = None, fill: Any = None) -> np.ndarray:
        from ..ops.decoding import OUT_FIELDS, DeviceArray, decode

        session, j = self._session, self.spec.joints
        p = n // 2 if flip else n
        per_image = int(np.prod(self.spec.heatmap_shape)) * self.output_dtype.itemsize
        rows = [(name, np.ascontiguousarray(arr, np.float32), first)
                for name, first in (("boxes", 0), ("root_depth", 4), ("intrinsics", 5))
                if (arr := post.get(name)) is not None]
        with session.pool.use() as slot:
            h_dec, d_dec, h_post, d_post = slot.decode(self.max_batch, j, OUT_FIELDS)
            session.enqueue(slot, images, n=n, fill=fill)
            args: dict[str, Any] = {}
            for name, arr, first in rows:
                offset = first * self.max_batch  # in floats: each row holds max_batch floats
                h_post.array.reshape(-1)[offset:offset + arr.size] = arr.reshape(-1)
                slot.copy(d_post.ptr + 4 * offset, h_post.ptr + 4 * offset, arr.nbytes, "cudaMemcpyHostToDevice")
                args[name] = DeviceArray(d_post.ptr + 4 * offset, arr.shape, "float32")
            shape = (p, *self.spec.heatmap_shape)
            heat = DeviceArray(slot.d_out.ptr, shape, self.output_dtype.name)
            mirrored = DeviceArray(slot.d_out.ptr + p * per_image, shape, self.output_dtype.name) if flip else None
            decode(heat, j, self.spec.depth_dim, flipped=mirrored, out=DeviceArray(d_dec.ptr, (p, j, OUT_FIELDS)),
                   stream=slot.stream_handle, **args)
            result = h_dec.array[:p]
            slot.copy(h_dec.ptr, d_dec.ptr, result.nbytes, "cudaMemcpyDeviceToHost")
            slot.synchronize()
            return result.copy()


class _Done:
    """A finished enqueue_device call's handle."""

    def __init__(self, value: np.ndarray) -> None:
        self._value = value

    def result(self) -> np.ndarray:
        return self._value


def _load_options(options: dict[str, Any]) -> int:
    """max_contexts from load_engine's options; anything else is refused naming what is allowed."""
    check_options(sys.modules[__name__], options)
    value = options.get("max_contexts", DEFAULT_MAX_CONTEXTS)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONTEXTS_LIMIT:
        raise ValueError(f"max_contexts must be an integer in 1..{MAX_CONTEXTS_LIMIT}, got {value!r}")
    return value

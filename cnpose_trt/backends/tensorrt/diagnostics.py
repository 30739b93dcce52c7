"""What TensorRT can do here, and why not: whether TensorRT imports and a CUDA device is usable
(availability, cuda_problem), the process's one TensorRT logger, TensorRT factories turned into
project errors, the GPU's identity, and which plans this runtime and GPU can build and run.

Used by both halves of the backend (runtime.py loads plans, compiler.py builds them); imports
neither TensorRT nor cuda-python until asked, and never torch.

Compatibility rules: version-compatible plans load on the same major version with a runtime at
least as new as the builder; hardware-compatible (AMPERE_PLUS) plans are built and loaded only on
compute capability 8.0 or newer; all other plans need the exact TensorRT version and the same GPU.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from ...errors import BuildError, CnposeError, EngineError
from ..device import check, cuda_runtime, error_text

log = logging.getLogger(__name__)
# TensorRT's own messages (warnings and errors reach stderr, the rest is debug).
trt_log = logging.getLogger("cnpose_trt.backends.tensorrt.trt")

INSTALL_HINT = ("TensorRT is not installed. On a machine with an NVIDIA GPU and driver: "
                "pip install 'cnpose_trt[tensorrt-cu12]' (CUDA 12 drivers) or 'cnpose_trt[tensorrt-cu13]' "
                "(CUDA 13, R580+ drivers); each pairs TensorRT with the cuda-python of the same CUDA major")
HARDWARE_COMPATIBLE_MIN_CC = (8, 0)  # AMPERE_PLUS
NULLPTR = "factory function returned nullptr"  # pybind11's TypeError when a TensorRT factory fails


def import_trt() -> Any:
    """The tensorrt module, or BuildError with the install hint."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildError(INSTALL_HINT) from None
    return trt


def version() -> str:
    return str(import_trt().__version__)


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}" if code > 0 else "none"


def cuda_problem() -> str | None:
    """Why no CUDA device is usable through cuda-python, or None when one is.

    Names the CUDA error and, where the driver is older than the bindings need, both versions.
    """
    try:
        cudart = cuda_runtime()
    except EngineError as exc:
        return str(exc)
    err, count = cudart.cudaGetDeviceCount()
    if err == cudart.cudaError_t.cudaSuccess:
        return None if count and count > 0 else "cudaGetDeviceCount found no CUDA device (CUDA_VISIBLE_DEVICES?)"
    problem = f"cudaGetDeviceCount failed with {error_text(err)}"
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


def create(factory: Callable[..., Any], what: str, error_type: type[CnposeError], *args: Any) -> Any:
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
    cudart = cuda_runtime()
    device = check(cudart.cudaGetDevice(), "cudaGetDevice")
    props = check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
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

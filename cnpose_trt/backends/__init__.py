"""The backend registry: each backend is one subpackage that owns its availability, version,
compile step and engine loading; adding a backend means one subpackage and one line here.

A backend package (onnxruntime/, tensorrt/, torch/) keeps its runtime (runtime.py: the Engine,
never importing torch except the torch backend's own) apart from its build step (compiler.py,
imported only by the package's thin compile() when an engine is built). Its __init__ defines
NAME, ENGINE_SUFFIX, LOAD_OPTIONS, PRECISIONS, NEEDS_GRAPH (whether it compiles the ONNX precision
graph or the PyTorch model), its capabilities (GPU, PORTABLE_ENGINE, CPU_IS_REFERENCE), available(),
version(), key_fields(job) (its part of the engine cache key), compile(job, built_file) -> sidecar
extras, check_engine_file(path, meta) (what the engine file's contents show against its sidecar,
read cheaply: EngineError on a contradiction; a cached engine that fails it is rebuilt), and
load(path, meta, **options) -> Engine (which runs the same checks on what it loads). Optional:
INSTALL_HINT (what to install when available() is False), precision_problem(precision) (why this machine
cannot build that precision, or None: asked before anything is exported).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any

from ..checks import flag, integer
from ..config import DEFAULT_MAX_BATCH  # noqa: F401  (the registry's callers ask it here)
from ..errors import BuildError, EngineError
from .base import (  # noqa: F401  (the registry's helpers live below the backend modules)
    LOAD_OPTIONS,
    ORT_DEFAULT_SPINNING,
    ORT_DEFAULT_THREADS,
    check_options,
    importable,
    library_version,
)

log = logging.getLogger(__name__)

# name -> subpackage
_MODULES = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "torch": "torch", "openvino": "openvino"}
NAMES = tuple(_MODULES)
BACKENDS = ("auto", *NAMES)  # what the commands that build offer
# "auto" picks the first available of these: TensorRT where it and a GPU are present.
AUTO_ORDER = ("tensorrt", "onnxruntime")
THREADS_HELP = (f"ONNX Runtime intra-op threads (torch engines: torch's CPU threads); 0: one per core (default "
                f"{ORT_DEFAULT_THREADS})")
SPINNING_HELP = (f"whether ONNX Runtime's idle threads spin waiting for work (default "
                 f"{'on' if ORT_DEFAULT_SPINNING else 'off'}; off leaves the cores to the pipeline's prep and "
                 "decode threads and to other processes)")


def add_session_arguments(p: Any) -> None:
    """--threads and --spinning on|off of the commands that load engines (predict, eval, batch, bench)."""
    p.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    p.add_argument("--spinning", choices=("on", "off"), default=None, help=SPINNING_HELP)


def session_options(threads: int | None = None, spinning: bool | str | None = None) -> dict[str, Any]:
    """Load options for the given threads / spinning ("on"/"off" from the command line, or a bool);
    None leaves each to the engine's default.

    Raises:
        ValueError: threads not an integer >= 0, spinning not a bool / on / off.
    """
    options: dict[str, Any] = {}
    if threads is not None:
        options["threads"] = integer("threads", threads, 0, hint="0: one per core")
    if spinning is not None:
        options["spinning"] = flag("spinning", spinning, words=True)
    return options


def get(name: str, what: str = "") -> ModuleType:
    """The backend module called name.

    Raises:
        EngineError: an unknown name, or a backend whose dependencies are missing.
    """
    module = _MODULES.get(name) if isinstance(name, str) else None
    if module is None:
        raise EngineError(f"{what + ' is for ' if what else ''}backend {name!r}; this installation loads "
                          f"{', '.join(NAMES)}")
    try:
        return importlib.import_module(f".{module}", __package__)
    except ImportError as exc:  # a backend package whose own imports need a missing library
        raise EngineError(f"{what + ': ' if what else ''}the {name} backend needs {exc.name or exc}, which is "
                          "not installed") from None


def builders_of(precision: str) -> list[str]:
    """The backends (of those whose packages import) that build engines of this precision."""
    names = []
    for name in NAMES:
        try:
            if precision in get(name).PRECISIONS:
                names.append(name)
        except EngineError:
            continue
    return names


def resolve(requested: str) -> str:
    """A concrete backend name for "auto" or a name; a named backend must be available.

    Raises:
        ValueError: an unknown name. BuildError: the named backend is not usable here.
    """
    if requested != "auto" and requested not in _MODULES:
        raise ValueError(f"backend must be one of auto, {', '.join(NAMES)}, got {requested!r}")
    if requested != "auto":
        module = get(requested)
        if requested == "tensorrt":
            module.import_trt()  # BuildError with the install hint if missing
        elif not module.available():
            hint = getattr(module, "INSTALL_HINT", "")
            raise BuildError(f"the {requested} backend is not available here{': ' + hint if hint else ''}")
        return requested
    for name in AUTO_ORDER:
        try:
            if get(name).available():
                return name
        except EngineError:
            continue
    raise BuildError("no backend is available: install onnxruntime")

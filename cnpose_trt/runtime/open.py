"""Getting an engine, written once: an EngineRequest (config.py) -> its engine file -> a loaded Engine.

Every caller that starts from "an engine file or a variant to build" (PoseEstimator, predict, batch
and its Ray workers, eval, bench) asks here. This is the one place below cli/ that reaches the build
layer, and only when the request asks for a build; loading a built engine never imports it (nor torch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import backends
from ..config import EngineRequest
from .engine import Engine, load_engine, read_sidecar

log = logging.getLogger(__name__)


def engine_path(request: EngineRequest, progress: Callable[[str], None] | None = None) -> Path:
    """The request's engine file: the one it names, or the one build_engine builds (or finds cached)."""
    return Path(request.engine) if request.engine is not None else build(request, progress).path


def build(request: EngineRequest, progress: Callable[[str], None] | None = None) -> Any:
    """build_engine's BuildResult for a request that asks for a build (its path, cached flag, metadata)."""
    if request.build is None:
        raise ValueError("this EngineRequest names a built engine file, not a build")
    from ..build.builder import build_engine  # the build layer only where an engine is built or looked up

    return build_engine(request.build, progress=progress)


def open_engine(request: EngineRequest, progress: Callable[[str], None] | None = None) -> Engine:
    """Load the request's engine with request.load's options, building it first if asked.

    Where the request let `auto` choose the backend, options the chosen backend does not take (ONNX
    Runtime's spinning for an OpenVINO engine) are dropped, with a debug note: the caller could not know
    which backend it would get. A named backend or engine file keeps the strict check.

    Raises:
        ValueError: bad options. EngineError, BuildError, CheckpointError: see their messages.
    """
    path = engine_path(request, progress)
    load = dict(request.load)
    if request.build is not None and request.build.backend == "auto" and load:
        taken = options_taken(path, load)
        if taken != load:
            log.debug("auto chose an engine that takes no %s: left out", ", ".join(sorted(set(load) - set(taken))))
        load = taken
    return load_engine(path, **load)


def options_taken(path: str | Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """Those of `options` (load_engine's) that the backend of the engine file at `path` takes, by its
    sidecar: for engines whose backend the caller did not pick (auto's choice, a RootNet beside the pose
    engine, a Ray actor's engine)."""
    takes = backends.get(read_sidecar(path)["backend"]).LOAD_OPTIONS
    return {k: v for k, v in options.items() if k in takes}

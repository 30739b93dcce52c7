"""Getting an engine, written once: an EngineRequest (config.py) -> its engine file -> a loaded Engine.

Every caller that starts from "an engine file or a variant to build" (PoseEstimator, predict, batch
and its Ray workers, eval, bench) asks here. This is the one place below cli/ that reaches the build
layer, and only when the request asks for a build; loading a built engine never imports it (nor torch).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import EngineRequest
from .engine import Engine, load_engine


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

    Raises:
        ValueError: bad options. EngineError, BuildError, CheckpointError: see their messages.
    """
    return load_engine(engine_path(request, progress), **request.load)

"""The engine of a batch job: how to get it (EngineOptions: a built engine file, or a variant built or
reused from the cache, as runtime.open_engine takes it), the id written with every row, and what its
backend can do (a backend is asked for its capabilities, never compared by name).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import backends
from ..config import BuildConfig, EngineRequest
from ..runtime.open import engine_path


@dataclasses.dataclass
class EngineOptions:
    """How to get the engine, as `build` takes it: a built engine file, or a variant (+ checkpoint)
    built or reused from the cache with these options."""

    engine: str | Path | None = None
    variant: str = "XS"
    checkpoint: str | Path | None = None
    precision: str = "fp32"
    backend: str = "auto"
    max_batch: int = 32
    engine_dir: str | Path | None = None

    def build_kwargs(self) -> dict[str, Any]:
        """build_engine's arguments, paths absolute (Ray workers build from them in another folder)."""
        return {"variant": self.variant,
                "checkpoint": None if self.checkpoint is None else os.path.abspath(self.checkpoint),
                "backend": self.backend, "precision": self.precision, "max_batch": self.max_batch,
                "out_dir": None if self.engine_dir is None else os.path.abspath(self.engine_dir)}

    def request(self) -> EngineRequest:
        """The engine file given, or a build of the variant (paths absolute), as runtime.open_engine takes it."""
        if self.engine is not None:
            return EngineRequest(engine=self.engine)
        return EngineRequest(build=BuildConfig(**self.build_kwargs()))

    def resolve(self, progress: Callable[[str], None] | None = None) -> Path:
        """The engine file: the given one, or built (or reused) by build_engine."""
        return engine_path(self.request(), progress)


def engine_id(engine: Any) -> str:
    """The id written with every row: the engine file's name (its cache key and sha256 prefixes)."""
    return Path(engine.path).name


def capability(backend: str, name: str, default: Any) -> Any:
    """A named backend's capability (backends/*_backend.py); `default` for "auto", which has none yet."""
    return getattr(backends.get(backend), name) if backend in backends.NAMES else default


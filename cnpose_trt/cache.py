"""The engine cache: what the key covers, where files go, and atomic writes.

An engine is valid only with its sidecar (<engine>.json), which is written last and records
the engine file's sha256; a build interrupted anywhere leaves no engine that loads.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# 2: upstream's input convention ((pixel - mean) / std on 0..255 values, upstream's box rule); format 1
# engines were checked and INT8-calibrated on [0, 1]-scaled inputs and are never reused.
ENGINE_FORMAT = 2
SIDECAR_SUFFIX = ".json"
ENV_ENGINE_DIR = "CNPOSE_TRT_ENGINES"


def default_engine_dir() -> Path:
    """$CNPOSE_TRT_ENGINES, else ./engines."""
    return Path(os.environ.get(ENV_ENGINE_DIR) or "engines")


def cache_key(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that changes the engine."""
    blob = json.dumps({"engine_format": ENGINE_FORMAT, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def engine_stem(name: str, head_tag: str, precision: str, backend: str, key: str) -> str:
    return f"{name}-{head_tag}-{precision}-{backend}-{key[:12]}"


def sidecar_path(engine_path: str | Path) -> Path:
    p = Path(engine_path)
    return p if p.suffix == SIDECAR_SUFFIX else p.with_name(p.name + SIDECAR_SUFFIX)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write via a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, obj: Mapping[str, Any]) -> Path:
    return atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Exclusive advisory lock, so two builds of one engine do not interleave."""
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)

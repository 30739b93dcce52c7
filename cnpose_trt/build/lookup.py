"""The engine cache's lookups: is a valid engine for this request already built?

Request records what a caller asked for, keyed without the weights as torch reads them (the
checkpoint file's sha256), so a request already served is found without torch; cached checks one
candidate engine (sidecar, file hash, contents) like every cache hit. Nothing here writes an engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..cache import cache_key, file_sha256, is_plain_name, sidecar_path, write_json
from ..errors import CheckpointError, EngineError
from ..runtime.engine import read_sidecar
from ..shipped import record
from .storage import tidy

log = logging.getLogger("cnpose_trt.build.builder")


def checkpoint_sha256(checkpoint: str | Path) -> str:
    path = Path(checkpoint)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    try:
        return file_sha256(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror}") from None


class Request:
    """What a caller asked build_engine for, without the weights as torch reads them: the checkpoint
    file's sha256 and every other field of the cache key. requests/<key>.json in the engine folder maps
    a request already served to its engine's handle and full key fields; a lookup then checks that
    engine like any cache hit (_cached). Without a record (a cache an older version filled, a copied
    folder) the sidecars are searched for an engine of the same checkpoint file (weights.checkpoint_sha256;
    for the shipped model, its recorded weights hash) whose cache key these fields reproduce. A stale or
    unreadable record is a miss, never an error."""

    FOLDER = "requests"

    def __init__(self, out: Path, fields: dict[str, Any], backend_fields: dict[str, Any]) -> None:
        self.out, self.fields, self.backend_fields = out, fields, backend_fields
        self.path = out / self.FOLDER / f"{cache_key({'request': {**fields, **backend_fields}})[:32]}.json"

    def lookup(self, module: Any, say: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
        try:
            rec = json.loads(self.path.read_bytes()[:1 << 20])
            handle = self.path.parent.parent / rec["handle"]
            key, fields = rec["cache_key"], rec["key_fields"]
            if not is_plain_name(rec["handle"]) or cache_key(fields) != key:
                return None
        except FileNotFoundError:
            return self._search(module, say)
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None
        hit = cached(handle, key, fields, module, say)
        if hit is not None:
            tidy(handle.parent, Path(rec["handle"]).stem, handle)
        return hit

    def _weights_match(self, weights: dict[str, Any]) -> bool:
        wanted = self.fields["checkpoint_sha256"]
        if wanted is None:
            return False  # random weights: their hash needs torch
        if weights.get("checkpoint_sha256") == wanted:
            return True
        shipped = record()
        return wanted == shipped.get("file_sha256") and weights.get("sha256") == shipped.get("weights_sha256")

    def _search(self, module: Any, say: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
        for side in sorted(self.out.glob(f"*{module.ENGINE_SUFFIX}.json")):
            try:
                meta = read_sidecar(side)
            except (EngineError, OSError):
                continue
            if not self._weights_match(meta.get("weights") or {}):
                continue
            fields = {**recorded_key_fields(meta), **self.backend_fields}
            if any(fields.get(k) != self.fields.get(k) for k in ("precision", "precision_options", "backend", "opset",
                                                                   "max_batch", "input_convention", "model")):
                continue
            if cache_key(fields) != meta.get("cache_key"):
                continue  # built with other backend settings (version, TensorRT options)
            handle = side.with_suffix("")
            hit = cached(handle, meta["cache_key"], fields, module, say)
            if hit is not None:
                self.remember(handle, meta["cache_key"], fields)
                return hit
        return None

    def remember(self, handle: Path, key: str, key_fields: dict[str, Any]) -> None:
        fields = json.loads(json.dumps(key_fields))  # as the sidecar records them
        try:
            self.path.parent.mkdir(exist_ok=True)
            write_json(self.path, {"handle": handle.name, "cache_key": key, "key_fields": fields})
        except OSError as exc:  # a read-only cache still serves its engines, through the slow path
            log.debug("cannot record the request %s: %s", self.path, exc)


def cached(handle: Path, key: str, key_fields: dict[str, Any], module: Any,
            say: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """(engine file, metadata) of the valid cached engine of this key, else None. Needs no lock.

    Valid: its sidecar is whole and records the fields the key was made of (an edited sidecar keeps
    its old cache_key), the engine file has the recorded sha256, and its contents agree with the
    sidecar (module.check_engine_file: another engine's bytes under a recomputed sha256 do not)."""
    try:
        meta = read_sidecar(handle)
        engine = sidecar_path(handle).with_name(meta["engine_file"])
        if meta.get("cache_key") != key or file_sha256(engine) != meta["engine_sha256"]:
            return None
        recorded = recorded_key_fields(meta)
        for field, value in recorded.items():
            if key_fields[field] != value:
                raise EngineError(f"engine metadata {sidecar_path(handle)} is damaged ({field} is {value!r}, its "
                                  f"cache_key was made for {key_fields[field]!r})")
        module.check_engine_file(engine, meta)
    except OSError:
        return None
    except EngineError as exc:
        if sidecar_path(handle).is_file():
            say(f"not reusing the cached engine, rebuilding it: {exc}")
        return None
    return engine, meta


def recorded_key_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """The cache key's fields as the sidecar records them (_sidecar writes them; see build_engine's key)."""
    return {"spec": meta.get("spec"), "precision": meta.get("precision"),
            "precision_options": meta.get("precision_options"),
            "weights_sha256": (meta.get("weights") or {}).get("sha256"), "backend": meta.get("backend"),
            "opset": meta.get("opset"), "max_batch": meta.get("max_batch"),
            "input_convention": (meta.get("input") or {}).get("convention"),
            # builder._fields: only a RootNet key holds the model (ConvNeXtPose keys are what they were)
            **({"model": meta["model"]} if meta.get("model", "convnextpose") != "convnextpose" else {})}


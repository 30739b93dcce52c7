"""Runtime: load_engine reads an engine file and its JSON sidecar, checks them, and asks the backend
registry (backends/) for the Engine. No torch needed.

The Engine protocol every backend implements, and the checks every backend shares, live in
backends/base.py (below the backends, so that a backend module never imports this one back);
they are imported here because load_engine returns an Engine.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .. import backends
from ..backends.base import (  # noqa: F401  (Engine and its checks are the runtime's vocabulary)
    IO_DTYPES,
    MAX_ENGINE_BATCH,
    PRECISIONS,
    Engine,
    _damaged,
    _max_batch,
    check_engine_contents,
    check_engine_io,
    engine_mismatch,
    engine_model,
    engine_spec,
)
from ..cache import ENGINE_FORMAT, file_sha256, is_plain_name, sidecar_path
from ..errors import CnposeError, EngineError
from ..spec import INPUT_CONVENTION, INPUT_NAME, OUTPUT_NAME, PIXEL_MEAN, PIXEL_STD

log = logging.getLogger(__name__)

MAX_SIDECAR_BYTES = 1 << 20  # a sidecar holds a few KB; a file far larger is not one
_LOAD_ATTEMPTS = 5


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The metadata of an engine, from its sidecar (path: the engine handle, an engine file or the .json).

    Raises:
        EngineError: missing, unreadable, oversized, too deeply nested or malformed metadata.
    """
    side = sidecar_path(path)
    if side.is_dir():
        raise EngineError(f"engine metadata {side} is a folder, not a file; remove it and rebuild")
    if not side.is_file():
        raise EngineError(f"no engine metadata at {side}: build the engine with `python -m cnpose_trt.build`"
                          " (an engine without its sidecar is an unfinished build)")
    try:
        with open(side, "rb") as f:
            raw = f.read(MAX_SIDECAR_BYTES + 1)
        if len(raw) > MAX_SIDECAR_BYTES:
            raise _damaged(side, f"larger than {MAX_SIDECAR_BYTES} bytes")
        meta = json.loads(raw)
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise EngineError(f"engine metadata {side} is unreadable ({exc}); rebuild with --force") from None
    except RecursionError:
        raise _damaged(side, "JSON nested too deeply") from None
    if isinstance(meta, dict) and meta.get("engine_format") == 1:
        raise EngineError(f"engine {side} was built by cnpose_trt 0.1 (engine format 1), whose input normalisation "
                          "was not upstream's (INT8 ranges and build checks used [0, 1]-scaled crops); rebuild it "
                          "with `python -m cnpose_trt.build ... --force`")
    if not isinstance(meta, dict) or meta.get("engine_format") != ENGINE_FORMAT:
        raise EngineError(f"engine metadata {side} is of an unknown format "
                          f"(engine_format {meta.get('engine_format') if isinstance(meta, dict) else '?'}, "
                          f"this version reads {ENGINE_FORMAT}); rebuild with --force")
    _check_meta(meta, side)
    return meta


def _check_meta(meta: dict[str, Any], side: Path) -> None:
    """The fields load_engine and Engine rely on, checked for type and range (hostile or damaged files)."""
    if not is_plain_name(meta.get("engine_file")):
        raise _damaged(side, f"engine_file must name a file in the sidecar's folder, got {meta.get('engine_file')!r}")
    sha = meta.get("engine_sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise _damaged(side, "engine_sha256 must be 64 hex digits")
    if not isinstance(meta.get("backend"), str):
        raise _damaged(side, f"backend must be a name, got {meta.get('backend')!r}")
    _max_batch(meta.get("max_batch"), side)
    for key in ("spec", "input", "output"):
        if not isinstance(meta.get(key), dict):
            raise _damaged(side, f"{key} must be an object, got {type(meta.get(key)).__name__}")
    if not isinstance(meta.get("weights", {}), dict):
        raise _damaged(side, "weights must be an object")
    _check_recorded(meta, side)


def _check_recorded(meta: dict[str, Any], side: Path) -> None:
    """The sidecar agrees with itself and with this version: its model (network), variant, head and
    I/O names and shapes with its spec, a known precision, and the input convention this version
    applies. Crops are normalised outside the engine with spec's constants, so a sidecar recording
    others was edited (or is foreign): it is damaged, not a request to normalise differently."""
    try:
        model = engine_model(meta)
    except ValueError as exc:
        raise _damaged(side, str(exc)) from None
    try:
        spec = engine_spec(meta)
    except (TypeError, ValueError):
        if model == "rootnet":  # one configuration: nothing else can be meant
            raise _damaged(side, "its RootNet spec is not this version's RootNet") from None
        return  # Engine() names what is wrong with the spec
    if meta.get("variant") != spec.name:
        raise _damaged(side, f"variant {meta.get('variant')!r} is not its spec's name {spec.name!r}")
    if meta.get("head") != spec.head_tag:
        raise _damaged(side, f"head {meta.get('head')!r} is not its spec's head {spec.head_tag!r}")
    if meta.get("precision") not in PRECISIONS:
        raise _damaged(side, f"precision must be one of {', '.join(PRECISIONS)}, got {meta.get('precision')!r}")
    for field, want in (("convention", INPUT_CONVENTION), ("mean", list(PIXEL_MEAN)), ("std", list(PIXEL_STD))):
        if meta["input"].get(field) != want:
            raise _damaged(side, f"input.{field} is {meta['input'].get(field)!r}; this version normalises crops "
                                 f"with {want!r}, outside the engine")
    for role, shape in (("input", spec.input_shape), ("output", spec.output_shape)):
        if meta[role].get("shape") != ["N", *shape]:
            raise _damaged(side, f"{role}.shape is {meta[role].get('shape')!r}; its spec's is {['N', *shape]!r}")
    names = (INPUT_NAME, spec.output_name if model == "rootnet" else OUTPUT_NAME)
    if model == "rootnet" and (meta["input"].get("name"), meta["output"].get("name")) != names:
        raise _damaged(side, f"a RootNet engine's I/O is {names[0]!r} -> {names[1]!r}, the metadata says "
                             f"{meta['input'].get('name')!r} -> {meta['output'].get('name')!r}")


def load_engine(path: str | Path, *, verify: bool = True, variant: str | None = None,
                precision: str | None = None, weights_sha256: str | None = None, model: str | None = None,
                **options: Any) -> Engine:
    """Load an engine built by `python -m cnpose_trt.build`: a ConvNeXtPose engine (heatmaps) or a
    RootNet engine (its sidecar's model "rootnet"; (N, 3) roots). Engine.network says which.

    Needs no lock and no write access: engines in a read-only folder load. A rebuild running at
    the same time is harmless: the sidecar names the engine file, is replaced atomically, and an
    engine file never changes once written; if the file the sidecar named is deleted by a
    rebuild before it was loaded, the new sidecar is read and its engine loaded.

    Args:
        path: the engine handle (<stem><ext>), an engine file or the .json sidecar; the sidecar
            decides which engine file is loaded (Engine.path).
        verify: check the engine file's sha256 against the sidecar (catches damaged files).
        variant, precision, weights_sha256, model: what the caller expects ("convnextpose" or
            "rootnet" for model); a mismatch is refused.
        options: backend options: onnxruntime threads, spinning (see backends/onnxruntime); torch device,
            cuda_graphs, threads; tensorrt max_contexts. Others are refused naming the allowed ones.
    Raises:
        EngineError: missing/garbled sidecar, damaged or replaced engine file, unknown backend,
            an engine of another variant, precision or weights than expected, or (TensorRT) one
            built for another GPU or TensorRT version.
    """
    path = Path(path)
    side = sidecar_path(path)
    for attempt in range(_LOAD_ATTEMPTS):
        before = _identity(side)
        meta = read_sidecar(side)
        try:
            return _load(side, meta, verify, (variant, precision, weights_sha256, model), options)
        except (CnposeError, OSError):
            if attempt + 1 == _LOAD_ATTEMPTS or _identity(side) == before:
                raise
            log.debug("engine metadata %s was replaced while loading (a rebuild committed); reading it again", side)
    raise AssertionError("unreachable")


def _suffix_owner(suffix: str) -> str | None:
    """The backend whose engine files end in suffix (of those this installation can import)."""
    for name in backends.NAMES:
        try:
            if backends.get(name).ENGINE_SUFFIX == suffix:
                return name
        except EngineError:  # its dependencies are missing
            continue
    return None


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _load(side: Path, meta: dict[str, Any], verify: bool, expected: tuple[str | None, ...],
          options: dict[str, Any]) -> Engine:
    weights = meta.get("weights", {})
    for what, want, have in zip(("variant", "precision", "weights", "model"), expected,
                                (meta.get("variant"), meta.get("precision"), weights.get("sha256"),
                                 engine_model(meta)), strict=True):
        if want is not None and want != have:
            raise EngineError(f"engine {side} was built for {what} {have!r}, not {want!r}; build the one you "
                              "need with python -m cnpose_trt.build")
    engine_file = side.with_name(meta["engine_file"])
    if not engine_file.is_file():
        raise EngineError(f"engine file {engine_file} named by {side} is missing; rebuild with --force")
    if verify:
        try:
            sha = file_sha256(engine_file)
        except OSError as exc:
            raise EngineError(f"engine file {engine_file} is unreadable ({exc.strerror})") from None
        if sha != meta["engine_sha256"]:
            raise EngineError(f"engine file {engine_file} does not match its metadata (sha256 differs): the file is "
                              "damaged or was replaced; rebuild with `python -m cnpose_trt.build ... --force`")
    module = backends.get(meta["backend"], what=f"engine {engine_file}")
    # Another backend's engine file under this backend's name: its loader would fail with its own
    # message (torch.load on an ONNX file). A backend whose library is missing says so first.
    other = _suffix_owner(engine_file.suffix) if engine_file.suffix != module.ENGINE_SUFFIX else None
    if other is not None and other != module.NAME and module.available():
        raise _damaged(side, f"backend {module.NAME!r} loads {module.ENGINE_SUFFIX} engine files, but engine_file "
                             f"{engine_file.name} is {other}'s")
    if engine_model(meta) not in module.MODELS:
        raise _damaged(side, f"the {module.NAME} backend runs {', '.join(module.MODELS)} engines, not "
                             f"{engine_model(meta)}")
    backends.check_options(module, options)
    log.debug("loading %s engine %s (pid %d)", module.NAME, engine_file, os.getpid())
    return module.load(engine_file, meta, **options)

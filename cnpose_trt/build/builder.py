"""Build step: variant (+ checkpoint) -> FP32 ONNX -> precision graph -> engine + JSON sidecar, cached.

    python -m cnpose_trt.build --variant M [--fp16] [--int8 --calib-images DIR] [--checkpoint FILE]
                               [--backend auto|onnxruntime|tensorrt|torch] [--max-batch N] [--out DIR] [--force]
    python -m cnpose_trt.build --all --fp16 --int8 --calib-images DIR

This module runs the build (build_engine); the backend compiles (backends/), build/verify.py holds
the checks, cli/build.py the command line (build/__main__.py runs it). The engine paths are
printed last (stdout), one per line; progress goes to stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import backends, checks
from .._version import __version__
from ..backends import DEFAULT_MAX_BATCH
from ..cache import (
    ENGINE_FORMAT,
    ENV_ENGINE_DIR,
    READ_ONLY_ERRNOS,
    cache_key,
    clean_stale,
    commit_engine,
    default_engine_dir,
    engine_stem,
    file_lock,
    file_sha256,
    is_no_space,
    is_plain_name,
    remove_orphans,
    sidecar_path,
    temp_dir,
    write_json,
)
from ..errors import BuildError, CheckpointError, EngineError, need_torch
from ..interrupts import raise_if_stopped
from ..spec import INPUT_CONVENTION, PIXEL_MEAN, PIXEL_STD, VARIANTS, SpecLike, VariantSpec, get_spec
from .precision import DEFAULT_INT8_EXCLUDE, PrecisionOptions

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class TrtOptions:
    """TensorRT builder settings (part of a TensorRT engine's cache key)."""

    opt_batch: int | None = None  # default: max_batch // 2, at least 1
    workspace_mb: int = 4096
    opt_level: int = 3
    version_compatible: bool = False
    hardware_compatible: bool = False
    tf32: bool = False  # let float32 layers use TF32 (off: true float32)


@dataclasses.dataclass(frozen=True)
class BuildResult:
    path: Path
    cached: bool
    meta: dict[str, Any]


@dataclasses.dataclass
class BuildJob:
    """What a backend's compile step gets: the model, its precision graph and the options."""

    spec: VariantSpec
    model: Any                  # the PyTorch module (weights loaded)
    precision: str
    max_batch: int
    opt_batch: int
    trt: TrtOptions
    out: Path                   # the engine cache folder
    say: Callable[[str], None]
    show_progress: bool
    graph: Path | None = None       # the precision graph (backends with NEEDS_GRAPH)
    fp32_graph: Path | None = None  # the FP32 graph it came from


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"cnpose_trt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def resolve_backend(backend: str) -> str:
    """'auto' is tensorrt where TensorRT and a GPU are present, else onnxruntime."""
    return backends.resolve(backend)


def weights_fingerprint(checkpoint: str | Path) -> str:
    """The sha256 an engine's sidecar records for weights built from `checkpoint` (weights.sha256)."""
    return _prepare_model(None, checkpoint, 0)[2]


def _prepare_model(variant: SpecLike | None, checkpoint: str | Path | None, seed: int
                   ) -> tuple[Any, str, str]:
    """(model, weights description, weights sha256); the checkpoint's shapes decide the variant."""
    from ..nn.checkpoint import detect_spec, load_checkpoint, weights_sha256
    from ..nn.model import build_model

    if checkpoint is None:
        if variant is None:
            raise ValueError("variant is required without a checkpoint: one of " + ", ".join(VARIANTS))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model(variant, seed=seed)
        source = f"random (seed {seed}); outputs are meaningless"
    else:
        state, stored = load_checkpoint(checkpoint)
        if variant is None:  # the tensors decide; a given variant is checked against them by build_model
            variant = detect_spec(state, head_upsample=stored.head_upsample if stored else None)
        model = build_model(variant, state)
        source = str(checkpoint)
    return model, source, weights_sha256(model.state_dict())


def _checkpoint_sha256(checkpoint: str | Path) -> str:
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
        hit = _cached(handle, key, fields, module, say)
        if hit is not None:
            _tidy(handle.parent, Path(rec["handle"]).stem, handle)
        return hit

    def _weights_match(self, weights: dict[str, Any]) -> bool:
        from ..shipped import record

        wanted = self.fields["checkpoint_sha256"]
        if wanted is None:
            return False  # random weights: their hash needs torch
        if weights.get("checkpoint_sha256") == wanted:
            return True
        shipped = record()
        return wanted == shipped.get("file_sha256") and weights.get("sha256") == shipped.get("weights_sha256")

    def _search(self, module: Any, say: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
        from ..runtime.engine import read_sidecar

        for side in sorted(self.out.glob(f"*{module.ENGINE_SUFFIX}.json")):
            try:
                meta = read_sidecar(side)
            except (EngineError, OSError):
                continue
            if not self._weights_match(meta.get("weights") or {}):
                continue
            fields = {**_recorded_key_fields(meta), **self.backend_fields}
            if any(fields.get(k) != self.fields[k] for k in ("precision", "precision_options", "backend", "opset",
                                                               "max_batch", "input_convention")):
                continue
            if cache_key(fields) != meta.get("cache_key"):
                continue  # built with other backend settings (version, TensorRT options)
            handle = side.with_suffix("")
            hit = _cached(handle, meta["cache_key"], fields, module, say)
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


def _cached(handle: Path, key: str, key_fields: dict[str, Any], module: Any,
            say: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """(engine file, metadata) of the valid cached engine of this key, else None. Needs no lock.

    Valid: its sidecar is whole and records the fields the key was made of (an edited sidecar keeps
    its old cache_key), the engine file has the recorded sha256, and its contents agree with the
    sidecar (module.check_engine_file: another engine's bytes under a recomputed sha256 do not)."""
    from ..runtime.engine import read_sidecar

    try:
        meta = read_sidecar(handle)
        engine = sidecar_path(handle).with_name(meta["engine_file"])
        if meta.get("cache_key") != key or file_sha256(engine) != meta["engine_sha256"]:
            return None
        recorded = _recorded_key_fields(meta)
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


def _recorded_key_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """The cache key's fields as the sidecar records them (_sidecar writes them; see build_engine's key)."""
    return {"spec": meta.get("spec"), "precision": meta.get("precision"),
            "precision_options": meta.get("precision_options"),
            "weights_sha256": (meta.get("weights") or {}).get("sha256"), "backend": meta.get("backend"),
            "opset": meta.get("opset"), "max_batch": meta.get("max_batch"),
            "input_convention": (meta.get("input") or {}).get("convention")}


# Below this much free space, a failed build step is reported as a full disk: ONNX Runtime, for
# one, reports a write that ran out of space as an invalid protobuf.
NEARLY_FULL_BYTES = 8 << 20


def _storage_error(out: Path, exc: OSError) -> BuildError:
    """One clear line for a file-system error in the engine cache."""
    where = exc.filename2 or exc.filename or out  # os.replace: filename2 is the destination
    if is_no_space(exc):
        return BuildError(f"no space left on the device holding the engine cache {out}: free some space and build "
                          "again (the previous engine, if any, is untouched)")
    if exc.errno in READ_ONLY_ERRNOS:
        return BuildError(f"the engine cache {out} is read-only ({exc.strerror}: {where}): its valid engines load, but "
                          f"new ones cannot be built there; build where it is writable, or pick a writable folder "
                          f"with --out / --engines / ${ENV_ENGINE_DIR}")
    return BuildError(f"cannot write in the engine cache {out}: {exc.strerror or exc}: {where}")


def _engine_folder(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise BuildError(f"the engine cache {out} is a file, not a folder (from --out / --engines or "
                         f"${ENV_ENGINE_DIR})")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _storage_error(out, exc) from None
    return out


@contextlib.contextmanager
def _build_lock(out: Path, stem: str) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(out / f".{stem}.lock"))
        except OSError as exc:
            raise _storage_error(out, exc) from None
        yield


@contextlib.contextmanager
def _workspace(out: Path, stem: str) -> Iterator[Path]:
    """A temporary build folder in the cache (removed on exit, or by a later build if this process
    is killed); a failure for lack of space becomes one clear BuildError."""
    try:
        with temp_dir(out, stem) as tmp:
            try:
                yield tmp
            except Exception as exc:
                # Judged before the folder is removed, while the disk is still as full as it was.
                if is_no_space(exc):
                    raise BuildError(f"no space left on the device holding the engine cache {out}: free some "
                                     "space and build again (the previous engine, if any, is untouched)") from exc
                free = shutil.disk_usage(out).free
                if free < NEARLY_FULL_BYTES and not isinstance(exc, ValueError):
                    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                    raise BuildError(f"the disk holding the engine cache {out} is full ({free >> 20} MB free; "
                                     f"{first}): free some space and build again (the previous engine, if any, "
                                     "is untouched)") from exc
                raise
    except OSError as exc:
        raise _storage_error(out, exc) from exc


def _tidy(out: Path, stem: str, handle: Path) -> None:
    """Remove what killed builds left behind; never blocks and never fails (read-only caches)."""
    if not os.access(out, os.W_OK):
        return
    clean_stale(out)
    with contextlib.suppress(OSError), file_lock(out / f".{stem}.lock", blocking=False):
        remove_orphans(handle)


def build_engine(variant: SpecLike | None = None, checkpoint: str | Path | None = None, *,
                 backend: str = "auto", precision: str = "fp32", max_batch: int = DEFAULT_MAX_BATCH,
                 out_dir: str | Path | None = None, force: bool = False, opset: int | None = None,
                 seed: int = 0, progress: Callable[[str], None] | None = None,
                 keep_fp32: Sequence[str] = (), fp16_output: bool = True,
                 calib_images: str | Path | None = None, calib_boxes: str | Path | None = None,
                 calib_count: int = 64, calib_method: str = "entropy", calib_synthetic: bool = False,
                 int8_exclude: Sequence[str] = DEFAULT_INT8_EXCLUDE, int8_scheme: str | None = None,
                 trt: TrtOptions | None = None) -> BuildResult:
    """Export and compile one engine, or reuse the cached one.

    Args:
        variant: "XS", "S", "M", "L" or a VariantSpec; optional with a checkpoint (then read
            from the weights' shapes).
        checkpoint: weights file; without one, deterministic random weights (benchmarks only).
        backend: "auto" (TensorRT where it and a GPU are present, else onnxruntime),
            "onnxruntime" or "tensorrt".
        precision: "fp32", "fp16" (FP16 graph; keep_fp32 node prefixes stay float32; float16
            heatmaps unless fp16_output=False) or "int8" (Q/DQ graph calibrated on calib_images
            with boxes from calib_boxes JSON, calib_count crops, calib_method entropy | minmax |
            percentile; int8_exclude node prefixes stay float; calib_synthetic for benchmarks).
        int8_scheme: the INT8 graph's shape (precision.INT8_SCHEMES); None: the backend's own
            ("ort-u8s8" for onnxruntime, whose CPU kernels fuse it; "trt-symmetric" for TensorRT).
            Both schemes come from one calibration (the stored ranges are shared).
        max_batch: largest batch of one engine call (larger ones are chunked).
        out_dir: cache folder, default $CNPOSE_TRT_ENGINES or ./engines.
        force: rebuild even when a valid cached engine exists.
        trt: TensorRT builder options.
    Returns:
        BuildResult(path, cached, sidecar metadata).
    Raises:
        ValueError: bad arguments. CheckpointError, BuildError: see their messages.
    """
    from ..spec import DEFAULT_OPSET
    from .precision import calibration_set, inspect_graph

    emit = progress or (lambda msg: None)

    def say(msg: str) -> None:
        raise_if_stopped()  # each step first raises a stop request that library code swallowed
        emit(msg)

    checks.integer("max_batch", max_batch, 1, 4096)
    opts = PrecisionOptions(precision=precision, fp16_output=fp16_output, keep_fp32=tuple(keep_fp32),
                            calib_method=calib_method, int8_exclude=tuple(int8_exclude),
                            calib_images=None if calib_images is None else str(calib_images),
                            calib_boxes=None if calib_boxes is None else str(calib_boxes),
                            calib_count=calib_count, calib_synthetic=calib_synthetic,
                            int8_scheme=int8_scheme or "trt-symmetric")
    trt = trt or TrtOptions()
    opt_batch = trt.opt_batch or max(1, max_batch // 2)
    checks.integer("opt_batch", opt_batch, 1, max_batch)
    opset = DEFAULT_OPSET if opset is None else opset
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be {DEFAULT_OPSET} or newer, got {opset}")
    if variant is not None:
        variant = get_spec(variant)
    backend_name = resolve_backend(backend)
    module = backends.get(backend_name)
    if int8_scheme is None:  # the graph the backend's kernels run quantized
        opts = dataclasses.replace(opts, int8_scheme=getattr(module, "INT8_SCHEME", "trt-symmetric"))
    if precision not in module.PRECISIONS:
        raise ValueError(f"the {backend_name} backend builds {', '.join(module.PRECISIONS)}, not {precision!r}")
    # Listed (and every image hashed) once: the hash keys the cache, the list feeds calibration.
    calib_items, calib_hash = calibration_set(opts, seed) if precision == "int8" else (None, None)
    out = _engine_folder(Path(out_dir) if out_dir is not None else default_engine_dir())
    # A request already served is found by the checkpoint file's own hash, without torch (the cache
    # key needs the weights as torch reads them): a cache hit costs what loading the engine costs.
    checkpoint_sha256 = None if checkpoint is None else _checkpoint_sha256(checkpoint)
    request = Request(out, {
        "checkpoint_sha256": checkpoint_sha256,
        # With a checkpoint its tensors decide the variant (a given one is checked on the hit).
        "seed": seed if checkpoint is None else None,
        "variant": None if variant is None or checkpoint is not None else variant.to_dict(),
        "precision": precision, "precision_options": opts.key_fields(calib_hash), "backend": backend_name,
        "opset": opset, "max_batch": max_batch, "input_convention": INPUT_CONVENTION},
        module.key_fields(BuildJob(spec=variant, model=None, precision=precision, max_batch=max_batch,
                                   opt_batch=opt_batch, trt=trt, out=out, say=say, show_progress=False)))
    hit = None if force else request.lookup(module, say)
    if hit is not None and variant is not None and not variant.same_architecture(VariantSpec(**hit[1]["spec"])):
        hit = None  # the checkpoint holds another variant: the full path says which tensors disagree
    if hit is not None:
        say(f"cached engine is up to date, reusing it (--force rebuilds): {hit[0]}")
        return BuildResult(hit[0], True, hit[1])
    need_torch("building an engine (model definition and ONNX export)")
    versions = _versions()

    say("[1/5] preparing the model")
    model, source, wsha = _prepare_model(variant, checkpoint, seed)
    spec: VariantSpec = model.spec
    say(f"      variant {spec.name} ({spec.head_tag}), weights: {source}")
    job = BuildJob(spec=spec, model=model, precision=precision, max_batch=max_batch, opt_batch=opt_batch, trt=trt,
                   out=out, say=say, show_progress=progress is not None)
    key_fields: dict[str, Any] = {
        "spec": spec.to_dict(), "precision": precision, "precision_options": opts.key_fields(calib_hash),
        "weights_sha256": wsha, "backend": backend_name, "opset": opset, "max_batch": max_batch,
        "input_convention": INPUT_CONVENTION, **module.key_fields(job)}
    key = cache_key(key_fields)
    stem = engine_stem(spec.name, spec.head_tag, precision, backend_name, key)
    # The handle names the engine; its sidecar names the engine file (see cache.py).
    handle = out / (stem + module.ENGINE_SUFFIX)
    # Lock-free first: sidecars are replaced atomically and engine files never change, so a valid
    # cached engine is served without a lock, from a read-only cache too.
    hit = None if force else _cached(handle, key, key_fields, module, say)
    if hit is not None:
        say(f"cached engine is up to date, reusing it (--force rebuilds): {hit[0]}")
        _tidy(out, stem, handle)
        request.remember(handle, key, key_fields)
        return BuildResult(hit[0], True, hit[1])
    with _build_lock(out, stem):
        hit = None if force else _cached(handle, key, key_fields, module, lambda _: None)  # built meanwhile?
        if hit is not None:
            say(f"cached engine is up to date, reusing it (--force rebuilds): {hit[0]}")
            request.remember(handle, key, key_fields)
            return BuildResult(hit[0], True, hit[1])
        clean_stale(out)
        remove_orphans(handle)
        started = time.time()
        extra: dict[str, Any] = {}
        with _workspace(out, stem) as tmp:
            io_dtypes = ("float32", "float16" if precision == "fp16" else "float32")
            if module.NEEDS_GRAPH:
                extra.update(_precision_graph(job, tmp, opts, opset, wsha, calib_hash, calib_items, seed, progress))
                report = inspect_graph(job.graph)
                io_dtypes = (report.input_dtype, report.output_dtype)
                extra.update(graph_ops=report.ops, int8_convs=report.quantized_convs)
            built = tmp / ("engine" + module.ENGINE_SUFFIX)
            extra.update(module.compile(job, built))
            raise_if_stopped()
            if checkpoint_sha256 is not None:  # finds the engine by the file's bytes, without torch (Request)
                extra["checkpoint_sha256"] = checkpoint_sha256
            engine, meta = commit_engine(handle, built, lambda path, _sha: _sidecar(
                path, key, spec, precision, opts, calib_hash, backend_name, opset, max_batch, *io_dtypes, wsha,
                source, checkpoint, versions, started, extra))
    request.remember(handle, key, key_fields)
    return BuildResult(engine, False, meta)


def _precision_graph(job: BuildJob, tmp: Path, opts: PrecisionOptions, opset: int, wsha: str,
                     calib_hash: str | None, calib_items: Any, seed: int,
                     progress: Callable[[str], None] | None) -> dict[str, Any]:
    """Export the FP32 graph and derive the precision graph (job.graph); returns sidecar extras."""
    from .export import export_onnx

    say, spec, extra = job.say, job.spec, {}
    job.fp32_graph = job.graph = tmp / "model.fp32.onnx"
    say(f"[2/5] exporting ONNX (opset {opset}, BatchNorm folded)")
    try:
        export_onnx(job.model, job.fp32_graph, opset)
    except Exception as exc:
        raise BuildError(f"ONNX export failed: {exc}") from exc
    if job.precision == "fp16":
        say("[3/5] converting the graph to FP16")
        from .precision import convert_fp16

        job.graph = tmp / "model.fp16.onnx"
        extra["fp16"] = convert_fp16(job.fp32_graph, job.graph, opts.keep_fp32, opts.fp16_output)
    elif job.precision == "int8":
        from .precision import quantize_int8

        # One calibration for both INT8 schemes: the scheme is not part of the ranges' key.
        calib_key = cache_key({"spec": spec.to_dict(), "weights_sha256": wsha, "opset": opset,
                               "input_convention": INPUT_CONVENTION, **opts.calibration_fields(calib_hash)})
        ranges = job.out / f"calib-{spec.name}-{calib_key[:12]}.json"
        say(f"[3/5] INT8 Q/DQ graph, {opts.int8_scheme} ({opts.calib_method} calibration"
            f"{', synthetic scenes: for benchmarking only' if opts.calib_synthetic else ''}"
            f"{', reusing stored ranges' if ranges.is_file() else ''})")
        job.graph = tmp / "model.int8.onnx"
        with file_lock(job.out / f".{ranges.name}.lock"):
            extra["int8"] = quantize_int8(job.fp32_graph, job.graph, opts, ranges,
                                          show_progress=progress is not None, seed=seed, items=calib_items)
        extra["int8"]["calibration"] = _calibration_words(opts, calib_items, say)
    else:
        say("[3/5] FP32 graph")
    return extra


def _calibration_words(opts: PrecisionOptions, items: Any, say: Callable[[str], None]) -> str:
    """What the calibration used, for the sidecar; says so when calib_count crops cycle fewer distinct ones."""
    from .precision import distinct_crops

    if opts.calib_synthetic:
        return f"{opts.calib_count} generated scenes (synthetic: for benchmarking only)"
    distinct = distinct_crops(items)
    words = f"{opts.calib_count} crops of {distinct} distinct people in {len(items)} images of {opts.calib_images}"
    if opts.calib_count > distinct:
        words += f" (each used about {opts.calib_count / distinct:.1f} times)"
        say(f"      note: --calib-count {opts.calib_count} asks for more crops than the {distinct} people in "
            f"{opts.calib_images}: the same crops are used again; more images give better ranges")
    return words


def _sidecar(engine: Path, key: str, spec: VariantSpec, precision: str, opts: PrecisionOptions,
             calib_hash: str | None, backend: str, opset: int, max_batch: int, in_dtype: str, out_dtype: str,
             wsha: str, source: str, checkpoint: Any, versions: dict[str, str], started: float,
             extra: dict[str, Any]) -> dict[str, Any]:
    """The engine's metadata: what the cache key covers, I/O contract, provenance."""
    from ..spec import INPUT_NAME, OUTPUT_NAME

    return {
        "engine_format": ENGINE_FORMAT, "cache_key": key, "engine_file": engine.name,
        "engine_sha256": file_sha256(engine),
        "variant": spec.name, "spec": spec.to_dict(), "head": spec.head_tag, "precision": precision,
        "precision_options": opts.key_fields(calib_hash), "backend": backend, "opset": opset,
        "max_batch": max_batch,
        "input": {"name": INPUT_NAME, "dtype": in_dtype, "shape": ["N", *spec.input_shape],
                  "convention": INPUT_CONVENTION, "mean": list(PIXEL_MEAN), "std": list(PIXEL_STD)},
        "output": {"name": OUTPUT_NAME, "dtype": out_dtype, "shape": ["N", *spec.heatmap_shape]},
        "weights": {"sha256": wsha, "source": source, "random": checkpoint is None,
                    **({"checkpoint_sha256": extra["checkpoint_sha256"]} if "checkpoint_sha256" in extra else {})},
        "versions": versions, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.time() - started, 2),
        **{k: v for k, v in extra.items() if k != "checkpoint_sha256"},
    }


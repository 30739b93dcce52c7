"""Build step: variant (+ checkpoint) -> FP32 ONNX -> precision graph -> engine + JSON sidecar, cached.

    python -m cnpose_trt.build --variant M [--fp16] [--int8 --calib-images DIR] [--checkpoint FILE]
                               [--backend auto|onnxruntime|tensorrt] [--max-batch N] [--out DIR] [--force]
    python -m cnpose_trt.build --all --fp16 --int8 --calib-images DIR

The engine paths are printed last (stdout), one per line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .cache import (
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
    remove_orphans,
    sidecar_path,
    temp_dir,
)
from .errors import BuildError, CnposeError, EngineError
from .precision import CALIB_METHODS, DEFAULT_INT8_EXCLUDE, PRECISIONS, PrecisionOptions
from .spec import INPUT_CONVENTION, PIXEL_MEAN, PIXEL_STD, VARIANTS, SpecLike, VariantSpec, get_spec

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
DEFAULT_MAX_BATCH = 32
# Rel. L2 error between an FP32 engine and PyTorch above which the build is refused: FP32
# graphs agree to ~1e-6, so 1e-3 only trips on a broken export.
PARITY_LIMIT = 1e-3
ACCURACY_SAMPLES = 8  # synthetic crops on which FP16/INT8 engines are compared with FP32


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


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"cnpose_trt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def resolve_backend(backend: str) -> str:
    """'auto' is tensorrt where TensorRT and a GPU are present, else onnxruntime."""
    from . import tensorrt_backend

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "tensorrt":
        tensorrt_backend.import_trt()  # BuildError with the install hint if missing
        return "tensorrt"
    if backend == "torch":
        return "torch"
    if backend == "auto" and tensorrt_backend.available():
        return "tensorrt"
    return "onnxruntime"


def _prepare_model(variant: SpecLike | None, checkpoint: str | Path | None, seed: int
                   ) -> tuple[Any, str, str]:
    """(model, weights description, weights sha256); the checkpoint's shapes decide the variant."""
    from .checkpoint import detect_spec, load_checkpoint, weights_sha256
    from .model import build_model

    if checkpoint is None:
        if variant is None:
            raise ValueError("variant is required without a checkpoint: one of " + ", ".join(VARIANTS))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model(variant, seed=seed)
        source = f"random (seed {seed}); outputs are meaningless"
    else:
        state, stored = load_checkpoint(checkpoint)
        detected = detect_spec(state, head_upsample=stored.head_upsample if stored else None)
        model = build_model(detected if variant is None else variant, state)
        source = str(checkpoint)
    return model, source, weights_sha256(model.state_dict())


def _optimise_for_ort(src: Path, dst: Path) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # EXTENDED fusions are CPU-provider specific but layout-neutral; ALL (NCHWc) runs at load time.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def _ort_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _parity(model: Any, engine_file: Path) -> float:
    import torch

    x = accuracy_inputs(model.spec, 2)  # real crops: the network's input spans about -2.1 .. 1136
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy().astype(np.float64)
    out = _ort_runner(engine_file)(x).astype(np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def accuracy_inputs(spec: VariantSpec, count: int = ACCURACY_SAMPLES, seed: int = 123) -> np.ndarray:
    """Normalised crops of generated scenes (upstream's convention), the common input of precision comparisons."""
    from .precision import calibration_batches

    rng = np.random.default_rng(seed)
    return np.concatenate(list(calibration_batches([("synthetic", rng)], count, count, spec.input_size)))


def joint_error(heat_ref: np.ndarray, heat: np.ndarray, spec: VariantSpec) -> dict[str, float]:
    """Decoded-joint difference of two heatmap batches, in heatmap cells and in mm.

    mm assume the usual 3D box of bbox_3d_shape = 2000 mm per side spread over the W x H x D
    volume: a cell is 2000/W mm in x, 2000/H mm in y, 2000/D mm in z.
    """
    from .decoding import decode
    from .spec import BBOX_3D_DEPTH_MM

    a = decode(np.ascontiguousarray(heat_ref), spec.joints, spec.depth_dim).cells.astype(np.float64)
    b = decode(np.ascontiguousarray(heat), spec.joints, spec.depth_dim).cells.astype(np.float64)
    d = b - a
    cells = np.linalg.norm(d, axis=-1)
    size = spec.heatmap_size
    mm = np.linalg.norm(d * (BBOX_3D_DEPTH_MM / np.array([size, size, spec.depth_dim])), axis=-1)
    return {"mean_cells": float(cells.mean()), "max_cells": float(cells.max()), "mean_mm": float(mm.mean()),
            "max_mm": float(mm.max()), "samples": int(len(a))}


def _cached(handle: Path, key: str) -> tuple[Path, dict[str, Any]] | None:
    """(engine file, metadata) of the valid cached engine of this key, else None. Needs no lock."""
    from .engine import read_sidecar

    try:
        meta = read_sidecar(handle)
        engine = sidecar_path(handle).with_name(meta["engine_file"])
        if meta.get("cache_key") != key or file_sha256(engine) != meta["engine_sha256"]:
            return None
    except (EngineError, OSError):
        return None
    return engine, meta


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


def _positive(name: str, value: Any, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"{name} must be an integer in 1..{limit}, got {value!r}")
    return value


def build_engine(variant: SpecLike | None = None, checkpoint: str | Path | None = None, *,
                 backend: str = "auto", precision: str = "fp32", max_batch: int = DEFAULT_MAX_BATCH,
                 out_dir: str | Path | None = None, force: bool = False, opset: int | None = None,
                 seed: int = 0, progress: Callable[[str], None] | None = None,
                 keep_fp32: Sequence[str] = (), fp16_output: bool = True,
                 calib_images: str | Path | None = None, calib_boxes: str | Path | None = None,
                 calib_count: int = 64, calib_method: str = "entropy", calib_synthetic: bool = False,
                 int8_exclude: Sequence[str] = DEFAULT_INT8_EXCLUDE, trt: TrtOptions | None = None) -> BuildResult:
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
        max_batch: largest batch of one engine call (larger ones are chunked).
        out_dir: cache folder, default $CNPOSE_TRT_ENGINES or ./engines.
        force: rebuild even when a valid cached engine exists.
        trt: TensorRT builder options.
    Returns:
        BuildResult(path, cached, sidecar metadata).
    Raises:
        ValueError: bad arguments. CheckpointError, BuildError: see their messages.
    """
    from .export import DEFAULT_OPSET, INPUT_NAME, export_onnx
    from .precision import calibration_set, inspect_graph

    say = progress or (lambda msg: None)
    _positive("max_batch", max_batch, 4096)
    opts = PrecisionOptions(precision=precision, fp16_output=fp16_output, keep_fp32=tuple(keep_fp32),
                            calib_method=calib_method, int8_exclude=tuple(int8_exclude),
                            calib_images=None if calib_images is None else str(calib_images),
                            calib_boxes=None if calib_boxes is None else str(calib_boxes),
                            calib_count=calib_count, calib_synthetic=calib_synthetic)
    trt = trt or TrtOptions()
    opt_batch = trt.opt_batch or max(1, max_batch // 2)
    _positive("opt_batch", opt_batch, max_batch)
    opset = DEFAULT_OPSET if opset is None else opset
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be {DEFAULT_OPSET} or newer, got {opset}")
    if variant is not None:
        variant = get_spec(variant)
    backend_name = resolve_backend(backend)
    if backend_name == "torch" and precision not in ("fp32", "fp16"):
        raise ValueError(f"the torch backend runs fp32 or fp16 (fp16 on CUDA), not {precision!r}")
    # Listed (and every image hashed) once: the hash keys the cache, the list feeds calibration.
    calib_items, calib_hash = calibration_set(opts, seed) if precision == "int8" else (None, None)
    versions = _versions()

    say("[1/5] preparing the model")
    model, source, wsha = _prepare_model(variant, checkpoint, seed)
    spec: VariantSpec = model.spec
    say(f"      variant {spec.name} ({spec.head_tag}), weights: {source}")
    key_fields: dict[str, Any] = {
        "spec": spec.to_dict(), "precision": precision, "precision_options": opts.key_fields(calib_hash),
        "weights_sha256": wsha, "backend": backend_name, "opset": opset, "max_batch": max_batch,
        "input_convention": INPUT_CONVENTION}
    if backend_name == "tensorrt":
        from . import tensorrt_backend

        key_fields.update(backend_version=tensorrt_backend.import_trt().__version__,
                          device=tensorrt_backend.gpu_identity(), trt=dataclasses.asdict(trt), opt_batch=opt_batch)
    else:
        key_fields.update(backend_version=versions["torch" if backend_name == "torch" else "onnxruntime"])
    key = cache_key(key_fields)
    out = _engine_folder(Path(out_dir) if out_dir is not None else default_engine_dir())
    stem = engine_stem(spec.name, spec.head_tag, precision, backend_name, key)
    # The handle names the engine; its sidecar names the engine file (see cache.py).
    handle = out / (stem + {"tensorrt": ".engine", "torch": ".pt"}.get(backend_name, ".onnx"))
    # Lock-free first: sidecars are replaced atomically and engine files never change, so a valid
    # cached engine is served without a lock, from a read-only cache too.
    hit = None if force else _cached(handle, key)
    if hit is not None:
        say(f"cached engine is up to date, reusing it (--force rebuilds): {hit[0]}")
        _tidy(out, stem, handle)
        return BuildResult(hit[0], True, hit[1])
    with _build_lock(out, stem):
        hit = None if force else _cached(handle, key)  # built by another process while we waited?
        if hit is not None:
            say(f"cached engine is up to date, reusing it (--force rebuilds): {hit[0]}")
            return BuildResult(hit[0], True, hit[1])
        clean_stale(out)
        remove_orphans(handle)
        started = time.time()
        extra: dict[str, Any] = {}
        if backend_name == "torch":
            from .torch_backend import save_engine

            say("[2/2] saving the PyTorch model (served by torch; fp16 runs on CUDA)")
            out_dtype = "float16" if precision == "fp16" else "float32"
            with _workspace(out, stem) as tmp:
                save_engine(model, tmp / "model.pt")
                engine, meta = commit_engine(handle, tmp / "model.pt", lambda path, _sha: _sidecar(
                    path, key, spec, precision, opts, calib_hash, backend_name, opset, max_batch,
                    "float32", out_dtype, wsha, source, checkpoint, versions, started, extra))
            return BuildResult(engine, False, meta)
        with _workspace(out, stem) as tmp:
            fp32 = Path(tmp) / "model.fp32.onnx"
            say(f"[2/5] exporting ONNX (opset {opset}, BatchNorm folded)")
            try:
                export_onnx(model, fp32, opset)
            except Exception as exc:
                raise BuildError(f"ONNX export failed: {exc}") from exc
            graph = fp32
            if precision == "fp16":
                say("[3/5] converting the graph to FP16")
                from .precision import convert_fp16

                graph = Path(tmp) / "model.fp16.onnx"
                extra["fp16"] = convert_fp16(fp32, graph, opts.keep_fp32, opts.fp16_output)
            elif precision == "int8":
                from .precision import quantize_int8

                calib_key = cache_key({"spec": spec.to_dict(), "weights_sha256": wsha, "opset": opset,
                                       "input_convention": INPUT_CONVENTION, **opts.key_fields(calib_hash)})
                ranges = out / f"calib-{spec.name}-{calib_key[:12]}.json"
                say(f"[3/5] INT8 Q/DQ graph ({opts.calib_method} calibration"
                    f"{', synthetic scenes: for benchmarking only' if opts.calib_synthetic else ''}"
                    f"{', reusing stored ranges' if ranges.is_file() else ''})")
                graph = Path(tmp) / "model.int8.onnx"
                with file_lock(out / f".{ranges.name}.lock"):
                    extra["int8"] = quantize_int8(fp32, graph, opts, ranges, show_progress=progress is not None,
                                                  seed=seed, items=calib_items)
                extra["int8"]["calibration"] = ("synthetic scenes (for benchmarking only)" if opts.calib_synthetic
                                                else f"{opts.calib_count} crops from {opts.calib_images}")
            else:
                say("[3/5] FP32 graph")
            report = inspect_graph(graph)
            built = Path(tmp) / "engine.bin"
            if backend_name == "tensorrt":
                from . import tensorrt_backend

                say("[4/5] building the TensorRT engine (strongly typed)")
                extra["tensorrt_build"] = tensorrt_backend.build(
                    graph, built, input_name=INPUT_NAME, input_shape=(max_batch, *spec.input_shape),
                    max_batch=max_batch, opt_batch=opt_batch, workspace_mb=trt.workspace_mb, opt_level=trt.opt_level,
                    timing_cache=out / "tensorrt.timing-cache", version_compatible=trt.version_compatible,
                    hardware_compatible=trt.hardware_compatible, show_progress=progress is not None,
                    tf32=trt.tf32, check_inputs=accuracy_inputs(spec))  # run once: non-finite output refused
                check = None
            else:
                say("[4/5] optimising the graph for onnxruntime")
                _optimise_for_ort(graph, built)
                check = _ort_runner(built)
            say("[5/5] checking the engine")
            if precision == "fp32" and backend_name == "onnxruntime":
                err = _parity(model, built)
                if not err <= PARITY_LIMIT:
                    raise BuildError(f"built engine disagrees with PyTorch: rel. L2 error {err:.2e} > {PARITY_LIMIT}")
                extra["parity_rel_l2_vs_torch"] = err
                say(f"      rel. L2 error vs PyTorch: {err:.1e}")
            elif check is not None:
                x = accuracy_inputs(spec)
                heat = check(x)
                if not np.isfinite(heat.astype(np.float32)).all():
                    raise BuildError(f"the {precision} engine produces non-finite heatmaps")
                acc = joint_error(_ort_runner(fp32)(x), heat, spec)
                extra["accuracy_vs_fp32"] = acc
                say(f"      decoded joints vs FP32: mean {acc['mean_cells']:.3f} cells ({acc['mean_mm']:.1f} mm), "
                    f"max {acc['max_cells']:.3f} cells on {acc['samples']} synthetic crops")
            engine, meta = commit_engine(handle, built, lambda path, _sha: _sidecar(
                path, key, spec, precision, opts, calib_hash, backend_name, opset, max_batch,
                report.input_dtype, report.output_dtype, wsha, source, checkpoint, versions, started,
                {"graph_ops": report.ops, "int8_convs": report.quantized_convs, **extra}))
    return BuildResult(engine, False, meta)


def _sidecar(engine: Path, key: str, spec: VariantSpec, precision: str, opts: PrecisionOptions,
             calib_hash: str | None, backend: str, opset: int, max_batch: int, in_dtype: str, out_dtype: str,
             wsha: str, source: str, checkpoint: Any, versions: dict[str, str], started: float,
             extra: dict[str, Any]) -> dict[str, Any]:
    """The engine's metadata: what the cache key covers, I/O contract, provenance."""
    from .export import INPUT_NAME, OUTPUT_NAME

    return {
        "engine_format": ENGINE_FORMAT, "cache_key": key, "engine_file": engine.name,
        "engine_sha256": file_sha256(engine),
        "variant": spec.name, "spec": spec.to_dict(), "head": spec.head_tag, "precision": precision,
        "precision_options": opts.key_fields(calib_hash), "backend": backend, "opset": opset,
        "max_batch": max_batch,
        "input": {"name": INPUT_NAME, "dtype": in_dtype, "shape": ["N", *spec.input_shape],
                  "convention": INPUT_CONVENTION, "mean": list(PIXEL_MEAN), "std": list(PIXEL_STD)},
        "output": {"name": OUTPUT_NAME, "dtype": out_dtype, "shape": ["N", *spec.heatmap_shape]},
        "weights": {"sha256": wsha, "source": source, "random": checkpoint is None},
        "versions": versions, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.time() - started, 2), **extra,
    }


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--variant", type=str.upper, choices=list(VARIANTS),
                   help="model variant (optional with --checkpoint: read from its weights)")
    g.add_argument("--all", action="store_true", help="build every variant (random weights)")
    p.add_argument("--checkpoint", type=Path, help="weights file; default: deterministic random weights")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="default auto: tensorrt where TensorRT and a GPU are present, else onnxruntime; "
                        "torch serves the model with PyTorch (fp16 on CUDA)")
    p.add_argument("--precision", choices=PRECISIONS, action="append", default=None,
                   help="repeatable; default fp32 (also --fp16, --int8)")
    p.add_argument("--fp16", action="append_const", dest="precision", const="fp16", help="build the FP16 engine")
    p.add_argument("--int8", action="append_const", dest="precision", const="int8",
                   help="build the INT8 engine (needs --calib-images or --calib-synthetic)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help=f"default {DEFAULT_MAX_BATCH}")
    p.add_argument("--out", type=Path, default=None, help="engine folder (default $CNPOSE_TRT_ENGINES or ./engines)")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached engine is valid")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 17 or newer (default 17)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights without --checkpoint")
    f = p.add_argument_group("FP16")
    f.add_argument("--keep-fp32", action="append", default=[], metavar="NODE_PREFIX",
                   help="ONNX node-name prefix kept in float32 (repeatable)")
    f.add_argument("--fp32-output", action="store_true", help="FP16 engine with float32 heatmaps")
    i = p.add_argument_group("INT8 calibration")
    i.add_argument("--calib-images", type=Path, help="folder of calibration images")
    i.add_argument("--calib-boxes", type=Path,
                   help="JSON {file name: [x, y, w, h] or [[...], ...]}; default: the whole image")
    i.add_argument("--calib-count", type=int, default=64, help="crops to calibrate on (default 64)")
    i.add_argument("--calib-method", choices=CALIB_METHODS, default="entropy")
    i.add_argument("--calib-synthetic", action="store_true",
                   help="calibrate on generated scenes: for benchmarking only (recorded in the sidecar)")
    i.add_argument("--int8-exclude", action="append", default=None, metavar="NODE_PREFIX",
                   help=f"node-name prefixes kept out of INT8 (repeatable; default {' '.join(DEFAULT_INT8_EXCLUDE)})")
    t = p.add_argument_group("TensorRT")
    t.add_argument("--opt-batch", type=int, default=None, help="optimisation profile's opt batch (default max/2)")
    t.add_argument("--workspace-mb", type=int, default=4096)
    t.add_argument("--opt-level", type=int, default=3, choices=range(6), help="builder optimisation level 0-5")
    t.add_argument("--version-compatible", action="store_true")
    t.add_argument("--hardware-compatible", action="store_true", help="Ampere and newer GPUs")
    t.add_argument("--tf32", action="store_true", help="let float32 layers use TF32 (default: true float32)")


def run_build(args: argparse.Namespace) -> int:
    if args.variant is None and args.checkpoint is None and not args.all:
        print("error: give --variant (XS, S, M, L), --all or --checkpoint", file=sys.stderr)
        return 2
    if args.all and args.checkpoint is not None:
        print("error: --all builds every variant with random weights; a checkpoint holds one variant", file=sys.stderr)
        return 2
    precisions = list(dict.fromkeys(args.precision or ["fp32"]))
    variants = list(VARIANTS) if args.all else [args.variant]
    trt = TrtOptions(opt_batch=args.opt_batch, workspace_mb=args.workspace_mb, opt_level=args.opt_level,
                     version_compatible=args.version_compatible, hardware_compatible=args.hardware_compatible,
                     tf32=args.tf32)
    paths = []
    try:
        for variant in variants:
            for precision in precisions:
                result = build_engine(
                    variant, args.checkpoint, backend=args.backend, precision=precision, max_batch=args.max_batch,
                    out_dir=args.out, force=args.force, opset=args.opset, seed=args.seed,
                    progress=lambda m: print(m, file=sys.stderr, flush=True), keep_fp32=args.keep_fp32,
                    fp16_output=not args.fp32_output, calib_images=args.calib_images, calib_boxes=args.calib_boxes,
                    calib_count=args.calib_count, calib_method=args.calib_method,
                    calib_synthetic=args.calib_synthetic,
                    int8_exclude=DEFAULT_INT8_EXCLUDE if args.int8_exclude is None else args.int8_exclude, trt=trt)
                paths.append(result.path)
    except (CnposeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # outside the engine cache (its errors are BuildErrors), e.g. a checkpoint folder
        print(f"error: {exc.strerror}: {exc.filename}" if exc.filename else f"error: {exc}", file=sys.stderr)
        return 2
    if args.checkpoint is None:
        print("warning: built with random weights; pass --checkpoint for real poses", file=sys.stderr)
    for path in paths:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnpose_trt.build", description=__doc__.split("\n")[0])
    add_build_arguments(parser)
    from .interrupts import run_command

    return run_command(run_build, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

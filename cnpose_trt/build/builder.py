"""Build step: variant (+ checkpoint) -> FP32 ONNX -> precision graph -> engine + JSON sidecar, cached.

    python -m cnpose_trt.build --variant M [--fp16] [--int8 --calib-images DIR] [--checkpoint FILE]
                               [--backend auto|onnxruntime|tensorrt|torch] [--max-batch N] [--out DIR] [--force]
    python -m cnpose_trt.build --all --fp16 --int8 --calib-images DIR

build_engine takes a BuildConfig (config.py; or its fields as arguments) and runs the steps of one
build (_Build): plan -> cached? -> prepare the model and its cache key -> cached? -> under the
engine's lock: export and precision graph (export.py, precision.py) -> the backend's compile
(backends/<name>/compile) -> sidecar -> atomic commit. lookup.py finds cached engines, storage.py
holds the cache folder's locks and temporary folders; cli/build.py is the command line
(build/__main__.py runs it). The engine paths are printed last (stdout), one per line; progress
goes to stderr.
"""

from __future__ import annotations

import dataclasses
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import backends
from .._version import __version__
from ..cache import (
    ENGINE_FORMAT,
    cache_key,
    clean_stale,
    commit_engine,
    default_engine_dir,
    engine_stem,
    file_lock,
    file_sha256,
    remove_orphans,
)
from ..config import DEFAULT_INT8_EXCLUDE, ROOTNET_INT8_EXCLUDE, ROOTNET_KEEP_FP32, BuildConfig, TrtOptions
from ..errors import BuildError, CheckpointError, need_torch
from ..interrupts import raise_if_stopped
from ..nn.checkpoint import detect_spec, load_checkpoint, network_of, weights_sha256
from ..spec import (
    DEFAULT_OPSET,
    INPUT_CONVENTION,
    INPUT_NAME,
    OUTPUT_NAME,
    PIXEL_MEAN,
    PIXEL_STD,
    VARIANTS,
    RootNetSpec,
    SpecLike,
    VariantSpec,
    get_spec,
    model_of,
)
from . import auto
from .lookup import Request, cached, checkpoint_sha256
from .precision import PrecisionOptions, calibration_set, convert_fp16, distinct_crops, inspect_graph, quantize_int8
from .storage import NEARLY_FULL_BYTES, build_lock, engine_folder, tidy, workspace

__all__ = ["BuildConfig", "BuildJob", "BuildResult", "NEARLY_FULL_BYTES", "Request", "TrtOptions", "build_engine",
           "resolve_backend", "weights_fingerprint"]


@dataclasses.dataclass(frozen=True)
class BuildResult:
    path: Path
    cached: bool
    meta: dict[str, Any]

@dataclasses.dataclass
class BuildJob:
    """What a backend's compile step gets: the model, its precision graph and the options."""

    spec: VariantSpec | RootNetSpec  # a RootNetSpec for a RootNet engine (spec.model_of says which)
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
    """'auto' is tensorrt where TensorRT and a GPU are present, else onnxruntime (the fixed rule; build_engine
    measures the CPU's engines instead unless CNPOSE_TRT_AUTO=first: auto.py)."""
    return backends.resolve(backend)


def weights_fingerprint(checkpoint: str | Path, model: str = "convnextpose") -> str:
    """The sha256 an engine's sidecar records for weights built from `checkpoint` (weights.sha256)."""
    return _prepare_model(None, checkpoint, 0, model)[2]


_NETWORK_NAMES = {"convnextpose": "ConvNeXtPose", "rootnet": "RootNet"}


def _check_network(state: Any, checkpoint: str | Path, model: str) -> None:
    """One line for a checkpoint of the other network than the build's model (network_of reads the keys)."""
    found = network_of(state)
    if found is not None and found != _NETWORK_NAMES[model]:
        how = "with --model rootnet (model='rootnet')" if found == "RootNet" else "without --model rootnet"
        raise CheckpointError(f"checkpoint {checkpoint} holds {found} weights, but a {_NETWORK_NAMES[model]} engine "
                              f"was asked for: build it {how}")


def _prepare_rootnet(checkpoint: str | Path | None, seed: int) -> tuple[Any, str, str]:
    from ..nn.rootnet import build_rootnet  # lazy: imports torch

    if checkpoint is None:
        model = build_rootnet(seed=seed, warn_random=False)
        source = (f"random (seed {seed}, BatchNorm statistics fitted on generated crops); roots are meaningless: "
                  "for benchmarks only")
    else:
        state, _ = load_checkpoint(checkpoint)
        _check_network(state, checkpoint, "rootnet")
        model = build_rootnet(state)
        source = str(checkpoint)
    return model, source, weights_sha256(model.state_dict())


def _prepare_model(variant: SpecLike | None, checkpoint: str | Path | None, seed: int, network: str = "convnextpose"
                   ) -> tuple[Any, str, str]:
    """(model, weights description, weights sha256); the checkpoint's shapes decide the variant. network:
    "rootnet" builds RootNet (nn/rootnet.py) from an official snapshot or random weights."""
    from ..nn.model import build_model  # lazy: imports torch (cache hits run without it)

    if network == "rootnet":
        return _prepare_rootnet(checkpoint, seed)
    if checkpoint is None:
        if variant is None:
            raise ValueError("variant is required without a checkpoint: one of " + ", ".join(VARIANTS))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model(variant, seed=seed)
        source = f"random (seed {seed}); outputs are meaningless"
    else:
        state, stored = load_checkpoint(checkpoint)
        _check_network(state, checkpoint, "convnextpose")
        if variant is None:  # the tensors decide; a given variant is checked against them by build_model
            variant = detect_spec(state, head_upsample=stored.head_upsample if stored else None)
        model = build_model(variant, state)
        source = str(checkpoint)
    return model, source, weights_sha256(model.state_dict())


def build_engine(variant: SpecLike | BuildConfig | None = None, checkpoint: str | Path | None = None, *,
                 progress: Callable[[str], None] | None = None, **options: Any) -> BuildResult:
    """Export and compile one engine, or reuse the cached one.

    Args:
        variant: a BuildConfig (then nothing else but progress), or "XS", "S", "M", "L" or a
            VariantSpec; optional with a checkpoint (then read from the weights' shapes).
        checkpoint: weights file; without one, deterministic random weights (benchmarks only).
        options: BuildConfig's other fields:
        backend: "auto" (TensorRT where it and a GPU are present; else the fastest CPU engine measured on
            this processor, within the accuracy bound: build/auto.py), "onnxruntime", "openvino",
            "tensorrt" or "torch".
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
        opset, seed: the ONNX opset (17 or newer); the random weights' seed (no checkpoint).
        trt: TensorRT builder options (TrtOptions).
        model: "convnextpose" (default) or "rootnet": RootNet (no variant; an official snapshot or
            random weights with fitted BatchNorm statistics), input (N, 3, 256, 256), output 'roots'
            (N, 3) float32 = x, y cells and gamma (depth = gamma * k on the host). Its FP16 graph keeps
            config.ROOTNET_KEEP_FP32 in float32; its INT8 graph leaves config.ROOTNET_INT8_EXCLUDE float
            when int8_exclude is left at its default. The onnxruntime and tensorrt backends build it.
    Returns:
        BuildResult(path, cached, sidecar metadata).
    Raises:
        ValueError: bad arguments. CheckpointError, BuildError: see their messages.
    """
    if isinstance(variant, BuildConfig):
        if checkpoint is not None or options:
            raise ValueError("give build_engine a BuildConfig alone, or its fields as arguments, not both")
        config = variant
    else:
        config = BuildConfig(variant, checkpoint, **options)
    if auto.measures(config):  # the CPU's candidates built, timed here, the fastest within bound kept (auto.py)
        return auto.build_measured(config, lambda concrete: _Build(concrete, progress).run(), progress)
    return _Build(config, progress).run()


class _Build:
    """One build_engine call, as its steps; everything a step needs is checked once, in __init__."""

    def __init__(self, config: BuildConfig, progress: Callable[[str], None] | None) -> None:
        c = self.config = config
        self.progress, self.emit = progress, progress or (lambda msg: None)
        rootnet = c.model == "rootnet"
        keep_fp32 = tuple(dict.fromkeys((*ROOTNET_KEEP_FP32, *c.keep_fp32))) if rootnet else tuple(c.keep_fp32)
        int8_exclude = ROOTNET_INT8_EXCLUDE if rootnet and tuple(c.int8_exclude) == DEFAULT_INT8_EXCLUDE \
            else tuple(c.int8_exclude)
        self.opts = PrecisionOptions(
            # RootNet's roots stay float32 (x to 1/64 cell near 63, gamma): its output is three numbers.
            precision=c.precision, fp16_output=c.fp16_output and not rootnet, keep_fp32=keep_fp32,
            calib_method=c.calib_method, int8_exclude=int8_exclude,
            calib_images=None if c.calib_images is None else str(c.calib_images),
            calib_boxes=None if c.calib_boxes is None else str(c.calib_boxes),
            calib_count=c.calib_count, calib_synthetic=c.calib_synthetic, int8_scheme=c.int8_scheme or "trt-symmetric")
        self.opset = DEFAULT_OPSET if c.opset is None else c.opset
        self.variant = None if c.variant is None else get_spec(c.variant)
        self.backend = resolve_backend(c.backend)
        self.module = backends.get(self.backend)
        if c.int8_scheme is None:  # the graph the backend's kernels run quantized
            self.opts = dataclasses.replace(self.opts, int8_scheme=getattr(self.module, "INT8_SCHEME", "trt-symmetric"))
        if c.model not in self.module.MODELS:
            raise ValueError(f"the {self.backend} backend builds {', '.join(self.module.MODELS)} engines, not "
                             f"{c.model}; build it with --backend onnxruntime (or tensorrt)")
        if c.precision not in self.module.PRECISIONS:
            others = backends.builders_of(c.precision)
            raise ValueError(f"the {self.backend} backend builds {', '.join(self.module.PRECISIONS)}, "
                             f"not {c.precision!r}" + (f" ({c.precision} engines: --backend {' or '.join(others)})"
                                                        if others else ""))
        problem = getattr(self.module, "precision_problem", lambda _: None)(c.precision)
        if problem:
            raise BuildError(f"cannot build a {c.precision} engine with the {self.backend} backend here: {problem}")
        # Listed (and every image hashed) once: the hash keys the cache, the list feeds calibration.
        self.calib_items, self.calib_hash = (calibration_set(self.opts, c.seed) if c.precision == "int8"
                                             else (None, None))
        self.out = engine_folder(Path(c.out_dir) if c.out_dir is not None else default_engine_dir())
        # A request already served is found by the checkpoint file's own hash, without torch (the cache
        # key needs the weights as torch reads them): a cache hit costs what loading the engine costs.
        self.checkpoint_sha256 = None if c.checkpoint is None else checkpoint_sha256(c.checkpoint)
        self.request = Request(self.out, {
            "checkpoint_sha256": self.checkpoint_sha256,
            # With a checkpoint its tensors decide the variant (a given one is checked on the hit).
            "seed": c.seed if c.checkpoint is None else None,
            "variant": None if self.variant is None or c.checkpoint is not None else self.variant.to_dict(),
            **self._fields()}, self.module.key_fields(self._job(self.variant, None)))

    def say(self, msg: str) -> None:
        raise_if_stopped()  # each step first raises a stop request that library code swallowed
        self.emit(msg)

    def _fields(self) -> dict[str, Any]:
        """The cache key's fields that the request knows before the model is made."""
        c = self.config
        # The model enters RootNet keys only: ConvNeXtPose keys stay what they were (engines already built
        # stay cache hits), and every RootNet key differs from them by this field (and by its spec).
        model = {"model": c.model} if c.model != "convnextpose" else {}
        return {"precision": c.precision, "precision_options": self.opts.key_fields(self.calib_hash),
                "backend": self.backend, "opset": self.opset, "max_batch": c.max_batch,
                "input_convention": INPUT_CONVENTION, **model}

    def _job(self, spec: VariantSpec | None, model: Any) -> BuildJob:
        c = self.config
        return BuildJob(spec=spec, model=model, precision=c.precision, max_batch=c.max_batch, opt_batch=c.opt_batch,
                        trt=c.trt or TrtOptions(), out=self.out, say=self.say,
                        show_progress=model is not None and self.progress is not None)

    def _reuse(self, hit: tuple[Path, dict[str, Any]]) -> BuildResult:
        self.say(f"cached engine is up to date, reusing it (--force rebuilds): {hit[0]}")
        return BuildResult(hit[0], True, hit[1])

    def run(self) -> BuildResult:
        force = self.config.force
        hit = None if force else self.request.lookup(self.module, self.say)
        if hit is not None and self.variant is not None and not self.variant.same_architecture(
                VariantSpec(**hit[1]["spec"])):
            hit = None  # the checkpoint holds another variant: the full path says which tensors disagree
        if hit is not None:
            return self._reuse(hit)
        need_torch("building an engine (model definition and ONNX export)")
        versions = _versions()
        self.say("[1/5] preparing the model")
        model, source, wsha = _prepare_model(self.variant, self.config.checkpoint, self.config.seed,
                                             self.config.model)
        spec: VariantSpec | RootNetSpec = model.spec
        what = "RootNet" if self.config.model == "rootnet" else "variant"
        self.say(f"      {what} {spec.name} ({spec.head_tag}), weights: {source}")
        job = self._job(spec, model)
        key_fields: dict[str, Any] = {"spec": spec.to_dict(), "weights_sha256": wsha, **self._fields(),
                                      **self.module.key_fields(job)}
        key = cache_key(key_fields)
        stem = engine_stem(spec.name, spec.head_tag, self.config.precision, self.backend, key)
        # The handle names the engine; its sidecar names the engine file (see cache.py).
        handle = self.out / (stem + self.module.ENGINE_SUFFIX)
        # Lock-free first: sidecars are replaced atomically and engine files never change, so a valid
        # cached engine is served without a lock, from a read-only cache too.
        hit = None if force else cached(handle, key, key_fields, self.module, self.say)
        if hit is not None:
            tidy(self.out, stem, handle)
            self.request.remember(handle, key, key_fields)
            return self._reuse(hit)
        with build_lock(self.out, stem):
            hit = None if force else cached(handle, key, key_fields, self.module, lambda _: None)  # built meanwhile?
            if hit is not None:
                result = self._reuse(hit)
            else:
                clean_stale(self.out)
                remove_orphans(handle)
                result = self._compile(job, handle, stem, key, {"wsha": wsha, "source": source, "versions": versions})
        self.request.remember(handle, key, key_fields)
        return result

    def _compile(self, job: BuildJob, handle: Path, stem: str, key: str, provenance: dict[str, Any]) -> BuildResult:
        """Precision graph, the backend's compile, the sidecar, the atomic commit (under the lock)."""
        started = time.time()
        extra: dict[str, Any] = {}
        with workspace(self.out, stem) as tmp:
            io_dtypes = ("float32", "float16" if job.precision == "fp16" else "float32")
            if self.module.NEEDS_GRAPH:
                extra.update(self._precision_graph(job, tmp, provenance["wsha"]))
                report = inspect_graph(job.graph)
                io_dtypes = (report.input_dtype, report.output_dtype)
                extra.update(graph_ops=report.ops, int8_convs=report.quantized_convs)
            built = tmp / ("engine" + self.module.ENGINE_SUFFIX)
            extra.update(self.module.compile(job, built))
            raise_if_stopped()
            if self.checkpoint_sha256 is not None:  # finds the engine by the file's bytes, without torch (Request)
                extra["checkpoint_sha256"] = self.checkpoint_sha256
            engine, meta = commit_engine(handle, built, lambda path, _sha: self._sidecar(
                path, key, job.spec, io_dtypes, {**provenance, "started": started}, extra))
        return BuildResult(engine, False, meta)

    def _sidecar(self, engine: Path, key: str, spec: VariantSpec | RootNetSpec, io_dtypes: tuple[str, str],
                 provenance: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """The engine's metadata: what the cache key covers, I/O contract, provenance."""
        c, (in_dtype, out_dtype) = self.config, io_dtypes
        model = model_of(spec)
        output = spec.output_name if isinstance(spec, RootNetSpec) else OUTPUT_NAME
        roots = {"roots": {"fields": ["x_cells", "y_cells", "gamma"], "output_size": spec.output_size,
                           "bbox_real_mm": list(spec.bbox_real_mm),
                           "depth": "depth mm = gamma * k, k = sqrt(bbox_real_x * bbox_real_y * fx * fy / (w * h)) "
                                    "of the processed box, on the host (ops.rootnet)"}} if model == "rootnet" else {}
        return {
            "engine_format": ENGINE_FORMAT, "cache_key": key, "engine_file": engine.name,
            "engine_sha256": file_sha256(engine), "model": model, **roots,
            "variant": spec.name, "spec": spec.to_dict(), "head": spec.head_tag, "precision": c.precision,
            "precision_options": self.opts.key_fields(self.calib_hash), "backend": self.backend,
            "opset": self.opset,
            "max_batch": c.max_batch,
            "input": {"name": INPUT_NAME, "dtype": in_dtype, "shape": ["N", *spec.input_shape],
                      "convention": INPUT_CONVENTION, "mean": list(PIXEL_MEAN), "std": list(PIXEL_STD)},
            "output": {"name": output, "dtype": out_dtype, "shape": ["N", *spec.output_shape]},
            "weights": {"sha256": provenance["wsha"], "source": provenance["source"], "random": c.checkpoint is None,
                        **({"checkpoint_sha256": extra["checkpoint_sha256"]} if "checkpoint_sha256" in extra else {})},
            "versions": provenance["versions"], "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.time() - provenance["started"], 2),
            **{k: v for k, v in extra.items() if k != "checkpoint_sha256"},
        }


    def _precision_graph(self, job: BuildJob, tmp: Path, wsha: str) -> dict[str, Any]:
        """Export the FP32 graph and derive the precision graph (job.graph); returns sidecar extras."""
        from .export import export_onnx  # lazy: imports torch (cache hits run without it)

        say, spec, extra, opts, opset = job.say, job.spec, {}, self.opts, self.opset
        job.fp32_graph = job.graph = tmp / "model.fp32.onnx"
        say(f"[2/5] exporting ONNX (opset {opset}, BatchNorm folded)")
        try:
            export_onnx(job.model, job.fp32_graph, opset)
        except Exception as exc:
            raise BuildError(f"ONNX export failed: {exc}") from exc
        if job.precision == "fp16":
            say("[3/5] converting the graph to FP16")
            job.graph = tmp / "model.fp16.onnx"
            extra["fp16"] = convert_fp16(job.fp32_graph, job.graph, opts.keep_fp32, opts.fp16_output)
        elif job.precision == "int8":
            # One calibration for both INT8 schemes: the scheme is not part of the ranges' key.
            calib_key = cache_key({"spec": spec.to_dict(), "weights_sha256": wsha, "opset": opset,
                                   "input_convention": INPUT_CONVENTION, **opts.calibration_fields(self.calib_hash)})
            ranges = job.out / f"calib-{spec.name}-{calib_key[:12]}.json"
            say(f"[3/5] INT8 Q/DQ graph, {opts.int8_scheme} ({opts.calib_method} calibration"
                f"{', synthetic scenes: for benchmarking only' if opts.calib_synthetic else ''}"
                f"{', reusing stored ranges' if ranges.is_file() else ''})")
            job.graph = tmp / "model.int8.onnx"
            with file_lock(job.out / f".{ranges.name}.lock"):
                extra["int8"] = quantize_int8(job.fp32_graph, job.graph, opts, ranges,
                                              show_progress=self.progress is not None, seed=self.config.seed,
                                              items=self.calib_items)
            extra["int8"]["calibration"] = _calibration_words(opts, self.calib_items, say)
        else:
            bf16 = " (bf16: the backend compiles it for bfloat16)" if job.precision == "bf16" else ""
            say(f"[3/5] FP32 graph{bf16}")
        return extra


def _calibration_words(opts: PrecisionOptions, items: Any, say: Callable[[str], None]) -> str:
    """What the calibration used, for the sidecar; says so when calib_count crops cycle fewer distinct ones."""
    if opts.calib_synthetic:
        return f"{opts.calib_count} generated scenes (synthetic: for benchmarking only)"
    distinct = distinct_crops(items)
    words = f"{opts.calib_count} crops of {distinct} distinct people in {len(items)} images of {opts.calib_images}"
    if opts.calib_count > distinct:
        words += f" (each used about {opts.calib_count / distinct:.1f} times)"
        say(f"      note: --calib-count {opts.calib_count} asks for more crops than the {distinct} people in "
            f"{opts.calib_images}: the same crops are used again; more images give better ranges")
    return words

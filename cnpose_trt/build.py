"""Build step: variant (+ checkpoint) -> ONNX -> engine file + JSON sidecar, cached.

    python -m cnpose_trt.build --variant M [--checkpoint FILE] [--backend auto|onnxruntime|tensorrt]
                               [--max-batch N] [--out DIR] [--force]

The last line printed (stdout) is the engine path; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .cache import (
    atomic_write,
    cache_key,
    default_engine_dir,
    engine_stem,
    file_lock,
    file_sha256,
    sidecar_path,
    write_json,
)
from .errors import BuildError, CnposeError, EngineError
from .spec import VARIANTS, SpecLike, VariantSpec, get_spec

BACKENDS = ("auto", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32",)
DEFAULT_MAX_BATCH = 32
# Rel. L2 error between the built engine and PyTorch above which the build is refused: FP32
# graphs agree to ~1e-6, so 1e-3 only trips on a broken export.
PARITY_LIMIT = 1e-3

TENSORRT_INSTALL_HINT = (
    "TensorRT is not installed. On a machine with an NVIDIA GPU and driver: "
    "pip install 'cnpose_trt[tensorrt]' (tensorrt-cu12 or tensorrt-cu13, and cuda-python). "
    "Without a GPU use --backend onnxruntime (the default that --backend auto picks).")


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
    """Name the backend that will build: 'auto' is onnxruntime until TensorRT building lands."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            raise BuildError(TENSORRT_INSTALL_HINT)
        raise BuildError("this version of cnpose_trt cannot build TensorRT engines yet; "
                         "use --backend onnxruntime")
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


def _parity(model: Any, engine_file: Path, seed: int = 1) -> float:
    import onnxruntime as ort
    import torch

    x = np.random.default_rng(seed).standard_normal((2, *model.spec.input_shape)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy().astype(np.float64)
    sess = ort.InferenceSession(str(engine_file), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def _cached(engine: Path, key: str) -> dict[str, Any] | None:
    from .engine import read_sidecar

    if not engine.is_file() or not sidecar_path(engine).is_file():
        return None
    try:
        meta = read_sidecar(engine)
    except EngineError:
        return None
    if meta.get("cache_key") != key or meta.get("engine_sha256") != file_sha256(engine):
        return None
    return meta


def build_engine(variant: SpecLike | None = None, checkpoint: str | Path | None = None, *,
                 backend: str = "auto", precision: str = "fp32", max_batch: int = DEFAULT_MAX_BATCH,
                 out_dir: str | Path | None = None, force: bool = False, opset: int | None = None,
                 seed: int = 0, progress: Callable[[str], None] | None = None) -> BuildResult:
    """Export and compile one engine, or reuse the cached one.

    Args:
        variant: "XS", "S", "M", "L" or a VariantSpec; optional with a checkpoint (then read
            from the weights' shapes).
        checkpoint: weights file; without one, deterministic random weights (benchmarks only).
        backend: "auto", "onnxruntime" or "tensorrt".
        max_batch: largest batch one engine call takes (larger ones are chunked).
        out_dir: cache folder, default $CNPOSE_TRT_ENGINES or ./engines.
        force: rebuild even when a valid cached engine exists.
    Returns:
        BuildResult(path, cached, sidecar metadata).
    Raises:
        ValueError: bad arguments. CheckpointError, BuildError: see their messages.
    """
    from .export import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, export_onnx

    say = progress or (lambda msg: None)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= 4096:
        raise ValueError(f"max_batch must be an integer in 1..4096, got {max_batch!r}")
    opset = DEFAULT_OPSET if opset is None else opset
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be {DEFAULT_OPSET} or newer, got {opset}")
    if variant is not None:
        variant = get_spec(variant)
    backend_name = resolve_backend(backend)
    versions = _versions()

    say("[1/4] preparing the model")
    model, source, wsha = _prepare_model(variant, checkpoint, seed)
    spec: VariantSpec = model.spec
    say(f"      variant {spec.name} ({spec.head_tag}), weights: {source}")
    key = cache_key({"spec": spec.to_dict(), "precision": precision, "weights_sha256": wsha,
                     "backend": backend_name, "backend_version": versions["onnxruntime"],
                     "opset": opset, "max_batch": max_batch})
    out = Path(out_dir) if out_dir is not None else default_engine_dir()
    out.mkdir(parents=True, exist_ok=True)
    stem = engine_stem(spec.name, spec.head_tag, precision, backend_name, key)
    engine = out / f"{stem}.onnx"
    with file_lock(out / f".{stem}.lock"):
        meta = None if force else _cached(engine, key)
        if meta is not None:
            say(f"cached engine is up to date, reusing it (--force rebuilds): {engine}")
            return BuildResult(engine, True, meta)
        sidecar_path(engine).unlink(missing_ok=True)  # an engine without a sidecar never loads
        started = time.time()
        with tempfile.TemporaryDirectory(dir=out, prefix=f".{stem}.") as tmp:
            raw, opt = Path(tmp) / "model.onnx", Path(tmp) / "model.opt.onnx"
            say(f"[2/4] exporting ONNX (opset {opset}, BatchNorm folded)")
            try:
                export_onnx(model, raw, opset)
            except Exception as exc:
                raise BuildError(f"ONNX export failed: {exc}") from exc
            say("[3/4] optimising the graph for onnxruntime")
            _optimise_for_ort(raw, opt)
            say("[4/4] checking the engine against PyTorch")
            err = _parity(model, opt)
            if not err <= PARITY_LIMIT:
                raise BuildError(f"built engine disagrees with PyTorch: rel. L2 error {err:.2e} > {PARITY_LIMIT}")
            say(f"      rel. L2 error vs PyTorch: {err:.1e}")
            atomic_write(engine, opt.read_bytes())
        h = spec.heatmap_shape
        meta = {
            "engine_format": 1, "cache_key": key, "engine_file": engine.name,
            "engine_sha256": file_sha256(engine), "variant": spec.name, "spec": spec.to_dict(),
            "head": spec.head_tag, "precision": precision, "backend": backend_name,
            "opset": opset, "max_batch": max_batch,
            "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["N", *spec.input_shape]},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", *h]},
            "weights": {"sha256": wsha, "source": source, "random": checkpoint is None},
            "parity_rel_l2_vs_torch": err, "versions": versions,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_seconds": round(time.time() - started, 2),
        }
        write_json(sidecar_path(engine), meta)
    return BuildResult(engine, False, meta)


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", type=str.upper, choices=list(VARIANTS),
                   help="model variant (optional with --checkpoint: read from its weights)")
    p.add_argument("--checkpoint", type=Path, help="weights file; default: deterministic random weights")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="default: auto (onnxruntime here)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help=f"default {DEFAULT_MAX_BATCH}")
    p.add_argument("--out", type=Path, default=None, help="engine folder (default $CNPOSE_TRT_ENGINES or ./engines)")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached engine is valid")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 17 or newer (default 17)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights without --checkpoint")


def run_build(args: argparse.Namespace) -> int:
    if args.variant is None and args.checkpoint is None:
        print("error: give --variant (XS, S, M, L) or --checkpoint", file=sys.stderr)
        return 2
    try:
        result = build_engine(args.variant, args.checkpoint, backend=args.backend, precision=args.precision,
                              max_batch=args.max_batch, out_dir=args.out, force=args.force, opset=args.opset,
                              seed=args.seed, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except (CnposeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.meta["weights"]["random"]:
        print("warning: built with random weights; pass --checkpoint for real poses", file=sys.stderr)
    print(result.path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnpose_trt.build", description=__doc__.split("\n")[0])
    add_build_arguments(parser)
    return run_build(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

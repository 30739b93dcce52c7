"""The build command line: `python -m cnpose_trt.build` and `cnpose-trt build` (same options).

The engine paths are printed last (stdout), one per line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..backends import BACKENDS, DEFAULT_MAX_BATCH
from ..build import builder
from ..build.precision import CALIB_METHODS, DEFAULT_INT8_EXCLUDE, PRECISIONS
from ..config import ROOTNET_INT8_EXCLUDE, BuildConfig, TrtOptions
from ..progress import say
from ..spec import MODELS, VARIANTS
from .errors import run


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=MODELS, default="convnextpose",
                   help="the network: convnextpose (the pose network, default) or rootnet (RootNet, ResNet-50: "
                        "root position and gamma per person; --checkpoint an official snapshot, else random "
                        "weights for benchmarks)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--variant", type=str.upper, choices=list(VARIANTS),
                   help="model variant (optional with --checkpoint: read from its weights)")
    g.add_argument("--all", action="store_true", help="build every variant (random weights)")
    p.add_argument("--checkpoint", type=Path, help="weights file; default: deterministic random weights")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="default auto: tensorrt where TensorRT and a GPU are present, else the fastest CPU engine "
                        "(onnxruntime, openvino; bf16 for fp32 within 1 mm mean joint shift) timed on this "
                        "processor, the choice kept per processor in OUT/auto/ (CNPOSE_TRT_AUTO=first: "
                        "onnxruntime without measuring); "
                        "torch serves the model with PyTorch (fp16 on CUDA); openvino: OpenVINO on the CPU "
                        "(fp32, bf16, int8; pip install 'cnpose_trt[openvino]')")
    p.add_argument("--precision", choices=PRECISIONS, action="append", default=None,
                   help="repeatable; default fp32 (also --fp16, --int8, --bf16)")
    p.add_argument("--fp16", action="append_const", dest="precision", const="fp16", help="build the FP16 engine")
    p.add_argument("--int8", action="append_const", dest="precision", const="int8",
                   help="build the INT8 engine (needs --calib-images or --calib-synthetic)")
    p.add_argument("--bf16", action="append_const", dest="precision", const="bf16",
                   help="build the BF16 engine: the FP32 graph run in bfloat16 (--backend openvino, on a CPU with "
                        "AMX-BF16 or AVX512-BF16)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help=f"default {DEFAULT_MAX_BATCH}")
    p.add_argument("--out", type=Path, default=None, help="engine folder (default $CNPOSE_TRT_ENGINES or ./engines)")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached engine is valid")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 17 or newer (default 17)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights without --checkpoint (default 0)")
    f = p.add_argument_group("FP16")
    f.add_argument("--keep-fp32", action="append", default=[], metavar="NODE_PREFIX",
                   help="ONNX node-name prefix kept in float32 (repeatable)")
    f.add_argument("--fp32-output", action="store_true", help="FP16 engine with float32 heatmaps")
    i = p.add_argument_group("INT8 calibration")
    i.add_argument("--calib-images", type=Path, help="folder of calibration images")
    i.add_argument("--calib-boxes", type=Path,
                   help="JSON {file name: [x, y, w, h] or [[...], ...]}; default: the whole image")
    i.add_argument("--calib-count", type=int, default=64, help="crops to calibrate on (default 64)")
    i.add_argument("--calib-method", choices=CALIB_METHODS, default="entropy",
                   help="how activation ranges are chosen from the calibration histograms (default entropy)")
    i.add_argument("--calib-synthetic", action="store_true",
                   help="calibrate on generated scenes: for benchmarking only (recorded in the sidecar)")
    i.add_argument("--int8-exclude", action="append", default=None, metavar="NODE_PREFIX",
                   help=f"node-name prefixes kept out of INT8 (repeatable; default {' '.join(DEFAULT_INT8_EXCLUDE)}; "
                        f"RootNet's: {' '.join(ROOTNET_INT8_EXCLUDE)})")
    t = p.add_argument_group("TensorRT")
    t.add_argument("--opt-batch", type=int, default=None, help="optimisation profile's opt batch (default max/2)")
    t.add_argument("--workspace-mb", type=int, default=4096, help="builder workspace limit in MiB (default 4096)")
    t.add_argument("--opt-level", type=int, default=3, choices=range(6),
                   help="builder optimisation level 0-5 (default 3)")
    t.add_argument("--version-compatible", action="store_true",
                   help="an engine later TensorRT versions can run (lean runtime)")
    t.add_argument("--hardware-compatible", action="store_true", help="Ampere and newer GPUs")
    t.add_argument("--tf32", action="store_true", help="let float32 layers use TF32 (default: true float32)")


def run_build(args: argparse.Namespace) -> int:
    """Build (or reuse) the engines the options ask for and print their paths; an error is raised for the
    one boundary (cli.errors) to report, also where a later engine fails after earlier ones were built."""
    rootnet = getattr(args, "model", "convnextpose") == "rootnet"
    if rootnet and (args.variant is not None or args.all):
        raise ValueError("--variant and --all are ConvNeXtPose's; --model rootnet builds RootNet's one configuration "
                         "(ResNet-50)")
    if not rootnet and args.variant is None and args.checkpoint is None and not args.all:
        raise ValueError("give --variant (XS, S, M, L), --all or --checkpoint (or --model rootnet)")
    if args.all and args.checkpoint is not None:
        raise ValueError("--all builds every variant with random weights; a checkpoint holds one variant")
    precisions = list(dict.fromkeys(args.precision or ["fp32"]))
    variants = list(VARIANTS) if args.all else [args.variant]
    trt = TrtOptions(opt_batch=args.opt_batch, workspace_mb=args.workspace_mb, opt_level=args.opt_level,
                     version_compatible=args.version_compatible, hardware_compatible=args.hardware_compatible,
                     tf32=args.tf32)
    options = dict(checkpoint=args.checkpoint, backend=args.backend, max_batch=args.max_batch, out_dir=args.out,
                   force=args.force, opset=args.opset, seed=args.seed, keep_fp32=args.keep_fp32,
                   fp16_output=not args.fp32_output, calib_images=args.calib_images, calib_boxes=args.calib_boxes,
                   calib_count=args.calib_count, calib_method=args.calib_method,
                   calib_synthetic=args.calib_synthetic,
                   int8_exclude=DEFAULT_INT8_EXCLUDE if args.int8_exclude is None else args.int8_exclude, trt=trt,
                   model="rootnet" if rootnet else "convnextpose")
    paths = [builder.build_engine(BuildConfig(variant, precision=precision, **options), progress=say).path
             for variant in variants for precision in precisions]
    if args.checkpoint is None:
        print(f"warning: built with random weights; pass --checkpoint for real {'roots' if rootnet else 'poses'}",
              file=sys.stderr)
    for path in paths:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnpose_trt.build",
                                     description="Export and compile a ConvNeXtPose (or RootNet: --model rootnet) "
                                                 "engine, or reuse the cached one.")
    add_build_arguments(parser)
    return run(run_build, parser.parse_args(argv))

"""`cnpose-trt`: build, inspect, predict, demo, bench, eval, batch.

The command table (COMMANDS: each command's help, description, the function adding its options and the
function running it), the parser built from it, and main, which runs the chosen command inside the one
error boundary (cli.errors). A command's module is imported only when that command runs (or its
options are added), so a command imports nothing another one needs.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._version import __version__
from ..spec import VARIANTS
from .common import join_signed_values
from .errors import run


def _build_args(p: argparse.ArgumentParser) -> None:
    from .build import add_build_arguments

    add_build_arguments(p)


def _build(args: argparse.Namespace) -> int:
    from .build import run_build

    return run_build(args)


def _inspect_args(p: argparse.ArgumentParser) -> None:
    from .inspect import add_inspect_arguments

    add_inspect_arguments(p)


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import run_inspect

    return run_inspect(args)


def _predict_args(p: argparse.ArgumentParser) -> None:
    from .predict import add_predict_arguments

    add_predict_arguments(p)


def _predict(args: argparse.Namespace) -> int:
    from .predict import run_predict

    return run_predict(args)


def _bench_args(bn: argparse.ArgumentParser) -> None:
    from ..backends import NAMES, add_session_arguments  # lazy: the registry only where bench adds its options
    from ..config import PRECISIONS

    bn.add_argument("--variant", type=str.upper, nargs="+", choices=list(VARIANTS), default=["XS"],
                    help="variants to measure (default XS)")
    bn.add_argument("--backend", nargs="+", choices=list(NAMES), default=["onnxruntime"],
                    help="backends to measure (default onnxruntime)")
    bn.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=["fp32"],
                    help="precisions to measure (default fp32; bf16: the openvino backend; a backend that does "
                         "not build one is reported as skipped)")
    bn.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes, people per call "
                    "(default 1 8)")
    bn.add_argument("--iterations", type=int, default=10, help="timed runs per measurement (default 10)")
    bn.add_argument("--warmup", type=int, default=2, help="untimed runs before them (default 2)")
    bn.add_argument("--budget", type=float, metavar="SECONDS", help="skip the configurations that would run past "
                    "this many seconds (estimated, rescaled as configurations finish); default: no limit")
    bn.add_argument("--all", action="store_true", help="also measure configurations that are pointless on this "
                    "machine (the torch backend on the CPU for M and L: well under 1 img/s)")
    bn.add_argument("--checkpoint", type=Path, help="weights (default random: speed does not depend on them)")
    bn.add_argument("--calib-images", type=Path, help="int8 calibration images (default: generated scenes)")
    bn.add_argument("--engines", type=Path, default=None, help="engine cache folder (default ./engines)")
    bn.add_argument("--cuda-graphs", action="store_true", help="torch backend on CUDA: replay CUDA graphs")
    add_session_arguments(bn)
    bn.add_argument("--plot", type=Path, help="PNG of end-to-end throughput against batch size")
    bn.add_argument("--json", type=Path, help="write the measurements as JSON")


def _bench(args: argparse.Namespace) -> int:
    from .bench import check_args
    from .bench import main as bench_main

    check_args(args.variant, args.batch, args.iterations, args.warmup)
    return bench_main(args)


def _demo_args(p: argparse.ArgumentParser) -> None:
    from .demo import add_demo_arguments

    add_demo_arguments(p)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _eval_args(p: argparse.ArgumentParser) -> None:
    from .eval import add_eval_arguments

    add_eval_arguments(p)


def _eval(args: argparse.Namespace) -> int:
    from .eval import run_eval

    return run_eval(args)


def _batch_args(p: argparse.ArgumentParser) -> None:
    from .batch import add_batch_arguments

    add_batch_arguments(p)


def _batch(args: argparse.Namespace) -> int:
    from .batch import run_batch

    return run_batch(args)


# Each command: its one-line help, its description (or None), the function adding its options and the
# function running it. A command's options are added (and their modules imported) only for the command
# being run.
COMMANDS: dict[str, tuple[str, str | None, Any, Any]] = {
    "build": ("export and compile an engine (same as python -m cnpose_trt.build)", None, _build_args, _build),
    "inspect": ("describe a checkpoint (the configuration its tensors describe) or an engine (variant, "
                "precision, backend, I/O, cache key)", None, _inspect_args, _inspect),
    "predict": ("3D poses of the people in an image", "3D poses of the people in an image. OpenCV applies a "
                "JPEG's EXIF orientation when it reads the file, so boxes refer to the rotated image (as a viewer "
                "shows it), not to the stored pixel rows. A box wholly outside the image is an error.", _predict_args,
                _predict),
    "bench": ("throughput/latency table (engine only and end to end) and a plot", None, _bench_args, _bench),
    "demo": ("generate an image, build the default engine, predict and draw", None, _demo_args, _demo),
    "eval": ("MPJPE / PA-MPJPE of engines side by side on synthetic people or Human3.6M", None, _eval_args, _eval),
    "batch": ("3D poses for every person of a manifest of images, to Parquet; resumable; locally or on a Ray "
              "cluster (--ray)", None, _batch_args, _batch),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; with `only`, the other commands get their help line but not their options (a
    command imports no module another command needs)."""
    parser = argparse.ArgumentParser(prog="cnpose-trt", description="Fast ConvNeXtPose inference.")
    parser.add_argument("--version", action="version", version=f"cnpose-trt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, description, add, _) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=description)
        if only is None or only == name:
            add(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The `cnpose-trt` command. Errors are one line on stderr: status 2 for bad input or a failed
    step, 130 on Ctrl-C, 143 on SIGTERM; never a traceback (cli.errors, the one boundary)."""
    return run(_main, sys.argv[1:] if argv is None else list(argv))


def _main(argv: list[str]) -> int:
    import logging

    command = next((a for a in argv if not a.startswith("-")), None)  # global options take no values
    args = build_parser(command if command in COMMANDS else None).parse_args(join_signed_values(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    warnings.filterwarnings("ignore", message="no checkpoint given")  # the CLI says it once itself
    return COMMANDS[args.command][3](args)


if __name__ == "__main__":
    sys.exit(main())

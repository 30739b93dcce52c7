"""What several commands share: the option parsers and argv fix-up for numbers (boxes, camera values
that may start with '-'), the engine options and the engine they open (runtime.open_engine), the flip
test rule's notice, and the checks and writes of output files. Light at import: the heavy modules
(numpy, the runtime) are imported by the functions that use them, so `cnpose-trt --help` stays fast.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..progress import say
from ..shipped import flip_for
from ..spec import VARIANTS


def floats(n: int, what: str):
    """An argparse type: `n` comma-separated finite numbers, named `what` when refused."""
    def parse(text: str) -> tuple[float, ...]:
        try:
            vals = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers, got {text!r}") from None
        if len(vals) != n:
            raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers, got {text!r}")
        if not all(math.isfinite(v) for v in vals):
            raise argparse.ArgumentTypeError(f"{what} must be finite numbers, got {text!r}")
        return vals
    return parse


# Options whose value may start with '-': argparse reads `--bbox -50,-50,200,300` as two options.
_SIGNED_VALUE_OPTIONS = ("--bbox", "--crop-box", "--focal", "--principal", "--root-depth")
_SIGNED_NUMBERS = re.compile(r"-\.?\d[\d.eE+\-]*(,[+\-]?\.?\d[\d.eE+\-]*)*")


def join_signed_values(argv: Sequence[str]) -> list[str]:
    """`--bbox -50,-50,200,300` -> `--bbox=-50,-50,200,300`, which argparse reads as intended."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--":
            return out + list(argv[i:])
        if argv[i] in _SIGNED_VALUE_OPTIONS and i + 1 < len(argv) and _SIGNED_NUMBERS.fullmatch(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def write_text(path: Path, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:  # name the file even where the OS does not (a failed write: disk full, ...)
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def emit_document(output: Path | None, doc: dict[str, Any], what: str) -> None:
    """A command's JSON document (predict's): to the --output file (saying what it holds), else to stdout."""
    from ..cache import finite_json

    text = finite_json(doc)
    if output:
        write_text(output, text + "\n")
        print(f"wrote {output} ({what})", file=sys.stderr)
    else:
        print(text)


def check_output_file(option: str, path: Path | None) -> None:
    """Refuse, before any work, an output path that cannot be written."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        problem = "is a file, not a folder" if path.parent.exists() else "does not exist"
        raise ValueError(f"{option} {path}: {path.parent} {problem}")


def flip_test(engine: Any, requested: bool) -> bool:
    """The flip test a command runs on this engine (shipped.flip_for), saying so when it differs."""
    flip, notice = flip_for(getattr(engine, "meta", None), requested)
    if notice:
        print(notice, file=sys.stderr)
    return flip


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """--engine FILE, or --variant (with --checkpoint, --engines) to build or reuse one: predict and demo."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--engine", type=Path, help="a built engine (file or .json sidecar)")
    g.add_argument("--variant", type=str.upper, choices=list(VARIANTS), default=None,
                   help="build (or reuse) the onnxruntime engine of this variant (default XS)")
    p.add_argument("--checkpoint", type=Path, help="weights for --variant (default: random)")
    p.add_argument("--engines", type=Path, default=None, help="engine cache folder (default ./engines)")


def default_variant(args: argparse.Namespace) -> None:
    """--variant's default (XS) where neither --engine nor --checkpoint says which engine."""
    if args.variant is None and args.engine is None and args.checkpoint is None:
        args.variant = "XS"


def engine_for(args: argparse.Namespace) -> Any:
    """The engine of add_engine_arguments' options (built or reused when not given as a file), through
    runtime.open_engine; a warning on stderr when its weights are random."""
    from ..backends import session_options
    from ..config import BuildConfig, EngineRequest
    from ..runtime.open import open_engine

    options = session_options(getattr(args, "threads", None), getattr(args, "spinning", None))
    if args.engine is not None:
        return open_engine(EngineRequest(engine=args.engine, load=options))
    engine = open_engine(EngineRequest(build=BuildConfig(args.variant, args.checkpoint, out_dir=args.engines),
                                       load=options), progress=say)
    if engine.meta["weights"]["random"]:
        print("warning: the engine uses random weights: the poses are meaningless; "
              "pass --checkpoint for real ones", file=sys.stderr)
    return engine


ROOTNET_HELP = ("root depths from RootNet: a RootNet engine (file or .json) or an official RootNet snapshot "
                "(.pth.tar; its engine is built with the pose engine's backend and precision, or reused from "
                "the cache), or 'prior' (depth from the box size alone, gamma = 1: a rough guess, marked "
                "root_source 'prior'); needs the camera (--focal and --principal)")
CAMERA_HINT = "upstream's demo assumes --focal 1500,1500 and --principal at the image centre"


def root_depth_value(text: str) -> float | str:
    """An argparse type: --root-depth MM (a finite number; the pipeline refuses depths <= 0 naming
    root_depth) or 'prior'."""
    if text.strip().lower() == "prior":
        return "prior"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--root-depth must be a depth in mm (> 0) or 'prior', got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"--root-depth must be a depth in mm (> 0) or 'prior', got {text!r}")
    return value


def add_rootnet_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rootnet", metavar="ENGINE_OR_CHECKPOINT", default=None, help=ROOTNET_HELP)


def rootnet_value(value: Any) -> str | Path | None:
    """--rootnet checked before anything is loaded (predict, eval): None, 'prior', or an existing file (a
    RootNet engine, its .json sidecar, a RootNet snapshot)."""
    from ..cache import sidecar_path

    if value is None or value == "prior":
        return value
    path = Path(value)
    if not str(value).strip() or not (path.is_file() or sidecar_path(path).is_file()):
        what = f"--rootnet {value}: no such file" if str(value).strip() else "--rootnet is empty"
        raise ValueError(f"{what}; --rootnet must be a RootNet engine file, its .json sidecar, a RootNet checkpoint "
                         "(.pth.tar) or 'prior'")
    return path


def check_root_options(args: argparse.Namespace) -> None:
    """--rootnet and --root-depth, checked before any engine is opened: `--root-depth prior` is
    `--rootnet prior`; a depth by hand and RootNet exclude each other; estimated depths need the camera."""
    depth = getattr(args, "root_depth", None)
    if depth == "prior":
        if args.rootnet not in (None, "prior"):
            raise ValueError("give one of --rootnet ENGINE_OR_CHECKPOINT and --root-depth prior")
        args.rootnet, args.root_depth = "prior", None
    elif depth is not None and args.rootnet is not None:
        raise ValueError(f"give one of --root-depth {depth:g} (a depth by hand) and --rootnet (depths estimated)")
    if rootnet_value(args.rootnet) is None:
        return
    if getattr(args, "focal", None) is None:
        raise ValueError(f"--rootnet needs the camera: --focal FX,FY and --principal CX,CY ({CAMERA_HINT}); "
                         "RootNet's depth scales with the focal length")


def rootnet_for(args: argparse.Namespace, engine: Any) -> Any:
    """The RootStep of --rootnet (None without it): a RootNet engine opened, or built from a snapshot with
    the pose engine's backend and precision into the same engine folder, or the prior."""
    if getattr(args, "rootnet", None) is None:
        return None
    from ..backends import session_options
    from ..pipeline.roots import open_rootnet

    options = session_options(getattr(args, "threads", None), getattr(args, "spinning", None))
    step = open_rootnet(args.rootnet, backend=engine.meta["backend"], precision=engine.precision,
                        engine_dir=getattr(args, "engines", None), load=options)
    if step.engine is not None and step.engine.meta["weights"]["random"]:
        print("warning: the RootNet engine uses random weights: its root depths are meaningless", file=sys.stderr)
    return step


def root_fields(step: Any) -> dict[str, Any]:
    """What a command's JSON document says of its root depths."""
    if step is None:
        return {}
    return {"root_depth": step.source, "rootnet": None if step.engine is None else str(step.engine.path)}

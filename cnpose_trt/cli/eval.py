"""`cnpose-trt eval` (also `python -m cnpose_trt.evaluate`): its options, the run from parsed options
(engines from --engine files and --variant, the set from --h36m or the synthetic options, the report
from eval.evaluate) and the report printed as terminal tables, written as JSON and as a chart.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..backends import add_session_arguments, session_options
from ..config import BuildConfig, EngineRequest
from ..errors import EngineError
from ..eval.datasets import DEFAULT_SYNTHETIC_SEED, H36M_TEST_SAMPLING, EvalSet, _jsonable, h36m_set, synthetic_set
from ..eval.evaluate import evaluate
from ..io.draw import check_image_suffix, eval_chart, save_image
from ..pipeline.roots import PRIOR, open_rootnet
from ..progress import say
from ..runtime.engine import load_engine
from ..runtime.open import open_engine
from ..shipped import flip_for
from ..spec import VARIANTS
from .common import rootnet_value
from .errors import run as run_reported

# The first line of the old module's docstring: `python -m cnpose_trt.evaluate --help` says it.
DESCRIPTION = "Accuracy: MPJPE and PA-MPJPE (upstream's Human3.6M protocols), per joint, and 2D pixel error."


def _fmt(v: Any, width: int = 9) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return f"{'-':>{width}}"
    return f"{v:>{width}.2f}"


def _flip_words(report: dict[str, Any]) -> str:
    flips = {e.get("flip_test", report["flip_test"]) for e in report["engines"]} or {report["flip_test"]}
    if len(flips) == 1:
        return "on" if flips.pop() else "off"
    return "on for " + ", ".join(e["label"] for e in report["engines"] if e["flip_test"]) + ", off for the others"


def format_report(report: dict[str, Any]) -> str:
    """The report as terminal tables: summary, per joint (MPJPE), per group (H3.6M actions)."""
    lines = [f"{report['dataset']['name']}: {report['dataset']['people']} people, "
             f"flip test {_flip_words(report)}; mm unless noted"]
    bad_truth = report["dataset"].get("skipped_ground_truth", 0)
    if bad_truth:
        named = [str(i) for i in report["dataset"].get("skipped_ground_truth_images", [])]
        lines.append(f"left out: {bad_truth} frame{'s' if bad_truth > 1 else ''} whose ground truth is unusable "
                     f"(not finite, or a joint at Z <= 0): image {', '.join(named)}"
                     f"{', ...' if bad_truth > len(named) else ''}")
    outside = report["dataset"].get("outside_boxes", 0)
    if outside:
        lines.append(f"left out: {outside} ground-truth box{'es' if outside > 1 else ''} wholly outside the image "
                     "(upstream's process_bbox would shift such a box into the image and score it)")
    width = max([len(e["label"]) for e in report["engines"]] + [24])
    head = f"{'engine':<{width}} {'MPJPE':>9} {'PA-MPJPE':>9} {'PA(scale)':>9} {'2D px':>9} {'people':>7} " \
           f"{'failed':>6} {'img/s':>7}"
    lines += [head, "-" * len(head)]
    for e in report["engines"]:
        m = e["metrics"]
        lines.append(f"{e['label']:<{width}} {_fmt(m['mpjpe'])} {_fmt(m['pa_mpjpe'])} {_fmt(m['pa_mpjpe_scaled'])} "
                     f"{_fmt(m.get('px_2d'))} {m['people']:>7} {m['nonfinite']:>6} {e['images_per_second']:>7.1f}")
    failed = report["dataset"].get("failed_boxes")
    if failed:
        examples = report["dataset"].get("failed_box_examples") or ["?"]
        lines.append(f"{failed} {'person' if failed == 1 else 'people'} not estimated (counted in 'failed', not in "
                     f"the means): the RootNet box is unusable, e.g. {examples[0]}")
    if "baseline" in report:
        b = report["baseline"]
        lines.append(f"{'mean pose (no network)':<{width}} {_fmt(b['mpjpe'])} {_fmt(b['pa_mpjpe'])} "
                     f"{_fmt(b['pa_mpjpe_scaled'])} {_fmt(None)} {b['people']:>7}")
    if "roots" in report:
        lines += _root_table(report, width)
    labels = [e["label"] for e in report["engines"]]
    col = max(10, *(len(lb) for lb in labels)) if labels else 10
    lines += ["", "MPJPE per joint (mm)", f"{'joint':<12} " + " ".join(f"{lb:>{col}}" for lb in labels)]
    for name in report["protocol"]["joints"]:
        lines.append(f"{name:<12} " + " ".join(_fmt(e["metrics"]["per_joint"]["mpjpe"][name], col)
                                               for e in report["engines"]))
    groups = report["engines"][0]["metrics"].get("per_group") if report["engines"] else None
    if groups:
        lines += ["", "MPJPE / PA-MPJPE per action (mm)",
                  f"{'action':<14} " + " ".join(f"{lb:>{col + 8}}" for lb in labels)]
        for g in groups:
            cells = []
            for e in report["engines"]:
                v = e["metrics"]["per_group"].get(g, {})
                cells.append(f"{_fmt(v.get('mpjpe'), 8)} /{_fmt(v.get('pa_mpjpe'), 7)}".rjust(col + 8))
            lines.append(f"{g:<14} " + " ".join(cells))
    return "\n".join(lines)


def _root_table(report: dict[str, Any], width: int) -> list[str]:
    """With estimated root depths: their source, and per engine the root figures (camera space)."""
    lines = ["", f"root depths: {report['roots']['what']}, not the ground truth",
             "(MPJPE and PA-MPJPE above are root-relative; these are in camera space)",
             f"{'engine':<{width}} {'MRPE':>9} {'root |dZ|':>9} {'|dZ| %':>9} {'abs MPJPE':>9} {'people':>7}"]
    lines.append("-" * len(lines[-1]))
    for e in report["engines"]:
        m = e["metrics"]
        rel = m["root_dz_rel"] * 100 if math.isfinite(m["root_dz_rel"]) else None
        lines.append(f"{e['label']:<{width}} {_fmt(m['mrpe'])} {_fmt(m['root_dz'])} {_fmt(rel)} "
                     f"{_fmt(m['mpjpe_abs'])} {m['root_people']:>7}")
    return lines


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cnpose-trt eval` / `python -m cnpose_trt.evaluate`."""
    e = p.add_argument_group("engines (one or several, evaluated side by side)")
    e.add_argument("--engine", type=Path, action="append", default=[], metavar="FILE",
                   help="a built engine (file or .json sidecar); repeat for several (e.g. fp32, fp16, int8)")
    e.add_argument("--label", action="append", default=None, help="a name per --engine (default: variant precision)")
    e.add_argument("--variant", type=str.upper, choices=list(VARIANTS), default=None,
                   help="also evaluate the fp32 onnxruntime engine of this variant (built or reused)")
    e.add_argument("--checkpoint", type=Path, help="weights for --variant (default: random, meaningless)")
    e.add_argument("--engines", type=Path, default=None, help="engine cache folder for --variant (default ./engines)")
    add_session_arguments(e)
    d = p.add_argument_group("data (default: synthetic people)")
    d.add_argument("--seed", type=int, default=DEFAULT_SYNTHETIC_SEED,
                   help=f"synthetic set seed (default {DEFAULT_SYNTHETIC_SEED}; training uses 0)")
    d.add_argument("--count", type=int, default=500, help="synthetic images (default 500)")
    d.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("W", "H"),
                   help="synthetic image size (default 256 256)")
    d.add_argument("--people", type=int, default=1, help="people per synthetic image (default 1)")
    d.add_argument("--occluders", type=float, default=0.0,
                   help="chance of an occluder per synthetic person (default 0)")
    d.add_argument("--h36m", type=Path, metavar="DIR",
                   help="Human3.6M in upstream's layout (DIR/annotations/*.json, DIR/images/) instead of synthetic")
    d.add_argument("--protocol", type=int, choices=(1, 2), default=2,
                   help="Human3.6M protocol: 1 = subject 11, 2 = subjects 9 and 11 (default 2)")
    d.add_argument("--subjects", type=lambda s: [int(x) for x in s.split(",")], default=None, metavar="S1,S2",
                   help="Human3.6M subjects (overrides --protocol's)")
    d.add_argument("--sampling", type=int, default=H36M_TEST_SAMPLING,
                   help=f"Human3.6M: every n-th frame (default {H36M_TEST_SAMPLING}, upstream's test)")
    d.add_argument("--bbox-root", type=Path, metavar="FILE",
                   help="RootNet's bbox_root_human36m_output.json: its boxes and root depths instead of ground truth")
    d.add_argument("--limit", type=int, default=None, help="Human3.6M: only the first N people")
    d.add_argument("--rootnet", metavar="ENGINE_OR_CHECKPOINT", default=None,
                   help="root depths from a RootNet engine (file or .json sidecar) or checkpoint (.pth.tar, built "
                        "into an fp32 onnxruntime engine in --engines), or 'prior' (depth = k, gamma = 1), instead "
                        "of the ground truth; adds MRPE, root |dZ| and absolute MPJPE to the report")
    o = p.add_argument_group("output")
    o.add_argument("--no-flip", dest="flip", action="store_false", help="no flip test (default: on, as upstream)")
    o.add_argument("--json", type=Path, help="write the report as JSON")
    o.add_argument("--predictions", action="store_true", help="include every person's predicted joints in the JSON")
    o.add_argument("--plot", type=Path, metavar="PNG", help="picture of the per-joint MPJPE, engines side by side")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")


def run_eval(args: argparse.Namespace) -> int:
    """Run `cnpose-trt eval` from parsed add_eval_arguments options; prints the tables, returns 0."""
    if args.plot is not None:
        check_image_suffix(args.plot, "--plot")
    rootnet = _rootnet_argument(args)
    engines, labels = _engines(args)
    dataset = _dataset(args)
    for e in engines:
        notice = flip_for(getattr(e, "meta", None), args.flip)[1]
        if notice:
            print(f"{e.path}: {notice}", file=sys.stderr)
    report = evaluate(engines, dataset, flip=args.flip, labels=labels, progress=args.progress,
                      keep_predictions=args.predictions, rootnet=_open_rootnet(args, rootnet))
    print(format_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_jsonable(report), indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot is not None:
        save_image(args.plot, eval_chart(report))
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _engines(args: argparse.Namespace) -> tuple[list[Any], list[str] | None]:
    """The --engine files loaded and the --variant engine built or reused, with their --label names."""
    options = session_options(args.threads, args.spinning)
    engines = [load_engine(path, **options) for path in args.engine]
    labels = list(args.label) if args.label else None
    if labels is not None and len(labels) != len(args.engine):
        raise ValueError(f"--label must be given once per --engine ({len(args.engine)}), got {len(labels)}")
    if args.variant is not None:
        config = BuildConfig(args.variant, args.checkpoint, backend="onnxruntime", out_dir=args.engines)
        engines.append(open_engine(EngineRequest(build=config, load=options), progress=say))
        if labels is not None:
            labels.append(f"{args.variant} fp32 (built)")
    elif args.checkpoint is not None:
        raise ValueError("--checkpoint goes with --variant (engines given with --engine carry their weights)")
    if not engines:
        raise ValueError("give at least one --engine FILE (or --variant to build one)")
    for e in engines:
        if (getattr(e, "meta", {}) or {}).get("weights", {}).get("random"):
            print(f"warning: {e.path} has random weights: its accuracy is meaningless", file=sys.stderr)
    return engines, labels


def _rootnet_argument(args: argparse.Namespace) -> str | Path | None:
    """--rootnet checked before anything is loaded: None, 'prior' or an existing file (common.rootnet_value)."""
    if args.rootnet is not None and args.bbox_root is not None:
        raise ValueError("--rootnet and --bbox-root both give root depths: choose one")
    return rootnet_value(args.rootnet)


def _open_rootnet(args: argparse.Namespace, rootnet: str | Path | None) -> Any:
    """None, 'prior', or the --rootnet engine: an engine file loaded with the session options, a checkpoint
    built into an fp32 onnxruntime engine in --engines (as --variant is) or reused from there."""
    if rootnet is None or rootnet == PRIOR:
        return rootnet
    try:
        step = open_rootnet(rootnet, backend="onnxruntime", engine_dir=args.engines,
                            load=session_options(args.threads, args.spinning))
    except EngineError as exc:  # a pose engine, a foreign file: say which option named it
        raise EngineError(f"--rootnet: {exc}") from None
    return None if step is None else step.engine


def _dataset(args: argparse.Namespace) -> EvalSet:
    """Human3.6M with --h36m, else the synthetic set of --seed, --count, --size, --people, --occluders."""
    if args.h36m is not None:
        dataset = h36m_set(args.h36m, protocol=args.protocol, subjects=args.subjects, sampling=args.sampling,
                           bbox_root=args.bbox_root, limit=args.limit)
    else:
        if args.bbox_root is not None or args.limit is not None or args.subjects is not None:
            raise ValueError("--bbox-root, --limit and --subjects apply to --h36m only")
        if args.count < 1:
            raise ValueError(f"--count must be >= 1, got {args.count}")
        dataset = synthetic_set(args.seed, args.count, width=args.size[0], height=args.size[1], people=args.people,
                                occluder_prob=args.occluders)
    if not dataset.images:
        raise ValueError(f"{dataset.name}: no people to evaluate (check the subjects, sampling and files)")
    return dataset


def main(argv: Iterable[str] | None = None) -> int:
    """`python -m cnpose_trt.evaluate ...` (the same as `cnpose-trt eval ...`), inside the cli's error boundary."""
    parser = argparse.ArgumentParser(prog="python -m cnpose_trt.evaluate", description=DESCRIPTION)
    add_eval_arguments(parser)
    args = parser.parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    return run_reported(run_eval, args)

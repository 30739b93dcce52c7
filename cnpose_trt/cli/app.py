"""`cnpose-trt`: build, inspect, predict, demo, bench, eval, batch."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..cache import finite_json
from ..errors import CnposeError
from ..progress import say


def _floats(n: int, what: str):
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


def _join_signed_values(argv: Sequence[str]) -> list[str]:
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


def _write_text(path: Path, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:  # name the file even where the OS does not (a failed write: disk full, ...)
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def _check_output_file(option: str, path: Path | None) -> None:
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
    from ..shipped import flip_for

    flip, notice = flip_for(getattr(engine, "meta", None), requested)
    if notice:
        print(notice, file=sys.stderr)
    return flip


def _engine_for(args: argparse.Namespace) -> Any:
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


def _emit(output: Path | None, doc: dict[str, Any], what: str) -> None:
    """predict's JSON document: to the --output file (saying what it holds), else to stdout."""
    text = finite_json(doc)
    if output:
        _write_text(output, text + "\n")
        print(f"wrote {output} ({what})", file=sys.stderr)
    else:
        print(text)


def _draw(path: Path, image: Any, result: Any) -> None:
    """The overlay with the 3D view beside it, for one image's PoseResult."""
    from ..io.draw import draw_poses_3d, pose_3d, save_image

    joints_mm, title = pose_3d(result.image, result.crop_boxes, result.camera)
    save_image(path, draw_poses_3d(image, result.image, result.boxes, joints_mm, title))


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io.draw import check_image_suffix
    from ..io.imageio_guard import check_image_file
    from ..io.preprocess import load_image
    from ..pipeline.estimator import estimate

    if (args.focal is None) != (args.principal is None):
        raise ValueError("--focal and --principal go together (camera intrinsics fx,fy and cx,cy)")
    if Path(args.image).is_dir():
        return _predict_folder(args)
    if getattr(args, "boxes", None) is not None:
        raise ValueError("--boxes goes with a folder of images; for one image give --bbox or --crop-box")
    _check_output_file("--output", args.output)
    _check_output_file("--draw", args.draw)
    if args.draw:
        check_image_suffix(args.draw, "--draw")
    check_image_file(args.image)
    image = load_image(args.image)
    engine = _engine_for(args)
    flip = flip_test(engine, args.flip)
    intr = None if args.focal is None else (*args.focal, *args.principal)
    crop_boxes = getattr(args, "crop_box", None)
    if (args.bbox is None) == (crop_boxes is None):
        raise ValueError("give person boxes with --bbox X,Y,W,H (upstream's box rule is applied) or already "
                         "processed crop boxes with --crop-box X,Y,W,H (used as they are), not both")
    try:
        result = estimate(engine, image, None if args.bbox is None else np.asarray(args.bbox),
                          crop_boxes=None if crop_boxes is None else np.asarray(crop_boxes),
                          root_depth=args.root_depth, intrinsics=intr, flip=flip)
    except ValueError as exc:  # name the option a bad box came from: boxes[1] is the second --bbox
        import re

        raise ValueError(re.sub(r"^(crop_)?boxes\[(\d+)\]",
                                lambda m: f"{'--crop-box' if m[1] else '--bbox'} #{int(m[2]) + 1}", str(exc))) from None
    doc = {"image": str(args.image), "width": image.shape[1], "height": image.shape[0],
           "engine": str(engine.path), "variant": engine.spec.name, "precision": engine.precision,
           "weights": engine.meta["weights"]["source"], "flip_test": flip,
           "people": result.to_dict()}
    _emit(args.output, doc, f"{len(result)} people")
    if args.draw:
        _draw(args.draw, image, result)
        print(f"wrote {args.draw}", file=sys.stderr)
    return 0


FOLDER_HINT = ("predict FOLDER needs the people's boxes: --boxes FILE (JSON {file name: [x, y, w, h] or "
               "[[x, y, w, h], ...]}) or --bbox/--crop-box for every image; for manifests with per-image depths and "
               "intrinsics, resumable Parquet output or Ray, use `cnpose-trt batch`")


def _folder_boxes(folder: Path, boxes_file: Path | None) -> tuple[list[Path], dict[str, Any]]:
    """The folder's images (sorted) and the boxes file's entries, checked against each other."""
    from ..io.draw import IMAGE_SUFFIXES

    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if boxes_file is None:
        return images, {}
    try:
        table = json.loads(Path(boxes_file).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--boxes {boxes_file}: cannot be read as JSON ({exc})") from None
    if not isinstance(table, dict):
        raise ValueError(f"--boxes {boxes_file}: must be a JSON object {{file name: boxes}}, got "
                         f"{type(table).__name__}")
    unknown = sorted(set(table) - {p.name for p in images})
    if unknown:
        raise ValueError(f"--boxes {boxes_file} names {len(unknown)} file(s) that are not images of {folder}: "
                         f"{', '.join(unknown[:5])}")
    import numpy as np

    for name, value in table.items():  # each entry checked before any work, by file name
        try:
            boxes = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            boxes = None
        if boxes is None or not (boxes.shape == (4,) or (boxes.ndim == 2 and boxes.shape[1] == 4) or boxes.size == 0) \
                or not np.isfinite(boxes).all():
            raise ValueError(f"--boxes {boxes_file}, entry {name!r}: must be a box [x, y, w, h] or a list of them "
                             f"(finite numbers), got {str(value)[:80]}")
    return images, table


def _predict_folder(args: argparse.Namespace) -> int:
    """predict FOLDER: every image of the folder, boxes from --boxes (per file) or --bbox/--crop-box (the
    same for every image); one JSON document, and with --draw a folder of pictures."""
    import collections

    import numpy as np

    from ..io.preprocess import load_image
    from ..pipeline.estimator import PoseEstimator

    folder = Path(args.image)
    crop_boxes = getattr(args, "crop_box", None)
    if args.boxes is None and args.bbox is None and crop_boxes is None:
        raise ValueError(FOLDER_HINT)
    if sum(x is not None for x in (args.boxes, args.bbox, crop_boxes)) > 1:
        raise ValueError("give one of --boxes FILE, --bbox or --crop-box")
    _check_output_file("--output", args.output)
    if args.draw is not None and args.draw.exists() and not args.draw.is_dir():
        raise ValueError(f"--draw {args.draw}: with a folder of images, --draw names a folder for the pictures")
    images, table = _folder_boxes(folder, args.boxes)
    engine = _engine_for(args)
    flip = flip_test(engine, args.flip)
    intr = None if args.focal is None else (*args.focal, *args.principal)
    if args.draw is not None:
        args.draw.mkdir(parents=True, exist_ok=True)

    def items() -> Any:
        for path in images:
            if args.boxes is not None:
                boxes = np.asarray(table.get(path.name, []), dtype=np.float64).reshape(-1, 4)
                yield {"image": load_image(path), "boxes": boxes, "root_depth": args.root_depth, "intrinsics": intr}
            else:
                yield {"image": load_image(path), ("boxes" if args.bbox is not None else "crop_boxes"):
                       np.asarray(args.bbox if args.bbox is not None else crop_boxes), "root_depth": args.root_depth,
                       "intrinsics": intr}

    docs, people = [], 0
    pending: collections.deque[tuple[Path, Any]] = collections.deque()  # images read ahead, not yet estimated

    def feed() -> Any:
        for path, item in zip(images, items(), strict=True):
            pending.append((path, item["image"]))
            yield item

    results = PoseEstimator(engine).predict_iter(feed(), flip=flip)
    while True:
        try:
            result = next(results)
        except StopIteration:
            break
        except ValueError as exc:  # a box this image cannot use: name the image (and the option its boxes came from)
            option = "--boxes" if args.boxes is not None else "--bbox" if args.bbox is not None else "--crop-box"
            raise ValueError(f"{pending[0][0].name} ({option}): {exc}") from None
        path, image = pending.popleft()
        docs.append({"image": path.name, "width": image.shape[1], "height": image.shape[0],
                     "people": result.to_dict()})
        people += len(result)
        if args.draw is not None and len(result):
            _draw(args.draw / f"{path.stem}_pose.png", image, result)
    doc = {"folder": str(folder), "engine": str(engine.path), "variant": engine.spec.name,
           "precision": engine.precision, "weights": engine.meta["weights"]["source"], "flip_test": flip,
           "images": docs}
    _emit(args.output, doc, f"{len(docs)} images, {people} people")
    if args.draw is not None:
        print(f"wrote the pictures to {args.draw}", file=sys.stderr)
    return 0


def _is_engine(path: Path) -> bool:
    """An engine handle, engine file or sidecar: the path is a .json, or has a sidecar beside it."""
    from ..cache import sidecar_path

    return path.suffix == ".json" or sidecar_path(path).is_file()


def _inspect_engine(path: Path) -> int:
    """What an engine is, from its sidecar (no torch, no engine load): variant, precision, backend, I/O,
    weights, cache key; and whether its file is there with the bytes the sidecar names."""
    from ..cache import file_sha256, sidecar_path
    from ..runtime.engine import read_sidecar

    meta = read_sidecar(path)
    side = sidecar_path(path)
    engine_file = side.parent / meta["engine_file"]
    if not engine_file.is_file():
        state = "missing: rebuild"
    elif file_sha256(engine_file) != meta["engine_sha256"]:
        state = "damaged (its sha256 differs from the sidecar's): rebuild with --force"
    else:
        state = "present, sha256 as recorded"

    def io(d: dict[str, Any]) -> str:
        return f"{d['name']} {d['dtype']} ({', '.join(map(str, d['shape']))})"

    weights = meta.get("weights", {})
    print(f"engine:          {side}")
    print(f"file:            {engine_file.name}: {state}")
    print(f"variant:         {meta['variant']} ({meta['head']})")
    print(f"precision:       {meta['precision']}, backend {meta['backend']}, max batch {meta['max_batch']}")
    print(f"input:           {io(meta['input'])}, {meta['input'].get('convention', '?')}")
    print(f"output:          {io(meta['output'])}")
    print(f"weights:         {weights.get('source', '?')}" + (" (random: poses are meaningless)"
                                                               if weights.get("random") else ""))
    print(f"cache key:       {meta['cache_key']}")
    version = meta.get("versions", {}).get("cnpose_trt", "?")
    print(f"built:           {meta.get('built_at', '?')} by cnpose_trt {version}"
          + (f", rel. L2 vs PyTorch {meta['parity_rel_l2_vs_torch']:.1e}" if "parity_rel_l2_vs_torch" in meta else ""))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import numpy as np

    if _is_engine(Path(args.file)):
        return _inspect_engine(Path(args.file))
    from ..nn.checkpoint import detect_spec, load_checkpoint
    from ..spec import match_variant

    state, stored = load_checkpoint(args.file)
    spec = detect_spec(state, head_upsample=stored.head_upsample if stored else None)
    learnable = sum(int(np.prod(v.shape)) for k, v in state.items()
                    if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    with_stats = sum(int(np.prod(v.shape)) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    match = match_variant(spec)
    print(f"file:            {args.file}")
    print(f"matches variant: {match or 'none (custom configuration)'}")
    print(f"backbone:        depths {spec.depths}, dims {spec.dims}")
    print(f"head:            {spec.head_channels} channels, upsample {spec.head_upsample} ({spec.head_tag})")
    shape = ", ".join(map(str, spec.heatmap_shape))
    print(f"depth_dim:       {spec.depth_dim}, joints {spec.joints}, heatmap (N, {shape})")
    print(f"parameters:      {learnable:,} learnable, {with_stats:,} with BatchNorm statistics")
    if stored is not None and not stored.same_architecture(spec):
        print(f"note: the file's own record says {stored}, which its tensors contradict")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from ..eval.metrics import mpjpe, pixel_errors
    from ..io.draw import save_image
    from ..io.synthetic import synthesize

    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out-dir {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    from ..shipped import SHIPPED_XS

    checkpoint = args.checkpoint
    if checkpoint is None and args.engine is None and args.variant in (None, "XS") and SHIPPED_XS.is_file():
        checkpoint = SHIPPED_XS
        print(f"weights: the XS model shipped with cnpose_trt ({SHIPPED_XS.name}), trained on synthetic people "
              "only: a demonstration, not an official checkpoint (pass --checkpoint for real weights)",
              file=sys.stderr)
    scene = synthesize(args.seed, width=640, height=480)
    image, box = scene.image, [float(v) for v in scene.boxes[0]]
    fx, fy, cx, cy = (float(v) for v in scene.intrinsics)
    img_path = save_image(out / "demo.png", image)
    print(f"generated a synthetic person {img_path} (seed {args.seed}) with box {[round(v, 1) for v in box]}, "
          f"root depth {scene.root_depth[0]:.0f} mm", file=sys.stderr)
    ns = argparse.Namespace(image=img_path, bbox=[box], crop_box=None, root_depth=float(scene.root_depth[0]),
                            focal=(fx, fy), principal=(cx, cy), engine=args.engine, variant=args.variant,
                            checkpoint=checkpoint, engines=args.engines, flip=True, output=out / "demo.json",
                            draw=out / "demo_pose.png")
    _predict(ns)
    people = json.loads(ns.output.read_text())["people"]
    cam = np.array([[people[0]["joints"][name]["camera_mm"] for name in people[0]["joints"]]])
    img = np.array([[[j["x_px"], j["y_px"]] for j in people[0]["joints"].values()]])
    print(f"against the scene's ground truth: MPJPE {mpjpe(cam, scene.joints_cam):.1f} mm (root-aligned), "
          f"2D error {float(np.mean(pixel_errors(img, scene.joints_img[..., :2]))):.1f} px", file=sys.stderr)
    print(f"demo done: {ns.output}, {ns.draw}")
    return 0


def _build_args(p: argparse.ArgumentParser) -> None:
    from .build import add_build_arguments

    add_build_arguments(p)


def _inspect_args(i: argparse.ArgumentParser) -> None:
    i.add_argument("file", type=Path, help="a checkpoint (.pth/.pth.tar/.pt), or an engine file or its .json sidecar")


def _engine_args(p: argparse.ArgumentParser) -> None:
    from ..spec import VARIANTS

    g = p.add_mutually_exclusive_group()
    g.add_argument("--engine", type=Path, help="a built engine (file or .json sidecar)")
    g.add_argument("--variant", type=str.upper, choices=list(VARIANTS), default=None,
                   help="build (or reuse) the onnxruntime engine of this variant (default XS)")
    p.add_argument("--checkpoint", type=Path, help="weights for --variant (default: random)")
    p.add_argument("--engines", type=Path, default=None, help="engine cache folder (default ./engines)")


def _predict_args(p: argparse.ArgumentParser) -> None:
    from ..backends import add_session_arguments

    p.add_argument("image", type=Path, help="an image file (PNG, JPEG, ...), or a folder of them (with --boxes "
                   "FILE, or --bbox/--crop-box for every image)")
    p.add_argument("--boxes", type=Path, metavar="FILE", help="with a folder: JSON {file name: [x, y, w, h] or "
                   "[[x, y, w, h], ...]}, person boxes per image (images it does not name have no people)")
    add_session_arguments(p)
    p.add_argument("--bbox", type=_floats(4, "--bbox"), action="append",
                   metavar="X,Y,W,H", help="person box in pixels; repeat for several people. Squared and "
                   "enlarged x1.25 by upstream's box rule")
    p.add_argument("--crop-box", type=_floats(4, "--crop-box"), action="append", metavar="X,Y,W,H",
                   help="instead of --bbox: a box that already went through upstream's rule (e.g. RootNet's "
                   "output), cropped as it is; repeat for several people")
    p.add_argument("--root-depth", type=float, default=None, metavar="MM",
                   help="camera depth of the pelvis in mm (else depths are root-relative)")
    p.add_argument("--focal", type=_floats(2, "--focal"), metavar="FX,FY",
                   help="camera focal lengths in pixels (with --principal and --root-depth: camera-space mm)")
    p.add_argument("--principal", type=_floats(2, "--principal"), metavar="CX,CY",
                   help="camera principal point in pixels (with --focal)")
    _engine_args(p)
    p.add_argument("--flip", action="store_true", help="flip test: average with the mirrored crop")
    p.add_argument("--output", type=Path, help="JSON file (default: stdout)")
    p.add_argument("--draw", type=Path, help="picture of the skeletons over the image, a 3D view beside it (PNG "
                   "or JPEG); with a folder of images, a folder for one picture per image")


def _bench_args(bn: argparse.ArgumentParser) -> None:
    from ..backends import add_session_arguments
    from ..spec import VARIANTS

    bn.add_argument("--variant", type=str.upper, nargs="+", choices=list(VARIANTS), default=["XS"],
                    help="variants to measure (default XS)")
    bn.add_argument("--backend", nargs="+", choices=["onnxruntime", "tensorrt", "torch"], default=["onnxruntime"],
                    help="backends to measure (default onnxruntime)")
    bn.add_argument("--precision", nargs="+", choices=["fp32", "fp16", "int8"], default=["fp32"],
                    help="precisions to measure (default fp32)")
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


def _demo_args(d: argparse.ArgumentParser) -> None:
    _engine_args(d)
    d.add_argument("--out-dir", default="demo_output", help="where demo.png/json and demo_pose.png go "
                   "(default demo_output)")
    d.add_argument("--seed", type=int, default=7, help="the synthetic person's seed (default 7)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    from .eval import add_eval_arguments

    add_eval_arguments(p)


def _batch_args(p: argparse.ArgumentParser) -> None:
    from ..batch.job import add_batch_arguments

    add_batch_arguments(p)


# Each command: its one-line help, its description (or None) and the function adding its options. A
# command's options are added (and their modules imported) only for the command being run.
COMMANDS: dict[str, tuple[str, str | None, Any]] = {
    "build": ("export and compile an engine (same as python -m cnpose_trt.build)", None, _build_args),
    "inspect": ("describe a checkpoint (the configuration its tensors describe) or an engine (variant, "
                "precision, backend, I/O, cache key)", None, _inspect_args),
    "predict": ("3D poses of the people in an image", "3D poses of the people in an image. OpenCV applies a "
                "JPEG's EXIF orientation when it reads the file, so boxes refer to the rotated image (as a viewer "
                "shows it), not to the stored pixel rows. A box wholly outside the image is an error.", _predict_args),
    "bench": ("throughput/latency table (engine only and end to end) and a plot", None, _bench_args),
    "demo": ("generate an image, build the default engine, predict and draw", None, _demo_args),
    "eval": ("MPJPE / PA-MPJPE of engines side by side on synthetic people or Human3.6M", None, _eval_args),
    "batch": ("3D poses for every person of a manifest of images, to Parquet; resumable; locally or on a Ray "
              "cluster (--ray)", None, _batch_args),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; with `only`, the other commands get their help line but not their options (a
    command imports no module another command needs)."""
    from .._version import __version__

    parser = argparse.ArgumentParser(prog="cnpose-trt", description="Fast ConvNeXtPose inference.")
    parser.add_argument("--version", action="version", version=f"cnpose-trt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, description, add) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=description)
        if only is None or only == name:
            add(p)
    return parser


def _os_error(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """The `cnpose-trt` command. Errors are one line on stderr: status 2 for bad input or a failed
    step, 130 on Ctrl-C, 143 on SIGTERM; never a traceback."""
    from ..interrupts import run_command

    return run_command(_main, sys.argv[1:] if argv is None else list(argv))


def _main(argv: list[str]) -> int:
    import logging

    command = next((a for a in argv if not a.startswith("-")), None)  # global options take no values
    args = build_parser(command if command in COMMANDS else None).parse_args(_join_signed_values(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if getattr(args, "variant", None) is None and args.command in ("predict", "demo") and \
            getattr(args, "engine", None) is None and getattr(args, "checkpoint", None) is None:
        args.variant = "XS"
    warnings.filterwarnings("ignore", message="no checkpoint given")  # the CLI says it once itself
    try:
        if args.command == "build":
            from .build import run_build

            return run_build(args)
        if args.command == "bench":
            from .bench import check_args
            from .bench import main as bench_main

            check_args(args.variant, args.batch, args.iterations, args.warmup)
            return bench_main(args)
        if args.command == "eval":
            from .eval import run_eval

            return run_eval(args)
        if args.command == "batch":
            from ..batch.job import run_batch

            return run_batch(args)
        return {"predict": _predict, "inspect": _inspect, "demo": _demo}[args.command](args)
    except (CnposeError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

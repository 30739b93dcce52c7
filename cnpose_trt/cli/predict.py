"""`cnpose-trt predict`: the 3D poses of the people in one image, in every image of a folder, or in every
frame of a video (predict_video.py).

One image takes its people's boxes from --bbox or --crop-box; a folder from --boxes FILE (per file) or
the same --bbox/--crop-box for every image. The options are checked and the output paths refused
before the engine is opened (common.engine_for); the result is one JSON document (stdout or --output)
and, with --draw, the skeletons drawn over the image (a folder of pictures for a folder).
Light at import (cli/__init__ imports this module for every command): numpy, io and the pipeline are
imported by the functions that use them.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path
from typing import Any

from .common import (
    add_engine_arguments,
    add_rootnet_argument,
    check_output_file,
    check_root_options,
    default_variant,
    emit_document,
    engine_for,
    flip_test,
    floats,
    root_depth_value,
    root_fields,
    rootnet_for,
)

FOLDER_HINT = ("predict FOLDER needs the people's boxes: --boxes FILE (JSON {file name: [x, y, w, h] or "
               "[[x, y, w, h], ...]}) or --bbox/--crop-box for every image; for manifests with per-image depths and "
               "intrinsics, resumable Parquet output or Ray, use `cnpose-trt batch`")


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    from ..backends import add_session_arguments

    p.add_argument("image", type=Path, help="an image file (PNG, JPEG, ...), a folder of them (with --boxes "
                   "FILE, or --bbox/--crop-box for every image), or a video file (.mp4, .avi, .mkv, ...; the same "
                   "options per frame)")
    p.add_argument("--boxes", type=Path, metavar="FILE", help="with a folder: JSON {file name: [x, y, w, h] or "
                   "[[x, y, w, h], ...]}, person boxes per image (images it does not name have no people); with a "
                   "video: {frame: boxes}, COCO-video detections (image_id or frame) or a list of detections")
    add_session_arguments(p)
    p.add_argument("--bbox", type=floats(4, "--bbox"), action="append",
                   metavar="X,Y,W,H", help="person box in pixels; repeat for several people. Squared and "
                   "enlarged x1.25 by upstream's box rule")
    p.add_argument("--crop-box", type=floats(4, "--crop-box"), action="append", metavar="X,Y,W,H",
                   help="instead of --bbox: a box that already went through upstream's rule (e.g. RootNet's "
                   "output), cropped as it is; repeat for several people")
    p.add_argument("--root-depth", type=root_depth_value, default=None, metavar="MM",
                   help="camera depth of the pelvis in mm (else depths are root-relative, unless --rootnet); "
                   "'prior' is --rootnet prior")
    add_rootnet_argument(p)
    p.add_argument("--focal", type=floats(2, "--focal"), metavar="FX,FY",
                   help="camera focal lengths in pixels (with --principal and --root-depth: camera-space mm)")
    p.add_argument("--principal", type=floats(2, "--principal"), metavar="CX,CY",
                   help="camera principal point in pixels (with --focal)")
    add_engine_arguments(p)
    p.add_argument("--flip", action="store_true", help="flip test: average with the mirrored crop")
    p.add_argument("--output", type=Path, help="JSON file (default: stdout)")
    p.add_argument("--draw", type=Path, help="picture of the skeletons over the image, a 3D view beside it (PNG "
                   "or JPEG); with a folder of images, a folder for one picture per image; with a video, the annotated "
                   "video (.mp4, .avi or .mkv)")


def run_predict(args: argparse.Namespace) -> int:
    """`cnpose-trt predict` from parsed options (also demo's last step): an image or a folder of them."""
    default_variant(args)
    if (args.focal is None) != (args.principal is None):
        raise ValueError("--focal and --principal go together (camera intrinsics fx,fy and cx,cy)")
    check_root_options(args)
    if Path(args.image).is_dir():
        return _predict_folder(args)
    from ..io.video import VIDEO_SUFFIXES

    if Path(args.image).suffix.lower() in VIDEO_SUFFIXES:
        from .predict_video import predict_video

        return predict_video(args)
    return _predict_image(args)


def _draw(path: Path, image: Any, result: Any) -> None:
    """The overlay with the 3D view beside it, for one image's PoseResult."""
    from ..io.draw import draw_poses_3d, pose_3d, save_image

    joints_mm, title = pose_3d(result.image, result.crop_boxes, result.camera)
    save_image(path, draw_poses_3d(image, result.image, result.boxes, joints_mm, title))


def _predict_image(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io.draw import check_image_suffix
    from ..io.imageio_guard import check_image_file
    from ..io.preprocess import load_image
    from ..pipeline.estimator import estimate

    if getattr(args, "boxes", None) is not None:
        raise ValueError("--boxes goes with a folder of images; for one image give --bbox or --crop-box")
    check_output_file("--output", args.output)
    check_output_file("--draw", args.draw)
    if args.draw:
        check_image_suffix(args.draw, "--draw")
    check_image_file(args.image)
    image = load_image(args.image)
    engine = engine_for(args)
    roots = rootnet_for(args, engine)
    flip = flip_test(engine, args.flip)
    intr = None if args.focal is None else (*args.focal, *args.principal)
    crop_boxes = getattr(args, "crop_box", None)
    if (args.bbox is None) == (crop_boxes is None):
        raise ValueError("give person boxes with --bbox X,Y,W,H (upstream's box rule is applied) or already "
                         "processed crop boxes with --crop-box X,Y,W,H (used as they are), not both")
    try:
        result = estimate(engine, image, None if args.bbox is None else np.asarray(args.bbox),
                          crop_boxes=None if crop_boxes is None else np.asarray(crop_boxes),
                          root_depth=args.root_depth, intrinsics=intr, flip=flip, rootnet=roots)
    except ValueError as exc:  # name the option a bad box came from: boxes[1] is the second --bbox
        raise ValueError(re.sub(r"^(crop_)?boxes\[(\d+)\]",
                                lambda m: f"{'--crop-box' if m[1] else '--bbox'} #{int(m[2]) + 1}", str(exc))) from None
    doc = {"image": str(args.image), "width": image.shape[1], "height": image.shape[0],
           "engine": str(engine.path), "variant": engine.spec.name, "precision": engine.precision,
           "weights": engine.meta["weights"]["source"], "flip_test": flip, **root_fields(roots),
           "people": result.to_dict()}
    emit_document(args.output, doc, f"{len(result)} people")
    if args.draw:
        _draw(args.draw, image, result)
        print(f"wrote {args.draw}", file=sys.stderr)
    return 0


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


def _folder_items(args: argparse.Namespace, images: list[Path], table: dict[str, Any]) -> Any:
    """PoseEstimator's items for the folder's images, read one by one: boxes from --boxes (per file), or
    the same --bbox/--crop-box for every image."""
    import numpy as np

    from ..io.preprocess import load_image

    crop_boxes = getattr(args, "crop_box", None)
    intr = None if args.focal is None else (*args.focal, *args.principal)
    for path in images:
        if args.boxes is not None:
            boxes = np.asarray(table.get(path.name, []), dtype=np.float64).reshape(-1, 4)
            yield {"image": load_image(path), "boxes": boxes, "root_depth": args.root_depth, "intrinsics": intr}
        else:
            yield {"image": load_image(path), ("boxes" if args.bbox is not None else "crop_boxes"):
                   np.asarray(args.bbox if args.bbox is not None else crop_boxes), "root_depth": args.root_depth,
                   "intrinsics": intr}


def _predict_folder(args: argparse.Namespace) -> int:
    """predict FOLDER: every image of the folder, boxes from --boxes (per file) or --bbox/--crop-box (the
    same for every image); one JSON document, and with --draw a folder of pictures."""
    from ..pipeline.estimator import PoseEstimator

    folder = Path(args.image)
    crop_boxes = getattr(args, "crop_box", None)
    if args.boxes is None and args.bbox is None and crop_boxes is None:
        raise ValueError(FOLDER_HINT)
    if sum(x is not None for x in (args.boxes, args.bbox, crop_boxes)) > 1:
        raise ValueError("give one of --boxes FILE, --bbox or --crop-box")
    check_output_file("--output", args.output)
    if args.draw is not None and args.draw.exists() and not args.draw.is_dir():
        raise ValueError(f"--draw {args.draw}: with a folder of images, --draw names a folder for the pictures")
    images, table = _folder_boxes(folder, args.boxes)
    engine = engine_for(args)
    roots = rootnet_for(args, engine)
    flip = flip_test(engine, args.flip)
    if args.draw is not None:
        args.draw.mkdir(parents=True, exist_ok=True)
    docs, people = [], 0
    pending: collections.deque[tuple[Path, Any]] = collections.deque()  # images read ahead, not yet estimated

    def feed() -> Any:
        for path, item in zip(images, _folder_items(args, images, table), strict=True):
            pending.append((path, item["image"]))
            yield item

    results = PoseEstimator(engine, rootnet=roots).predict_iter(feed(), flip=flip)
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
           **root_fields(roots), "images": docs}
    emit_document(args.output, doc, f"{len(docs)} images, {people} people")
    if args.draw is not None:
        print(f"wrote the pictures to {args.draw}", file=sys.stderr)
    return 0

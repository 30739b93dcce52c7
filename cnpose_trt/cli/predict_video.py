"""`cnpose-trt predict VIDEO`: the 3D poses of the people in every frame of a video file.

Boxes per frame come from --boxes FILE (batch/detections: {frame: boxes}, COCO-video, or a list of
detections), or the same --bbox/--crop-box for every frame. Frames are decoded in one sequential pass
(io/video) and streamed through PoseEstimator.predict_iter, so memory follows the estimator's window,
not the video's length. Without --draw only the frames that have boxes are decoded (the others are
grabbed past); with --draw every frame is, and frames without boxes are written as they are. The
result is one JSON document whose rows (one per frame with boxes) carry `video` and `frame`.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

from .common import check_output_file, emit_document, engine_for, flip_test, root_fields, rootnet_for

VIDEO_HINT = ("predict VIDEO needs the people's boxes: --boxes FILE (JSON {frame: [x, y, w, h] or [[x, y, w, h], "
              "...]}, COCO-video detections, or a list of detections with image_id or frame) or --bbox/--crop-box "
              "for every frame")


def _boxes(args: argparse.Namespace) -> tuple[dict[int, Any] | None, str]:
    """The boxes per frame of --boxes (None: --bbox/--crop-box for every frame) and the option they came from;
    every record checked before the engine is opened."""
    from ..batch.detections import read_frame_boxes

    crop_boxes = getattr(args, "crop_box", None)
    given = [x is not None for x in (args.boxes, args.bbox, crop_boxes)]
    if not any(given):
        raise ValueError(VIDEO_HINT)
    if sum(given) > 1:
        raise ValueError("give one of --boxes FILE, --bbox or --crop-box")
    if args.boxes is None:
        return None, "--bbox" if args.bbox is not None else "--crop-box"
    return read_frame_boxes(args.boxes, video=args.image), "--boxes"


def _check_outputs(args: argparse.Namespace) -> None:
    from ..io.video import WRITE_CODECS

    check_output_file("--output", args.output)
    check_output_file("--draw", args.draw)
    if args.draw is not None and Path(args.draw).suffix.lower() not in WRITE_CODECS:
        raise ValueError(f"--draw {args.draw}: with a video, --draw names a video file ending in "
                         f"{', '.join(WRITE_CODECS)}")


def _items(args: argparse.Namespace, table: dict[int, Any] | None, frames: list[int] | None,
           pending: collections.deque[tuple[int, Any]]) -> Any:
    """PoseEstimator's items, one per decoded frame (no boxes: an empty (0, 4)); each frame's index and image
    (None when not drawing) appended to `pending` as it is handed over."""
    import numpy as np

    from ..io.video import read_frames

    intr = None if args.focal is None else (*args.focal, *args.principal)
    if table is None:
        key = "boxes" if args.bbox is not None else "crop_boxes"
        fixed = np.asarray(args.bbox if args.bbox is not None else args.crop_box, np.float64)
    empty = np.zeros((0, 4))
    for frame, image in read_frames(args.image, frames):
        pending.append((frame, image if args.draw is not None else None))
        if table is None:
            yield {"image": image, key: fixed, "root_depth": args.root_depth, "intrinsics": intr}
        else:
            yield {"image": image, "boxes": table.get(frame, empty), "root_depth": args.root_depth, "intrinsics": intr}


def _run(args: argparse.Namespace, engine: Any, flip: bool, table: dict[int, Any] | None, option: str,
         info: Any, roots: Any = None) -> tuple[list[dict[str, Any]], int]:
    """Every frame through the estimator: the rows of the frames with people, and the frames read."""
    from ..io.draw import draw_poses
    from ..io.video import VideoWriter
    from ..pipeline.estimator import PoseEstimator
    from ..progress import Bar

    # Without --draw, frames without boxes are not decoded at all (grabbed past by read_frames).
    frames = sorted(f for f, b in table.items() if len(b)) if table is not None and args.draw is None else None
    total = len(frames) if frames is not None else info.frame_count
    pending: collections.deque[tuple[int, Any]] = collections.deque()  # frames handed to the estimator
    results = PoseEstimator(engine, rootnet=roots).predict_iter(_items(args, table, frames, pending), flip=flip)
    writer = None if args.draw is None else VideoWriter(args.draw, info.fps or 25.0)
    bar = Bar(total, "predict", unit="frames", counters=("people",))
    rows: list[dict[str, Any]] = []
    read = 0
    name = Path(args.image).name
    try:
        while True:
            try:
                result = next(results)
            except StopIteration:
                break
            except ValueError as exc:  # a box this frame cannot use: name the frame and the option
                if not pending or getattr(exc, "frame", None) is not None:
                    raise
                raise ValueError(f"{name} frame {pending[0][0]} ({option}): {exc}") from None
            frame, image = pending.popleft()
            read += 1
            if len(result):
                row = {"video": name, "frame": frame}
                if info.fps:
                    row["time_s"] = round(frame / info.fps, 6)
                rows.append({**row, "people": result.to_dict()})
            if writer is not None:
                writer.write(draw_poses(image, result.image, result.boxes) if len(result) else image)
            bar.update(1, people=len(result))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return rows, read


def predict_video(args: argparse.Namespace) -> int:
    """predict VIDEO: boxes per frame from --boxes, or --bbox/--crop-box for every frame; one JSON document,
    and with --draw the annotated video (every frame, those without boxes as they are)."""
    from ..io.video import video_info

    _check_outputs(args)
    info = video_info(args.image)
    table, option = _boxes(args)
    if table and info.frame_count and max(table) >= info.frame_count:
        raise ValueError(f"--boxes {args.boxes}: frame {max(table)} is past the end of {args.image} "
                         f"({info.frame_count} frames, 0 is the first)")
    engine = engine_for(args)
    roots = rootnet_for(args, engine)
    flip = flip_test(engine, args.flip)
    rows, read = _run(args, engine, flip, table, option, info, roots)
    if table and args.draw is not None and max(table) >= read:  # the container's count said more frames
        raise ValueError(f"--boxes {args.boxes}: frame {max(table)} is past the end of {args.image} ({read} frames "
                         "could be decoded)")
    everything = read if args.draw is not None or table is None else info.frame_count
    doc = {"video": str(args.image), "width": info.width, "height": info.height, "fps": info.fps,
           "frames": everything, "frames_with_people": len(rows), "frames_without_boxes": everything - len(rows),
           "engine": str(engine.path), "variant": engine.spec.name, "precision": engine.precision,
           "weights": engine.meta["weights"]["source"], "flip_test": flip, **root_fields(roots), "rows": rows}
    people = sum(len(r["people"]) for r in rows)
    emit_document(args.output, doc, f"{everything} frames, {len(rows)} with people, {people} people")
    if args.draw is not None:
        print(f"wrote {args.draw} ({read} frames)", file=sys.stderr)
    return 0

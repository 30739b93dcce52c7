"""Person boxes per frame of a video, read from a detections file and checked record by record.

Three forms, told apart by the JSON's shape:
- per frame, as `predict FOLDER --boxes` takes per file: {"0": [x, y, w, h] or [[x, y, w, h], ...], ...},
  keys frame indices (0 is the first frame);
- COCO-video: {"images": [...], "annotations": [{"image_id", "bbox", "score"?, "category_id"?}, ...],
  "categories"?}: an image's frame is its `frame` field, else its `id`; images with a `video` field
  are kept when it names this video (its file name or stem); without `images`, image_id is the frame;
- a list of detections, each with `image_id` (the frame) or `frame` (and `video`), `bbox`, `score`?,
  `category_id`?.
Detections of another category (default: the file's 'person' category, else 1) are left out, and
those with a score below the threshold (a detection without a score is kept). A record that cannot be
used is a ManifestError naming the file, the record and the field, as manifest.py's readers do; other
fields (id, area, track_id, segmentation, ...) are read past.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import checks
from .fields import _fail, _is_image_id, _is_number, _json, _text_errors


def read_frame_boxes(path: str | Path, *, video: str | Path | None = None, score_threshold: float = 0.5,
                     category_id: Any = None) -> dict[int, np.ndarray]:
    """{frame index: (P, 4) x, y, w, h px person boxes} from a detections file (forms: module docstring).

    Args:
        video: the video the boxes are for: records naming another video (`video` field) are left out.
        score_threshold, category_id: COCO forms only (see the module docstring).
    Raises:
        FileNotFoundError: no such file. ManifestError: a record that cannot be used (file, record, field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detections file not found: {path}")
    score_threshold = checks.number("score_threshold", score_threshold)
    with _text_errors(path):
        doc = _json(path.read_bytes().decode("utf-8-sig"), str(path))
    name = None if video is None else Path(video)
    if isinstance(doc, dict) and "annotations" in doc:
        frames, dets = _coco_video(path, doc, name), doc["annotations"]
        if category_id is None:
            persons = [c.get("id") for c in doc.get("categories") or [] if isinstance(c, dict)
                       and c.get("name") == "person"]
            category_id = persons[0] if persons else None
        where = "annotations"
    elif isinstance(doc, dict):
        return _per_frame(path, doc)
    elif isinstance(doc, list):
        frames, dets, where = None, doc, "detection"
    else:
        raise _fail(str(path), None, "detections must be a JSON object ({frame: boxes}, or COCO-video with "
                    f"'images' and 'annotations') or a list of detections, got {type(doc).__name__}")
    category_id = 1 if category_id is None else category_id
    boxes: dict[int, list[np.ndarray]] = {}
    for i, det in enumerate(dets):
        rec = f"{path}, {where}[{i}]" if where == "annotations" else f"{path}, {where} {i}"
        frame = _detection_frame(det, rec, frames, name)
        if frame is None or det.get("category_id", category_id) != category_id:
            continue
        score = det.get("score")
        if score is not None and not _is_number(score):
            raise _fail(rec, "score", f"must be a number, got {score!r:.80}")
        box = _box(det.get("bbox"), rec, "bbox")
        if score is None or score >= score_threshold:
            boxes.setdefault(frame, []).append(box)
    return {f: np.stack(b) for f, b in sorted(boxes.items())}


def _box(value: Any, where: str, field: str) -> np.ndarray:
    """[x, y, w, h]: 4 finite numbers, w and h > 0 -> (4,) float64."""
    if not (isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(v) for v in value)):
        raise _fail(where, field, f"must be 4 numbers [x, y, w, h], got {value!r:.80}")
    try:
        box = np.asarray(value, np.float64)
    except OverflowError:
        raise _fail(where, field, "holds an integer too large for a float64 number") from None
    if not np.isfinite(box).all() or box[2] <= 0 or box[3] <= 0:
        raise _fail(where, field, f"must be finite numbers [x, y, w, h] with w, h > 0, got {value!r:.80}")
    return box


def _frame_index(value: Any, where: str, field: str) -> int:
    if not checks.is_integer(value) or value < 0:
        raise _fail(where, field, f"must be a frame index (an integer >= 0, 0 is the first frame), got {value!r:.80}")
    return int(value)


def _same_video(named: Any, video: Path | None, where: str) -> bool:
    """Whether a record's `video` field names this video (by file name or stem); no video given: all do."""
    if not isinstance(named, str) or not named.strip():
        raise _fail(where, "video", f"must be a video file name, got {named!r:.80}")
    return video is None or Path(named).name == video.name or Path(named).name == video.stem


def _coco_video(path: Path, doc: dict[str, Any], video: Path | None) -> dict[Any, int | None] | None:
    """A COCO-video dict's images -> {image id: frame, or None for another video's image}; None without
    'images' (image_id is then the frame)."""
    if not isinstance(doc["annotations"], list):
        raise _fail(str(path), "annotations", "must be a list of detections")
    images = doc.get("images")
    if images is None:
        return None
    if not isinstance(images, list):
        raise _fail(str(path), "images", f"must be a list of images, got {type(images).__name__}")
    frames: dict[Any, int | None] = {}
    seen: dict[tuple[Any, int], int] = {}
    named = set()
    for i, im in enumerate(images):
        where = f"{path}, images[{i}]"
        if not (isinstance(im, dict) and "id" in im):
            raise _fail(where, None, f"needs an 'id' (and a 'frame', else the id is the frame), got {im!r:.80}")
        if not _is_image_id(im["id"]):
            raise _fail(where, "id", f"must be an integer or a string, got {im['id']!r:.80}")
        if im["id"] in frames:
            raise _fail(where, "id", f"{im['id']!r} is listed again; every image id appears once")
        frame = _frame_index(im["frame"] if "frame" in im else im["id"], where, "frame" if "frame" in im else "id")
        if "video" in im:
            named.add(str(im["video"]))
            if not _same_video(im["video"], video, where):
                frames[im["id"]] = None
                continue
        key = (im.get("video"), frame)
        if key in seen:
            raise _fail(where, "frame", f"frame {frame} is listed again (first at images[{seen[key]}])")
        seen[key] = i
        frames[im["id"]] = frame
    if named and video is not None and not any(f is not None for f in frames.values()):
        raise _fail(str(path), "images", f"no image is of video {video.name} (the file's videos: "
                    f"{', '.join(sorted(named)[:5])})")
    return frames


def _detection_frame(det: Any, where: str, frames: dict[Any, int | None] | None, video: Path | None) -> int | None:
    """One detection's frame (None: another video's); its fields checked."""
    if not isinstance(det, dict):
        raise _fail(where, None, f"must be an object with image_id (or frame), bbox, score, got {det!r:.80}")
    if "bbox" not in det:
        raise _fail(where, "bbox", "missing (a detection has image_id or frame, bbox, score)")
    if frames is not None:  # COCO-video with images: image_id names an image
        if "image_id" not in det:
            raise _fail(where, "image_id", "missing (a detection has image_id, bbox, score)")
        ident = det["image_id"]
        if not _is_image_id(ident) or ident not in frames:
            raise _fail(where, "image_id", f"{ident!r:.80} matches no image of the file's 'images'")
        return frames[ident]
    if "video" in det and not _same_video(det["video"], video, where):
        return None
    if "frame" in det:
        return _frame_index(det["frame"], where, "frame")
    if "image_id" not in det:
        raise _fail(where, "image_id", "missing (a detection has image_id, the frame index, or frame)")
    return _frame_index(det["image_id"], where, "image_id")


def _per_frame(path: Path, table: dict[str, Any]) -> dict[int, np.ndarray]:
    """{"12": [x, y, w, h] or [[x, y, w, h], ...]} -> {12: (P, 4)}; each entry checked, named by its key."""
    out: dict[int, np.ndarray] = {}
    for key, value in table.items():
        where = f"{path}, frame {key!r}"
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise _fail(where, None, "keys must be frame indices (0, 1, ...; 0 is the first frame), or give COCO-video "
                        "detections ('images', 'annotations')")
        frame = int(key)
        if frame in out:
            raise _fail(where, None, f"frame {frame} is listed again (as {key!r})")
        rows = [value] if isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(v) for v in value) \
            else value
        if not isinstance(rows, (list, tuple)):
            raise _fail(where, None, f"must be a box [x, y, w, h] or a list of them, got {value!r:.80}")
        out[frame] = np.asarray([_box(r, f"{where}, box {i}", None) for i, r in enumerate(rows)],
                                np.float64).reshape(-1, 4)
    return dict(sorted(out.items()))

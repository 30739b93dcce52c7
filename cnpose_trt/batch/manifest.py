"""Batch manifests: the images (and video frames) of a job and their people's boxes, read and checked
record by record.

A manifest is JSON Lines, CSV or Parquet (fields `image`, `boxes` or `crop_boxes`, optional
`root_depth`, `intrinsics`), or COCO-style detection results with an image folder (person
detections above a score threshold). A record may name a video frame instead of an image
(`video` and `frame`, with the same other fields), or a whole video with its detections file
(`video` and `detections`, read by detections.read_frame_boxes): that record stands for every frame
of the video, each an entry (frames without people included, so every frame is in the output once).
read_manifest streams its records as Entry objects, each checked as it is read: a record that
cannot be used is a ManifestError naming the file, the line (or row) and the field. An Entry is one
image or frame with its people, as the rest of the job sees it.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import checks
from ..errors import ManifestError, VideoError, need_pyarrow
from ..io.video import read_frames, video_info
from .detections import read_frame_boxes
from .fields import _fail, _floats, _is_image_id, _is_number, _json, _text_errors

FORMATS = ("auto", "jsonl", "csv", "parquet", "coco")
FIELDS = ("image", "boxes", "crop_boxes", "root_depth", "intrinsics", "video", "frame", "detections")
_PATHS = ("image", "video", "detections")  # fields that hold a file name (never JSON in CSV or Parquet text)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() takes '²', which int() refuses


@dataclasses.dataclass
class Entry:
    """One image of the manifest. Shapes: boxes or crop_boxes (P, 4) x, y, w, h px; root_depth
    () or (P,) mm; intrinsics (4,) or (P, 4) fx, fy, cx, cy. Values are checked when the image is
    read (a bad value becomes an error row); shapes and types were checked when the manifest was."""

    key: str                      # the image as the manifest names it, or "clip.mp4#12": the output's `image` column
    path: str                     # the file to read (the image, or the video)
    where: str                    # "manifest.jsonl, line 12", for messages
    boxes: np.ndarray | None = None
    crop_boxes: np.ndarray | None = None
    root_depth: np.ndarray | None = None
    intrinsics: np.ndarray | None = None
    video: str | None = None      # video frames: the video as the manifest names it, and the frame (0: the first)
    frame: int | None = None

    @property
    def people(self) -> int:
        return len(self.boxes if self.boxes is not None else self.crop_boxes)

    def to_json(self) -> str:
        """Lossless JSON (floats round-trip exactly; NaN kept): how entries travel to Ray workers."""
        doc: dict[str, Any] = {"key": self.key, "path": self.path, "where": self.where}
        if self.video is not None:
            doc.update(video=self.video, frame=self.frame)
        for name in ("boxes", "crop_boxes", "root_depth", "intrinsics"):
            value = getattr(self, name)
            if value is not None:
                doc[name] = value.tolist()
        return json.dumps(doc)

    def record_hash(self) -> str:
        """What the image's poses are computed from, as the manifest gives it: the image as named, its
        boxes (or crop boxes), root_depth and intrinsics (not the resolved path: a moved image folder
        is the same job). Written to the parts, so a resume sees a record that changed. A frame: the video
        as named and the frame instead of the image (an image's hash keeps its form: parts record it)."""
        doc: dict[str, Any] = {"image": self.key} if self.video is None else {"video": self.video,
                                                                              "frame": self.frame}
        for name in ("boxes", "crop_boxes", "root_depth", "intrinsics"):
            value = getattr(self, name)
            if value is not None:
                doc[name] = value.tolist()
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]

    @classmethod
    def from_json(cls, text: str) -> Entry:
        doc = json.loads(text)
        arrays = {k: np.asarray(doc[k], np.float64).reshape(-1, 4) if k in ("boxes", "crop_boxes")
                  else np.asarray(doc[k], np.float64) for k in ("boxes", "crop_boxes", "root_depth", "intrinsics")
                  if k in doc}
        return cls(doc["key"], doc["path"], doc["where"], **arrays, video=doc.get("video"), frame=doc.get("frame"))


def _quad_list(value: Any, where: str, field: str, what: str) -> np.ndarray:
    """A list of [a, b, c, d] lists (or one such list) -> (P, 4) float64."""
    if isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(v) for v in value):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _fail(where, field, f"must be a list of {what} lists, got {type(value).__name__} {value!r:.80}")
    for i, row in enumerate(value):
        if not isinstance(row, (list, tuple)) or len(row) != 4 or not all(_is_number(v) for v in row):
            raise _fail(where, field, f"entry {i} must be 4 numbers {what}, got {row!r:.80}")
    return _floats(value, where, field).reshape(-1, 4)


def _per_person(value: Any, people: int, where: str, field: str) -> np.ndarray:
    """root_depth: one number for every person or one per person -> () or (P,)."""
    if _is_number(value):
        return _floats(value, where, field)
    if isinstance(value, (list, tuple)) and all(_is_number(v) for v in value):
        if len(value) != people:
            raise _fail(where, field, f"needs one number for all people or one per person ({people}), "
                        f"got {len(value)}")
        return _floats(value, where, field)
    raise _fail(where, field, f"must be a number (mm) or a list of numbers, one per person, got {value!r:.80}")


def _intrinsics(value: Any, people: int, where: str) -> np.ndarray:
    """[fx, fy, cx, cy] for every person, or one such list per person -> (4,) or (P, 4)."""
    if isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(v) for v in value):
        return _floats(value, where, "intrinsics")
    arr = _quad_list(value, where, "intrinsics", "[fx, fy, cx, cy]")
    if len(arr) != people:
        raise _fail(where, "intrinsics", f"needs one [fx, fy, cx, cy] for all people or one per person ({people}), "
                    f"got {len(arr)}")
    return arr


def _values(record: dict[str, Any], where: str, decode_text: bool) -> dict[str, Any]:
    """A record's fields by name (None where absent); with decode_text, the JSON in the numeric ones decoded."""
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise _fail(where, unknown[0], f"unknown field; a record has {', '.join(FIELDS)}")
    values: dict[str, Any] = {}
    for name in FIELDS:
        value = record.get(name)
        if name not in _PATHS and isinstance(value, str) and decode_text:
            if not value.strip():
                value = None
            else:
                value = _json(value, where, name)
        values[name] = value
    return values


def make_entry(record: dict[str, Any], where: str, image_root: Path, decode_text: bool = False) -> Entry:
    """One manifest record (a JSON object, CSV row or Parquet row) of one image or video frame -> Entry,
    or a ManifestError.

    Args:
        record: fields image (or video and frame), boxes or crop_boxes, optional root_depth, intrinsics.
        where: file and line/row, for messages.
        image_root: folder that relative image and video paths are resolved against.
        decode_text: string values of the numeric fields hold JSON (CSV cells, Parquet strings).
    """
    values = _values(record, where, decode_text)
    if values["detections"] is not None:
        raise _fail(where, "detections", "a record with detections stands for every frame of its video: read it "
                    "with make_entries")
    return _one_entry(values, where, image_root)


def make_entries(record: dict[str, Any], where: str, image_root: Path, decode_text: bool = False, *,
                 score_threshold: float = 0.5, category_id: Any = None,
                 estimated_roots: bool = False) -> Iterator[Entry]:
    """The entries of one manifest record: make_entry's one, or for a video with its detections file
    (`video`, `detections`, optional root_depth and intrinsics for every frame) one per frame, in order,
    frames without people included. score_threshold, category_id: how the detections are read
    (detections.read_frame_boxes). estimated_roots: the job estimates root depths (batch --rootnet), so
    intrinsics without root_depth are what it needs."""
    values = _values(record, where, decode_text)
    if values["detections"] is None:
        return iter([_one_entry(values, where, image_root, estimated_roots)])
    return _video_entries(values, where, image_root, score_threshold, category_id, estimated_roots)


def _resolve(name: str, root: Path) -> Path:
    path = Path(name)
    return path if path.is_absolute() else root / path


def _source(values: dict[str, Any], where: str, root: Path) -> tuple[str, Path, str | None, int | None]:
    """An image record's or a video frame record's (key, file, video, frame)."""
    image, video, frame = values["image"], values["video"], values["frame"]
    if image is not None and video is not None:
        raise _fail(where, "video", "a record names an image or a video frame, not both: give 'image', or 'video' "
                    "with 'frame'")
    if video is None:
        if frame is not None:
            raise _fail(where, "frame", "is for video records: give 'video' (the video file) with it, or drop it")
        if not isinstance(image, str) or not image.strip():
            raise _fail(where, "image", f"must be an image path (or give 'video' and 'frame' for a video frame), got "
                        f"{image!r:.80}")
        return image, _resolve(image, root), None, None
    path = _video_path(video, where, root)
    if frame is None:
        raise _fail(where, "frame", "missing: a video record names its frame (0 is the first), or gives "
                    "'detections' (a detections file) for every frame")
    if not checks.is_integer(frame) or frame < 0:
        raise _fail(where, "frame", f"must be a frame index, an integer >= 0 (0 is the first frame), got {frame!r:.80}")
    return f"{video}#{int(frame)}", path, video, int(frame)


def _video_path(video: Any, where: str, root: Path) -> Path:
    """A video record's file, which must exist (a missing video would be an error row for every frame)."""
    if not isinstance(video, str) or not video.strip():
        raise _fail(where, "video", f"must be a video path, got {video!r:.80}")
    path = _resolve(video, root)
    if not path.is_file():
        raise _fail(where, "video", f"no such video file: {path}")
    return path


_NEEDS_DEPTH = ("needs root_depth: camera coordinates require the root's absolute depth (or run the job with "
                "--rootnet, which estimates it)")


def _one_entry(values: dict[str, Any], where: str, image_root: Path, estimated_roots: bool = False) -> Entry:
    name, path, video, frame = _source(values, where, image_root)
    if (values["boxes"] is None) == (values["crop_boxes"] is None):
        raise _fail(where, "boxes", "give exactly one of 'boxes' (person boxes [x, y, w, h]; upstream's box rule is "
                    "applied) or 'crop_boxes' (already processed, used as they are)")
    key = "boxes" if values["boxes"] is not None else "crop_boxes"
    boxes = _quad_list(values[key], where, key, "[x, y, w, h]")
    root = None if values["root_depth"] is None else _per_person(values["root_depth"], len(boxes), where,
                                                                 "root_depth")
    intr = None
    if values["intrinsics"] is not None:
        if root is None and not estimated_roots:
            raise _fail(where, "intrinsics", _NEEDS_DEPTH)
        intr = _intrinsics(values["intrinsics"], len(boxes), where)
    return Entry(name, str(path), where, **{key: boxes}, root_depth=root, intrinsics=intr, video=video, frame=frame)


def _video_entries(values: dict[str, Any], where: str, root: Path, score_threshold: float,
                   category_id: Any, estimated_roots: bool = False) -> Iterator[Entry]:
    """A video with its detections file -> one entry per frame: every frame the video has (or its
    detections name; a frame past the end becomes that frame's error row), people or not."""
    for name in ("image", "frame", "boxes", "crop_boxes"):
        if values[name] is not None:
            raise _fail(where, name, "not with 'detections', which give every frame's boxes (a record with 'video', "
                        "'frame' and 'boxes' names one frame)")
    if values["video"] is None:
        raise _fail(where, "detections", "is for video records: give 'video' (the video file) with it")
    video = values["video"]
    path = _video_path(video, where, root)
    dets = values["detections"]
    if not isinstance(dets, str) or not dets.strip():
        raise _fail(where, "detections", f"must be a detections file (JSON), got {dets!r:.80}")
    dets_path = _resolve(dets, root)
    if not dets_path.is_file():
        raise _fail(where, "detections", f"no such detections file: {dets_path}")
    depth, intr = values["root_depth"], values["intrinsics"]
    if depth is not None and not _is_number(depth):
        raise _fail(where, "root_depth", f"with detections, one number (mm) for every person of every frame, got "
                    f"{depth!r:.80}")
    if intr is not None:
        if depth is None and not estimated_roots:
            raise _fail(where, "intrinsics", _NEEDS_DEPTH)
        if not (isinstance(intr, (list, tuple)) and len(intr) == 4 and all(_is_number(v) for v in intr)):
            raise _fail(where, "intrinsics", f"with detections, one [fx, fy, cx, cy] for the whole video, got "
                        f"{intr!r:.80}")
    root_depth = None if depth is None else _floats(depth, where, "root_depth")
    intrinsics = None if intr is None else _floats(intr, where, "intrinsics")
    try:
        boxes = read_frame_boxes(dets_path, video=path, score_threshold=score_threshold, category_id=category_id)
    except ManifestError as exc:
        raise _fail(where, "detections", str(exc)) from None
    frames = max(_frame_count(path, where), max(boxes, default=-1) + 1)
    none = np.zeros((0, 4), np.float64)
    for frame in range(frames):
        yield Entry(f"{video}#{frame}", str(path), f"{where} (frame {frame})", boxes=boxes.get(frame, none),
                    root_depth=root_depth, intrinsics=intrinsics, video=video, frame=frame)


def _frame_count(path: Path, where: str) -> int:
    """The frames of a video: the count its container reports, else (none reported) the frames decoded."""
    try:
        count = video_info(path).frame_count
        if not count:  # unknown: one pass to count them (grab is not enough: a frame must decode to count)
            count = sum(1 for _ in read_frames(path))
    except (VideoError, OSError) as exc:
        raise _fail(where, "video", str(exc)) from None
    return count


def _read_jsonl(path: Path, image_root: Path, dets: dict[str, Any]) -> Iterator[Entry]:
    # utf-8-sig: a byte order mark, as some editors write one, is read past
    with open(path, encoding="utf-8-sig") as f, _text_errors(path):
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            record = _json(line, where)
            if not isinstance(record, dict):
                raise _fail(where, None, f"each line must be a JSON object, got {type(record).__name__}")
            yield from make_entries(record, where, image_root, **dets)


def _read_csv(path: Path, image_root: Path, dets: dict[str, Any]) -> Iterator[Entry]:
    with open(path, encoding="utf-8-sig", newline="") as f, _text_errors(path):
        reader = csv.DictReader(f)
        rows = iter(reader)
        try:
            header = reader.fieldnames or []
            twice = sorted({name for name in header if header.count(name) > 1})
            if twice:
                raise _fail(f"{path}, line 1", twice[0], "column named twice in the header; each column once")
            if "image" not in header and "video" not in header:
                raise _fail(f"{path}, line 1", None, "the header must name an 'image' column (or 'video' for video "
                            f"frames; columns: {', '.join(FIELDS)}; boxes and the other numbers as JSON), got {header}")
            row = next(rows, None)
        except csv.Error as exc:
            raise _fail(f"{path}, line {reader.line_num + 1}", None, _csv_message(exc)) from None
        while row is not None:
            where = f"{path}, line {reader.line_num}"
            if None in row:
                raise _fail(where, None, f"more cells than the header's {len(header)} columns (quote JSON lists "
                            "that hold commas)")
            yield from make_entries({k: v for k, v in row.items() if v is not None and v != ""}, where, image_root,
                                    decode_text=True, **dets)
            try:
                row = next(rows, None)
            except csv.Error as exc:
                raise _fail(f"{path}, line {reader.line_num + 1}", None, _csv_message(exc)) from None


def _csv_message(exc: csv.Error) -> str:
    if "field larger than field limit" in str(exc):
        return (f"a cell is longer than the CSV limit of {csv.field_size_limit()} characters: give images with "
                "that many boxes in JSON Lines or Parquet")
    return f"not valid CSV ({exc})"


def _read_parquet(path: Path, image_root: Path, dets: dict[str, Any]) -> Iterator[Entry]:
    _, pq = need_pyarrow()
    try:
        source = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's own exception types
        raise _fail(str(path), None, f"not a readable Parquet file ({exc})") from None
    names = source.schema_arrow.names
    if "image" not in names and "video" not in names:
        raise _fail(str(path), None, f"needs an 'image' column (or 'video' for video frames; columns: "
                    f"{', '.join(FIELDS)}), got {names}")
    row = 0
    for batch in source.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield from make_entries({k: v for k, v in record.items() if v is not None}, f"{path}, row {row}",
                                    image_root, decode_text=True, **dets)


def _read_coco(path: Path, image_root: Path, score_threshold: float, category_id: int | None) -> Iterator[Entry]:
    """COCO detection results (a list of {image_id, category_id, bbox, score}) or a COCO-style
    dict with 'annotations' (+ 'images', 'categories'); person detections with score >=
    score_threshold. Images are those the dict's 'images' lists, else every image file in
    image_root, matched to image ids by file stem (42.jpg or 000000000042.jpg); an image without
    detections is listed with no people."""
    with _text_errors(path):
        doc = _json(path.read_bytes().decode("utf-8-sig"), str(path))
    files: dict[Any, str] = {}
    if isinstance(doc, dict):
        if not isinstance(doc.get("annotations"), list):
            raise _fail(str(path), "annotations", "a COCO dict needs an 'annotations' list of detections")
        files = _coco_images(path, doc.get("images") or [])
        if category_id is None:
            persons = [c.get("id") for c in doc.get("categories") or [] if isinstance(c, dict)
                       and c.get("name") == "person"]
            category_id = persons[0] if persons else None
        dets = doc["annotations"]
    elif isinstance(doc, list):
        dets = doc
    else:
        raise _fail(str(path), None, f"COCO detections must be a list or a dict, got {type(doc).__name__}")
    category_id = 1 if category_id is None else category_id
    listed = bool(files)  # the dict's 'images' name the images, else the folder's files do
    if not files:
        files = _folder_images(path, image_root)
    boxes: dict[Any, list[list[float]]] = {ident: [] for ident in files}
    for i, det in enumerate(dets):
        where = f"{path}, detection {i}"
        ident = _detection(det, where, category_id, boxes, listed, image_root)
        if ident is not None and det["score"] >= score_threshold:
            boxes[ident].append(_floats(det["bbox"], where, "bbox").tolist())
    for ident, name in files.items():
        path_ = Path(name) if Path(name).is_absolute() else image_root / name
        yield Entry(name, str(path_), f"{path}, image_id {ident!r}",
                    boxes=np.asarray(boxes[ident], np.float64).reshape(-1, 4))


def _coco_images(path: Path, images: list[Any]) -> dict[Any, str]:
    """A COCO dict's 'images' list -> {image id: file name}, each id once."""
    files: dict[Any, str] = {}
    first: dict[Any, int] = {}
    for i, im in enumerate(images):
        if not (isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str)):
            raise _fail(f"{path}, images[{i}]", None, f"needs 'id' and 'file_name', got {im!r:.80}")
        if not _is_image_id(im["id"]):
            raise _fail(f"{path}, images[{i}]", "id", f"must be an integer or a string, got {im['id']!r:.80}")
        if im["id"] in first:
            raise _fail(f"{path}, images[{i}]", "id", f"{im['id']!r} is listed again (first at "
                        f"images[{first[im['id']]}]); every image id appears once")
        first[im["id"]] = i
        files[im["id"]] = im["file_name"]
    return files


def _folder_images(path: Path, image_root: Path) -> dict[Any, str]:
    """The image files of image_root -> {image id (the stem, an int when all digits): file name}."""
    if not image_root.is_dir():
        raise _fail(str(path), None, f"the image folder {image_root} does not exist (--image-root)")
    files: dict[Any, str] = {}
    for p in sorted(image_root.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            ident: Any = int(p.stem) if _DIGITS.fullmatch(p.stem) else p.stem
            if ident in files:
                raise _fail(str(path), None, f"images {files[ident]} and {p.name} in {image_root} both match "
                            f"image id {ident!r}")
            files[ident] = p.name
    return files


def _detection(det: Any, where: str, category_id: Any, boxes: dict[Any, list[list[float]]], listed: bool,
               image_root: Path) -> Any:
    """One detection checked -> the id of its image (a key of boxes); None for another category."""
    if not isinstance(det, dict):
        raise _fail(where, None, f"must be an object with image_id, category_id, bbox, score, got {det!r:.80}")
    for field in ("image_id", "bbox", "score"):
        if field not in det:
            raise _fail(where, field, "missing (a detection has image_id, category_id, bbox, score)")
    if det.get("category_id", category_id) != category_id:
        return None
    score = det["score"]
    if not _is_number(score):
        raise _fail(where, "score", f"must be a number, got {score!r:.80}")
    bbox = det["bbox"]
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise _fail(where, "bbox", f"must be 4 numbers [x, y, w, h], got {bbox!r:.80}")
    ident = det["image_id"]
    if not _is_image_id(ident):
        raise _fail(where, "image_id", f"must be an integer or a string, got {ident!r:.80}")
    if isinstance(ident, str) and _DIGITS.fullmatch(ident) and ident not in boxes:
        ident = int(ident)
    if ident not in boxes:
        raise _fail(where, "image_id", f"{det['image_id']!r} matches no image ("
                    + ("not in the file's 'images'" if listed else
                       f"no file in {image_root} with that stem, e.g. {det['image_id']}.jpg or "
                       f"{str(det['image_id']).zfill(12)}.jpg") + ")")
    return ident


def manifest_format(path: str | Path, fmt: str = "auto") -> str:
    """The manifest's format: fmt, or for 'auto' the one its suffix names."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower()
    found = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet",
             ".json": "coco"}.get(suffix)
    if found is None:
        raise ValueError(f"cannot tell the format of manifest {path} from its suffix {suffix!r} (.jsonl, .csv, "
                         ".parquet, or .json for COCO detections): pass format= / --format")
    return found


def read_manifest(path: str | Path, *, format: str = "auto", image_root: str | Path | None = None,
                  score_threshold: float = 0.5, category_id: int | None = None,
                  estimated_roots: bool = False) -> Iterator[Entry]:
    """Stream the entries of a manifest, checking each record's fields as it goes.

    Args:
        path: JSON Lines (.jsonl), CSV (.csv: numbers and lists as JSON in the cells), Parquet, or
            COCO detections (.json).
        format: 'auto' (from the suffix), 'jsonl', 'csv', 'parquet' or 'coco'.
        image_root: folder relative image, video and detections paths are resolved against (COCO:
            the image folder); default the manifest's folder.
        score_threshold, category_id: COCO, and the detections files of video records: keep
            detections of this category (default the file's 'person' category, else 1) with score >=
            the threshold.
        estimated_roots: the job estimates root depths (batch --rootnet): intrinsics need no root_depth.
    Raises:
        ManifestError: a record that cannot be used, naming the file, line (row) and field.
        FileNotFoundError: no such manifest.
    """
    path = Path(path)
    fmt = manifest_format(path, format)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    score_threshold = checks.number("score_threshold", score_threshold)
    # Absolute (not resolved: a symlinked folder stays as named): entries go to Ray workers, whose
    # working folder is not this process's.
    root = Path(os.path.abspath(image_root if image_root is not None else path.parent))
    # video records' detections files, and whether intrinsics may come without root_depth
    dets = {"score_threshold": score_threshold, "category_id": category_id, "estimated_roots": bool(estimated_roots)}
    if fmt == "jsonl":
        return _read_jsonl(path, root, dets)
    if fmt == "csv":
        return _read_csv(path, root, dets)
    if fmt == "parquet":
        return _read_parquet(path, root, dets)
    return _read_coco(path, root, score_threshold, category_id)

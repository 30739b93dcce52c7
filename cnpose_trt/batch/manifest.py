"""Batch manifests: the images of a job and their people's boxes, read and checked record by record.

A manifest is JSON Lines, CSV or Parquet (fields `image`, `boxes` or `crop_boxes`, optional
`root_depth`, `intrinsics`), or COCO-style detection results with an image folder (person
detections above a score threshold). read_manifest streams its records as Entry objects, each
checked as it is read: a record that cannot be used is a ManifestError naming the file, the line
(or row) and the field. An Entry is one image with its people, as the rest of the job sees it.
"""

from __future__ import annotations

import contextlib
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
from ..errors import ManifestError, need_pyarrow

FORMATS = ("auto", "jsonl", "csv", "parquet", "coco")
FIELDS = ("image", "boxes", "crop_boxes", "root_depth", "intrinsics")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() takes '²', which int() refuses


@dataclasses.dataclass
class Entry:
    """One image of the manifest. Shapes: boxes or crop_boxes (P, 4) x, y, w, h px; root_depth
    () or (P,) mm; intrinsics (4,) or (P, 4) fx, fy, cx, cy. Values are checked when the image is
    read (a bad value becomes an error row); shapes and types were checked when the manifest was."""

    key: str                      # the image as the manifest names it: the output's `image` column
    path: str                     # the file to read
    where: str                    # "manifest.jsonl, line 12", for messages
    boxes: np.ndarray | None = None
    crop_boxes: np.ndarray | None = None
    root_depth: np.ndarray | None = None
    intrinsics: np.ndarray | None = None

    @property
    def people(self) -> int:
        return len(self.boxes if self.boxes is not None else self.crop_boxes)

    def to_json(self) -> str:
        """Lossless JSON (floats round-trip exactly; NaN kept): how entries travel to Ray workers."""
        doc: dict[str, Any] = {"key": self.key, "path": self.path, "where": self.where}
        for name in ("boxes", "crop_boxes", "root_depth", "intrinsics"):
            value = getattr(self, name)
            if value is not None:
                doc[name] = value.tolist()
        return json.dumps(doc)

    def record_hash(self) -> str:
        """What the image's poses are computed from, as the manifest gives it: the image as named, its
        boxes (or crop boxes), root_depth and intrinsics (not the resolved path: a moved image folder
        is the same job). Written to the parts, so a resume sees a record that changed."""
        doc: dict[str, Any] = {"image": self.key}
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
        return cls(doc["key"], doc["path"], doc["where"], **arrays)


def _fail(where: str, field: str | None, message: str) -> ManifestError:
    return ManifestError(f"{where}{f', field {field!r}' if field else ''}: {message}")


_is_number = checks.is_number


def _floats(values: Any, where: str, field: str) -> np.ndarray:
    """Numbers (checked by _is_number) -> float64; an integer too large for a float is refused."""
    try:
        return np.asarray(values, np.float64)
    except OverflowError:
        raise _fail(where, field, "holds an integer too large for a float64 number") from None


def _json(text: str | bytes, where: str, field: str | None = None) -> Any:
    """json.loads with the manifest's messages (a record nested thousands deep included)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise _fail(where, field, f"{'is ' if field else ''}not valid JSON here: nested too deeply") from None
    except ValueError as exc:
        if field is None:
            raise _fail(where, None, f"not valid JSON ({exc})") from None
        raise _fail(where, field, f"is not valid JSON ({getattr(exc, 'msg', exc)}): {text!r:.80}") from None


@contextlib.contextmanager
def _text_errors(path: Path) -> Iterator[None]:
    """A manifest that is not UTF-8 text (Latin-1, UTF-16) is refused naming the file."""
    try:
        yield
    except UnicodeDecodeError as exc:
        what = ("it is UTF-16" if exc.object[:2] in (b"\xff\xfe", b"\xfe\xff") else
                f"byte {exc.object[exc.start]:#04x}, e.g. Latin-1")
        raise _fail(str(path), None, f"not UTF-8 text ({what}): save it as UTF-8") from None


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


def make_entry(record: dict[str, Any], where: str, image_root: Path, decode_text: bool = False) -> Entry:
    """One manifest record (a JSON object, CSV row or Parquet row) -> Entry, or a ManifestError.

    Args:
        record: fields image, boxes or crop_boxes, optional root_depth, intrinsics.
        where: file and line/row, for messages.
        image_root: folder that relative image paths are resolved against.
        decode_text: string values of the numeric fields hold JSON (CSV cells, Parquet strings).
    """
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise _fail(where, unknown[0], f"unknown field; a record has {', '.join(FIELDS)}")
    values: dict[str, Any] = {}
    for name in FIELDS:
        value = record.get(name)
        if name != "image" and isinstance(value, str) and decode_text:
            if not value.strip():
                value = None
            else:
                value = _json(value, where, name)
        values[name] = value
    image = values["image"]
    if not isinstance(image, str) or not image.strip():
        raise _fail(where, "image", f"must be an image path, got {image!r:.80}")
    if (values["boxes"] is None) == (values["crop_boxes"] is None):
        raise _fail(where, "boxes", "give exactly one of 'boxes' (person boxes [x, y, w, h]; upstream's box rule is "
                    "applied) or 'crop_boxes' (already processed, used as they are)")
    key = "boxes" if values["boxes"] is not None else "crop_boxes"
    boxes = _quad_list(values[key], where, key, "[x, y, w, h]")
    root = None if values["root_depth"] is None else _per_person(values["root_depth"], len(boxes), where,
                                                                 "root_depth")
    intr = None
    if values["intrinsics"] is not None:
        if root is None:
            raise _fail(where, "intrinsics", "needs root_depth: camera coordinates require the root's absolute depth")
        intr = _intrinsics(values["intrinsics"], len(boxes), where)
    path = Path(image)
    path = path if path.is_absolute() else image_root / path
    return Entry(image, str(path), where, **{key: boxes}, root_depth=root, intrinsics=intr)


def _read_jsonl(path: Path, image_root: Path) -> Iterator[Entry]:
    # utf-8-sig: a byte order mark, as some editors write one, is read past
    with open(path, encoding="utf-8-sig") as f, _text_errors(path):
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            record = _json(line, where)
            if not isinstance(record, dict):
                raise _fail(where, None, f"each line must be a JSON object, got {type(record).__name__}")
            yield make_entry(record, where, image_root)


def _read_csv(path: Path, image_root: Path) -> Iterator[Entry]:
    with open(path, encoding="utf-8-sig", newline="") as f, _text_errors(path):
        reader = csv.DictReader(f)
        rows = iter(reader)
        try:
            header = reader.fieldnames or []
            twice = sorted({name for name in header if header.count(name) > 1})
            if twice:
                raise _fail(f"{path}, line 1", twice[0], "column named twice in the header; each column once")
            if "image" not in header:
                raise _fail(f"{path}, line 1", None, "the header must name an 'image' column (columns: "
                            f"{', '.join(FIELDS)}; boxes and the other numbers as JSON), got {header}")
            row = next(rows, None)
        except csv.Error as exc:
            raise _fail(f"{path}, line {reader.line_num + 1}", None, _csv_message(exc)) from None
        while row is not None:
            where = f"{path}, line {reader.line_num}"
            if None in row:
                raise _fail(where, None, f"more cells than the header's {len(header)} columns (quote JSON lists "
                            "that hold commas)")
            yield make_entry({k: v for k, v in row.items() if v is not None and v != ""}, where, image_root,
                             decode_text=True)
            try:
                row = next(rows, None)
            except csv.Error as exc:
                raise _fail(f"{path}, line {reader.line_num + 1}", None, _csv_message(exc)) from None


def _csv_message(exc: csv.Error) -> str:
    if "field larger than field limit" in str(exc):
        return (f"a cell is longer than the CSV limit of {csv.field_size_limit()} characters: give images with "
                "that many boxes in JSON Lines or Parquet")
    return f"not valid CSV ({exc})"


def _read_parquet(path: Path, image_root: Path) -> Iterator[Entry]:
    _, pq = need_pyarrow()
    try:
        source = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's own exception types
        raise _fail(str(path), None, f"not a readable Parquet file ({exc})") from None
    names = source.schema_arrow.names
    if "image" not in names:
        raise _fail(str(path), None, f"needs an 'image' column (columns: {', '.join(FIELDS)}), got {names}")
    row = 0
    for batch in source.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield make_entry({k: v for k, v in record.items() if v is not None}, f"{path}, row {row}", image_root,
                             decode_text=True)


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


def _is_image_id(value: Any) -> bool:
    # not bool: True == 1 would match image 1
    return checks.identifier(value)


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
                  score_threshold: float = 0.5, category_id: int | None = None) -> Iterator[Entry]:
    """Stream the entries of a manifest, checking each record's fields as it goes.

    Args:
        path: JSON Lines (.jsonl), CSV (.csv: numbers and lists as JSON in the cells), Parquet, or
            COCO detections (.json).
        format: 'auto' (from the suffix), 'jsonl', 'csv', 'parquet' or 'coco'.
        image_root: folder relative image paths are resolved against (COCO: the image folder);
            default the manifest's folder.
        score_threshold, category_id: COCO only: keep detections of this category (default the
            file's 'person' category, else 1) with score >= the threshold.
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
    if fmt == "jsonl":
        return _read_jsonl(path, root)
    if fmt == "csv":
        return _read_csv(path, root)
    if fmt == "parquet":
        return _read_parquet(path, root)
    return _read_coco(path, root, score_threshold, category_id)

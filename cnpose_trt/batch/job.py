"""Batch jobs: 3D poses of every person in a manifest of images, written to Parquet part by part.

    cnpose-trt batch MANIFEST --out DIR [--variant XS | --engine FILE] [--flip] [--ray [ADDRESS]]

The manifest lists images and their person boxes: JSON Lines, CSV or Parquet (fields `image`,
`boxes` or `crop_boxes`, optional `root_depth`, `intrinsics`), or COCO-style detection results
with an image folder (person detections above a score threshold). The output folder holds
Parquet parts with one row per person (see OUTPUT_COLUMNS), error rows for unreadable images
and bad boxes, and `_summary.json`.

Exactly once: a part file holds whole images and is the unit of commit. It is written to a
temporary file and renamed into place; its images are done only once the rename happened (the
part's footer lists them, people or not). A rerun with the same --out removes the temporaries
of a killed run and skips the images of the committed parts, so a job killed at any point and
rerun ends with every image in the output exactly once. The folder is locked while a job runs.

Locally, reader threads read and decode images ahead of PoseEstimator; with --ray the same job
runs on a Ray cluster with Ray Data (an actor pool, the engine loaded once per actor) and the
results stream back to this process, which commits the parts in the same way. ray and pyarrow
are imported lazily (`pip install 'cnpose_trt[batch]'`, `'cnpose_trt[ray]'`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .. import backends, checks
from ..config import BuildConfig, EngineRequest
from ..errors import CnposeError
from ..interrupts import held_stops, raise_if_stopped
from ..progress import Bar
from ..runtime.open import engine_path
from .watchdog import alive, ray_descendants, start_time

log = logging.getLogger(__name__)

FORMATS = ("auto", "jsonl", "csv", "parquet", "coco")
FIELDS = ("image", "boxes", "crop_boxes", "root_depth", "intrinsics")
OUTPUT_COLUMNS = ("image", "person", "box", "crop_box", "joints", "camera", "confidence", "root_depth", "engine",
                  "error")
META_KEY = b"cnpose_trt.batch"
PART_FORMAT = 1
SUMMARY_FILE = "_summary.json"  # '_' and '.' prefixes: Parquet readers of the folder skip these files
LOCK_FILE = ".lock"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
_PART_NAME = re.compile(r"part-(\d{6,})\.parquet")
_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() takes '²', which int() refuses
_TEMP_NAME = re.compile(r"\.part-\d{6,}\.parquet\.\d+\.tmp")
_INSTALL_HINT = "pip install 'cnpose_trt[batch]'"


class ManifestError(CnposeError, ValueError):
    """A manifest that cannot be read: names the file, the line (or row) and the field."""


class BatchError(CnposeError, RuntimeError):
    """An output folder that cannot be used for this job (locked, another job's results, damaged part)."""


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise BatchError(f"batch jobs write Parquet and need pyarrow: {_INSTALL_HINT}") from None
    return pa, pq


# ---------------------------------------------------------------------------------------------
# Manifests


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
    _, pq = _pyarrow()
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
        first: dict[Any, int] = {}
        for i, im in enumerate(doc.get("images") or []):
            if not (isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str)):
                raise _fail(f"{path}, images[{i}]", None, f"needs 'id' and 'file_name', got {im!r:.80}")
            if not _is_image_id(im["id"]):
                raise _fail(f"{path}, images[{i}]", "id", f"must be an integer or a string, got {im['id']!r:.80}")
            if im["id"] in first:
                raise _fail(f"{path}, images[{i}]", "id", f"{im['id']!r} is listed again (first at "
                            f"images[{first[im['id']]}]); every image id appears once")
            first[im["id"]] = i
            files[im["id"]] = im["file_name"]
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
    if not files:
        if not image_root.is_dir():
            raise _fail(str(path), None, f"the image folder {image_root} does not exist (--image-root)")
        for p in sorted(image_root.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                ident: Any = int(p.stem) if _DIGITS.fullmatch(p.stem) else p.stem
                if ident in files:
                    raise _fail(str(path), None, f"images {files[ident]} and {p.name} in {image_root} both match "
                                f"image id {ident!r}")
                files[ident] = p.name
    boxes: dict[Any, list[list[float]]] = {ident: [] for ident in files}
    for i, det in enumerate(dets):
        where = f"{path}, detection {i}"
        if not isinstance(det, dict):
            raise _fail(where, None, f"must be an object with image_id, category_id, bbox, score, got {det!r:.80}")
        for field in ("image_id", "bbox", "score"):
            if field not in det:
                raise _fail(where, field, "missing (a detection has image_id, category_id, bbox, score)")
        if det.get("category_id", category_id) != category_id:
            continue
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
                        + ("not in the file's 'images'" if isinstance(doc, dict) and doc.get("images") else
                           f"no file in {image_root} with that stem, e.g. {det['image_id']}.jpg or "
                           f"{str(det['image_id']).zfill(12)}.jpg") + ")")
        if score >= score_threshold:
            boxes[ident].append(_floats(bbox, where, "bbox").tolist())
    for ident, name in files.items():
        path_ = Path(name) if Path(name).is_absolute() else image_root / name
        yield Entry(name, str(path_), f"{path}, image_id {ident!r}",
                    boxes=np.asarray(boxes[ident], np.float64).reshape(-1, 4))


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
    if not (isinstance(score_threshold, (int, float)) and math.isfinite(score_threshold)):
        raise ValueError(f"score_threshold must be a finite number, got {score_threshold!r}")
    # Absolute (not resolved: a symlinked folder stays as named): entries go to Ray workers, whose
    # working folder is not this process's.
    root = Path(os.path.abspath(image_root if image_root is not None else path.parent))
    if fmt == "jsonl":
        return _read_jsonl(path, root)
    if fmt == "csv":
        return _read_csv(path, root)
    if fmt == "parquet":
        return _read_parquet(path, root)
    return _read_coco(path, root, float(score_threshold), category_id)


# ---------------------------------------------------------------------------------------------
# Reading images ahead, and the estimator with error rows


@dataclasses.dataclass
class _Loaded:
    """An entry with its decoded image, the people sent to the estimator and the bad ones."""

    entry: Entry
    image: np.ndarray | None = None
    error: str | None = None                       # the whole image failed
    keep: list[int] = dataclasses.field(default_factory=list)
    bad: dict[int, str] = dataclasses.field(default_factory=dict)

    def item(self) -> dict[str, Any]:
        """The PoseEstimator item of the people in `keep`."""
        e, k = self.entry, self.keep
        key = "boxes" if e.boxes is not None else "crop_boxes"
        boxes = (e.boxes if e.boxes is not None else e.crop_boxes)[k]
        item: dict[str, Any] = {"image": self.image, key: boxes}
        if e.root_depth is not None:
            item["root_depth"] = np.broadcast_to(e.root_depth, (e.people,))[k]
        if e.intrinsics is not None:
            item["intrinsics"] = np.broadcast_to(e.intrinsics, (e.people, 4))[k]
        return item


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, (ValueError, TypeError, OSError)) else f"{type(exc).__name__}: {text}"


def load_entry(entry: Entry) -> _Loaded:
    """Read and decode an entry's image and check each person's values (never raises for bad input:
    the problems are recorded as the image's or the person's error)."""
    from ..io.imageio_guard import check_image_file
    from ..io.preprocess import load_image
    from ..ops.geometry import check_crop_boxes, check_intrinsics, check_root_depth, process_boxes

    out = _Loaded(entry)
    try:
        check_image_file(entry.path)
        out.image = load_image(entry.path)
    except (OSError, ValueError) as exc:
        out.error = _message(exc)
        return out
    except MemoryError:
        out.error = f"image {entry.path} is too large to decode in the memory available"
        return out
    h, w = out.image.shape[:2]
    p = entry.people
    root = None if entry.root_depth is None else np.broadcast_to(entry.root_depth, (p,))
    intr = None if entry.intrinsics is None else np.broadcast_to(entry.intrinsics, (p, 4))
    for i in range(p):
        try:
            # The estimator's own checks, one person at a time: a bad person is that person's error row.
            if entry.boxes is not None:
                process_boxes(entry.boxes[i:i + 1], (w, h))
            else:
                check_crop_boxes(entry.crop_boxes[i:i + 1], (w, h))
            if root is not None:
                check_root_depth(root[i])
            if intr is not None:
                check_intrinsics(intr[i])
        except ValueError as exc:
            # The checks index the one box they saw as [0]; name the person instead.
            out.bad[i] = re.sub(r"^(crop_)?boxes\[0\]", rf"\1boxes[{i}]", str(exc))
        else:
            out.keep.append(i)
    return out


def read_ahead(pool: ThreadPoolExecutor, entries: Iterable[Entry], window: int) -> Iterator[_Loaded]:
    """load_entry over entries on the pool's threads, `window` images ahead, in order."""
    pending: collections.deque[Future[_Loaded]] = collections.deque()
    source = iter(entries)
    try:
        while True:
            while len(pending) < window:
                entry = next(source, None)
                if entry is None:
                    break
                pending.append(pool.submit(load_entry, entry))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()


def estimate_stream(estimator: Any, loaded: Iterable[_Loaded], flip: bool = False
                    ) -> Iterator[tuple[_Loaded, Any]]:
    """(loaded image, PoseResult or None) for every image, in order; the people of images that
    failed are not run.

    PoseEstimator stops at a bad item (after delivering everything before it). Every input
    problem it can raise should already have been caught by load_entry; any ValueError or
    TypeError it raises anyway becomes the image's error and the stream goes on. Other errors
    (the engine failing) end the job: they are not the image's fault.
    """
    inflight: collections.deque[_Loaded] = collections.deque()
    retry: list[_Loaded] = []
    source = iter(loaded)
    source_error: list[BaseException] = []

    def feed() -> Iterator[dict[str, Any]]:
        try:
            for item in itertools.chain(retry, source):
                inflight.append(item)
                if item.error is None:
                    yield item.item()
        except Exception as exc:  # our own reader failing: end the stream cleanly, raise after the results
            source_error.append(exc)

    while True:
        stream = feed()
        try:
            for result in estimator.predict_iter(stream, flip=flip):
                while inflight[0].error is not None:
                    yield inflight.popleft(), None
                yield inflight.popleft(), result
        except (ValueError, TypeError) as exc:
            while inflight and inflight[0].error is not None:
                yield inflight.popleft(), None
            if not inflight:  # not an item's fault
                raise
            culprit = inflight.popleft()
            culprit.error = _message(exc)
            log.debug("image %s failed in the estimator: %s", culprit.entry.key, culprit.error)
            yield culprit, None
            retry[:] = list(inflight)
            inflight.clear()
            continue
        finally:
            stream.close()
        while inflight:  # images after the last one run that failed to load
            yield inflight.popleft(), None
        if source_error:
            raise source_error[0]
        return


# ---------------------------------------------------------------------------------------------
# Output rows


class RowBuffer:
    """Output rows of whole images, gathered as arrays and turned into one Arrow table.

    One row per person: image, person (index in the manifest's boxes), box (P, 4) x, y, w, h px
    as given (crop_boxes manifests: the crop box), crop_box (the square the network saw), joints
    (J, 3) x_px, y_px, depth_mm (root-relative without root_depth), camera (J, 3) X, Y, Z mm
    (null without intrinsics), confidence (J,), root_depth mm (null when not given), engine, and
    error (null). An error row has image, error, and person and box when the error is one
    person's; its other columns are null.
    """

    def __init__(self, joints: int, engine_id: str) -> None:
        self.joints, self.engine_id = joints, engine_id
        self.images: list[str] = []
        self.people = self.errors = 0
        self._image: list[str] = []
        self._person: list[int | None] = []
        self._box: list[np.ndarray] = []
        self._box_ok: list[bool] = []
        self._crop: list[np.ndarray] = []
        self._joints: list[np.ndarray] = []
        self._camera: list[np.ndarray] = []
        self._conf: list[np.ndarray] = []
        self._root: list[float | None] = []
        self._error: list[str | None] = []
        self._pose: list[bool] = []
        self._has_camera: list[bool] = []

    def __len__(self) -> int:
        return len(self._image)

    def _row(self, key: str, person: int | None, box: np.ndarray | None, error: str | None) -> None:
        j = self.joints
        self._image.append(key)
        self._person.append(person)
        self._box.append(np.zeros(4) if box is None else np.asarray(box, np.float64))
        self._box_ok.append(box is not None)
        self._error.append(error)
        if error is not None:
            self.errors += 1
            self._crop.append(np.zeros(4))
            self._joints.append(np.zeros((j, 3), np.float32))
            self._camera.append(np.zeros((j, 3), np.float32))
            self._conf.append(np.zeros(j, np.float32))
            self._root.append(None)
            self._pose.append(False)
            self._has_camera.append(False)

    def add(self, loaded: _Loaded, result: Any) -> None:
        """One image's rows: its people's poses (result: the PoseResult of loaded.keep) and its errors."""
        e = loaded.entry
        self.images.append(e.key)
        if loaded.error is not None or result is None:
            self._row(e.key, None, None, loaded.error or "not processed")
            return
        boxes = e.boxes if e.boxes is not None else e.crop_boxes
        root = None if e.root_depth is None else np.broadcast_to(e.root_depth, (e.people,))
        rows = {k: ("pose", n) for n, k in enumerate(loaded.keep)}
        rows.update({k: ("bad", msg) for k, msg in loaded.bad.items()})
        for person in sorted(rows):
            kind, val = rows[person]
            if kind == "bad":
                self._row(e.key, person, boxes[person], val)
                continue
            n = val
            self._row(e.key, person, result.boxes[n], None)
            self.people += 1
            self._crop.append(np.asarray(result.crop_boxes[n], np.float64))
            self._joints.append(np.asarray(result.image[n], np.float32))
            self._conf.append(np.asarray(result.confidence[n], np.float32))
            cam = result.camera
            self._has_camera.append(cam is not None)
            self._camera.append(np.zeros((self.joints, 3), np.float32) if cam is None else
                                np.asarray(cam[n], np.float32))
            self._root.append(None if root is None else float(root[person]))
            self._pose.append(True)

    def table(self) -> Any:
        """The rows as a pyarrow Table with the schema of output_schema(joints)."""
        pa, _ = _pyarrow()
        schema = output_schema(self.joints)
        r = len(self._image)
        pose = np.asarray(self._pose, bool)

        def fixed(values: list[np.ndarray], dtype: Any, shape: tuple[int, ...], valid: np.ndarray, field: str) -> Any:
            flat = np.stack(values).astype(dtype).reshape(-1) if r else np.zeros(0, dtype)
            arr = pa.array(flat)
            for size in reversed(shape[2:]):  # the inner lists; the outer one carries the nulls
                arr = pa.FixedSizeListArray.from_arrays(arr, size)
            mask = pa.array(valid, pa.bool_()).buffers()[1] if r else None
            return pa.Array.from_buffers(schema.field(field).type, r, [mask], children=[arr])

        j = self.joints
        cols = {
            "image": pa.array(self._image, pa.string()),
            "person": pa.array(self._person, pa.int32()),
            "box": fixed(self._box, np.float64, (r, 4), np.asarray(self._box_ok, bool), "box"),
            "crop_box": fixed(self._crop, np.float64, (r, 4), pose, "crop_box"),
            "joints": fixed(self._joints, np.float32, (r, j, 3), pose, "joints"),
            "camera": fixed(self._camera, np.float32, (r, j, 3), np.asarray(self._has_camera, bool), "camera"),
            "confidence": fixed(self._conf, np.float32, (r, j), pose, "confidence"),
            "root_depth": pa.array(self._root, pa.float64()),
            "engine": pa.array([self.engine_id if ok else None for ok in pose], pa.string()),
            "error": pa.array(self._error, pa.string()),
        }
        return pa.table(cols, schema=schema)


def output_schema(joints: int) -> Any:
    """The Arrow schema of the output rows (see RowBuffer)."""
    pa, _ = _pyarrow()
    f32, f64 = pa.float32(), pa.float64()
    return pa.schema([
        pa.field("image", pa.string(), nullable=False), pa.field("person", pa.int32()),
        pa.field("box", pa.list_(f64, 4)), pa.field("crop_box", pa.list_(f64, 4)),
        pa.field("joints", pa.list_(pa.list_(f32, 3), joints)), pa.field("camera", pa.list_(pa.list_(f32, 3), joints)),
        pa.field("confidence", pa.list_(f32, joints)), pa.field("root_depth", f64),
        pa.field("engine", pa.string()), pa.field("error", pa.string())])


# ---------------------------------------------------------------------------------------------
# The output folder: parts committed by rename, resume


@dataclasses.dataclass
class _Done:
    images: set[str]
    people: int
    errors: int
    parts: int
    next_index: int
    # image -> its record hash (Entry.record_hash), None in parts written before hashes were recorded
    records: dict[str, str | None] = dataclasses.field(default_factory=dict)


def _part_meta(path: Path) -> dict[str, Any]:
    _, pq = _pyarrow()
    try:
        meta = pq.read_schema(path).metadata or {}
        doc = json.loads(meta[META_KEY])
        if not (isinstance(doc, dict) and isinstance(doc.get("images"), list)):
            raise ValueError("no image list")
    except Exception as exc:  # pyarrow's exception types, KeyError, ValueError
        raise BatchError(f"part {path} is unreadable or not a cnpose_trt batch part ({type(exc).__name__}: "
                         f"{str(exc)[:200]}): parts are committed whole, so it was damaged or put there by "
                         "something else; delete it and rerun to redo its images") from None
    return doc


def scan_output(out: Path, job: dict[str, Any] | None = None) -> _Done:
    """The images done in out (committed parts), checking that the parts are this job's."""
    done = _Done(set(), 0, 0, 0, 0)
    for path, doc in _parts(out):
        if job is not None and doc.get("job") != job:
            raise BatchError(f"{out} holds the results of another job ({path.name}: {doc.get('job')}; this run: "
                             f"{job}): use another --out, or delete {out} to start over")
        done.images.update(doc["images"])
        records = doc.get("records")
        if not (isinstance(records, list) and len(records) == len(doc["images"])):
            records = [None] * len(doc["images"])
        done.records.update(zip(doc["images"], records, strict=True))
        done.people += int(doc.get("people", 0))
        done.errors += int(doc.get("errors", 0))
        done.parts += 1
        done.next_index = max(done.next_index, _part_index(path) + 1)
    return done


def _part_index(path: Path) -> int:
    m = _PART_NAME.fullmatch(path.name)
    assert m is not None
    return int(m.group(1))


def _parts(out: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The committed parts of out with their footers, in commit order."""
    return [(p, _part_meta(p)) for p in sorted((p for p in out.iterdir() if _PART_NAME.fullmatch(p.name)),
                                               key=_part_index)]


def _superseded(parts: list[tuple[Path, dict[str, Any]]]) -> dict[Path, set[str]]:
    """Images of each part that a later part lists again (redone by --redo-changed or --retry-errors)."""
    owner: dict[str, Path] = {}
    for path, doc in parts:
        owner.update(dict.fromkeys(doc["images"], path))
    stale = {path: {k for k in doc["images"] if owner[k] != path} for path, doc in parts}
    return {path: keys for path, keys in stale.items() if keys}


def _without(table: Any, images: set[str]) -> Any:
    """table less the rows of these images (the old rows of redone images)."""
    pa, _ = _pyarrow()
    import pyarrow.compute as pc

    return table.filter(pc.invert(pc.is_in(table["image"], value_set=pa.array(sorted(images), pa.string()))))


def drop_superseded(out: Path) -> int:
    """Remove the old rows of redone images from the earlier parts that hold them (each such part is
    rewritten and renamed into place, or deleted when nothing of it is left); returns the images
    dropped. Run after the parts that redo them are committed: killed at any point, every image is
    still in a part (the last one that lists it wins in read_results), and the next run finishes."""
    _, pq = _pyarrow()
    from ..cache import _fsync_dir

    dropped = 0
    for path, stale in _superseded(_parts(out)).items():
        doc = _part_meta(path)
        keep = [i for i, k in enumerate(doc["images"]) if k not in stale]
        dropped += len(doc["images"]) - len(keep)
        if not keep:
            path.unlink()
            _fsync_dir(out)
            continue
        table = _without(pq.read_table(path).replace_schema_metadata(None), stale)
        people = table.column("error").null_count
        new = {**doc, "images": [doc["images"][i] for i in keep], "people": people, "errors": table.num_rows - people}
        if isinstance(doc.get("records"), list) and len(doc["records"]) == len(doc["images"]):
            new["records"] = [doc["records"][i] for i in keep]
        _write_part(path, table, new)
    return dropped


def _failed_images(parts: list[tuple[Path, dict[str, Any]]]) -> set[str]:
    """Images whose rows are all error rows (an image without people has no rows: not failed)."""
    _, pq = _pyarrow()
    failed: set[str] = set()
    for path, doc in parts:
        if not doc.get("errors", 1):  # the footer says none (parts of every version count them)
            continue
        table = pq.read_table(path, columns=["image", "error"])
        posed = set(table.filter(table["error"].is_null())["image"].to_pylist())
        failed.update(set(table.filter(table["error"].is_valid())["image"].to_pylist()) - posed)
    return failed


def read_results(out: str | Path) -> Any:
    """All committed rows of an output folder as one pyarrow Table (parts in order), every image once:
    the rows of a redone image are those of the last part that lists it."""
    pa, pq = _pyarrow()
    out = Path(out)
    parts = _parts(out)
    stale = _superseded(parts)
    tables = []
    for path, _ in parts:
        table = pq.read_table(path).replace_schema_metadata(None)
        tables.append(_without(table, stale[path]) if path in stale else table)
    if not tables:
        return output_schema(18).empty_table()
    return pa.concat_tables(tables)


def _write_part(final: Path, table: Any, doc: dict[str, Any]) -> None:
    """Write a part under a temporary name, fsync, rename into place (replacing a part only when
    drop_superseded rewrites it)."""
    from ..cache import install_file

    _, pq = _pyarrow()
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    table = table.replace_schema_metadata({META_KEY: json.dumps(doc).encode()})
    try:
        pq.write_table(table, tmp, compression="zstd")
        install_file(tmp, final)  # fsync, rename, fsync the folder
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class PartWriter:
    """Commits whole images in parts: write a temporary file, fsync, rename (on a background thread,
    at most one commit in flight). A part is committed when it holds part_images images or
    part_seconds have passed since the last commit."""

    def __init__(self, out: Path, next_index: int, job: dict[str, Any], joints: int, engine_id: str,
                 part_images: int, part_seconds: float) -> None:
        self.out, self.index, self.job = out, next_index, job
        self.joints, self.engine_id = joints, engine_id
        self.part_images, self.part_seconds = part_images, part_seconds
        self.parts = self.people = self.errors = self.images = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cnpose-batch-write")
        self._inflight: Future[None] | None = None
        self._started = time.monotonic()
        self._reset()

    def _reset(self) -> None:
        self._rows = RowBuffer(self.joints, self.engine_id)
        self._tables: list[Any] = []
        self._keys: list[str] = []
        self._records: list[str] = []
        self._people = self._errors = 0

    def add(self, loaded: _Loaded, result: Any) -> tuple[int, int]:
        """One image's rows; returns its (people, error rows)."""
        before = (self._rows.people, self._rows.errors)
        self._rows.add(loaded, result)
        self._keys.append(loaded.entry.key)
        self._records.append(loaded.entry.record_hash())
        people, errors = self._rows.people - before[0], self._rows.errors - before[1]
        self._people += people
        self._errors += errors
        self._maybe_commit()
        return people, errors

    def add_table(self, keys: list[str], table: Any, records: list[str]) -> tuple[int, int]:
        """Rows of whole images made elsewhere (Ray workers): keys lists every image, people or not,
        records their record hashes. Returns the (people, error rows) of the table."""
        if len(records) != len(keys):
            raise BatchError(f"{len(keys)} images came back with {len(records)} record hashes")
        self._tables.append(table)
        self._keys.extend(keys)
        self._records.extend(records)
        people = table.column("error").null_count  # a row without an error is a person
        errors = table.num_rows - people
        self._people += people
        self._errors += errors
        self._maybe_commit()
        return people, errors

    def _maybe_commit(self) -> None:
        if len(self._keys) >= self.part_images or (
                self._keys and time.monotonic() - self._started >= self.part_seconds):
            self.commit()

    def commit(self) -> None:
        """Hand the gathered images to the writer thread (waits for the previous commit first)."""
        self.wait()
        if not self._keys:
            return
        pa, _ = _pyarrow()
        tables = [*self._tables, self._rows.table()] if len(self._rows) or not self._tables else self._tables
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        doc = {"format": PART_FORMAT, "job": self.job, "images": self._keys, "records": self._records,
               "people": self._people, "errors": self._errors}
        self._inflight = self._pool.submit(self._write, self.index, table, doc)
        self.index += 1
        self.parts += 1
        self.images += len(self._keys)
        self.people += self._people
        self.errors += self._errors
        self._reset()
        self._started = time.monotonic()

    def _write(self, index: int, table: Any, doc: dict[str, Any]) -> None:
        final = self.out / f"part-{index:06d}.parquet"
        if final.exists():  # never overwrite a committed part (the folder is locked: cannot happen)
            raise BatchError(f"part {final} exists already")
        _write_part(final, table, doc)

    def wait(self) -> None:
        if self._inflight is not None:
            fut, self._inflight = self._inflight, None
            fut.result()

    def close(self, commit: bool = True) -> None:
        """Commit what is gathered (commit=False drops it: it is redone on resume) and stop the thread."""
        try:
            if commit:
                self.commit()
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# Progress and summary


class Progress(Bar):
    """The batch job's bar: images, with people and errors counted beside the rate."""

    def __init__(self, total: int, enabled: bool = True, stream: Any = None) -> None:
        super().__init__(total, unit="images", counters=("people", "errors"), enabled=enabled, stream=stream,
                         interval=0.5)

    @property
    def images(self) -> int:
        return self.done

    @property
    def people(self) -> int:
        return self.counts["people"]

    @property
    def errors(self) -> int:
        return self.counts["errors"]

    def update(self, images: int = 1, people: int = 0, errors: int = 0) -> None:  # type: ignore[override]
        super().update(images, people=people, errors=errors)


@dataclasses.dataclass
class Summary:
    """What a batch job did. images/people/errors: in the whole output folder; this_run_*: this run."""

    out: str
    engine: str
    images: int
    people: int
    errors: int
    parts: int
    this_run_images: int
    this_run_people: int
    this_run_errors: int
    skipped: int
    seconds: float
    images_per_s: float
    mode: str
    redone: int = 0  # of this run's images, those done before (--redo-changed, --retry-errors)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def text(self) -> str:
        return (f"{self.this_run_images} images ({self.images_per_s:.1f} img/s, {self.mode}), "
                f"{self.this_run_people} people, {self.this_run_errors} error rows this run"
                f"{f' ({self.redone} images redone)' if self.redone else ''}; {self.skipped} images "
                f"already done were skipped. {self.out}: {self.images} images, {self.people} people, "
                f"{self.errors} error rows in {self.parts} parts"
                + ("; rerun with --retry-errors to redo the images whose rows are all errors (e.g. a missing file "
                   "since restored)" if self.errors else ""))


# ---------------------------------------------------------------------------------------------
# Engines


@dataclasses.dataclass
class EngineOptions:
    """How to get the engine, as `build` takes it: a built engine file, or a variant (+ checkpoint)
    built or reused from the cache with these options."""

    engine: str | Path | None = None
    variant: str = "XS"
    checkpoint: str | Path | None = None
    precision: str = "fp32"
    backend: str = "auto"
    max_batch: int = 32
    engine_dir: str | Path | None = None

    def build_kwargs(self) -> dict[str, Any]:
        """build_engine's arguments, paths absolute (Ray workers build from them in another folder)."""
        return {"variant": self.variant,
                "checkpoint": None if self.checkpoint is None else os.path.abspath(self.checkpoint),
                "backend": self.backend, "precision": self.precision, "max_batch": self.max_batch,
                "out_dir": None if self.engine_dir is None else os.path.abspath(self.engine_dir)}

    def request(self) -> EngineRequest:
        """The engine file given, or a build of the variant (paths absolute), as runtime.open_engine takes it."""
        if self.engine is not None:
            return EngineRequest(engine=self.engine)
        return EngineRequest(build=BuildConfig(**self.build_kwargs()))

    def resolve(self, progress: Callable[[str], None] | None = None) -> Path:
        """The engine file: the given one, or built (or reused) by build_engine."""
        return engine_path(self.request(), progress)


def engine_id(engine: Any) -> str:
    """The id written with every row: the engine file's name (its cache key and sha256 prefixes)."""
    return Path(engine.path).name


def _engine_files(engine_path: Path) -> dict[str, bytes]:
    """The engine file and its sidecar, by name: what is shipped to Ray workers."""
    from ..cache import sidecar_path
    from ..runtime.engine import read_sidecar

    meta = read_sidecar(engine_path)
    side = sidecar_path(engine_path)
    return {side.name: side.read_bytes(), meta["engine_file"]: side.with_name(meta["engine_file"]).read_bytes()}


def install_shipped_engine(files: dict[str, bytes], folder: Path | None = None) -> Path:
    """Write shipped engine files into a per-node folder (atomically; shared by the actors of a
    node) and return the sidecar path to load. The folder is named after the engine file's bytes."""
    from ..cache import atomic_write

    engine_name = next(n for n in files if not n.endswith(".json"))
    digest = hashlib.sha256(files[engine_name]).hexdigest()[:16]
    folder = (folder or Path(tempfile.gettempdir()) / "cnpose_trt-shipped-engines") / digest
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        target = folder / name
        if not (target.is_file() and target.stat().st_size == len(data)):
            atomic_write(target, data)
    return folder / next(n for n in files if n.endswith(".json"))


# ---------------------------------------------------------------------------------------------
# Ray


class RayPredictor:
    """Ray Data UDF: loads the engine once per actor; a batch of entries -> one row holding the
    batch's image keys and its output rows (Arrow IPC), which the driver commits."""

    def __init__(self, engine: dict[str, Any], flip: bool, readers: int, threads: int | None, device: str | None,
                 spinning: bool | None = None) -> None:
        from ..pipeline.estimator import PoseEstimator
        from ..runtime.engine import load_engine

        options: dict[str, Any] = {}
        if engine["mode"] == "ship":
            import ray

            path = install_shipped_engine(ray.get(engine["files"]))
        else:
            path = engine_path(EngineRequest(build=BuildConfig(**engine["build"])))
        from ..runtime.engine import read_sidecar

        takes = backends.get(read_sidecar(path)["backend"]).LOAD_OPTIONS
        given = {"threads": threads or None, "spinning": spinning, "device": device or None}
        options.update({k: v for k, v in given.items() if k in takes and v is not None})
        self.engine = load_engine(path, **options)
        self.estimator = PoseEstimator(self.engine)
        self.flip, self.readers = flip, readers
        self.pool = ThreadPoolExecutor(readers, thread_name_prefix="cnpose-read")
        self.engine_id = engine_id(self.engine)

    def __call__(self, batch: Any) -> Any:
        pa, _ = _pyarrow()
        entries = [Entry.from_json(t) for t in batch.column("entry").to_pylist()]
        rows = RowBuffer(self.engine.spec.joints, self.engine_id)
        window = 2 * self.readers + self.estimator.max_batch
        unseen: list[str] = []  # files this worker cannot open: the driver checks whether it can
        for loaded, result in estimate_stream(self.estimator, read_ahead(self.pool, entries, window), self.flip):
            rows.add(loaded, result)
            if loaded.image is None and not os.access(loaded.entry.path, os.R_OK):
                unseen.append(loaded.entry.path)
        sink = pa.BufferOutputStream()
        table = rows.table()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return pa.table({"images": pa.array([rows.images], pa.list_(pa.string())),
                         "records": pa.array([[e.record_hash() for e in entries]], pa.list_(pa.string())),
                         "unseen": pa.array([unseen], pa.list_(pa.string())),
                         "node": pa.array([socket.gethostname()], pa.string()),
                         "rows": pa.array([sink.getvalue().to_pybytes()], pa.binary())})


def _check_unseen(paths: list[str], node: str) -> None:
    """Images a worker could not open: the job fails when this process can read one of them (the
    workers do not see the files the manifest names), instead of ending with error rows for all."""
    for path in paths:
        if os.access(path, os.R_OK):
            raise BatchError(f"a Ray worker on {node} cannot read {path}, which this process reads: every node "
                             "must see the images at the manifest's paths (a shared file system)")


def _ray_rows(blob: bytes) -> Any:
    pa, _ = _pyarrow()
    with pa.ipc.open_stream(pa.py_buffer(blob)) as reader:
        return reader.read_all()


# ---------------------------------------------------------------------------------------------
# The job


def _check_positive(name: str, value: Any, kind: type = int) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)
    if not ok or (kind is int and not isinstance(value, int)):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'} > 0, got {value!r}")


@dataclasses.dataclass
class _Plan:
    """What a run does: the manifest's images, those to do, and of those the ones done before and redone."""

    total: int
    todo: int
    redo: set[str]              # images done before and redone (changed records, --retry-errors)
    unknown: int                # images done by parts that recorded no record hashes: kept unchecked


def _prepass(manifest_args: dict[str, Any], done: _Done, redo_changed: bool = False,
             failed: set[str] | None = None) -> _Plan:
    """Read the whole manifest once before any work: every record checked (a ManifestError stops the
    job before it starts), no image listed twice, and each done image's record compared with the
    one its poses were computed from (a change stops the job unless redo_changed). failed: images
    to redo because their rows are all errors (--retry-errors)."""
    seen: set[str] = set()
    todo = unknown = 0
    redo: set[str] = set()
    changed: list[Entry] = []
    for entry in read_manifest(**manifest_args):
        if entry.key in seen:
            first = next(e.where for e in read_manifest(**manifest_args) if e.key == entry.key)
            raise ManifestError(f"{entry.where}, field 'image': {entry.key!r} is listed again (first at "
                                f"{first}); every image appears once, with all its boxes")
        seen.add(entry.key)
        if entry.key not in done.images:
            todo += 1
            continue
        record = done.records.get(entry.key)
        if record is None:
            unknown += 1
        elif record != entry.record_hash():
            changed.append(entry)
            if redo_changed:
                redo.add(entry.key)
        if failed is not None and entry.key in failed:
            redo.add(entry.key)
    if changed and not redo_changed:
        e = changed[0]
        raise BatchError(f"{e.where}: the record of {e.key!r} changed since its poses were computed (its boxes, "
                         f"root_depth or intrinsics; {len(changed)} image{'s' * (len(changed) > 1)} in all): rerun "
                         "with --redo-changed to redo them, or use another --out")
    return _Plan(len(seen), todo + len(redo), redo, unknown)


def run(manifest: str | Path, out: str | Path, *, engine: Any = None, variant: str = "XS",
        checkpoint: str | Path | None = None, precision: str = "fp32", backend: str = "auto", max_batch: int = 32,
        engine_dir: str | Path | None = None, flip: bool = False, format: str = "auto",
        image_root: str | Path | None = None, score_threshold: float = 0.5, category_id: int | None = None,
        readers: int | None = None, part_images: int = 1024, part_seconds: float = 60.0, progress: bool | None = None,
        ray: str | bool | None = None, ray_actors: int | None = None, ray_cpus_per_actor: float = 1,
        ray_gpus_per_actor: float | None = None, ray_batch_size: int = 64, ray_engine: str = "auto",
        redo_changed: bool = False, retry_errors: bool = False, threads: int | None = None,
        spinning: bool | None = None, say: Callable[[str], None] | None = None) -> Summary:
    """3D poses of every person in a manifest, into Parquet parts in `out`; resumes a killed job.

    Args:
        manifest, format, image_root, score_threshold, category_id: see read_manifest.
        out: output folder (created). Rerun with the same folder to resume: images in committed
            parts are skipped. A folder holding another job's results (other engine or flip) is
            refused, and so is an image whose manifest record changed since its poses were made.
        engine: an engine file, or a loaded Engine (local runs); else variant, checkpoint,
            precision, backend, max_batch, engine_dir as build_engine takes them.
        flip: the flip test.
        readers: threads reading and decoding images ahead of the engine (default: local runs half
            the CPU cores, at most 8; Ray actors their CPUs, at least 4 on a GPU).
        part_images, part_seconds: a part is committed every part_images images or part_seconds
            seconds, whichever comes first (a killed job redoes at most that much).
        progress: progress on stderr (default on: a bar on a terminal, else a line at least every 5 s).
        ray: None for a local run; True or "" for Ray's default cluster (RAY_ADDRESS, or a new
            local one), or a cluster address. A Ray session already initialised is used as it is.
        ray_actors: actor pool size (default: as many as the cluster's GPUs, or CPUs, allow).
        ray_cpus_per_actor: CPUs per actor (also the onnxruntime threads of each actor).
        ray_gpus_per_actor: GPUs per actor (default 1 for TensorRT engines and for torch engines on
            a cluster with GPUs, else 0).
        ray_batch_size: images per Ray Data batch (one actor call).
        ray_engine: "ship" (the engine file built here is sent to every worker), "build" (each
            worker builds it from the same options: TensorRT engines are GPU-specific), or "auto"
            (build for TensorRT, else ship).
        redo_changed: redo the done images whose record (boxes, root_depth, intrinsics) changed
            instead of refusing the run; their old rows are replaced.
        retry_errors: redo the done images whose rows are all error rows (a file missing or
            unreadable then); their old rows are replaced.
        threads, spinning: the engine's session options (load_engine's: ONNX Runtime intra-op threads,
            0 one per core, and whether idle threads spin; None: the defaults, and on Ray an onnxruntime
            actor's threads are its CPUs). Not for an Engine passed in loaded.
        say: where progress messages (engine build) go.
    Returns:
        the Summary (also written to out/_summary.json).
    Raises:
        ManifestError: a bad manifest record (before any work). BatchError: the output folder
        cannot be used. EngineError/BuildError: the engine. ValueError: bad arguments.
    """
    _pyarrow()
    from ..backends import session_options

    load_options = session_options(threads, spinning)
    if load_options and engine is not None and not isinstance(engine, (str, Path)):
        raise ValueError(f"{' and '.join(load_options)} apply where batch loads the engine; pass them to "
                         "load_engine for an Engine that is already loaded")
    if readers is not None:
        _check_positive("readers", readers)
    _check_positive("part_images", part_images)
    _check_positive("part_seconds", part_seconds, float)
    _check_positive("ray_batch_size", ray_batch_size)
    if ray_engine not in ("auto", "ship", "build"):
        raise ValueError(f"ray_engine must be auto, ship or build, got {ray_engine!r}")
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be fp32 or fp16 (build an int8 engine with `cnpose-trt build --int8 ...` "
                         f"and pass it as the engine), got {precision!r}")
    say = say or (lambda msg: log.info("%s", msg))
    manifest_args = {"path": manifest, "format": format, "image_root": image_root,
                     "score_threshold": score_threshold, "category_id": category_id}
    manifest_format(manifest, format)
    if not Path(manifest).is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BatchError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    from ..cache import file_lock

    try:
        with file_lock(out / LOCK_FILE, blocking=False):
            return _run_locked(out, manifest_args, engine, EngineOptions(
                None, variant, checkpoint, precision, backend, max_batch, engine_dir), flip, readers, part_images,
                part_seconds, progress, ray, ray_actors, ray_cpus_per_actor, ray_gpus_per_actor, ray_batch_size,
                ray_engine, bool(redo_changed), bool(retry_errors), say, load_options)
    except BlockingIOError:
        raise BatchError(f"another batch job is writing to {out} (its lock {out / LOCK_FILE} is held)") from None


def _run_locked(out: Path, manifest_args: dict[str, Any], engine: Any, opts: EngineOptions, flip: bool,
                readers: int | None, part_images: int, part_seconds: float, progress: bool | None, ray: Any,
                ray_actors: int | None, ray_cpus: float, ray_gpus: float | None, ray_batch: int, ray_engine: str,
                redo_changed: bool, retry_errors: bool, say: Callable[[str], None],
                load_options: dict[str, Any] | None = None) -> Summary:
    from ..runtime.engine import Engine, load_engine, read_sidecar

    for tmp in out.iterdir():  # a killed run's uncommitted part: its images were never done
        if _TEMP_NAME.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)
    loaded_engine: Engine | None = engine if isinstance(engine, Engine) else None
    engine_path: Path | None = None
    use_ray = ray is not None and ray is not False
    if loaded_engine is None:
        opts.engine = engine
        backend = opts.backend
        if use_ray and ray_engine == "auto":  # TensorRT engines are built for one GPU model: on the workers
            ray_engine = "build" if engine is None and not _capability(backend, "PORTABLE_ENGINE", True) else "ship"
        if use_ray and ray_engine == "build":
            if engine is not None:
                raise ValueError("ray_engine='build' builds from the variant options; an engine file is shipped")
        else:
            engine_path = opts.resolve(say)
    elif use_ray:
        engine_path = Path(loaded_engine.path)
    meta = read_sidecar(engine_path) if engine_path is not None else getattr(loaded_engine, "meta", None)
    flip = _flip_rule(meta, opts, flip, say)
    if engine_path is not None:
        job = {"engine": meta["engine_file"], "flip": bool(flip)}
        if meta.get("weights", {}).get("random"):
            say("warning: the engine uses random weights: the poses are meaningless; pass a checkpoint for real ones")
    elif loaded_engine is not None:
        job = {"engine": engine_id(loaded_engine), "flip": bool(flip)}
    else:
        kw = opts.build_kwargs()
        job = {"engine": "build:" + ",".join(f"{k}={kw[k]}" for k in ("variant", "checkpoint", "precision", "backend",
                                                                       "max_batch")), "flip": bool(flip)}
    scan_output(out, job)  # refuses another job's folder before anything in it is touched
    drop_superseded(out)  # a run killed after redoing images, before it removed their old rows
    done = scan_output(out, job)
    plan = _prepass(manifest_args, done, redo_changed, _failed_images(_parts(out)) if retry_errors else None)
    total, todo = plan.total, plan.todo
    if plan.unknown:
        say(f"{plan.unknown} done images are in parts written before records were hashed: kept as done without "
            f"checking their records (use another --out to redo them)")
    say(f"{total} images in the manifest, {total - todo} already done in {out}, {todo} to do"
        + (f" ({len(plan.redo)} of them redone)" if plan.redo else ""))
    bar = Progress(todo, enabled=True if progress is None else progress)
    started = time.perf_counter()
    try:
        entries = (e for e in read_manifest(**manifest_args) if e.key not in done.images or e.key in plan.redo)
        if use_ray:
            writer, mode = _run_ray(out, entries, done, job, opts, engine_path, flip, readers, part_images,
                                    part_seconds, bar, "" if ray is True else str(ray), ray_actors, ray_cpus,
                                    ray_gpus, ray_batch, ray_engine, todo, load_options or {})
        else:
            if loaded_engine is None:
                assert engine_path is not None
                loaded_engine = load_engine(engine_path, **(load_options or {}))
            # On a CPU engine the readers take cores from it: more threads than half the cores slowed the whole
            # job down on a 2-core machine (benchmarks/test_batch.py); a GPU engine leaves the cores to them.
            local_readers = readers or max(1, min(8, (os.cpu_count() or 2) // 2))
            writer = _run_local(out, entries, done, job, loaded_engine, flip, local_readers, part_images, part_seconds,
                                bar)
            mode = "local"
    finally:
        bar.close()  # stops its ticker however the job ends
    seconds = time.perf_counter() - started
    if plan.redo:
        drop_superseded(out)
    final = scan_output(out, job)
    summary = Summary(str(out), job["engine"], len(final.images), final.people, final.errors, final.parts,
                      writer.images, writer.people, writer.errors, total - todo, round(seconds, 3),
                      round(writer.images / seconds, 2) if seconds > 0 else 0.0, mode, len(plan.redo))
    from ..cache import write_json

    write_json(out / SUMMARY_FILE, summary.to_dict())
    return summary


def _capability(backend: str, name: str, default: Any) -> Any:
    """A named backend's capability (backends/*_backend.py); `default` for "auto", which has none yet."""
    return getattr(backends.get(backend), name) if backend in backends.NAMES else default


def _flip_rule(meta: dict[str, Any] | None, opts: EngineOptions, flip: bool, say: Callable[[str], None]) -> bool:
    """shipped.flip_for on the job's engine (its metadata, or, for engines the Ray workers build, the
    checkpoint file), saying so when a requested flip test is turned off."""
    from ..shipped import flip_for, is_shipped_checkpoint, record

    if meta is None and is_shipped_checkpoint(opts.checkpoint):
        meta = {"weights": {"sha256": record()["weights_sha256"]}}
    flip, notice = flip_for(meta, flip)
    if notice:
        say(notice)
    return flip


def _run_local(out: Path, entries: Iterator[Entry], done: _Done, job: dict[str, Any], engine: Any, flip: bool,
               readers: int, part_images: int, part_seconds: float, bar: Progress) -> PartWriter:
    from ..pipeline.estimator import PoseEstimator

    estimator = PoseEstimator(engine)
    writer = PartWriter(out, done.next_index, job, engine.spec.joints, engine_id(engine), part_images, part_seconds)
    ok = False
    try:
        with ThreadPoolExecutor(readers, thread_name_prefix="cnpose-read") as pool:
            # A batch of images beyond the estimator's own look-ahead, so a slow file delays no batch.
            window = 2 * readers + estimator.max_batch
            stream = estimate_stream(estimator, read_ahead(pool, entries, window), flip)
            for loaded, result in stream:
                raise_if_stopped()  # a Ctrl-C that library code swallowed stops the run before this image is kept
                bar.update(1, *writer.add(loaded, result))
        raise_if_stopped()
        ok = True
    finally:
        # An interrupted run drops the images gathered since the last commit (redone on resume).
        writer.close(commit=ok)
    return writer


def _run_ray(out: Path, entries: Iterator[Entry], done: _Done, job: dict[str, Any], opts: EngineOptions,
             engine_path: Path | None, flip: bool, readers: int | None, part_images: int, part_seconds: float,
             bar: Progress, address: str, actors: int | None, cpus: float, gpus: float | None, batch_size: int,
             ray_engine: str, todo: int, load_options: dict[str, Any]) -> tuple[PartWriter, str]:
    try:
        import ray
        import ray.data
    except ImportError:
        raise BatchError("--ray needs Ray Data: pip install 'cnpose_trt[ray]'") from None
    pa, _ = _pyarrow()
    from ..runtime.engine import read_sidecar

    if todo == 0:  # nothing left: no cluster needed
        writer = PartWriter(out, done.next_index, job, 18, job["engine"], part_images, part_seconds)
        writer.close()
        return writer, "ray, nothing to do"
    started_here = not ray.is_initialized()
    watchdog = None
    if started_here:
        before = set(_ray_processes().items())
        watchdog = _start_watchdog()  # a kill -9 of this process leaves no cluster behind
        try:  # a Ctrl-C waits for ray.init, then the session (and a local cluster) is shut down
            held_stops(ray.init, address=address or None, include_dashboard=False, log_to_driver=False,
                       configure_logging=False)
        except BaseException:
            _shutdown_ray(ray, before)
            _stop_watchdog(watchdog)
            raise
    try:
        resources = ray.cluster_resources()
        if ray_engine == "ship":
            assert engine_path is not None
            meta = read_sidecar(engine_path)
            backend = meta["backend"]
            spec_joints = int(meta["spec"].get("joints", 18))
            engine_spec: dict[str, Any] = {"mode": "ship", "files": ray.put(_engine_files(engine_path))}
            eid = job["engine"]
        else:
            from ..spec import get_spec

            backend = opts.backend
            spec_joints = get_spec(opts.variant).joints
            engine_spec = {"mode": "build", "build": opts.build_kwargs()}
            eid = job["engine"]
        if gpus is None:
            gpu = _capability(backend, "GPU", "never")
            gpus = 1.0 if gpu == "required" or (gpu == "optional" and resources.get("GPU", 0) > 0) else 0.0
        if actors is None:
            actors = int(resources.get("GPU", 0) // gpus) if gpus > 0 else int(resources.get("CPU", 1) // cpus)
            actors = max(1, actors)
        _check_positive("ray_actors", actors)
        threads = load_options.get("threads") or max(1, int(cpus))
        device = "cuda" if gpus > 0 else "cpu"
        # Ray Data gives each actor task whole blocks (then calls the UDF on batch_size images at a time):
        # about four blocks per actor spread the work, at most 4096 entries each.
        block_rows = max(1, min(4096, math.ceil(todo / (4 * actors))))
        tables = []
        chunk: list[Entry] = []
        for entry in itertools.chain(entries, [None]):
            if entry is not None:
                chunk.append(entry)
            if chunk and (entry is None or len(chunk) >= block_rows):
                tables.append(pa.table({"key": [e.key for e in chunk], "entry": [e.to_json() for e in chunk]}))
                chunk = []
        writer = PartWriter(out, done.next_index, job, spec_joints, eid, part_images, part_seconds)
        if not tables:
            writer.close()
            return writer, f"ray, {actors} actors"
        ctx = ray.data.DataContext.get_current()
        bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # ours counts images; restored below
        ds = ray.data.from_arrow(tables).map_batches(
            RayPredictor, batch_size=batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=gpus or None,
            fn_constructor_kwargs={"engine": engine_spec, "flip": flip,
                                   "readers": readers or (max(4, threads) if gpus else threads), "threads": threads,
                                   "device": device, "spinning": load_options.get("spinning")})
        del tables
        ok = False
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for keys, records, blob, unseen, node in zip(
                        batch.column("images").to_pylist(), batch.column("records").to_pylist(),
                        batch.column("rows").to_pylist(), batch.column("unseen").to_pylist(),
                        batch.column("node").to_pylist(), strict=True):
                    raise_if_stopped()
                    _check_unseen(unseen, node)
                    bar.update(len(keys), *writer.add_table(keys, _ray_rows(blob), records))
            raise_if_stopped()
            ok = True
        finally:
            ctx.enable_progress_bars = bars
            writer.close(commit=ok)
        return writer, f"ray, {actors} actors x {cpus:g} CPU{f' x {gpus:g} GPU' if gpus else ''}"
    finally:
        if started_here:
            _shutdown_ray(ray, before)
            _stop_watchdog(watchdog)


def _ray_processes() -> dict[int, bytes]:
    """This process's descendants that run Ray (pid -> start time)."""
    return ray_descendants(os.getpid())


def _start_watchdog() -> subprocess.Popen[bytes] | None:
    """The watchdog that ends the cluster's processes if this process dies without ending them (watchdog.py)."""
    start = start_time(os.getpid())
    if start is None:  # no /proc: nothing to watch with
        return None
    return subprocess.Popen([sys.executable, "-m", "cnpose_trt.batch.watchdog", str(os.getpid()), start.decode()],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop_watchdog(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def _shutdown_ray(ray: Any, before: set[tuple[int, bytes]], grace: float = 10.0) -> None:
    """ray.shutdown() (not cut by a Ctrl-C: held until it is done), then wait for the Ray processes
    started since `before` (a local cluster's raylet, GCS, agents, workers) to exit, killing those
    left after `grace` seconds: ray.shutdown returns before they are gone, and an interrupted
    start-up left some that it did not stop."""
    ours = {pid: t for pid, t in _ray_processes().items() if (pid, t) not in before}
    held_stops(ray.shutdown)
    deadline = time.monotonic() + grace
    while ours:
        ours = {pid: t for pid, t in ours.items() if alive(pid, t)}
        if not ours:
            break
        if time.monotonic() > deadline:
            for pid in ours:
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)
            break
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Command line


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """The `cnpose-trt batch` options."""
    from ..backends import BACKENDS, DEFAULT_MAX_BATCH
    from ..spec import VARIANTS

    p.add_argument("manifest", type=Path, help="JSON Lines, CSV or Parquet (image, boxes or crop_boxes, optional "
                   "root_depth, intrinsics), or COCO detections (.json) with --image-root")
    p.add_argument("--out", type=Path, required=True, help="output folder: Parquet parts, _summary.json; rerun "
                   "with the same folder to resume")
    p.add_argument("--format", choices=FORMATS, default="auto", help="manifest format (default: from the suffix)")
    p.add_argument("--image-root", type=Path, default=None,
                   help="folder relative image paths are resolved against; COCO: the image folder "
                        "(default: the manifest's folder)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="COCO: minimum detection score (default 0.5)")
    p.add_argument("--category-id", type=int, default=None,
                   help="COCO: the person category (default: the file's 'person' category, else 1)")
    e = p.add_argument_group("engine (as `build`)")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--engine", type=Path, help="a built engine (file or .json sidecar)")
    g.add_argument("--variant", type=str.upper, choices=list(VARIANTS), default="XS",
                   help="build (or reuse) this variant's engine (default XS)")
    e.add_argument("--checkpoint", type=Path, help="weights for --variant (default: random)")
    e.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="fp32 or fp16 (default fp32; int8: build it with `cnpose-trt build --int8` and pass --engine)")
    e.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="default auto: tensorrt where TensorRT and a GPU are present, else onnxruntime")
    e.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help=f"default {DEFAULT_MAX_BATCH}")
    e.add_argument("--engines", type=Path, default=None, help="engine cache folder (default ./engines)")
    p.add_argument("--flip", action="store_true", help="flip test: average with the mirrored crop")
    p.add_argument("--readers", type=int, default=None,
                   help="threads reading and decoding images ahead (default: half the CPU cores, at most 8; "
                        "Ray: the actor's CPUs, at least 4 with a GPU)")
    from ..backends import add_session_arguments

    add_session_arguments(e)
    p.add_argument("--part-images", type=int, default=1024, help="images per Parquet part (default 1024)")
    p.add_argument("--part-seconds", type=float, default=60.0,
                   help="commit a part at least this often (default 60 s): the most a killed job redoes")
    p.add_argument("--redo-changed", action="store_true",
                   help="redo the done images whose manifest record (boxes, root_depth, intrinsics) changed since "
                        "(without it such a rerun is refused); their old rows are replaced")
    p.add_argument("--retry-errors", action="store_true",
                   help="redo the done images whose rows are all errors (missing or unreadable then); their old "
                        "rows are replaced")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    r = p.add_argument_group("Ray (pip install 'cnpose_trt[ray]')")
    r.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster with Ray Data: ADDRESS (e.g. auto, ray://head:10001), or none for "
                        "$RAY_ADDRESS or a new local cluster")
    r.add_argument("--ray-actors", type=int, default=None,
                   help="actor pool size (default: the cluster's GPUs, or CPUs / --ray-cpus-per-actor)")
    r.add_argument("--ray-cpus-per-actor", type=float, default=1.0,
                   help="CPUs per actor, also its onnxruntime threads unless --threads says (default 1)")
    r.add_argument("--ray-gpus-per-actor", type=float, default=None,
                   help="GPUs per actor (default 1 for TensorRT, and torch on a cluster with GPUs; else 0)")
    r.add_argument("--ray-batch-size", type=int, default=64, help="images per actor call (default 64)")
    r.add_argument("--ray-engine", choices=("auto", "ship", "build"), default="auto",
                   help="ship the engine built here to the workers, or build it on each (default: build for "
                        "TensorRT, which is GPU-specific; else ship)")


def run_batch(args: argparse.Namespace) -> int:
    """Run `cnpose-trt batch` from parsed arguments; prints the summary. 0 when the job completed
    (error rows included: see the summary), 2 for bad input or a failed step."""
    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.ray is not None and logging.getLogger().getEffectiveLevel() > logging.INFO:
        # Ray Data logs every execution plan at INFO (configured when it is imported): our progress line says it.
        with contextlib.suppress(ImportError):
            import ray.data  # noqa: F401

            logging.getLogger("ray.data").setLevel(logging.WARNING)
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"

    try:
        summary = run(args.manifest, args.out, engine=args.engine, variant=args.variant or "XS",
                      checkpoint=args.checkpoint, precision=args.precision, backend=args.backend,
                      max_batch=args.max_batch, engine_dir=args.engines, flip=args.flip, format=args.format,
                      image_root=args.image_root, score_threshold=args.score_threshold,
                      category_id=args.category_id, readers=args.readers, part_images=args.part_images,
                      part_seconds=args.part_seconds, progress=not args.no_progress, ray=args.ray,
                      ray_actors=args.ray_actors, ray_cpus_per_actor=args.ray_cpus_per_actor,
                      ray_gpus_per_actor=args.ray_gpus_per_actor, ray_batch_size=args.ray_batch_size,
                      ray_engine=args.ray_engine, redo_changed=args.redo_changed,
                      retry_errors=args.retry_errors, threads=args.threads, spinning=args.spinning, say=say)
    except (CnposeError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror}: {exc.filename}" if exc.filename and exc.strerror else f"error: {exc}",
              file=sys.stderr)
        return 2
    print(summary.text())
    print(json.dumps(summary.to_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cnpose_trt.batch` (the same as `cnpose-trt batch`)."""
    parser = argparse.ArgumentParser(prog="python -m cnpose_trt.batch", description=__doc__.split("\n")[0])
    add_batch_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    from ..interrupts import run_command

    return run_command(run_batch, args)


if __name__ == "__main__":
    sys.exit(main())

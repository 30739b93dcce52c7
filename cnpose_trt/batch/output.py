"""A job's output folder: rows of whole images as Arrow tables, committed in Parquet parts, read back.

The folder holds Parquet parts with one row per person (see RowBuffer, OUTPUT_COLUMNS), error rows
for unreadable images and bad boxes, and `_summary.json`. A part holds whole images and is the unit
of commit: PartWriter writes it under a temporary name and renames it into place, and its footer
lists its images (people or not) with their record hashes and the job that made them. scan_output
reads the footers back (what a resume skips), drop_superseded and read_results keep the rows of a
redone image from its last part only; Progress and Summary say what a run did.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import _fsync_dir, install_file
from ..errors import BatchError, need_pyarrow
from ..progress import Bar
from .stream import _Loaded

OUTPUT_COLUMNS = ("image", "person", "box", "crop_box", "joints", "camera", "confidence", "root_depth", "engine",
                  "error", "video", "frame", "root_source")
META_KEY = b"cnpose_trt.batch"
PART_FORMAT = 1
SUMMARY_FILE = "_summary.json"  # '_' and '.' prefixes: Parquet readers of the folder skip these files
LOCK_FILE = ".lock"
_PART_NAME = re.compile(r"part-(\d{6,})\.parquet")
_TEMP_NAME = re.compile(r"\.part-\d{6,}\.parquet\.\d+\.tmp")


class RowBuffer:
    """Output rows of whole images, gathered as arrays and turned into one Arrow table.

    One row per person: image, person (index in the manifest's boxes), box (P, 4) x, y, w, h px
    as given (crop_boxes manifests: the crop box), crop_box (the square the network saw), joints
    (J, 3) x_px, y_px, depth_mm (root-relative without root_depth), camera (J, 3) X, Y, Z mm
    (null without intrinsics), confidence (J,), root_depth mm (null when not given), engine, and
    error (null). An error row has image, error, and person and box when the error is one
    person's; its other columns are null. Video frames: video (as the manifest names it) and frame
    (0 is the first), null for images; their `image` is the frame's key, "clip.mp4#12".
    root_source: where root_depth came from, "given" (the manifest), "rootnet" or "prior" (the job's
    rootnet; root_depth is then the estimate), null when depths are root-relative.
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
        self._video: list[str | None] = []
        self._frame: list[int | None] = []
        self._root_source: list[str | None] = []

    def __len__(self) -> int:
        return len(self._image)

    def _row(self, entry: Any, person: int | None, box: np.ndarray | None, error: str | None) -> None:
        j = self.joints
        self._image.append(entry.key)
        self._video.append(entry.video)
        self._frame.append(entry.frame)
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
            self._root_source.append(None)
            self._pose.append(False)
            self._has_camera.append(False)

    def add(self, loaded: _Loaded, result: Any) -> None:
        """One image's rows: its people's poses (result: the PoseResult of loaded.keep) and its errors."""
        e = loaded.entry
        self.images.append(e.key)
        if loaded.error is not None or result is None:
            self._row(e, None, None, loaded.error or "not processed")
            return
        boxes = e.boxes if e.boxes is not None else e.crop_boxes
        root = None if e.root_depth is None else np.broadcast_to(e.root_depth, (e.people,))
        rows = {k: ("pose", n) for n, k in enumerate(loaded.keep)}
        rows.update({k: ("bad", msg) for k, msg in loaded.bad.items()})
        for person in sorted(rows):
            kind, val = rows[person]
            if kind == "bad":
                self._row(e, person, boxes[person], val)
                continue
            n = val
            self._row(e, person, result.boxes[n], None)
            self.people += 1
            self._crop.append(np.asarray(result.crop_boxes[n], np.float64))
            self._joints.append(np.asarray(result.image[n], np.float32))
            self._conf.append(np.asarray(result.confidence[n], np.float32))
            cam = result.camera
            self._has_camera.append(cam is not None)
            self._camera.append(np.zeros((self.joints, 3), np.float32) if cam is None else
                                np.asarray(cam[n], np.float32))
            if result.roots is not None:  # estimated (RootNet or the prior)
                self._root.append(float(result.roots[n, 2]))
            else:
                self._root.append(None if root is None else float(root[person]))
            self._root_source.append(result.root_source)
            self._pose.append(True)

    def table(self) -> Any:
        """The rows as a pyarrow Table with the schema of output_schema(joints)."""
        pa, _ = need_pyarrow()
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
            "video": pa.array(self._video, pa.string()),
            "frame": pa.array(self._frame, pa.int64()),
            "root_source": pa.array(self._root_source, pa.string()),
        }
        return pa.table(cols, schema=schema)


def output_schema(joints: int) -> Any:
    """The Arrow schema of the output rows (see RowBuffer)."""
    pa, _ = need_pyarrow()
    f32, f64 = pa.float32(), pa.float64()
    return pa.schema([
        pa.field("image", pa.string(), nullable=False), pa.field("person", pa.int32()),
        pa.field("box", pa.list_(f64, 4)), pa.field("crop_box", pa.list_(f64, 4)),
        pa.field("joints", pa.list_(pa.list_(f32, 3), joints)), pa.field("camera", pa.list_(pa.list_(f32, 3), joints)),
        pa.field("confidence", pa.list_(f32, joints)), pa.field("root_depth", f64),
        pa.field("engine", pa.string()), pa.field("error", pa.string()),
        pa.field("video", pa.string()), pa.field("frame", pa.int64()), pa.field("root_source", pa.string())])


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
    _, pq = need_pyarrow()
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
    pa, _ = need_pyarrow()
    import pyarrow.compute as pc

    return table.filter(pc.invert(pc.is_in(table["image"], value_set=pa.array(sorted(images), pa.string()))))


def drop_superseded(out: Path) -> int:
    """Remove the old rows of redone images from the earlier parts that hold them (each such part is
    rewritten and renamed into place, or deleted when nothing of it is left); returns the images
    dropped. Run after the parts that redo them are committed: killed at any point, every image is
    still in a part (the last one that lists it wins in read_results), and the next run finishes."""
    _, pq = need_pyarrow()
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
    _, pq = need_pyarrow()
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
    pa, pq = need_pyarrow()
    out = Path(out)
    parts = _parts(out)
    stale = _superseded(parts)
    tables = []
    for path, _ in parts:
        table = _with_newer_columns(pq.read_table(path).replace_schema_metadata(None))
        tables.append(_without(table, stale[path]) if path in stale else table)
    if not tables:
        return output_schema(18).empty_table()
    return pa.concat_tables(tables)


def _with_newer_columns(table: Any) -> Any:
    """A part written before video frames (or root sources) had columns: its `video` and `frame` null (all its
    rows are images), its `root_source` "given" where it holds a root_depth (then only a manifest gave one),
    else null; columns in today's order."""
    pa, _ = need_pyarrow()
    import pyarrow.compute as pc  # present with pyarrow (need_pyarrow said so)

    for name, kind in (("video", pa.string()), ("frame", pa.int64())):
        if name not in table.column_names:
            table = table.append_column(pa.field(name, kind), pa.nulls(table.num_rows, kind))
    if "root_source" not in table.column_names:
        given = pc.if_else(pc.is_valid(table.column("root_depth")), pa.scalar("given"), pa.scalar(None, pa.string()))
        table = table.append_column(pa.field("root_source", pa.string()), given)
    return table.select([n for n in OUTPUT_COLUMNS if n in table.column_names])


def _write_part(final: Path, table: Any, doc: dict[str, Any]) -> None:
    """Write a part under a temporary name, fsync, rename into place (replacing a part only when
    drop_superseded rewrites it)."""
    _, pq = need_pyarrow()
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
        pa, _ = need_pyarrow()
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



def remove_temporaries(out: Path) -> None:
    """Delete the parts a killed run left uncommitted (temporary names): their images were never done."""
    for tmp in out.iterdir():
        if _TEMP_NAME.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)

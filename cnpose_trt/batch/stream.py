"""The images of a job: each entry's image read and decoded ahead on threads, its people checked, and
the people run through PoseEstimator in order, a bad image or person becoming its error instead of
stopping the job (the local run and every Ray actor stream images through here).

Video frames are read in one sequential pass per video: consecutive entries of one video are a group,
whose frames (sorted) one io.video.read_frames pass decodes, shared by the reader threads under a
lock; the read-ahead window bounds the frames decoded and not yet run, as it does for images.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import VideoError
from ..io.imageio_guard import check_image_file
from ..io.preprocess import load_image
from ..io.video import read_frames
from ..ops.geometry import check_crop_boxes, check_intrinsics, check_root_depth, process_boxes
from ..pipeline.items import NEEDS_CAMERA
from .manifest import Entry

log = logging.getLogger(__name__)


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
    the problems are recorded as the image's or the person's error). Video frames: _FrameReader."""
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
    return _check_people(out)


def _check_people(out: _Loaded) -> _Loaded:
    """Each person of a decoded image checked: the good ones kept, the bad ones with their error."""
    entry = out.entry
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


class _FrameReader:
    """The frames of one group of a video's entries, decoded in one sequential pass (read_frames over
    the sorted frames) that the reader threads share: load(entry) for each entry of the group, any
    order, any thread. A frame decoded before its entry asked (another thread's entry came first)
    waits in `ready`, so at most the read-ahead window's frames are held. A frame past the end, and
    every frame after it, is that frame's error; a frame that cannot be decoded is its own error and
    the pass starts again after it; a video that cannot be read is every frame's error. A frame wanted by
    several entries (one video named two ways: "clip.mp4" and its absolute path) is decoded once and kept
    until each of them took it."""

    def __init__(self, path: str, frames: list[int]) -> None:
        self.wanted = collections.Counter(frames)  # entries still to take each frame
        self.path, self.frames = path, sorted(self.wanted)
        self.left = len(frames)
        self.ready: dict[int, np.ndarray] = {}
        self.failed: dict[int, str] = {}
        self.end: int | None = None           # the frames the video has, once a wanted one was past it
        self.error: str | None = None         # the whole video cannot be read
        self.last = -1                        # the last frame the pass reached
        self._lock = threading.Lock()
        self._pass: Iterator[tuple[int, np.ndarray]] | None = None

    def load(self, entry: Entry) -> _Loaded:
        out = _Loaded(entry)
        with self._lock:
            try:
                out.image = self._frame(entry.frame)
            except _FrameError as exc:
                out.error = str(exc)
            finally:
                self.left -= 1
                if not self.left and self._pass is not None:
                    self._pass.close()  # releases the capture now, not when the reader is collected
                    self._pass = None
        return out if out.error is not None else _check_people(out)

    def _frame(self, frame: int) -> np.ndarray:
        while True:
            if frame in self.ready:
                self.wanted[frame] -= 1
                return self.ready[frame] if self.wanted[frame] > 0 else self.ready.pop(frame)
            if frame in self.failed:
                self.wanted[frame] -= 1
                raise _FrameError(self.failed[frame] if self.wanted[frame] > 0 else self.failed.pop(frame))
            if self.error is not None:
                raise _FrameError(self.error)
            if self.end is not None and frame >= self.end:
                raise _FrameError(f"{self.path}: frame {frame} is past the end of the video ({self.end} frames can "
                                  "be decoded)")
            self._advance()

    def _advance(self) -> None:
        """One more wanted frame from the pass (into ready, or its error into failed)."""
        if self._pass is None:
            self._pass = read_frames(self.path, [f for f in self.frames if f > self.last])
        try:
            index, image = next(self._pass)
        except StopIteration:  # cannot happen: every frame asked for is in the pass
            self.error = f"{self.path}: the frame reader ended early"
            return
        except VideoError as exc:
            self._pass = None
            if exc.frame is None:
                self.error = _message(exc)
            elif exc.end is not None:
                self.end = exc.end
            else:
                self.failed[exc.frame] = _message(exc)
                self.last = exc.frame
            return
        except (OSError, ValueError, MemoryError) as exc:
            self._pass = None
            self.error = f"video {self.path}: {_message(exc)}"
            return
        self.last = index
        self.ready[index] = image


class _FrameError(Exception):
    """A frame's error message (raised inside _FrameReader only)."""


def _loaders(entries: Iterable[Entry]) -> Iterator[Callable[[], _Loaded]]:
    """What reads each entry, in the order the entries are run: load_entry for an image; for a run of
    consecutive entries of one video, one _FrameReader, its entries sorted by frame (one pass)."""
    group: list[Entry] = []

    def flush() -> Iterator[Callable[[], _Loaded]]:
        group.sort(key=lambda e: e.frame)
        reader = _FrameReader(group[0].path, [e.frame for e in group])
        for e in group:
            yield lambda e=e: reader.load(e)
        group.clear()

    for entry in entries:
        if group and (entry.video is None or entry.path != group[0].path):
            yield from flush()
        if entry.video is None:
            yield lambda e=entry: load_entry(e)
        else:
            group.append(entry)
    if group:
        yield from flush()


def read_ahead(pool: ThreadPoolExecutor, entries: Iterable[Entry], window: int) -> Iterator[_Loaded]:
    """The entries read on the pool's threads, `window` images ahead: load_entry for images, one pass
    per run of a video's frames (_loaders); in order, a video's run sorted by frame."""
    pending: collections.deque[Future[_Loaded]] = collections.deque()
    source = _loaders(entries)
    try:
        while True:
            while len(pending) < window:
                load = next(source, None)
                if load is None:
                    break
                pending.append(pool.submit(load))
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
    rooted = getattr(estimator, "rootnet", None) is not None  # depths estimated: records need intrinsics
    source = iter(loaded)
    source_error: list[BaseException] = []

    def feed() -> Iterator[dict[str, Any]]:
        try:
            for item in itertools.chain(retry, source):
                inflight.append(item)
                if item.error is None and rooted and item.keep and item.entry.root_depth is None \
                        and item.entry.intrinsics is None:
                    item.error = NEEDS_CAMERA  # the image's error row, before the estimator refuses it
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


"""The images of a job: each entry's image read and decoded ahead on threads, its people checked, and
the people run through PoseEstimator in order, a bad image or person becoming its error instead of
stopping the job (the local run and every Ray actor stream images through here).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..io.imageio_guard import check_image_file
from ..io.preprocess import load_image
from ..ops.geometry import check_crop_boxes, check_intrinsics, check_root_depth, process_boxes
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
    the problems are recorded as the image's or the person's error)."""
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


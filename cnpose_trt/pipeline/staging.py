"""The staging ring: page-locked host memory allocated once, mirrored by device memory of the same
size, handed out to images as regions and taken back when the work reading them is done.

PinnedRing hands out the regions (a region is reused only after the event of the last work that
read it); StagingRing copies images in and over to its mirror; Lease is one predict run's hold on
the ring: every image staged through it is freed exactly once, when the engine calls that read it
are done, or at the end of the run when no call ever did. Nothing here calls CUDA itself: the
events and the mirror come from gpu_stage.Uploader (host arrays stand in for them in tests).
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np


class _Region:
    """Bytes [start, end) of a PinnedRing, busy until the work reading them has finished."""

    __slots__ = ("start", "end", "_state")

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self._state: tuple[Any] | None = None  # (done,) once attached: one store publishes both facts

    @property
    def attached(self) -> bool:
        """True once attach() was called (nobody waits for this: take() skips unattached regions)."""
        return self._state is not None

    def attach(self, done: Any) -> None:
        """done: an event (synchronize()) recorded after the last work that reads the region
        (the crop kernel on the engine's stream); None when nothing reads it any more. Lock-free:
        a prep thread may hold the ring's lock while it waits for the GPU, and the main thread,
        which attaches, must not wait with it (it would stop enqueuing work)."""
        self._state = (done,)

    def wait(self) -> None:
        """Block until the work reading the region has finished (only called once attached)."""
        state = self._state
        if state is not None and state[0] is not None:
            state[0].synchronize()


class PinnedRing:
    """Page-locked staging allocated once, used as a ring: each image takes the next `nbytes`,
    and a region is reused only after the work reading it has finished (its event).

    A region that overlaps the one wanted but has no event yet belongs to an image not handed to
    the engine so far: take() then gives None (the caller stages that image another way) rather
    than wait for it, which could wait forever when the ring is smaller than the work in flight.

    buffer: a 1-D uint8 numpy view of pinned memory (any 1-D uint8 array in tests).
    """

    ALIGN = 256

    def __init__(self, buffer: np.ndarray) -> None:
        if buffer.ndim != 1 or buffer.dtype != np.uint8:
            raise ValueError(f"buffer must be 1-D uint8, got {buffer.dtype} {buffer.shape}")
        self.buffer, self.size = buffer, len(buffer)
        self._head = 0
        self._live: collections.deque[_Region] = collections.deque()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> _Region | None:
        """A region of nbytes (waiting for the events of older regions in its way), or None when
        nbytes exceeds the whole ring or a region in the way is still unattached."""
        return self.take_many([nbytes])[0]

    def take_many(self, sizes: list[int]) -> list[_Region | None]:
        """take() for each size in turn, with no other thread's region between them: images
        staged together lie side by side (and come over in one copy)."""
        with self._lock:
            return [self._take(n) for n in sizes]

    @classmethod
    def footprint(cls, nbytes: int) -> int:
        """The ring bytes an image of nbytes takes: regions start on ALIGN-byte boundaries."""
        return -(-nbytes // cls.ALIGN) * cls.ALIGN

    def _take(self, nbytes: int) -> _Region | None:  # holding self._lock
        nbytes = self.footprint(nbytes)
        if not 0 < nbytes <= self.size:
            return None
        start = self._head if self._head + nbytes <= self.size else 0
        end = start + nbytes
        # Live regions lie in the order they were handed out, circularly from the oldest up to
        # the head, so the ones in the way are the oldest few. On a wrap the unused tail
        # [head, size) counts as taken too: its regions are the oldest and leave first.
        claims = ((start, end),) if start == self._head else ((self._head, self.size), (0, end))
        blocking = []
        for r in self._live:
            if not any(r.start < b and a < r.end for a, b in claims):
                break
            if not r.attached:
                return None
            blocking.append(r)
        for r in blocking:
            r.wait()
            self._live.popleft()
        region = _Region(start, end)
        self._live.append(region)
        self._head = end
        return region


class Staged:
    """A host image copied into a StagingRing: bytes [region.start, region.start + nbytes) of the
    host ring, and of its device mirror once the copies of the call that reads it are enqueued."""

    __slots__ = ("region", "shape", "nbytes")

    def __init__(self, region: _Region, shape: tuple[int, ...], nbytes: int) -> None:
        self.region, self.shape, self.nbytes = region, shape, nbytes


def spans(staged: list[Staged]) -> list[tuple[int, int]]:
    """The byte ranges to copy for these images: each region once, adjacent regions merged (images
    staged one after another make one range). Gaps are never copied: bytes between two regions
    may belong to another image whose crops are still being cut."""
    out: list[list[int]] = []
    for start, end in sorted({(s.region.start, s.region.end) for s in staged}):
        if out and start == out[-1][1]:
            out[-1][1] = end
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


class StagingRing:
    """A PinnedRing of host memory and its mirror of the same size (device memory on the GPU; any
    1-D uint8 array in tests). put() runs on the prep threads, copy_in() and view() at the engine.

    host: 1-D uint8 numpy array (the ring's memory); source: the same memory as the copies read
    it (a pinned torch tensor on the GPU; host itself in tests); mirror: where copy_in() writes.
    """

    def __init__(self, host: np.ndarray, mirror: Any, source: Any = None) -> None:
        got = getattr(mirror, "shape", None)
        if got is None or tuple(got) != host.shape:
            raise ValueError(f"mirror must have the host ring's shape {host.shape}, got {got}")
        self.ring = PinnedRing(host)
        self.mirror = mirror
        self.source = host if source is None else source

    @property
    def size(self) -> int:
        return self.ring.size

    def put(self, image: np.ndarray) -> Staged | None:
        """Copy a uint8 (H, W, 3) image into the next region, or None when the ring has no room."""
        return self.put_many([image])[0]

    def put_many(self, images: list[np.ndarray]) -> list[Staged | None]:
        """put() for several images, their regions side by side (PinnedRing.take_many)."""
        regions = self.ring.take_many([im.nbytes for im in images])
        try:
            for image, region in zip(images, regions, strict=True):
                if region is not None:
                    np.copyto(self.ring.buffer[region.start:region.start + image.nbytes].reshape(image.shape), image)
        except BaseException:
            for region in regions:
                if region is not None:
                    region.attach(None)
            raise
        return [None if r is None else Staged(r, tuple(im.shape), im.nbytes)
                for im, r in zip(images, regions, strict=True)]

    def copy_in(self, staged: list[Staged]) -> int:
        """Copy the images' ranges host -> mirror (non-blocking on a GPU: the caller's current
        stream); the number of copies made."""
        ranges = spans(staged)
        for a, b in ranges:
            dest = self.mirror[a:b]
            if hasattr(dest, "copy_"):
                dest.copy_(self.source[a:b], non_blocking=True)
            else:
                dest[...] = self.source[a:b]
        return len(ranges)

    def view(self, s: Staged) -> Any:
        """The image in the mirror, (H, W, 3) uint8."""
        return self.mirror[s.region.start:s.region.start + s.nbytes].reshape(s.shape)

    def release(self, staged: list[Staged], done: Any) -> None:
        """The images' regions are free once `done` (an event after the crop kernel) fires."""
        for region in {id(s.region): s.region for s in staged}.values():
            region.attach(done)


class Lease:
    """One predict run's hold on a stager's ring: the images it staged, each held until freed.

    The run stages through the lease (stage_many, stage, load: the stager's, recorded here) and
    says when the engine calls that read an image are done (release); close() at the end of the
    run frees whatever no call took (a failed or stopped run, an item that failed after its file
    was staged). Each region is freed once; the run keeps no record of its own. Thread safe: prep
    threads stage while the main thread releases.

    stager: a gpu_stage.Stager (stage_many, stage, load).
    """

    def __init__(self, stager: Any) -> None:
        self._stager = stager
        self._held: dict[Staged, None] = {}  # an ordered set: freed in the order they were staged
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """The staged images not freed yet."""
        with self._lock:
            return len(self._held)

    def _hold(self, got: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        with self._lock:
            self._held.update((s, None) for s, _ in got if isinstance(s, Staged))
        return got

    def stage_many(self, images: list[np.ndarray]) -> list[tuple[Any, Any]]:
        """Stager.stage_many, the staged images held."""
        return self._hold(self._stager.stage_many(images))

    def stage(self, image: np.ndarray) -> tuple[Any, Any]:
        """Stager.stage, the staged image held."""
        return self._hold([self._stager.stage(image)])[0]

    def load(self, path: Any) -> tuple[Any, Any]:
        """Stager.load (an image file), the image held when it was staged."""
        return self._hold([self._stager.load(path)])[0]

    def release(self, images: list[Any], calls: list[Any]) -> None:
        """Free the regions of `images` (those not Staged are skipped): each once the last of `calls`
        that read it is done, a region no call read (a file with nobody in it, or an image whose call
        failed before its fill ran) at once. calls: the engine calls' fills in the order they were
        enqueued, each with .staged (the images it read) and .done (its event, None when it never ran)."""
        last: dict[_Region, Any] = {}
        for call in calls:
            if call.done is not None:
                last.update((s.region, call.done) for s in call.staged)
        for image in images:
            if isinstance(image, Staged):
                image.region.attach(last.get(image.region))
                with self._lock:
                    self._held.pop(image, None)

    def close(self) -> None:
        """Free the regions of the images no engine call took (nothing reads them any more)."""
        with self._lock:
            held, self._held = list(self._held), {}
        for s in held:
            if not s.region.attached:
                s.region.attach(None)

"""The prep window: PoseEstimator's items read ahead of the engine, prepared in runs on the prep
threads (a path's prepare_run and prepare_rest), taken in order and gathered into batches of at
most one engine call's people. Memory stays bounded: the window counts images, and is narrowed to
about one window of crops when images hold many people.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .items import Item

_END = object()  # end of the item stream (an item itself may be anything, None included)


class _Slot:
    """One pending item: entry i of a prep run's result (an Item, or the exception it raised)."""

    __slots__ = ("future", "i", "rest")

    def __init__(self, future: Future[list[Any]], i: int, rest: bool = False) -> None:
        self.future, self.i, self.rest = future, i, rest  # rest: a later part of an image already counted

    def result(self) -> Item:
        got = self.future.result()[self.i]
        if isinstance(got, Exception):
            raise got
        return got

    def cancel(self) -> None:
        self.future.cancel()


class Window:
    """Items on their way to the engine (see the module text).

    items: the caller's items; path: the run's host.HostPath or device.DevicePath; prep: the prep
    thread pool; size: items read ahead (max_batch x prefetch); prefetch, prep_threads,
    prep_chunk: PoseEstimator's. A failure (the source raising, an item that cannot be prepared)
    ends the batches; every item before it is still batched, and `failure` holds it.
    """

    def __init__(self, items: Iterable[Any], path: Any, prep: ThreadPoolExecutor, size: int, prefetch: int,
                 prep_threads: int, prep_chunk: int | None) -> None:
        self.source, self.path, self.prep = iter(items), path, prep
        self.size, self.prefetch, self.prep_threads = size, prefetch, prep_threads
        # Items go to the prep threads in runs of `chunk`: fewer tasks and thread hand-offs
        # (each costs the GIL), and one thread stages consecutive images side by side.
        # At most size / prep_threads, so that every prep thread has a run to work on.
        self.chunk = min(max(1, size // prep_threads), prep_chunk or max(1, min(16, size // (2 * prep_threads))))
        self.pending: collections.deque[_Slot] = collections.deque()  # one per item, in order
        self.people_seen = self.images_seen = 0  # of the first parts taken
        self.exhausted = False
        self.failure: BaseException | None = None

    def batches(self, capacity: int) -> Iterator[tuple[list[Item], int]]:
        """(batch, its people) in order: each filled up to `capacity` people (waiting for the
        crops): full, steady batch shapes suit every engine, GPUs and CUDA graphs most."""
        self._refill()
        while self.pending:
            first = self._take()
            if first is None:
                break
            self._advance(first)
            batch, people = [first], len(first.boxes)
            self._refill()
            while self.pending:
                nxt = self._take()
                if nxt is None or people + len(nxt.boxes) > capacity:
                    break
                self._advance(nxt)
                batch.append(nxt)
                people += len(nxt.boxes)
                self._refill()
            yield batch, people

    def _ahead(self) -> int:
        """Images to read ahead. The window counts images; their crops are what costs memory:
        capped at size / (people per image seen so far), so crops in flight stay about one window
        whether images hold one person or hundreds (a few images until the first is seen)."""
        if not self.images_seen:
            return min(self.size, max(self.prefetch, self.prep_threads))
        return max(self.prefetch, min(self.size, int(self.size * self.images_seen /
                                                      max(self.people_seen, self.images_seen))))

    def _submit(self, run: list[Any]) -> None:
        if run:
            fut = self.prep.submit(self.path.prepare_run, run)
            self.pending.extend(_Slot(fut, i) for i in range(len(run)))

    def _refill(self) -> None:
        """Top the window up, once a whole run of items fits (or nothing is pending)."""
        limit = self._ahead()
        if self.pending and len(self.pending) > limit - self.chunk:
            return
        run: list[Any] = []
        while not self.exhausted and len(self.pending) + len(run) < limit:
            try:
                nxt = next(self.source, _END)
            except Exception as exc:  # delivered after everything before it
                self.failure, self.exhausted = exc, True
                break
            if nxt is _END:
                self.exhausted = True
                break
            run.append(nxt)
            if len(run) == self.chunk:
                self._submit(run)
                run = []
        self._submit(run)

    def _advance(self, item: Item) -> None:
        """Drop the taken item from the window; the rest of its image's people come next."""
        if not self.pending.popleft().rest:  # an image's first part
            self.people_seen += len(item.boxes)
            self.images_seen += 1
        if item.rest is not None:
            fut = self.prep.submit(self.path.prepare_rest, item.rest)
            self.pending.appendleft(_Slot(fut, 0, rest=True))

    def _take(self) -> Item | None:
        """The next prepared item, or None (and failure set) when it failed."""
        try:
            return self.pending[0].result()
        except Exception as exc:
            self.failure, self.exhausted = exc, True
            for fut in self.pending:
                fut.cancel()
            self.pending.clear()
            return None

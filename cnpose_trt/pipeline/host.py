"""The host path: people cropped and normalised on the prep threads (crop_people), the crops run
through the engine (Engine.infer) and the heatmaps decoded on a decode thread; an engine on a GPU
decodes where its output lives instead (Engine.infer_decode: only (P, J, 10) floats come back).

HostPath is also the interface PoseEstimator's scheduler calls on every path (device.DevicePath
is the other): prepare_run and prepare_rest on the prep threads, run per batch, close at the end of
the run; in_flight says how many batches run() may leave unwaited-for.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..io.preprocess import check_image, crop_people, load_image, resolve_crop_boxes
from ..ops.decoding import decode
from . import items as items_
from .items import Item, Rest, Whole, call_chunks
from .results import PoseResult, Timings, assemble, finished, to_host


class HostPath:
    """One predict run's host path (see the module text).

    engine: the Engine; crop_method: preprocess.crop_people's method; timings: where stage times
    go; flip: the flip test (two crops per person); per_call: people per engine call; on_device:
    the engine decodes on its device (infer_decode) rather than on the decode thread.
    """

    in_flight = 1  # batches left to run while the host yields results: batch k-1 decoded while batch k runs

    def __init__(self, engine: Any, crop_method: str, timings: Timings, flip: bool, per_call: int,
                 on_device: bool = False, roots: Any = None) -> None:
        self.engine, self.crop_method, self.timings = engine, crop_method, timings
        self.roots = roots
        self.flip, self.per_call, self.on_device = flip, per_call, on_device
        self.spec = engine.spec
        self._decoder: ThreadPoolExecutor | None = None
        if not on_device:
            self._decoder = ThreadPoolExecutor(1, thread_name_prefix="cnpose-decode")

    def close(self) -> None:
        """End of the run: the decode thread finishes what it was given and stops."""
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)

    # -- on the prep threads -------------------------------------------------------------------

    def prepare_run(self, entries: list[Any]) -> list[Any]:
        """Prepare consecutive items on one prep thread: their Items, up to and including the
        exception of the first that fails (the ones after it are left alone)."""
        out: list[Any] = []
        for entry in entries:
            try:
                out.append(self.prepare(entry))
            except Exception as exc:
                out.append(exc)
                break
        return out

    def prepare(self, entry: Any) -> Item:
        started = time.perf_counter()
        item = self.item(entry)
        self.timings.add("prepare", time.perf_counter() - started, images=1, people=len(item.boxes))
        return item

    def item(self, entry: Any) -> Item:
        """One caller's item, read, its image loaded and checked, its people cropped."""
        item = items_.read(entry, estimated_roots=self.roots is not None)
        image = item["image"]
        image = load_image(image) if isinstance(image, (str, Path)) else check_image(image)
        return self.cropped(item, image)

    def cropped(self, item: dict[str, Any], image: np.ndarray) -> Item:
        """An image's people cropped on the host; more than one engine call's people are cut into
        parts, the first cropped now, each next one when the one before is taken."""
        crop_boxes = resolve_crop_boxes(item["boxes"], item["crop_boxes"], image.shape)
        arrays = items_.people(item, crop_boxes, estimated_roots=self.roots is not None)
        if len(crop_boxes) > self.per_call:
            first = self.prepare_rest(Rest(image, arrays["boxes"], crop_boxes, arrays["root_depth"],
                                           arrays["intrinsics"], 0, Whole()))[0]
            if isinstance(first, Exception):
                raise first
            return first
        crops, mirrored, ready = self.crops(image, crop_boxes)
        return Item(**arrays, crops=crops, mirrored=mirrored, ready=ready)

    def crops(self, image: np.ndarray, crop_boxes: np.ndarray) -> tuple[Any, Any, Any]:
        """(crops, mirrored crops or None, arrival event or None) of people cropped on the host."""
        # One thread per image: the prep pool already crops prep_threads images at once.
        crops = crop_people(image, crop_boxes, self.spec.input_size, method=self.crop_method, threads=1)
        mirrored = np.ascontiguousarray(crops[:, :, :, ::-1]) if self.flip else None
        return crops, mirrored, None

    def prepare_rest(self, rest: Rest) -> list[Any]:
        """The next part of an image with more people than one engine call takes: at most one
        call's people cropped (so memory is bounded by max_batch, not by the image's people), and
        what is left after them. As a one-item prep run: [its Item] or [the exception]."""
        started = time.perf_counter()
        try:
            start, stop = call_chunks(len(rest.crop_boxes) - rest.first, self.per_call)[0]
            a, b = rest.first + start, rest.first + stop
            crops, mirrored, ready = self.crops(rest.image, rest.crop_boxes[a:b])
            more = dataclasses.replace(rest, first=b) if b < len(rest.crop_boxes) else None
            item = Item(rest.boxes[a:b], rest.crop_boxes[a:b],
                        None if rest.root_depth is None else rest.root_depth[a:b],
                        None if rest.intrinsics is None else rest.intrinsics[a:b],
                        crops=crops, mirrored=mirrored, ready=ready, whole=rest.whole, rest=more)
        except Exception as exc:
            return [exc]
        if rest.first:  # the first part is timed (and its image counted) by prepare
            self.timings.add("prepare", time.perf_counter() - started, people=b - a)
        return [item]

    # -- at the engine -------------------------------------------------------------------------

    def run(self, batch: list[Item], people: int) -> Any:
        """A batch through the engine; its results as a Future-like (.result(): one PoseResult per
        image): a batch of nobody at once, an on-device engine's when it returns, else the decode
        thread's."""
        if not people:
            return finished(assemble(batch, None, self.spec.joints))
        crops = items_.crops(batch, self.flip)
        if self.roots is not None:
            try:
                self._estimate_roots(batch, crops)
            except ValueError as exc:  # no usable depth: this batch's error, delivered after the batches before it
                failed: Future[list[PoseResult]] = Future()
                failed.set_exception(exc)
                return failed
        if self.on_device:
            return self._infer_decode(batch, crops)
        started = time.perf_counter()
        heatmaps = self.engine.infer(crops)
        self.timings.add("infer", time.perf_counter() - started)
        return self._decoder.submit(self._decode, batch, heatmaps)

    def _estimate_roots(self, batch: list[Item], crops: np.ndarray) -> None:
        """Root depths of the batch's people who have none, in one RootStep call on the very crops the
        pose engine takes (the un-mirrored half: the first P rows), before the decode needs them."""
        started = time.perf_counter()
        todo = [it for it in batch if it.root_depth is None and len(it.boxes)]
        if not todo:
            return
        rows = None
        if self.roots.needs_crops:
            everyone = len(todo) == sum(1 for it in batch if len(it.boxes))
            rows = crops[:sum(len(it.boxes) for it in batch)] if everyone else np.concatenate([it.crops for it in todo])
        roots = self.roots(rows, np.concatenate([it.crop_boxes for it in todo]),
                           np.concatenate([it.intrinsics for it in todo]))
        offset = 0
        for it in todo:
            it.roots, offset = roots[offset:offset + len(it.boxes)], offset + len(it.boxes)
            it.root_depth, it.root_source = it.roots[:, 2].copy(), self.roots.source
        self.timings.add("roots", time.perf_counter() - started)

    def _infer_decode(self, batch: list[Item], crops: np.ndarray) -> Future[list[PoseResult]]:
        """Engine and fused decode on the engine's device; only (P, J, 10) floats come back."""
        started = time.perf_counter()
        packed = self.engine.infer_decode(crops, flip=self.flip, **items_.post(batch))
        self.timings.add("infer", time.perf_counter() - started)
        return finished(assemble(batch, packed, self.spec.joints))

    def _decode(self, batch: list[Item], heatmaps: np.ndarray) -> list[PoseResult]:
        started = time.perf_counter()
        p = sum(len(it.boxes) for it in batch)
        spec = self.spec
        res = decode(heatmaps[:p], spec.joints, spec.depth_dim, flipped=heatmaps[p:] if self.flip else None,
                     **items_.post(batch))
        results = assemble(batch, to_host(res.packed), spec.joints)
        self.timings.add("decode", time.perf_counter() - started)
        return results

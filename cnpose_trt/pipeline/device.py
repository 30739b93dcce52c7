"""The device path: uint8 images go to the GPU once (staged in the uploader's ring, or uploaded per
image; JPEG files decoded there) and are cut by the fused crop kernel straight into the engine's
input buffer (gpu_stage.Fill, run by Engine.enqueue_device), network and decode on the device.
Float images, and nothing else, are cropped on the host as on the host path and uploaded.

Each run stages through a staging.Lease: the ring regions of a batch's images are freed once the
engine calls that read them are done, and those of images no call took when the run ends.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..io.preprocess import check_image, resolve_crop_boxes
from ..ops.geometry import crop_matrices
from . import gpu_stage
from . import items as items_
from .host import HostPath
from .items import Item, call_chunks
from .results import Later, Timings, assemble

IN_FLIGHT = 2  # batches enqueued on the device path before the host waits for the oldest


class DevicePath(HostPath):
    """One predict run's device path (see the module text); HostPath's interface and its host
    crops for float images, which are uploaded once cropped.

    uploader: the estimator's gpu_stage.Uploader (a Stager: HostStager stands in for it in tests).
    """

    in_flight = IN_FLIGHT  # host hiccups while yielding or batching do not idle the GPU

    def __init__(self, engine: Any, crop_method: str, timings: Timings, flip: bool, per_call: int,
                 uploader: Any) -> None:
        super().__init__(engine, crop_method, timings, flip, per_call, on_device=True)
        self.uploader = uploader
        self.lease = uploader.lease()

    def close(self) -> None:
        """End of the run (the prep threads have stopped): the ring regions of images that never
        reached the engine are freed."""
        super().close()
        self.lease.close()

    # -- on the prep threads -------------------------------------------------------------------

    def prepare_run(self, entries: list[Any]) -> list[Any]:
        """HostPath.prepare_run, then the run's uint8 images staged together: side by side in the
        ring, so a batch comes over in few copies."""
        out = super().prepare_run(entries)
        waiting = [it for it in out if isinstance(it, Item) and it.host_image is not None]
        if not waiting:
            return out
        started = time.perf_counter()
        try:
            got = self.lease.stage_many([it.host_image for it in waiting])
        except Exception:  # one at a time, so the items before the one that fails still come out
            got = []
            for it in waiting:
                try:
                    got.append(self.lease.stage(it.host_image))
                except Exception as exc:
                    del out[next(k for k, x in enumerate(out) if x is it):]
                    out.append(exc)
                    break
        for it, (dev, ready) in zip(waiting, got, strict=False):
            it.image_dev, it.ready, it.host_image = dev, ready, None
        self.timings.add("prepare", time.perf_counter() - started)
        return out

    def item(self, entry: Any) -> Item:
        """A file is loaded by the uploader (JPEGs decode on the GPU) and cut by the kernel; a uint8
        array is left in host_image (prepare_run stages it with the other images of its run); a
        float image is cropped on the host and its crops uploaded."""
        item = items_.read(entry)
        image = item["image"]
        if isinstance(image, (str, Path)):
            image_dev, ready = self.lease.load(image)
            crop_boxes = resolve_crop_boxes(item["boxes"], item["crop_boxes"], tuple(image_dev.shape))
            return self._kernel_item(item, crop_boxes, image_dev=image_dev, ready=ready)
        image = check_image(image)
        if image.dtype != np.uint8:
            return self.cropped(item, image)
        crop_boxes = resolve_crop_boxes(item["boxes"], item["crop_boxes"], image.shape)
        if len(crop_boxes):
            return self._kernel_item(item, crop_boxes, host_image=image)
        size = self.spec.input_size  # nobody in it: nothing to stage or crop
        crops = np.zeros((0, 3, size, size), np.float32)
        return Item(**items_.people(item, crop_boxes), crops=crops, mirrored=crops if self.flip else None)

    def _kernel_item(self, item: dict[str, Any], crop_boxes: np.ndarray, **where: Any) -> Item:
        affines = crop_matrices(crop_boxes, self.spec.input_size)
        return Item(**items_.people(item, crop_boxes), affines=affines, **where)

    def crops(self, image: np.ndarray, crop_boxes: np.ndarray) -> tuple[Any, Any, Any]:
        """Host crops (a float image), uploaded once, crops and mirrored crops together."""
        crops, mirrored, ready = super().crops(image, crop_boxes)
        if len(crops):
            both = crops if mirrored is None else np.concatenate([crops, mirrored])
            dev, ready = self.uploader.upload_crops(both)
            crops, mirrored = dev[:len(crop_boxes)], dev[len(crop_boxes):] if self.flip else None
        return crops, mirrored, ready

    # -- at the engine -------------------------------------------------------------------------

    def run(self, batch: list[Item], people: int) -> Any:
        """Crops cut on the GPU into the engine's input, network, fused decode: enqueued, not waited
        for. An image with more people than one call takes is spread over several calls. The
        batch's ring regions are freed after the calls that read them (at once for a batch of nobody)."""
        if not people:
            self.lease.release([it.image_dev for it in batch], [])
            return super().run(batch, people)
        started = time.perf_counter()
        handles, fills = [], []
        try:
            self._enqueue(batch, people, handles, fills)
        finally:
            self.lease.release([it.image_dev for it in batch], fills)
        self.timings.add("infer", time.perf_counter() - started)
        return Later(lambda: assemble(batch, np.concatenate([self._wait(h) for h in handles]), self.spec.joints))

    def _enqueue(self, batch: list[Item], people: int, handles: list[Any], fills: list[Any]) -> None:
        """One enqueue_device call per call_chunks range of the batch's people, each with its Fill
        (appended to fills as it is made, so the caller frees the ring after whatever ran)."""
        persons = [(it, i) for it in batch for i in range(len(it.boxes))]
        post = items_.post(batch)
        copied: dict[int, Any] = {}  # shared by the batch's calls: each staged image is copied once
        for first, stop in call_chunks(people, self.per_call):
            chunk = persons[first:stop]
            fill = self._fill(chunk, copied, fills[-1] if fills else None)
            fills.append(fill)
            q = len(chunk)
            part = {k: None if v is None else v[first:first + q] for k, v in post.items()}
            handles.append(self.engine.enqueue_device(fill, 2 * q if self.flip else q, flip=self.flip, **part))

    def _fill(self, chunk: list[tuple[Item, int]], copied: dict[int, Any], after: Any) -> Any:
        """The Fill of one engine call: kernel rows for images on the device or staged, host-made
        crops (float images) copied into their rows; the flip test's mirrored half after the plain one."""
        q = len(chunk)
        uploads: list[tuple[Any, Any]] = []
        slot: dict[int, int] = {}  # id(item) -> its upload's number in this call
        kernel: list[tuple[int, np.ndarray, bool]] = []  # (upload, affine, mirrored) in row order
        crop_rows: list[tuple[int, Any, Any]] = []
        for mirrored in (False, True) if self.flip else (False,):
            for r, (it, i) in enumerate(chunk):
                if it.image_dev is not None:
                    if id(it) not in slot:
                        slot[id(it)] = len(uploads)
                        uploads.append((it.image_dev, it.ready))
                    kernel.append((slot[id(it)], it.affines[i], mirrored))
                else:  # a float image's host-made crops, uploaded in the prep thread
                    crops = it.mirrored if mirrored else it.crops
                    crop_rows.append((q * mirrored + r, crops[i:i + 1], it.ready))
        index = np.array([k for k, _, _ in kernel], np.int64)
        affines = np.array([m for _, m, _ in kernel], np.float64).reshape(-1, 2, 3)
        flips = np.array([f for _, _, f in kernel], bool)
        return gpu_stage.Fill(uploads, index, affines, flips, crop_rows, self.spec.input_size, self.uploader, copied,
                              after=after)

    def _wait(self, handle: Any) -> np.ndarray:
        started = time.perf_counter()
        packed = handle.result()
        self.timings.add("infer", time.perf_counter() - started)
        return packed

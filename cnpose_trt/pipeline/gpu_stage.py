"""The device-resident side of PoseEstimator: images go to the GPU once, as uint8.

Staging ("batched", the default): the prep threads copy each uint8 image into one pinned host
ring allocated once (a plain memcpy, no CUDA call, the GIL released; a prep run's images side by
side); the ring is mirrored byte for byte by a device buffer of the same size. At the engine,
`Fill` copies the call's images over with one asynchronous copy per run of adjacent ring regions
(usually one per call) on the upload stream, makes the engine's stream wait for it, and runs
the fused CUDA crop-and-normalise kernel (cropping.crop_normalize) on views of the device
mirror, straight into the engine's input buffer. The copy for batch k+1 runs on the copy engine
while batch k runs on the GPU. Measured on an H200 before this: per-image staging (pinned
allocation, copy and event per image on the prep threads) held the pipeline at 7-22% of the
engine's throughput. "per_image" keeps that way. JPEG files are decoded on the GPU where
torchvision offers it (torchvision.io.decode_jpeg(device="cuda")), else by OpenCV on the host and
staged. torch is needed for the pinned memory and the streams; TensorRT engines use it too.
The ring itself, its regions and their lifetimes are in staging.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import importable
from ..io.imageio_guard import jpeg_orientation
from ..io.preprocess import decode_image, load_image, read_image_file
from ..ops._device import GRAPH_CAPTURE_LOCK, torch_stream
from ..ops.arrays import compiled
from ..ops.cropping import crop_normalize
from ..runtime.engine import Engine
from .staging import Lease, PinnedRing, Staged, StagingRing

log = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"
STAGINGS = ("batched", "per_image")  # how Uploader stages uint8 images (see the module text)
RING_MIN_BYTES, RING_MAX_BYTES = 64 << 20, 1 << 30  # staging rings sized automatically (host and device each)


def usable(engine: Engine) -> str | None:
    """None when the device path can serve `engine`, else why not (one line)."""
    if not engine.on_device:
        return "the engine runs on the CPU"
    if type(engine).enqueue_device is Engine.enqueue_device:
        return f"the {engine.backend} engine has no device input path"
    lib = compiled()
    if lib is None or not lib.built_with_cuda:
        return "cnpose_trt._C is not built with CUDA (the GPU crop kernel)"
    if not importable("torch"):
        return "PyTorch is not installed (pinned staging and streams)"
    import torch

    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    return None


def _gpu_jpeg() -> Any:
    """torchvision.io.decode_jpeg when it decodes on the GPU here, else None."""
    if not importable("torchvision"):
        return None
    try:
        from torchvision.io import decode_jpeg
    except Exception:  # a torchvision that does not match torch fails at import
        return None
    return decode_jpeg


def gpu_decodable(data: np.ndarray | bytes) -> bool:
    """True for a JPEG the GPU decoder may take: one without an EXIF rotation, which OpenCV (the
    host path) applies and nvJPEG does not (a rotated phone photo would come out sideways)."""
    head = bytes(data[:3])
    return head == _JPEG_MAGIC and jpeg_orientation(bytes(data[:1 << 16])) in (None, 1)


class Stager:
    """How images are staged for the device, without the device: the staging ring, sized on
    first use, and the fallback to per-image uploads. Uploader supplies the GPU memory and the
    per-image upload; tests run this logic on host arrays.

    staging: "batched" (a StagingRing, see the module text) or "per_image" (upload() per image).
    ring_images, ring_bytes: the staging ring's size: ring_bytes when given, else room for
    ring_images images the size of the first one staged (within RING_MIN_BYTES..RING_MAX_BYTES),
    host and device memory each. An image that finds no room is uploaded per image (staging_fallbacks).
    """

    def __init__(self, staging: str = "batched", ring_images: int = 256, ring_bytes: int | None = None) -> None:
        if staging not in STAGINGS:
            raise ValueError(f"staging must be one of {', '.join(STAGINGS)}, got {staging!r}")
        if ring_bytes is not None and ring_bytes < PinnedRing.ALIGN:
            raise ValueError(f"staging ring bytes must be at least {PinnedRing.ALIGN} (or None: sized from the "
                             f"images), got {ring_bytes}")
        if ring_images < 1:
            raise ValueError(f"ring_images must be >= 1, got {ring_images}")
        self.staging, self.ring_images, self.ring_bytes = staging, int(ring_images), ring_bytes
        self.ring: StagingRing | None = None
        self._ring_lock = threading.Lock()
        self.staging_fallbacks = 0
        self.gpu_jpeg_failures = self.gpu_jpeg_decoded = 0  # JPEG files nvJPEG refused / decoded (Uploader)

    def _allocate(self, size: int) -> StagingRing:
        raise NotImplementedError

    def upload(self, image: np.ndarray) -> tuple[Any, Any]:
        raise NotImplementedError

    def upload_crops(self, crops: np.ndarray) -> tuple[Any, Any]:
        """Host-made (P, 3, S, S) float32 crops (float images) -> (device crops, event)."""
        return self.upload(crops)

    def _ring_for(self, nbytes: int) -> StagingRing:
        with self._ring_lock:
            if self.ring is None:
                auto = min(RING_MAX_BYTES, max(RING_MIN_BYTES, self.ring_images * PinnedRing.footprint(nbytes)))
                self.ring = self._allocate(self.ring_bytes or auto)
            return self.ring

    def stage(self, image: np.ndarray) -> tuple[Any, Any]:
        """(H, W, 3) uint8 host image -> (Staged, None): copied into the staging ring, no CUDA call
        (Fill copies it over at the engine); or upload()'s (device tensor, event) when staged per image."""
        return self.stage_many([image])[0]

    def stage_many(self, images: list[np.ndarray]) -> list[tuple[Any, Any]]:
        """stage() for several images, their ring regions side by side (fewer copies at the engine).
        When an image staged per image fails, the regions already taken are freed before the error
        propagates (nothing would free them otherwise)."""
        ringed = [i for i, im in enumerate(images) if im.dtype == np.uint8] if self.staging == "batched" else []
        out: list[Any] = [None] * len(images)
        if ringed:
            got = self._ring_for(images[ringed[0]].nbytes).put_many([images[i] for i in ringed])
            for i, staged in zip(ringed, got, strict=True):
                if staged is not None:
                    out[i] = (staged, None)
            missed = [images[i].nbytes for i, staged in zip(ringed, got, strict=True) if staged is None]
            if missed:
                with self._ring_lock:
                    first = not self.staging_fallbacks
                    self.staging_fallbacks += len(missed)
                if first:  # once per stager: the run goes on, slower
                    log.warning("the staging ring (%.1f MiB) had no room for an image of %.2f MiB: images are "
                                "uploaded one by one while it is full (slower; counted in "
                                "PoseEstimator.device_stats). A larger staging_bytes avoids it.",
                                self.ring.size / 2**20, missed[0] / 2**20)
        try:
            return [self.upload(im) if got is None else got for im, got in zip(images, out, strict=True)]
        except BaseException:
            for got in out:
                if got is not None:
                    got[0].region.attach(None)
            raise

    def stats(self) -> dict[str, Any]:
        """How images reached the device so far: the staging way, the ring's bytes (None until the
        first image), images staged per image for want of room, JPEGs decoded on the GPU and refused."""
        return {"staging": self.staging, "ring_bytes": None if self.ring is None else self.ring.size,
                "staging_fallbacks": self.staging_fallbacks, "gpu_jpeg_decoded": self.gpu_jpeg_decoded,
                "gpu_jpeg_failures": self.gpu_jpeg_failures}

    def lease(self) -> Lease:
        """One predict run's hold on the ring: what it stages through the lease is freed exactly once."""
        return Lease(self)

    def release(self, staged: list[Staged], done: Any) -> None:
        """The images' ring regions are free once `done` fires (None: now)."""
        if staged:
            self.ring.release(staged, done)


class HostStager(Stager):
    """Stager on host memory only, for machines without a GPU: tests and the host-side benchmark
    (benchmarks/host_ceiling.py) run the real staging logic with it. The ring's mirror is a
    second host array filled with 7s (a range never copied in shows up); upload() returns the
    image itself. Nothing here touches a GPU."""

    def __init__(self, device: str = "host (stand-in)", gpu_jpeg: bool = True, staging: str = "batched",
                 ring_images: int = 256, ring_bytes: int | None = None) -> None:
        super().__init__(staging, ring_images, ring_bytes)
        self.device = device

    def _allocate(self, size: int) -> StagingRing:
        return StagingRing(np.zeros(size, np.uint8), np.full(size, 7, np.uint8))

    def upload(self, image: np.ndarray) -> tuple[Any, Any]:
        return np.ascontiguousarray(image), None

    def load(self, path: str | Path) -> tuple[Any, Any]:
        return self.stage(load_image(path))


class Uploader(Stager):
    """Stages and uploads uint8 images (and decodes JPEG files) for one device, on its own stream.

    gpu_jpeg: decode JPEG files on the GPU where torchvision can. nvJPEG's IDCT and chroma
    upsampling differ from libjpeg's (a mean of 2.47 grey levels measured on an H200 on
    colour-rich 4:2:0 files), so poses can differ slightly from the host path's; False decodes
    with OpenCV, as the host path does. staging, ring_images, ring_bytes: see Stager.
    """

    def __init__(self, device: str, gpu_jpeg: bool = True, staging: str = "batched", ring_images: int = 256,
                 ring_bytes: int | None = None) -> None:
        super().__init__(staging, ring_images, ring_bytes)
        import torch

        self.torch = torch
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # High priority: a stream pool of its own, so never the pool stream torch.cuda.graph captures on
        # (torch hands out default-priority pool streams in rotation; a capture would take the uploads in).
        self.stream = torch.cuda.Stream(self.device, priority=-1)
        self._decode_jpeg = _gpu_jpeg() if gpu_jpeg else None
        self._jpeg_lock = threading.Lock()  # one nvJPEG decode at a time
        # torchvision's nvJPEG decode allocates its output on the current stream but writes it on a
        # stream of its own that waits for nothing: with the upload stream current, the block of a
        # decode whose permute is still queued there could be handed to the next decode and
        # overwritten. Decoding on a stream of its own (high priority: away from the capture pool)
        # and record_stream on the upload stream keeps such a block out of reuse until it is read.
        self.jpeg_stream = torch.cuda.Stream(self.device, priority=-1) if self._decode_jpeg else None

    def _allocate(self, size: int) -> StagingRing:
        torch = self.torch
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        with torch.cuda.stream(self.stream):  # the mirror belongs to the upload stream that fills it
            mirror = torch.empty(size, dtype=torch.uint8, device=self.device)
        return StagingRing(host.numpy(), mirror, host)

    def upload(self, image: np.ndarray) -> tuple[Any, Any]:
        """A host array -> (device tensor, event marking its arrival): pinned by torch's caching
        allocator, one non-blocking copy on the upload stream."""
        torch = self.torch
        staged = torch.from_numpy(np.ascontiguousarray(image)).pin_memory()
        with torch.cuda.stream(self.stream):
            dev = staged.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return dev, ready

    def load(self, path: str | Path) -> tuple[Any, Any]:
        """An image file -> (Staged, None) or ((H, W, 3) uint8 RGB device tensor, event). JPEGs
        decode on the GPU where torchvision can; anything else (or a JPEG nvJPEG refuses) is decoded
        by OpenCV, as preprocess.load_image does, from the bytes already read, and staged."""
        data = read_image_file(path)  # image bombs are refused from the header, before any decoder
        if self._decode_jpeg is not None and gpu_decodable(data):
            got = self._gpu_decode(data)
            if got is not None:
                return got
        return self.stage(decode_image(data, path))

    def _gpu_decode(self, data: np.ndarray) -> tuple[Any, Any] | None:
        torch = self.torch
        from torchvision.io import ImageReadMode

        with self._jpeg_lock:
            if self._decode_jpeg is None:  # switched off by earlier failures
                return None
            try:
                with GRAPH_CAPTURE_LOCK, torch.cuda.stream(self.jpeg_stream):
                    chw = self._decode_jpeg(torch.from_numpy(data), mode=ImageReadMode.RGB, device=self.device)
                self.stream.wait_stream(self.jpeg_stream)  # the decode is ordered on its current stream
                with torch.cuda.stream(self.stream):
                    dev = chw.permute(1, 2, 0).contiguous()
                    chw.record_stream(self.stream)
                    ready = torch.cuda.Event()
                    ready.record(self.stream)
            except RuntimeError:  # e.g. JPEGs nvJPEG does not take (CMYK, ...): OpenCV decodes them
                self.gpu_jpeg_failures += 1
                if self.gpu_jpeg_failures >= 3 and not self.gpu_jpeg_decoded:
                    self._decode_jpeg = None  # a torchvision without a working GPU decoder: stop trying
                return None
            self.gpu_jpeg_decoded += 1
        return dev, ready


class Fill:
    """enqueue_device's fill for one engine call.

    uploads: (image, event) per image cut by the kernel: a Staged image of the uploader's ring
    (event None) or a device uint8 tensor; index, affines, flips: the kernel's people (the input
    rows not in crop_rows, ascending); crop_rows: (first row, device crops, event) of host-made
    crops copied in as they are; copied: shared by the fills of one batch, region id -> the event
    of its copy to the device, so an image read by several calls is copied once; after: the
    batch's previous fill, whose `done` this call waits for on the device (a batch's calls then
    finish in order on any engine, so the last call's event covers the earlier ones' reads).

    On the GPU the staged images' ranges not copied yet are copied on the upload stream
    (StagingRing.copy_in); the engine's stream waits for every copy it reads and keeps each
    per-image tensor alive until its own work is done. After the call, `done` is an event on the
    engine's stream after everything the call enqueued (set even when the call failed part way),
    when the ring regions it read are free again. Given a host array (stand-in engines in tests)
    the same steps run on the host and `done` stays None.
    """

    def __init__(self, uploads: list[tuple[Any, Any]], index: np.ndarray, affines: np.ndarray, flips: np.ndarray,
                 crop_rows: list[tuple[int, Any, Any]], size: int, uploader: Any,
                 copied: dict[int, Any] | None = None, after: Fill | None = None) -> None:
        self.uploads, self.index, self.affines, self.flips = uploads, index, affines, flips
        self.crop_rows, self.size, self.uploader = crop_rows, size, uploader
        self.staged = [s for s, _ in uploads if isinstance(s, Staged)]
        self.copied = {} if copied is None else copied
        self.after = after
        self.done: Any = None

    def _images(self) -> list[Any]:
        ring = self.uploader.ring
        return [ring.view(s) if isinstance(s, Staged) else s for s, _ in self.uploads]

    def __call__(self, inputs: Any, stream: int) -> None:
        if isinstance(inputs, np.ndarray):
            if self.staged:
                self.uploader.ring.copy_in(self.staged)
            write_rows(inputs, self._images(), self.index, self.affines, self.flips, self.crop_rows, self.size, stream)
            return
        import torch

        up = self.uploader
        target = torch_stream(stream, up.device)  # the engine's stream: the crop kernel runs on it
        try:
            if self.after is not None and self.after.done is not None:
                target.wait_event(self.after.done)
            # The caching allocator keeps what the engine's stream reads until that stream is done with
            # it; not for a stream torch does not own (TensorRT's): torch would record an event on it when
            # the memory is freed, perhaps after the engine destroyed it. The batch holds those until
            # its results are waited for.
            keep = not isinstance(target, torch.cuda.ExternalStream)
            if self.staged and keep:
                up.ring.mirror.record_stream(target)
            fresh = [s for s in self.staged if id(s.region) not in self.copied]
            if fresh:
                with torch.cuda.stream(up.stream):
                    up.ring.copy_in(fresh)
                    arrived = torch.cuda.Event()
                    arrived.record(up.stream)
                self.copied.update((id(s.region), arrived) for s in fresh)
            for event in {id(e): e for e in (self.copied[id(s.region)] for s in self.staged)}.values():
                target.wait_event(event)
            waits = [(t, e) for t, e in self.uploads if not isinstance(t, Staged)]
            for tensor, ready in [*waits, *((t, e) for _, t, e in self.crop_rows)]:
                target.wait_event(ready)
                if keep:
                    tensor.record_stream(target)
            dest = inputs if hasattr(inputs, "data_ptr") else torch.as_tensor(inputs, device=up.device)
            with torch.cuda.stream(target):
                write_rows(dest, self._images(), self.index, self.affines, self.flips, self.crop_rows, self.size,
                           stream)
        except BaseException:
            target.wait_stream(up.stream)  # copies enqueued before the failure: `done` comes after them
            raise
        finally:
            done = torch.cuda.Event()
            done.record(target)
            self.done = done


def write_rows(dest: Any, images: list[Any], index: np.ndarray, affines: np.ndarray, flips: np.ndarray,
               crop_rows: list[tuple[int, Any, Any]], size: int, stream: int) -> None:
    """Write a batch's input rows: host-made crops copied into their rows, every other row cut by
    the fused crop kernel (in runs of consecutive rows). Works on device arrays (the kernel on
    `stream`) and on host arrays alike (the CPU kernel; tests)."""
    for first, crops, _ in crop_rows:
        rows = dest[first:first + len(crops)]
        if hasattr(rows, "copy_"):
            rows.copy_(crops, non_blocking=True)
        else:
            rows[...] = crops
    if not len(index):
        return
    if not crop_rows:
        crop_normalize(images, index, affines, size, flip=flips, out=dest[:len(index)], stream=stream,
                       round_pixels=True)
        return
    taken = np.zeros(len(dest), bool)
    for first, crops, _ in crop_rows:
        taken[first:first + len(crops)] = True
    free = np.flatnonzero(~taken)
    if len(free) != len(index):
        raise ValueError(f"the kernel's people ({len(index)}) must fill the rows left by host crops ({len(free)})")
    start = 0
    for run in np.split(free, np.flatnonzero(np.diff(free) != 1) + 1):
        stop = start + len(run)
        crop_normalize(images, index[start:stop], affines[start:stop], size, flip=flips[start:stop],
                       out=dest[int(run[0]):int(run[-1]) + 1], stream=stream, round_pixels=True)
        start = stop

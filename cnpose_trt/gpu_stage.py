"""The device-resident side of PoseEstimator: images go to the GPU once, as uint8.

Each image is copied into pinned (page-locked) host memory and uploaded on one upload stream
with a non-blocking copy; an event marks its arrival. JPEG files are decoded on the GPU where
torchvision offers it (torchvision.io.decode_jpeg(device="cuda")), else by OpenCV on the host
and uploaded. At the engine, `fill` makes the engine's stream wait for those events and runs the
fused CUDA crop-and-normalise kernel (cropping.crop_normalize) straight into the engine's input
buffer, so batch k+1's uploads (made by the prep threads while batch k runs) overlap the
network. torch is needed for the pinned staging and the streams; TensorRT engines use it too.
"""

from __future__ import annotations

import collections
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import compiled
from .backends import importable
from .engine import Engine

_JPEG_MAGIC = b"\xff\xd8\xff"
STAGINGS = ("pin_memory", "ring")  # how Uploader stages uint8 images in pinned memory


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
    from .imageio_guard import jpeg_orientation

    head = bytes(data[:3])
    return head == _JPEG_MAGIC and jpeg_orientation(bytes(data[:1 << 16])) in (None, 1)


class _Region:
    """Bytes [start, end) of a PinnedRing, busy until the copy out of them has finished."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self._attached = threading.Event()
        self._done: Any = None

    def attach(self, done: Any) -> None:
        """done: an event (synchronize()) recorded after the copy out of the region; None when the
        upload failed before any copy was enqueued."""
        self._done = done
        self._attached.set()

    def wait(self) -> None:
        self._attached.wait()
        if self._done is not None:
            self._done.synchronize()


class PinnedRing:
    """Page-locked staging allocated once, used as a ring: each upload takes the next `nbytes`,
    and a region is reused only after the copy out of it has finished (its event). Regions are
    handed out in order, so the ones in the way of a new region are always the oldest.

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
        """A region of nbytes (waiting for old copies when the ring is full), or None when nbytes
        exceeds the whole ring (the caller stages that upload another way)."""
        nbytes = -(-nbytes // self.ALIGN) * self.ALIGN  # regions start on 256-byte boundaries
        if not 0 < nbytes <= self.size:
            return None
        with self._lock:
            start = self._head if self._head + nbytes <= self.size else 0
            end = start + nbytes
            while any(r.start < end and start < r.end for r in self._live):
                self._live.popleft().wait()  # oldest first: copies finish in the order they were made
            region = _Region(start, end)
            self._live.append(region)
            self._head = end
            return region


class Uploader:
    """Uploads uint8 images (and decodes JPEG files) onto one device, on its own stream.

    gpu_jpeg: decode JPEG files on the GPU where torchvision can. nvJPEG's IDCT and chroma
    upsampling differ from libjpeg's (a mean of 2.47 grey levels measured on an H200 on
    colour-rich 4:2:0 files), so poses can differ slightly from the host path's; False decodes
    with OpenCV, as the host path does.
    staging: "pin_memory" (torch's caching pinned allocator per image; measured on an H200: the
    end-to-end limit) or "ring" (one PinnedRing of ring_bytes allocated once; not yet measured
    on a GPU, benchmarks/gpu_e2e.py compares them).
    """

    def __init__(self, device: str, gpu_jpeg: bool = True, staging: str = "pin_memory",
                 ring_bytes: int = 128 << 20) -> None:
        if staging not in STAGINGS:
            raise ValueError(f"staging must be one of {', '.join(STAGINGS)}, got {staging!r}")
        import torch

        self.torch = torch
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self._decode_jpeg = _gpu_jpeg() if gpu_jpeg else None
        self._jpeg_lock = threading.Lock()  # one nvJPEG decode at a time
        self.gpu_jpeg_failures = 0
        self.gpu_jpeg_decoded = 0
        self._ring: PinnedRing | None = None
        if staging == "ring":
            self._ring_tensor = torch.empty(int(ring_bytes), dtype=torch.uint8, pin_memory=True)
            self._ring = PinnedRing(self._ring_tensor.numpy())

    def upload(self, image: np.ndarray) -> tuple[Any, Any]:
        """(H, W, 3) uint8 host image -> (device tensor, event marking its arrival)."""
        torch = self.torch
        region = self._ring.take(image.nbytes) if self._ring is not None and image.dtype == np.uint8 else None
        if region is None:
            staged = torch.from_numpy(np.ascontiguousarray(image)).pin_memory()
            with torch.cuda.stream(self.stream):
                dev = staged.to(self.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.stream)
            return dev, ready
        ready = None
        try:
            stop = region.start + image.nbytes
            np.copyto(self._ring.buffer[region.start:stop].reshape(image.shape), image)
            with torch.cuda.stream(self.stream):
                dev = torch.empty(image.shape, dtype=torch.uint8, device=self.device)
                dev.copy_(self._ring_tensor[region.start:stop].view(image.shape), non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.stream)
        finally:
            region.attach(ready)  # None when nothing was enqueued: the region is free at once
        return dev, ready

    def upload_crops(self, crops: np.ndarray) -> tuple[Any, Any]:
        """Host-made (P, 3, S, S) float32 crops (float images) -> device tensor, event."""
        return self.upload(crops)

    def load(self, path: str | Path) -> tuple[Any, Any]:
        """An image file -> (H, W, 3) uint8 RGB device tensor, event. JPEGs decode on the GPU where
        torchvision can; anything else (or a JPEG nvJPEG refuses) is decoded by OpenCV, as
        preprocess.load_image does, from the bytes already read."""
        from .preprocess import decode_image, read_image_file

        data = read_image_file(path)  # image bombs are refused from the header, before any decoder
        if self._decode_jpeg is not None and gpu_decodable(data):
            got = self._gpu_decode(data)
            if got is not None:
                return got
        return self.upload(decode_image(data, path))

    def _gpu_decode(self, data: np.ndarray) -> tuple[Any, Any] | None:
        torch = self.torch
        from torchvision.io import ImageReadMode

        with self._jpeg_lock:
            if self._decode_jpeg is None:  # switched off by earlier failures
                return None
            try:
                with torch.cuda.stream(self.stream):
                    chw = self._decode_jpeg(torch.from_numpy(data), mode=ImageReadMode.RGB, device=self.device)
                    dev = chw.permute(1, 2, 0).contiguous()
                    ready = torch.cuda.Event()
                    ready.record(self.stream)
            except RuntimeError:  # e.g. JPEGs nvJPEG does not take (CMYK, ...): OpenCV decodes them
                self.gpu_jpeg_failures += 1
                if self.gpu_jpeg_failures >= 3 and not self.gpu_jpeg_decoded:
                    self._decode_jpeg = None  # a torchvision without a working GPU decoder: stop trying
                return None
            self.gpu_jpeg_decoded += 1
        return dev, ready


def make_fill(uploads: list[tuple[Any, Any]], index: np.ndarray, affines: np.ndarray, flips: np.ndarray,
              crop_rows: list[tuple[int, Any, Any]], size: int, device: Any) -> Any:
    """enqueue_device's fill for one batch.

    uploads: (device uint8 image, event) per image cut by the kernel; index, affines, flips: the
    kernel's people (the input rows not in crop_rows, ascending); crop_rows: (first row, device
    crops, event) of host-made crops copied in as they are. The engine's stream first waits for
    every upload, and keeps each uploaded tensor alive until its own work is done.
    """

    def fill(inputs: Any, stream: int) -> None:
        import torch

        target = torch.cuda.ExternalStream(stream, device=device)
        for tensor, ready in [*uploads, *((t, e) for _, t, e in crop_rows)]:
            target.wait_event(ready)
            tensor.record_stream(target)  # the allocator keeps it until the engine's stream is done
        dest = inputs if hasattr(inputs, "data_ptr") else torch.as_tensor(inputs, device=device)
        with torch.cuda.stream(target):
            write_rows(dest, [t for t, _ in uploads], index, affines, flips, crop_rows, size, stream)

    return fill


def write_rows(dest: Any, images: list[Any], index: np.ndarray, affines: np.ndarray, flips: np.ndarray,
               crop_rows: list[tuple[int, Any, Any]], size: int, stream: int) -> None:
    """Write a batch's input rows: host-made crops copied into their rows, every other row cut by
    the fused crop kernel (in runs of consecutive rows). Works on device arrays (the kernel on
    `stream`) and on host arrays alike (the CPU kernel; tests)."""
    from .cropping import crop_normalize

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

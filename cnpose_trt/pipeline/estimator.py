"""PoseEstimator: images and their people's boxes in, one PoseResult per image out, in order.

It batches and schedules: the caller's items are read ahead through a window.Window (prepared on
the prep threads), gathered into batches of at most one engine call's people, and each batch is
handed to the run's path: host.HostPath (crops on the host; the engine, then the decode thread or
the engine's fused decode) or device.DevicePath (uint8 images cut on the GPU into the engine's
input). Results come back in order; an error is delivered after every result before it.
"""

from __future__ import annotations

import collections
import threading
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .. import checks
from ..backends import session_options
from ..config import BuildConfig, EngineRequest
from ..io.preprocess import CROP_METHODS, check_image
from ..runtime.engine import Engine
from ..runtime.open import open_engine
from ..shipped import flip_for
from ..spec import VariantSpec
from . import gpu_stage
from . import items as items_
from .device import IN_FLIGHT, DevicePath
from .host import HostPath
from .items import call_chunks  # noqa: F401  (re-export: its old home)
from .results import PoseResult, Timings
from .roots import open_rootnet
from .window import Window


class PoseEstimator:
    """3D poses of many people in many images, as fast as the engine allows.

    Work is chunked into batches of the engine's max_batch crops (the flip test makes two crops per
    person; the last batch is smaller; images whose people fit are not split, so a batch may hold
    fewer) and pipelined: while batch k runs in the engine, the people of batch k+1 are cropped
    and normalised on a thread pool and batch k-1 is decoded on another thread (on a GPU engine
    the decode runs on the device, right after the network: Engine.infer_decode). Memory stays
    bounded: at most `prefetch` batches are prepared ahead and one batch waits for its decode.
    An image with more people than one engine call takes is cut into parts of one call each,
    a part cropped when the one before it is taken (GPU crops: cut into calls from the uploaded
    image), and its results joined into one PoseResult: memory follows max_batch, not the
    number of people in an image.

    Thread safety: one estimator may be shared by several threads. predict() and
    predict_iter() hold an internal lock while they run (a predict_iter generator until it is
    exhausted or closed), so calls from different threads run one after the other, each with
    the whole engine; results never mix.

    Args:
        engine_or_variant: an Engine, an engine file (or its .json), or a variant name / spec to
            build (or reuse from the cache) with build_engine(**build_options); default "XS".
            variant= is accepted as its keyword name.
        prep_threads: threads that crop and normalise.
        prefetch: batches prepared ahead of the engine.
        crop_method: "auto" (the compiled fused crop-and-normalise kernel where built, else
            OpenCV), "fused" or "opencv" (upstream's exact crops; see preprocess.crop_people).
            On a GPU engine "auto" and "fused" crop on the GPU (device_crops; see gpu_stage):
            uint8 images go to the device once and are cut into the engine's input buffer.
            Up to prefetch x max_batch images are then held on the GPU at a time.
        gpu_jpeg: on the GPU path, decode JPEG files given as image paths on the GPU (nvJPEG
            through torchvision); False decodes them with OpenCV as the host path does (nvJPEG's
            pixels differ from libjpeg's by a few grey levels).
        staging: on the GPU path, how uint8 images reach the device: "batched" (the prep threads
            copy them into one pinned ring, mirrored on the device; one copy per engine call) or
            "per_image" (a pinned allocation, copy and event per image: the way measured to limit
            the pipeline on an H200). See gpu_stage.
        staging_bytes: the batched staging ring's size (host and device memory each); None: room
            for (prefetch + 4) x max_batch images the size of the first one (what can be in flight:
            prefetched, batching, enqueued), 64 MiB to 1 GiB.
            Images that find no room are staged per image (device_stats counts them; a warning is
            logged the first time).
        threads, spinning: the engine's session options where PoseEstimator loads it (a variant
            or an engine file): ONNX Runtime intra-op threads (0: one per core) and whether its idle
            threads spin (see backends/onnxruntime; torch engines take threads). None: the engine's
            default. An Engine passed in keeps the options it was loaded with.
        rootnet: root depths for items that give none: a RootNet engine (loaded, an engine file, an
            EngineRequest, or a RootNet checkpoint built with the pose engine's backend and precision
            into engine_dir), or "prior" (depth = k, gamma = 1: from the box size alone; marked
            root_source "prior"). Each item then needs intrinsics (fx, fy enter RootNet's k); its
            results carry absolute depths, camera coordinates, roots and root_source. RootNet takes
            the very crops the pose engine takes, one call per pose call (see pipeline/roots.py);
            crops are then made on the host (GPU crops feed one engine only, for now).
        prep_chunk: items handed to a prep thread at a time (fewer tasks and thread hand-offs,
            each of which costs the GIL); None: max_batch x prefetch / (2 x prep_threads),
            between 1 and 16. Capped at max_batch x prefetch / prep_threads, so every prep thread
            has work.
    """

    def __init__(self, engine_or_variant: Any = None, *, checkpoint: Any = None, backend: str = "auto",
                 precision: str = "fp32", max_batch: int | None = None, engine_dir: Any = None,
                 prep_threads: int = 2, prefetch: int = 2, crop_method: str = "auto", gpu_jpeg: bool = True,
                 staging: str = "batched", staging_bytes: int | None = None, prep_chunk: int | None = None,
                 threads: int | None = None, spinning: bool | None = None, rootnet: Any = None,
                 **build_options: Any) -> None:
        if "variant" in build_options:  # PoseEstimator(variant="M"): the keyword it looks like
            variant = build_options.pop("variant")
            if engine_or_variant is not None:
                raise ValueError(f"give the variant once: as the first argument ({engine_or_variant!r}) or as "
                                 f"variant= ({variant!r}), not both")
            engine_or_variant = variant
        if engine_or_variant is None:
            engine_or_variant = "XS"
        if prep_threads < 1 or prefetch < 1:
            raise ValueError(f"prep_threads and prefetch must be >= 1, got {prep_threads}, {prefetch}")
        checks.integer("prep_chunk", prep_chunk, 1, none=True)
        checks.integer("staging_bytes", staging_bytes, 256, none=True, hint="bytes")
        checks.one_of("crop_method", crop_method, CROP_METHODS)
        checks.one_of("staging", staging, gpu_stage.STAGINGS)  # checked before any engine is built
        self.engine = _open(engine_or_variant, checkpoint=checkpoint, backend=backend, precision=precision,
                            max_batch=max_batch, engine_dir=engine_dir, threads=threads, spinning=spinning,
                            build_options=build_options)
        self.engine.require_model("convnextpose", "PoseEstimator")  # a RootNet engine: one line, not garbage poses
        meta = getattr(self.engine, "meta", None) or {}  # a RootNet checkpoint is built like the pose engine
        self.rootnet = open_rootnet(rootnet, backend=meta.get("backend", backend),
                                    precision=getattr(self.engine, "precision", precision), engine_dir=engine_dir,
                                    load=session_options(threads, spinning))
        if self.rootnet is not None:
            self.rootnet.check_crops(self.engine.spec.input_shape, "the pose engine")
        self.crop_method = crop_method
        self.prep_threads, self.prefetch, self.prep_chunk = prep_threads, prefetch, prep_chunk
        self.max_batch = self.engine.max_batch
        # Re-entrant: one thread may interleave two predict_iter generators; other threads wait.
        self._lock = threading.RLock()
        self.timings = Timings()
        self._flip_noticed = False
        # An engine on a GPU decodes where its output lives (Engine.infer_decode): the heatmaps
        # never come to the host. A CPU engine's heatmaps are decoded on the decode thread.
        self._on_device = bool(self.engine.on_device)
        # Device-resident path (device.py): uint8 images uploaded once, cut on the GPU straight
        # into the engine's input buffer. Where it cannot run, crops are made on the host.
        self._uploader: Any = None
        self.device_crops_unavailable: str | None = "crop_method 'opencv' crops on the host"
        if self.rootnet is not None:
            self.device_crops_unavailable = "root depths are estimated (rootnet) on the host path's crops"
        elif self._on_device and crop_method != "opencv":
            self.device_crops_unavailable = gpu_stage.usable(self.engine)
            if self.device_crops_unavailable is None:
                self._uploader = gpu_stage.Uploader(
                    self.engine.device, gpu_jpeg=bool(gpu_jpeg), staging=staging,
                    ring_images=(prefetch + IN_FLIGHT + 2) * max(1, self.max_batch), ring_bytes=staging_bytes)
        elif not self._on_device:
            self.device_crops_unavailable = "the engine runs on the CPU"

    @property
    def device_crops(self) -> bool:
        """True when images are uploaded as uint8 and cropped on the GPU into the engine's input."""
        return self._uploader is not None

    @property
    def device_stats(self) -> dict[str, Any] | None:
        """On the GPU path, how images reached the device so far: staging ("batched" or
        "per_image"), ring_bytes (the staging ring's size, host and device each; None before the
        first image), staging_fallbacks (images uploaded one by one because the ring had no room:
        raise staging_bytes when it grows), gpu_jpeg_decoded and gpu_jpeg_failures (JPEG files
        decoded by nvJPEG, and refused by it and decoded by OpenCV). None without the GPU path."""
        return None if self._uploader is None else self._uploader.stats()

    @property
    def spec(self) -> Any:
        return self.engine.spec

    def predict(self, images: Any, boxes: Any = None, *, crop_boxes: Any = None, root_depth: Any = None,
                intrinsics: Any = None, flip: bool = False) -> PoseResult | list[PoseResult]:
        """Poses for one image (H, W, 3), or for a list of images (one result each, in order).

        Args:
            images: one (H, W, 3) RGB image (uint8, or float in 0..255), or a list of them.
            boxes: person boxes x, y, w, h: (P, 4) for one image, a list of (P_i, 4) for a list;
                they go through upstream's box rule (squared, x1.25). P may be 0.
            crop_boxes: instead of boxes, boxes that already went through that rule (e.g.
                RootNet's output boxes), used as they are; same shapes as boxes.
            root_depth: pelvis depth in mm, > 0: scalar or (P,) for one image; for a list, one
                value for all images or one entry per image.
            intrinsics: fx, fy, cx, cy: (4,) (or (P, 4) for one image); for a list, one (4,) for
                all images or one entry per image. Needs root_depth, unless the estimator has a rootnet
                (then intrinsics are what it needs: RootNet's depth scales with the focal length).
            flip: the flip test (average with the mirrored crop).
        Returns:
            a PoseResult, or a list of them in the order of the images.
        """
        if (boxes is None) == (crop_boxes is None):
            raise ValueError("give exactly one of boxes (person boxes; upstream's box rule is applied) or "
                             "crop_boxes (already processed, used as they are)")
        key = "boxes" if crop_boxes is None else "crop_boxes"
        given = boxes if crop_boxes is None else crop_boxes
        single, images = items_.image_list(images)
        if single:
            item = {"image": images[0], key: given, "root_depth": root_depth, "intrinsics": intrinsics}
            return next(iter(self.predict_iter([item], flip=flip)))
        if not isinstance(given, (list, tuple)) or len(given) != len(images):
            raise ValueError(f"{key} must be a list with one (P, 4) array per image ({len(images)} images)")
        roots = items_.per_image("root_depth", root_depth, len(images), ())
        ks = items_.per_image("intrinsics", intrinsics, len(images), (4,))
        items = [{"image": im, key: b, "root_depth": r, "intrinsics": k}
                 for im, b, r, k in zip(images, given, roots, ks, strict=True)]
        return list(self.predict_iter(items, flip=flip))

    def predict_iter(self, items: Iterable[Any], *, flip: bool = False) -> Iterator[PoseResult]:
        """Stream results for (image, boxes[, root_depth[, intrinsics]]) tuples or dicts, in order.

        A dict item has 'image' and 'boxes' or 'crop_boxes' (see predict), optional 'root_depth'
        and 'intrinsics'. An image with no people gives an empty PoseResult. When the source
        raises, or an item is bad, every result before it is delivered first, then the error.
        """
        flip = self._flip(flip)
        with self._lock:
            path = self._path(flip)
            try:
                yield from self._predict_iter(items, path)
            finally:  # after the prep threads stopped: the path frees what never reached the engine
                path.close()

    def _flip(self, flip: bool) -> bool:
        """shipped.flip_for: the shipped synthetic model runs without the flip test, said once per estimator."""
        flip, notice = flip_for(getattr(self.engine, "meta", None), bool(flip))
        if notice and not self._flip_noticed:
            self._flip_noticed = True
            warnings.warn(notice, stacklevel=4)
        return flip

    def _path(self, flip: bool) -> HostPath:
        """This run's path: the device path where it serves (it needs room for a crop and its
        mirror in one engine call), else the host path."""
        per_call = items_.per_call(self.max_batch, flip)
        if self._uploader is not None and not (flip and self.max_batch < 2):
            return DevicePath(self.engine, self.crop_method, self.timings, flip, per_call, self._uploader)
        return HostPath(self.engine, self.crop_method, self.timings, flip, per_call, on_device=self._on_device,
                        roots=self.rootnet)

    def _predict_iter(self, items: Iterable[Any], path: HostPath) -> Iterator[PoseResult]:
        """Batches from the window run on the path; batch k's results are yielded once batch
        k + path.in_flight is running (the host path: batch k-1 decoded while batch k runs; the
        device path: two batches stay enqueued, so host hiccups do not idle the GPU)."""
        with ThreadPoolExecutor(self.prep_threads, thread_name_prefix="cnpose-prep") as prep:
            window = Window(items, path, prep, max(1, self.max_batch) * self.prefetch, self.prefetch,
                            self.prep_threads, self.prep_chunk)
            running: collections.deque[Any] = collections.deque()  # Futures / results.Later: .result()
            for batch, people in window.batches(path.per_call):
                running.append(path.run(batch, people))
                while len(running) > path.in_flight:
                    yield from running.popleft().result()
            while running:
                yield from running.popleft().result()
            if window.failure is not None:
                raise window.failure


def _open(engine_or_variant: Any, *, checkpoint: Any, backend: str, precision: str, max_batch: int | None,
          engine_dir: Any, threads: int | None, spinning: bool | None, build_options: dict[str, Any]) -> Engine:
    """PoseEstimator's engine: an Engine as it is; an EngineRequest, a variant (built or reused
    from the cache with these options) or an engine file opened by runtime.open.open_engine."""
    load_options = session_options(threads, spinning)
    if isinstance(engine_or_variant, Engine):
        if load_options:
            raise ValueError(f"{' and '.join(load_options)} apply where PoseEstimator loads the engine; pass "
                             "them to load_engine for an Engine that is already loaded")
        return engine_or_variant
    if isinstance(engine_or_variant, EngineRequest):
        if load_options:
            raise ValueError(f"{' and '.join(load_options)} go in the EngineRequest's load options")
        return open_engine(engine_or_variant)
    if isinstance(engine_or_variant, (str, Path, VariantSpec)) and (
            isinstance(engine_or_variant, VariantSpec) or not Path(str(engine_or_variant)).suffix):
        extra = {} if max_batch is None else {"max_batch": max_batch}
        config = BuildConfig(engine_or_variant, checkpoint, backend=backend, precision=precision,
                             out_dir=engine_dir, **extra, **build_options)
        return open_engine(EngineRequest(build=config, load=load_options))
    return open_engine(EngineRequest(engine=engine_or_variant, load=load_options))


def estimate(engine: Engine, image: np.ndarray, boxes: Any = None, *, crop_boxes: Any = None,
             root_depth: Any = None, intrinsics: Any = None, flip: bool = False,
             crop_method: str = "auto", rootnet: Any = None) -> PoseResult:
    """3D poses of the people in one image (a one-off PoseEstimator(engine).predict).

    Args:
        engine: from load_engine.
        image: (H, W, 3) RGB, uint8 or float 0..255.
        boxes: (P, 4) or (4,) person boxes x, y, w, h in pixels; upstream's box rule is applied
            (inclusive width, shifted into the image, squared, x1.25).
        crop_boxes: instead of boxes, boxes that already went through that rule (e.g. RootNet's
            output boxes), used as they are.
        root_depth: camera-space depth of each person's pelvis in mm (> 0), scalar or (P,);
            without it depths are root-relative.
        intrinsics: fx, fy, cx, cy as (4,) or (P, 4); needs root_depth.
        flip: average with the horizontally flipped crop (flip test).
        crop_method: "auto", "fused" or "opencv" (see PoseEstimator).
        rootnet: root depths from RootNet or "prior" when root_depth is not given (see PoseEstimator).
    Raises:
        ValueError: bad boxes (empty, outside the image), intrinsics without root_depth, shapes.
    """
    return PoseEstimator(engine, crop_method=crop_method, rootnet=rootnet).predict(
        check_image(image), boxes, crop_boxes=crop_boxes, root_depth=root_depth, intrinsics=intrinsics, flip=flip)

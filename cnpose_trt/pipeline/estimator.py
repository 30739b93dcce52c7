"""One image, several people: crop -> engine -> heatmaps -> decode -> image px, mm, camera mm."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .. import checks
from ..io.preprocess import check_image, crop_people, load_image, resolve_crop_boxes
from ..ops.decoding import decode
from ..ops.geometry import as_array, check_intrinsics, check_root_depth, crop_matrices, per_person
from ..runtime.engine import Engine
from ..spec import JOINT_NAMES
from .gpu_stage import Staged


@dataclasses.dataclass
class PoseResult:
    """Poses of P people. Shapes: crop_boxes (P, 4); cells, image (P, J, 3); confidence (P, J).

    image holds x_px, y_px, depth_mm (root-relative when no root depth was given); camera holds
    X, Y, Z in mm (camera frame) when intrinsics and root depth were given, else None.
    """

    boxes: np.ndarray
    crop_boxes: np.ndarray
    cells: np.ndarray
    confidence: np.ndarray
    image: np.ndarray
    camera: np.ndarray | None
    root_relative: bool
    joint_names: tuple[str, ...] = JOINT_NAMES

    def __len__(self) -> int:
        return len(self.cells)

    def to_dict(self) -> list[dict[str, Any]]:
        """JSON-ready list, one entry per person, joints by name."""
        people = []
        for p in range(len(self)):
            joints = {}
            for j, name in enumerate(self.joint_names):
                entry = {"x_px": float(self.image[p, j, 0]), "y_px": float(self.image[p, j, 1]),
                         "depth_mm": float(self.image[p, j, 2]), "confidence": float(self.confidence[p, j])}
                if self.camera is not None:
                    entry["camera_mm"] = [float(v) for v in self.camera[p, j]]
                joints[name] = entry
            people.append({"bbox": [float(v) for v in self.boxes[p]],
                           "crop_box": [float(v) for v in self.crop_boxes[p]],
                           "depth": "root-relative" if self.root_relative else "absolute",
                           "joints": joints})
        return people


_END = object()  # end of the item stream (an item itself may be anything, None included)
_GPU_IN_FLIGHT = 2  # batches enqueued on the GPU path before the host waits for the oldest


class Timings:
    """Seconds spent per stage (prepare runs on several threads: its time is summed over them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.seconds = {"prepare": 0.0, "infer": 0.0, "decode": 0.0}
            self.images = self.people = 0

    def add(self, stage: str, seconds: float, images: int = 0, people: int = 0) -> None:
        with self._lock:
            self.seconds[stage] += seconds
            self.images += images
            self.people += people

    def shares(self) -> dict[str, float]:
        """Each stage's share of the summed stage time."""
        total = sum(self.seconds.values()) or 1.0
        return {k: v / total for k, v in self.seconds.items()}

    def __repr__(self) -> str:
        with self._lock:
            seconds, images, people = dict(self.seconds), self.images, self.people
        total = sum(seconds.values()) or 1.0
        stages = ", ".join(f"{k} {v:.3f} s ({v / total:.0%})" for k, v in seconds.items())
        per = f", {seconds['infer'] / people * 1e3:.2f} ms infer per person" if people else ""
        return f"Timings({images} images, {people} people: {stages}{per})"


@dataclasses.dataclass
class _Item:
    """One image's people on their way through the pipeline."""

    boxes: np.ndarray
    crops: Any                 # (P, 3, S, S) host crops, or device crops (float images on the GPU path)
    mirrored: Any              # (P, 3, S, S) the mirrored crops when flipping (host path), else None
    crop_boxes: np.ndarray
    root_depth: np.ndarray | None
    intrinsics: np.ndarray | None
    image_dev: Any = None      # GPU path: the uint8 image cut by the crop kernel: on the device, or staged
    ready: Any = None          # GPU path: event marking the upload's (or device crops') arrival
    affines: np.ndarray | None = None  # GPU path: (P, 2, 3) crop maps of image_dev
    host_image: np.ndarray | None = None  # GPU path: a uint8 image its prep run still has to stage
    whole: _Whole | None = None  # a part of an image with more people than one engine call takes
    rest: _Rest | None = None    # the people after this part, cropped when this part is taken


class _Whole:
    """The PoseResults of an image's parts, joined into one when its last part is decoded."""

    def __init__(self) -> None:
        self.parts: list[PoseResult] = []


@dataclasses.dataclass
class _Rest:
    """An image's people from `first` on, not cropped yet (arrays over all of its people)."""

    image: np.ndarray
    boxes: np.ndarray
    crop_boxes: np.ndarray
    root_depth: np.ndarray | None
    intrinsics: np.ndarray | None
    first: int
    whole: _Whole


def call_chunks(people: int, per_call: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most per_call people covering 0..people: how an image's people
    (or a batch's) are cut into engine calls on every path, host crops and GPU crops alike."""
    per_call = max(1, int(per_call))
    return [(start, min(people, start + per_call)) for start in range(0, people, per_call)]


def _root_depth(value: Any, p: int) -> np.ndarray | None:
    root = per_person("root_depth", value, p, ())
    check_root_depth(root)
    return root


def _intrinsics(value: Any, p: int) -> np.ndarray | None:
    k = per_person("intrinsics", value, p, (4,))
    check_intrinsics(k)
    return k


def _host(packed: Any) -> np.ndarray:
    """float64 numpy copy of a decode result (numpy or torch, host or device)."""
    if hasattr(packed, "detach"):
        packed = packed.detach().cpu().numpy()
    return np.asarray(packed, dtype=np.float64)


_ITEM_KEYS = ("image", "boxes", "crop_boxes", "root_depth", "intrinsics")


def _unpack(entry: Any) -> dict[str, Any]:
    """An item as a dict with every key of _ITEM_KEYS (missing ones None)."""
    if isinstance(entry, dict):
        unknown = set(entry) - set(_ITEM_KEYS)
        if unknown or "image" not in entry or (("boxes" in entry) == ("crop_boxes" in entry)):
            raise ValueError("an item dict needs 'image' and one of 'boxes' (person boxes) or 'crop_boxes' "
                             f"(already processed, used as they are); optional 'root_depth', 'intrinsics'; "
                             f"got keys {sorted(entry)}")
        return {k: entry.get(k) for k in _ITEM_KEYS}
    if isinstance(entry, (tuple, list)) and 2 <= len(entry) <= 4:
        image, boxes, *rest = entry
        rest += [None] * (2 - len(rest))
        return {"image": image, "boxes": boxes, "crop_boxes": None, "root_depth": rest[0], "intrinsics": rest[1]}
    raise TypeError("items must be (image, boxes[, root_depth[, intrinsics]]) tuples or dicts with 'image' and "
                    f"'boxes' or 'crop_boxes', got {type(entry).__name__}")


_IMAGES_WANTED = "one (H, W, 3) RGB image (uint8, or float in 0..255) or a list of them (arrays or file paths)"


def _image_list(images: Any) -> tuple[bool, list[Any]]:
    """predict's images as (one image?, list of images); anything else refused in one line."""
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            return True, [images]
        if images.ndim == 4:
            return False, list(images)
        hint = ": a grayscale image? stack it to (H, W, 3) uint8" if images.ndim == 2 else ""
        raise ValueError(f"images must be {_IMAGES_WANTED}, got a numpy array of shape {images.shape}{hint}")
    if isinstance(images, (str, Path)):
        return True, [images]
    if hasattr(images, "detach") or isinstance(images, (dict, bytes)) or not hasattr(images, "__iter__"):
        raise TypeError(f"images must be {_IMAGES_WANTED}, got {type(images).__module__}.{type(images).__name__}"
                        f"{' (convert it with .cpu().numpy())' if hasattr(images, 'detach') else ''}")
    images = list(images)  # any iterable of images, a generator included (as before issue 20)
    for i, im in enumerate(images):
        if not isinstance(im, (np.ndarray, str, Path)):
            raise TypeError(f"images[{i}] must be a numpy array (H, W, 3) or an image file path ({_IMAGES_WANTED}), "
                            f"got {type(im).__name__}"
                            f"{': a nested list? pass np.asarray(image, np.uint8)' if isinstance(im, list) else ''}")
    return False, list(images)


def _per_image(name: str, value: Any, n: int, tail: tuple[int, ...]) -> list[Any]:
    """Split a predict() argument over n images: one value of shape `tail` for all, or n per-image values."""
    if value is None:
        return [None] * n
    try:
        if np.asarray(value, dtype=np.float64).shape == tail:
            return [value] * n
    except (TypeError, ValueError):  # ragged: per-image values of different lengths
        pass
    if not hasattr(value, "__len__") or len(value) != n:
        raise ValueError(f"{name} must be one value of shape {tail} for all images or a sequence with one entry "
                         f"per image ({n} images), got {np.shape(value) if hasattr(value, '__len__') else value!r}")
    return list(value)


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
        prep_chunk: items handed to a prep thread at a time (fewer tasks and thread hand-offs,
            each of which costs the GIL); None: max_batch x prefetch / (2 x prep_threads),
            between 1 and 16. Capped at max_batch x prefetch / prep_threads, so every prep thread
            has work.
    """

    def __init__(self, engine_or_variant: Any = None, *, checkpoint: Any = None, backend: str = "auto",
                 precision: str = "fp32", max_batch: int | None = None, engine_dir: Any = None,
                 prep_threads: int = 2, prefetch: int = 2, crop_method: str = "auto", gpu_jpeg: bool = True,
                 staging: str = "batched", staging_bytes: int | None = None, prep_chunk: int | None = None,
                 threads: int | None = None, spinning: bool | None = None, **build_options: Any) -> None:
        from ..backends import session_options
        from ..config import BuildConfig, EngineRequest
        from ..io.preprocess import CROP_METHODS
        from ..runtime.open import open_engine
        from ..spec import VariantSpec

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
        if crop_method not in CROP_METHODS:
            raise ValueError(f"crop_method must be one of {', '.join(CROP_METHODS)}, got {crop_method!r}")
        from .gpu_stage import STAGINGS

        if staging not in STAGINGS:  # checked before any engine is built, as crop_method is
            raise ValueError(f"staging must be one of {', '.join(STAGINGS)}, got {staging!r}")
        load_options = session_options(threads, spinning)
        if isinstance(engine_or_variant, Engine):
            if load_options:
                raise ValueError(f"{' and '.join(load_options)} apply where PoseEstimator loads the engine; pass "
                                 "them to load_engine for an Engine that is already loaded")
            self.engine = engine_or_variant
        elif isinstance(engine_or_variant, EngineRequest):
            if load_options:
                raise ValueError(f"{' and '.join(load_options)} go in the EngineRequest's load options")
            self.engine = open_engine(engine_or_variant)
        elif isinstance(engine_or_variant, (str, Path, VariantSpec)) and (
                isinstance(engine_or_variant, VariantSpec) or not Path(str(engine_or_variant)).suffix):
            extra = {} if max_batch is None else {"max_batch": max_batch}
            config = BuildConfig(engine_or_variant, checkpoint, backend=backend, precision=precision,
                                 out_dir=engine_dir, **extra, **build_options)
            self.engine = open_engine(EngineRequest(build=config, load=load_options))
        else:
            self.engine = open_engine(EngineRequest(engine=engine_or_variant, load=load_options))
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
        # Device-resident path (gpu_stage): uint8 images uploaded once, cut on the GPU straight
        # into the engine's input buffer. Where it cannot run, crops are made on the host.
        self._uploader: Any = None
        self.device_crops_unavailable: str | None = "crop_method 'opencv' crops on the host"
        if self._on_device and crop_method != "opencv":
            from . import gpu_stage

            self.device_crops_unavailable = gpu_stage.usable(self.engine)
            if self.device_crops_unavailable is None:
                self._uploader = gpu_stage.Uploader(
                    self.engine.device, gpu_jpeg=bool(gpu_jpeg), staging=staging,
                    ring_images=(prefetch + _GPU_IN_FLIGHT + 2) * max(1, self.max_batch), ring_bytes=staging_bytes)
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
                all images or one entry per image. Needs root_depth.
            flip: the flip test (average with the mirrored crop).
        Returns:
            a PoseResult, or a list of them in the order of the images.
        """
        if (boxes is None) == (crop_boxes is None):
            raise ValueError("give exactly one of boxes (person boxes; upstream's box rule is applied) or "
                             "crop_boxes (already processed, used as they are)")
        key = "boxes" if crop_boxes is None else "crop_boxes"
        given = boxes if crop_boxes is None else crop_boxes
        single, images = _image_list(images)
        if single:
            item = {"image": images[0], key: given, "root_depth": root_depth, "intrinsics": intrinsics}
            return next(iter(self.predict_iter([item], flip=flip)))
        if not isinstance(given, (list, tuple)) or len(given) != len(images):
            raise ValueError(f"{key} must be a list with one (P, 4) array per image ({len(images)} images)")
        roots = _per_image("root_depth", root_depth, len(images), ())
        ks = _per_image("intrinsics", intrinsics, len(images), (4,))
        items = [{"image": im, key: b, "root_depth": r, "intrinsics": k}
                 for im, b, r, k in zip(images, given, roots, ks, strict=True)]
        return list(self.predict_iter(items, flip=flip))

    def predict_iter(self, items: Iterable[Any], *, flip: bool = False) -> Iterator[PoseResult]:
        """Stream results for (image, boxes[, root_depth[, intrinsics]]) tuples or dicts, in order.

        A dict item has 'image' and 'boxes' or 'crop_boxes' (see predict), optional 'root_depth'
        and 'intrinsics'. An image with no people gives an empty PoseResult. When the source
        raises, or an item is bad, every result before it is delivered first, then the error.
        """
        staged: dict[int, Any] = {}  # this run's images in the staging ring not freed yet (GPU path)
        flip = self._flip(flip)
        try:
            yield from self._predict_iter(items, flip, staged)
        finally:  # after the prep threads stopped: free the ring regions of images that never ran
            for s in list(staged.values()):
                if not s.region.attached:
                    s.region.attach(None)

    def _flip(self, flip: bool) -> bool:
        """shipped.flip_for: the shipped synthetic model runs without the flip test, said once per estimator."""
        from ..shipped import flip_for

        flip, notice = flip_for(getattr(self.engine, "meta", None), bool(flip))
        if notice and not self._flip_noticed:
            self._flip_noticed = True
            warnings.warn(notice, stacklevel=4)
        return flip

    def _predict_iter(self, items: Iterable[Any], flip: bool, staged: dict[int, Any]) -> Iterator[PoseResult]:
        with self._lock, ThreadPoolExecutor(self.prep_threads, thread_name_prefix="cnpose-prep") as prep, \
                ThreadPoolExecutor(1, thread_name_prefix="cnpose-decode") as dec:
            pending: collections.deque[_Slot] = collections.deque()  # one per item, in order
            decoding: collections.deque[Any] = collections.deque()  # Futures / _Later: .result()
            source = iter(items)
            window = max(1, self.max_batch) * self.prefetch
            # Items go to the prep threads in runs of `chunk`: fewer tasks and thread hand-offs
            # (each costs the GIL), and one thread stages consecutive images side by side.
            # At most window / prep_threads, so that every prep thread has a run to work on.
            chunk = min(max(1, window // self.prep_threads),
                        self.prep_chunk or max(1, min(16, window // (2 * self.prep_threads))))
            capacity = self._per_call(flip)  # people per engine call
            # The window counts images; their crops are what costs memory. Images read ahead are capped
            # at window / (people per image seen so far), so crops in flight stay about one window
            # whether images hold one person or hundreds (a few images until the first is seen).
            seen = [0, 0]  # people of the first parts taken, images taken

            def ahead() -> int:
                if not seen[1]:
                    return min(window, max(self.prefetch, self.prep_threads))
                return max(self.prefetch, min(window, int(window * seen[1] / max(seen[0], seen[1]))))

            exhausted = False
            failure: BaseException | None = None
            # The GPU path needs room for a crop and its mirror in one engine call.
            gpu = self._uploader is not None and not (flip and self.max_batch < 2)

            def submit(run: list[Any]) -> None:
                if run:
                    fut = prep.submit(self._prepare_run, run, flip, gpu, staged)
                    pending.extend(_Slot(fut, i) for i in range(len(run)))

            def refill() -> None:
                """Top the window up, once a whole run of items fits (or nothing is pending)."""
                nonlocal exhausted, failure
                limit = ahead()
                if pending and len(pending) > limit - chunk:
                    return
                run: list[Any] = []
                while not exhausted and len(pending) + len(run) < limit:
                    try:
                        nxt = next(source, _END)
                    except Exception as exc:  # delivered after everything before it
                        failure, exhausted = exc, True
                        break
                    if nxt is _END:
                        exhausted = True
                        break
                    run.append(nxt)
                    if len(run) == chunk:
                        submit(run)
                        run = []
                submit(run)

            def advance(item: _Item) -> None:
                """Drop the taken item from the window; the rest of its image's people come next."""
                if not pending.popleft().rest:  # an image's first part
                    seen[0] += len(item.boxes)
                    seen[1] += 1
                if item.rest is not None:
                    fut = prep.submit(self._prepare_rest, item.rest, flip, gpu)
                    pending.appendleft(_Slot(fut, 0, rest=True))

            def take() -> _Item | None:
                """The next prepared item, or None (and failure set) when it failed."""
                nonlocal exhausted, failure
                try:
                    return pending[0].result()
                except Exception as exc:
                    failure, exhausted = exc, True
                    for fut in pending:
                        fut.cancel()
                    pending.clear()
                    return None

            refill()
            while pending:
                first = take()
                if first is None:
                    break
                advance(first)
                batch: list[_Item] = [first]
                people = len(first.boxes)
                refill()
                # Fill the batch up to capacity (waiting for the crops): full, steady batch
                # shapes suit every engine, GPUs and CUDA graphs most.
                while pending:
                    nxt = take()
                    if nxt is None or people + len(nxt.boxes) > capacity:
                        break
                    advance(nxt)
                    batch.append(nxt)
                    people += len(nxt.boxes)
                    refill()
                if not people:
                    if gpu:  # files staged before their (no) boxes were known: nothing reads them
                        self._release(batch, [], staged)
                    done: Future[list[PoseResult]] = Future()
                    done.set_result(self._results(batch, None))
                    decoding.append(done)
                elif gpu:
                    decoding.append(self._run_gpu(batch, flip, people, staged))
                elif self._on_device:
                    decoding.append(self._run_on_device(batch, flip))
                else:
                    started = time.perf_counter()
                    heatmaps = self.engine.infer(_crops(batch, flip))
                    self.timings.add("infer", time.perf_counter() - started)
                    decoding.append(dec.submit(self._decode, batch, heatmaps, flip))
                # Batch k-1 decoded while batch k ran: yield it now. On the GPU path two batches
                # stay enqueued, so host hiccups while yielding or batching do not idle the GPU.
                while len(decoding) > (_GPU_IN_FLIGHT if gpu else 1):
                    yield from decoding.popleft().result()
            while decoding:
                yield from decoding.popleft().result()
            if failure is not None:
                raise failure

    def _prepare_run(self, entries: list[Any], flip: bool, gpu: bool, staged: dict[int, Any]) -> list[Any]:
        """Prepare consecutive items on one prep thread: their _Items, up to and including the
        exception of the first that fails (the ones after it are left alone)."""
        out: list[Any] = []
        for entry in entries:
            try:
                out.append(self._prepare(entry, flip, gpu, staged))
            except Exception as exc:
                out.append(exc)
                break
        waiting = [it for it in out if isinstance(it, _Item) and it.host_image is not None]
        if not waiting:
            return out
        started = time.perf_counter()
        try:  # staged together: side by side in the ring, so a batch comes over in few copies
            got = self._uploader.stage_many([it.host_image for it in waiting])
        except Exception:  # one at a time, so the items before the one that fails still come out
            got = []
            for it in waiting:
                try:
                    got.append(self._uploader.stage(it.host_image))
                except Exception as exc:
                    del out[next(k for k, x in enumerate(out) if x is it):]
                    out.append(exc)
                    break
        for it, (dev, ready) in zip(waiting, got, strict=False):
            it.image_dev, it.ready, it.host_image = dev, ready, None
            if isinstance(dev, Staged):
                staged[id(dev.region)] = dev
        self.timings.add("prepare", time.perf_counter() - started)
        return out

    def _prepare(self, entry: Any, flip: bool, gpu: bool, staged: dict[int, Any]) -> _Item:
        started = time.perf_counter()
        item = self._prepare_item(entry, flip, gpu, staged)
        self.timings.add("prepare", time.perf_counter() - started, images=1, people=len(item.boxes))
        return item

    def _prepare_item(self, entry: Any, flip: bool, gpu: bool, staged: dict[int, Any]) -> _Item:
        """staged: where images put in the staging ring are logged until freed (the run frees the
        ring regions of those that never reach the engine). A uint8 array on the GPU path is left
        in host_image: _prepare_run stages it with the other images of its run."""
        item = _unpack(entry)
        if item["intrinsics"] is not None and item["root_depth"] is None:
            raise ValueError("intrinsics need root_depth: camera coordinates require the absolute depth of the root")
        image, image_dev, ready, crop_boxes, host_image = item["image"], None, None, None, None
        if isinstance(image, (str, Path)):  # a file: JPEGs decode on the GPU on the device path
            if gpu:
                image_dev, ready = self._uploader.load(image)
                image = None
            else:
                image = load_image(image)
        else:
            image = check_image(image)
            if gpu and image.dtype == np.uint8:  # uint8 images go to the GPU, unless nobody is in them
                crop_boxes = resolve_crop_boxes(item["boxes"], item["crop_boxes"], image.shape)
                if len(crop_boxes):
                    host_image = image
        if isinstance(image_dev, Staged):  # a file OpenCV decoded, staged by the uploader
            staged[id(image_dev.region)] = image_dev
        size = self.spec.input_size
        affines = None
        if image_dev is not None or host_image is not None:
            if crop_boxes is None:  # a file decoded on the device: its size is known now
                crop_boxes = resolve_crop_boxes(item["boxes"], item["crop_boxes"], tuple(image_dev.shape))
            crops = mirrored = None
            affines = crop_matrices(crop_boxes, size)
        elif crop_boxes is not None:  # nobody in a uint8 image on the GPU path: nothing to crop
            crops = np.zeros((0, 3, size, size), np.float32)
            mirrored = crops if flip else None
        else:
            crop_boxes = resolve_crop_boxes(item["boxes"], item["crop_boxes"], image.shape)
            p = len(crop_boxes)
            boxes = crop_boxes if item["boxes"] is None else as_array("boxes", item["boxes"], (4,))
            root, k = _root_depth(item["root_depth"], p), _intrinsics(item["intrinsics"], p)
            if p > self._per_call(flip):  # cut into parts, each cropped when the one before is taken
                return self._prepare_rest(_Rest(image, boxes, crop_boxes, root, k, 0, _Whole()), flip, gpu)[0]
            crops, mirrored, ready = self._host_crops(image, crop_boxes, flip, gpu)
            return _Item(boxes, crops, mirrored, crop_boxes, root, k, None, ready)
        p = len(crop_boxes)
        boxes = crop_boxes if item["boxes"] is None else as_array("boxes", item["boxes"], (4,))
        return _Item(boxes, crops, mirrored, crop_boxes, _root_depth(item["root_depth"], p),
                     _intrinsics(item["intrinsics"], p), image_dev, ready, affines, host_image)

    def _per_call(self, flip: bool) -> int:
        """People per engine call: with the flip test each person is two crops."""
        return max(1, self.max_batch // 2) if flip else max(1, self.max_batch)

    def _host_crops(self, image: np.ndarray, crop_boxes: np.ndarray, flip: bool, gpu: bool) -> tuple[Any, Any, Any]:
        """(crops, mirrored crops or None, upload event or None) of people cropped on the host."""
        # One thread per image: the prep pool already crops prep_threads images at once.
        crops = crop_people(image, crop_boxes, self.spec.input_size, method=self.crop_method, threads=1)
        mirrored = np.ascontiguousarray(crops[:, :, :, ::-1]) if flip else None
        ready = None
        if gpu and len(crops):  # float image: host crops, uploaded once
            both = crops if mirrored is None else np.concatenate([crops, mirrored])
            dev, ready = self._uploader.upload_crops(both)
            crops, mirrored = dev[:len(crop_boxes)], dev[len(crop_boxes):] if flip else None
        return crops, mirrored, ready

    def _prepare_rest(self, rest: _Rest, flip: bool, gpu: bool) -> list[Any]:
        """The next part of an image with more people than one engine call takes: at most one
        call's people cropped (so memory is bounded by max_batch, not by the image's people), and
        what is left after them. As a one-item prep run: [its _Item] or [the exception]."""
        started = time.perf_counter()
        try:
            start, stop = call_chunks(len(rest.crop_boxes) - rest.first, self._per_call(flip))[0]
            a, b = rest.first + start, rest.first + stop
            crops, mirrored, ready = self._host_crops(rest.image, rest.crop_boxes[a:b], flip, gpu)
            more = dataclasses.replace(rest, first=b) if b < len(rest.crop_boxes) else None
            item = _Item(rest.boxes[a:b], crops, mirrored, rest.crop_boxes[a:b],
                         None if rest.root_depth is None else rest.root_depth[a:b],
                         None if rest.intrinsics is None else rest.intrinsics[a:b], None, ready, whole=rest.whole,
                         rest=more)
        except Exception as exc:
            return [exc]
        if rest.first:  # the first part is timed (and its image counted) by _prepare
            self.timings.add("prepare", time.perf_counter() - started, people=b - a)
        return [item]

    def _run_gpu(self, batch: list[_Item], flip: bool, people: int, staged: dict[int, Any]) -> _Later:
        """Crops cut on the GPU into the engine's input, network, fused decode: enqueued, not waited
        for. An image with more people than one call takes is spread over several calls."""
        started = time.perf_counter()
        persons: list[tuple[_Item, int]] = [(it, i) for it in batch for i in range(len(it.boxes))]
        post = _post(batch)
        step = self._per_call(flip)
        handles, fills = [], []
        try:
            self._enqueue_gpu(persons, people, step, flip, post, handles, fills)
        finally:
            self._release(batch, fills, staged)
        self.timings.add("infer", time.perf_counter() - started)
        return _Later(lambda: self._results(batch, np.concatenate([self._wait(h) for h in handles])))

    def _release(self, batch: list[_Item], fills: list[Any], staged: dict[int, Any]) -> None:
        """Free the batch's ring regions: each once the last call that read it is done (its fill's
        event); a region no call read (a file with nobody in it, or its call failed before its
        fill ran) at once."""
        last: dict[int, Any] = {}
        for fill in fills:
            if fill.done is not None:
                last.update((id(s.region), fill.done) for s in fill.staged)
        for it in batch:
            if isinstance(it.image_dev, Staged):
                key = id(it.image_dev.region)
                it.image_dev.region.attach(last.get(key))
                staged.pop(key, None)

    def _enqueue_gpu(self, persons: list[tuple[_Item, int]], people: int, step: int, flip: bool,
                     post: dict[str, Any], handles: list[Any], fills: list[Any]) -> None:
        from .gpu_stage import Fill

        copied: dict[int, Any] = {}  # shared by the batch's calls: each staged image is copied once
        for first, stop in call_chunks(people, step):
            chunk = persons[first:stop]
            q = len(chunk)
            uploads: list[tuple[Any, Any]] = []
            slot: dict[int, int] = {}  # id(item) -> its upload's number in this call
            kernel: list[tuple[int, np.ndarray, bool]] = []  # (upload, affine, mirrored) in row order
            crop_rows: list[tuple[int, Any, Any]] = []
            for mirrored in (False, True) if flip else (False,):
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
            fill = Fill(uploads, index, affines, flips, crop_rows, self.spec.input_size, self._uploader, copied,
                        after=fills[-1] if fills else None)
            fills.append(fill)
            part = {k: None if v is None else v[first:first + q] for k, v in post.items()}
            handles.append(self.engine.enqueue_device(fill, 2 * q if flip else q, flip=flip, **part))

    def _wait(self, handle: Any) -> np.ndarray:
        started = time.perf_counter()
        packed = handle.result()
        self.timings.add("infer", time.perf_counter() - started)
        return packed

    def _run_on_device(self, batch: list[_Item], flip: bool) -> Future[list[PoseResult]]:
        """Engine and fused decode on the engine's device; only (P, J, 10) floats come back."""
        started = time.perf_counter()
        packed = self.engine.infer_decode(_crops(batch, flip), flip=flip, **_post(batch))
        self.timings.add("infer", time.perf_counter() - started)
        done: Future[list[PoseResult]] = Future()
        done.set_result(self._results(batch, packed))
        return done

    def _decode(self, batch: list[_Item], heatmaps: np.ndarray, flip: bool) -> list[PoseResult]:
        started = time.perf_counter()
        p = sum(len(it.boxes) for it in batch)
        res = decode(heatmaps[:p], self.spec.joints, self.spec.depth_dim, flipped=heatmaps[p:] if flip else None,
                     **_post(batch))
        results = self._results(batch, _host(res.packed))
        self.timings.add("decode", time.perf_counter() - started)
        return results

    def _results(self, batch: list[_Item], packed: np.ndarray | None) -> list[PoseResult]:
        """Split a batch's (P, J, 10) decode result into one PoseResult per image (an image cut
        into parts: one when its last part comes; batches are decoded in order)."""
        results, offset, j = [], 0, self.spec.joints
        for it in batch:
            p = len(it.boxes)
            part = np.zeros((0, j, 10)) if p == 0 else np.asarray(packed[offset:offset + p], np.float64)
            offset += p
            res = PoseResult(it.boxes, it.crop_boxes, part[..., 0:3], part[..., 3], part[..., 4:7],
                             None if it.intrinsics is None else part[..., 7:10], it.root_depth is None)
            if it.whole is None:
                results.append(res)
                continue
            it.whole.parts.append(res)
            if it.rest is None:
                results.append(_joined(it.whole.parts))
        return results


class _Slot:
    """One pending item: entry i of a prep run's result (an _Item, or the exception it raised)."""

    __slots__ = ("future", "i", "rest")

    def __init__(self, future: Future[list[Any]], i: int, rest: bool = False) -> None:
        self.future, self.i, self.rest = future, i, rest  # rest: a later part of an image already counted

    def result(self) -> _Item:
        got = self.future.result()[self.i]
        if isinstance(got, Exception):
            raise got
        return got

    def cancel(self) -> None:
        self.future.cancel()


class _Later:
    """A batch's results, computed when asked for (after the GPU work behind them is enqueued)."""

    def __init__(self, compute: Any) -> None:
        self._compute = compute

    def result(self) -> list[PoseResult]:
        return self._compute()


def _joined(parts: list[PoseResult]) -> PoseResult:
    """One image's PoseResult from the PoseResults of its parts, in order."""
    first = parts[0]

    def cat(name: str) -> Any:
        return None if getattr(first, name) is None else np.concatenate([getattr(r, name) for r in parts])

    return PoseResult(cat("boxes"), cat("crop_boxes"), cat("cells"), cat("confidence"), cat("image"), cat("camera"),
                      first.root_relative)


def _crops(batch: list[_Item], flip: bool) -> np.ndarray:
    """The engine's input for a batch: every person's crop, then (flip test) every mirrored crop."""
    parts = [it.crops for it in batch] + ([it.mirrored for it in batch] if flip else [])
    return np.concatenate(parts)


def _post(batch: list[_Item]) -> dict[str, np.ndarray | None]:
    """A batch's decode post-processing inputs. Images without a root depth get 0 (root-relative
    depth) and without intrinsics a placeholder camera whose output _results drops."""
    boxes = np.concatenate([it.crop_boxes for it in batch])
    root = k = None
    if any(it.root_depth is not None for it in batch):
        root = np.concatenate([np.zeros(len(it.boxes)) if it.root_depth is None else it.root_depth for it in batch])
    if any(it.intrinsics is not None for it in batch):
        k = np.concatenate([np.tile([1.0, 1.0, 0.0, 0.0], (len(it.boxes), 1)) if it.intrinsics is None
                            else it.intrinsics for it in batch])
    return {"boxes": boxes, "root_depth": root, "intrinsics": k}


def estimate(engine: Engine, image: np.ndarray, boxes: Any = None, *, crop_boxes: Any = None,
             root_depth: Any = None, intrinsics: Any = None, flip: bool = False,
             crop_method: str = "auto") -> PoseResult:
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
    Raises:
        ValueError: bad boxes (empty, outside the image), intrinsics without root_depth, shapes.
    """
    return PoseEstimator(engine, crop_method=crop_method).predict(
        check_image(image), boxes, crop_boxes=crop_boxes, root_depth=root_depth, intrinsics=intrinsics, flip=flip)

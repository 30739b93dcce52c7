"""The Engine protocol: every backend the same calls, and PoseEstimator on the device path for any
engine that says its output lives on a device."""

from __future__ import annotations

import logging
import time

import cv2
import numpy as np
import pytest

from cnpose_trt import backends
from cnpose_trt.build.verify import accuracy_inputs
from cnpose_trt.errors import EngineError
from cnpose_trt.ops.decoding import decode
from cnpose_trt.pipeline import gpu_stage
from cnpose_trt.pipeline import staging as ring_module
from cnpose_trt.pipeline.estimator import PoseEstimator
from cnpose_trt.pipeline.host import HostPath
from cnpose_trt.runtime.engine import Engine, load_engine


def test_infer_decode_equals_infer_then_decode(xs_engine):
    x = accuracy_inputs(xs_engine.spec, 5)  # max_batch is 4: two chunks
    boxes = np.column_stack([np.arange(5) * 10.0, np.arange(5) * 5.0, np.full(5, 200.0), np.full(5, 200.0)])
    root, k = np.linspace(3000, 5000, 5), np.tile([1500.0, 1500.0, 320.0, 240.0], (5, 1))
    got = xs_engine.infer_decode(x, boxes=boxes, root_depth=root, intrinsics=k)
    want = decode(xs_engine.infer(x), 18, 32, boxes=boxes, root_depth=root, intrinsics=k).packed
    assert got.shape == (5, 18, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
    mirrored = np.ascontiguousarray(x[:, :, :, ::-1])
    flip = xs_engine.infer_decode(np.concatenate([x, mirrored]), boxes=boxes, flip=True)
    heat = xs_engine.infer(np.concatenate([x, mirrored]))
    np.testing.assert_allclose(flip, decode(heat[:5], 18, 32, boxes=boxes, flipped=heat[5:]).packed, atol=1e-4)
    assert not np.allclose(flip[..., :3], got[..., :3])


def test_protocol_refusals(xs_engine, xs_engine_path):
    x = accuracy_inputs(xs_engine.spec, 3)
    with pytest.raises(ValueError, match="even N"):
        xs_engine.infer_decode(x, flip=True)
    with pytest.raises(ValueError, match="need boxes"):
        xs_engine.infer_decode(x, root_depth=4000.0)
    with pytest.raises(ValueError, match="boxes must have shape \\(3, 4\\)"):
        xs_engine.infer_decode(x, boxes=np.zeros((2, 4)))
    with pytest.raises(EngineError, match="runs on the CPU"):
        xs_engine.infer_device(x)
    assert not xs_engine.on_device and xs_engine.device == "cpu"
    with pytest.raises(ValueError, match="takes the options threads, spinning, got max_contexts \\(max_contexts is an option "
                                         "of tensorrt\\)"):
        load_engine(xs_engine_path, max_contexts=2)
    with load_engine(xs_engine_path, threads=1) as engine:
        assert engine.infer(x).shape == (3, 576, 32, 32)
    with pytest.raises(EngineError, match="closed"):
        engine.infer(x)


def test_registry():
    assert backends.NAMES == ("onnxruntime", "tensorrt", "torch", "openvino")
    for name in backends.NAMES:
        module = backends.get(name)
        assert module.NAME == name and module.ENGINE_SUFFIX.startswith(".")
        for attr in ("available", "version", "key_fields", "compile", "load", "LOAD_OPTIONS", "PRECISIONS",
                     "NEEDS_GRAPH"):
            assert hasattr(module, attr), (name, attr)
    assert backends.resolve("onnxruntime") == "onnxruntime"
    with pytest.raises(ValueError, match="backend must be one of auto, onnxruntime, tensorrt, torch, openvino"):
        backends.resolve("tvm")
    with pytest.raises(EngineError, match="this installation loads onnxruntime, tensorrt, torch, openvino"):
        backends.get("tvm")


class _OnDevice(Engine):
    """An engine that says its output lives on a device; heatmaps must never reach the host.

    It computes with a real ONNX Runtime engine (so results can be compared); what it proves is
    the PoseEstimator's side of the protocol, not any GPU."""

    device = "cuda:0"

    def __init__(self, real: Engine) -> None:
        super().__init__(real.path, real.meta)
        self.real, self.calls = real, []

    def infer(self, images):
        raise AssertionError("PoseEstimator copied heatmaps to the host from an on-device engine")

    def _infer_decode(self, images, post, flip):
        self.calls.append((len(images), flip))
        return self.real._infer_decode(images, post, flip)


@pytest.mark.parametrize("flip", [False, True])
def test_pose_estimator_uses_the_device_path(xs_engine, flip):
    from cnpose_trt.io.draw import demo_image

    img, box = demo_image()
    x, y, w, h = box
    items = [(img, [box, (x + 20, y, w * 0.8, h)], 4000.0, [1500, 1500, 320, 240]), (img, []),
             (img, [(x, y + 10, w, h * 0.9)]), (img, [box] * 3, [3000.0, 4000.0, 5000.0])]
    device = _OnDevice(xs_engine)
    got = list(PoseEstimator(device).predict_iter(items, flip=flip))
    want = list(PoseEstimator(xs_engine).predict_iter(items, flip=flip))
    assert device.calls and all(n <= xs_engine.max_batch for n, _ in device.calls)
    assert all(f == flip for _, f in device.calls)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.image, b.image, rtol=1e-5, atol=1e-3)
        assert (a.camera is None) == (b.camera is None) and a.root_relative == b.root_relative
        if a.camera is not None:
            np.testing.assert_allclose(a.camera, b.camera, rtol=1e-5, atol=1e-2)


_HostStaging = gpu_stage.HostStager  # the real staging logic on host arrays (no GPU runs here)


class _FillsInput(Engine):
    """Stand-in GPU engine on the CPU: enqueue_device hands fill a host input buffer, then runs the
    real engine on it. Proves the pipeline's row layout with the CPU crop kernel, not the GPU."""

    def __init__(self, inner):
        self.__dict__.update(inner.__dict__)
        self.inner, self.calls = inner, []
        self.device = "cuda:0 (stand-in)"

    def _run(self, images):  # the host-crop path (infer_decode)
        return self.inner.infer(images)

    def enqueue_device(self, fill, n, *, flip=False, boxes=None, root_depth=None, intrinsics=None):
        self._device_call(n, flip, boxes, root_depth, intrinsics)
        buf = np.full((n, *self.spec.input_shape), np.nan, np.float32)  # poison: every row must be written
        fill(buf, 0)
        assert np.isfinite(buf).all()
        self.calls.append(n)
        done = self.inner.infer_decode(buf, flip=flip, boxes=boxes, root_depth=root_depth, intrinsics=intrinsics)
        return type("Done", (), {"result": lambda _self: done})()


@pytest.mark.parametrize("staging", ["batched", "per_image"])
@pytest.mark.parametrize("flip", [False, True])
def test_device_crop_path_row_layout(xs_engine, monkeypatch, tmp_path, flip, staging):
    """PoseEstimator's device path (uploads, kernel rows, host-cropped float images between them,
    the flip test's mirrored half) gives the host path's results; the kernel runs on the host."""
    pytest.importorskip("cnpose_trt._C")
    from cnpose_trt.io.draw import demo_image
    from cnpose_trt.pipeline import gpu_stage

    monkeypatch.setattr(gpu_stage, "usable", lambda engine: None)
    monkeypatch.setattr(gpu_stage, "Uploader", _HostStaging)
    img, box = demo_image()
    x, y, w, h = box
    path = tmp_path / "person.png"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    items = [(img, [box, (x + 20, y, w * 0.8, h)], 4000.0, [1500, 1500, 320, 240]), (img, []),
             (img.astype(np.float32), [(x, y + 10, w, h * 0.9)]), (img, [box] * 3, [3000.0, 4000.0, 5000.0]),
             (img.astype(np.float32), [box, box]), (str(path), [(x - 5, y, w, h)], 3500.0, [1400, 1400, 300, 250])]
    engine = _FillsInput(xs_engine)
    est = PoseEstimator(engine, staging=staging)
    assert est.device_crops
    import cnpose_trt.pipeline.host as pipeline

    host_crops = pipeline.crop_people

    def float_images_only(image, *args, **kwargs):
        assert image.dtype != np.uint8, "a uint8 image was cropped on the host on the device path"
        return host_crops(image, *args, **kwargs)

    monkeypatch.setattr(pipeline, "crop_people", float_images_only)
    got = list(est.predict_iter(items, flip=flip))
    monkeypatch.setattr(pipeline, "crop_people", host_crops)
    want = list(PoseEstimator(xs_engine).predict_iter(items, flip=flip))
    assert engine.calls and max(engine.calls) <= xs_engine.max_batch
    want[-1] = PoseEstimator(xs_engine).predict(img, [(x - 5, y, w, h)], root_depth=3500.0,
                                                intrinsics=[1400, 1400, 300, 250], flip=flip)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.image, b.image, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(a.confidence, b.confidence, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a.crop_boxes, b.crop_boxes)
        assert (a.camera is None) == (b.camera is None)
        if a.camera is not None:
            np.testing.assert_allclose(a.camera, b.camera, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("flip", [False, True])
def test_device_crop_path_cuts_many_people_into_calls(xs_engine, monkeypatch, tmp_path, flip):
    """Many people in one image on the device path (uint8 images and files cut by the kernel,
    float images cropped on the host in parts): every engine call takes at most max_batch
    inputs, and the poses are the host path's."""
    pytest.importorskip("cnpose_trt._C")
    from cnpose_trt.io.draw import demo_image
    from cnpose_trt.pipeline.items import call_chunks

    monkeypatch.setattr(gpu_stage, "usable", lambda engine: None)
    monkeypatch.setattr(gpu_stage, "Uploader", _HostStaging)
    img, box = demo_image()
    path = tmp_path / "people.png"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    rng = np.random.default_rng(5)
    n = 2 * xs_engine.max_batch + 3
    boxes = np.column_stack([rng.uniform(0, 400, n), rng.uniform(0, 300, n), rng.uniform(40, 200, n),
                             rng.uniform(40, 200, n)])
    items = [(img, boxes, 4000.0, [1400, 1400, 320, 240]), (img.astype(np.float32), boxes), (img, [box]),
             (str(path), boxes)]
    engine = _FillsInput(xs_engine)
    got = list(PoseEstimator(engine).predict_iter(items, flip=flip))
    want = list(PoseEstimator(xs_engine).predict_iter([*items[:3], (img, boxes)], flip=flip))
    assert engine.calls and max(engine.calls) <= xs_engine.max_batch, engine.calls
    assert sum(engine.calls) == (3 * n + 1) * (2 if flip else 1)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.image, b.image, rtol=1e-5, atol=1e-3)
        np.testing.assert_array_equal(a.crop_boxes, b.crop_boxes)
    assert call_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)] and call_chunks(0, 4) == []
    assert call_chunks(3, 0) == [(0, 1), (1, 2), (2, 3)]


def _ring_is_free(est):
    """Every staging ring region of the estimator has its event (nothing is held for ever)."""
    ring = est._uploader.ring
    return ring is None or all(r.attached for r in ring.ring._live)


def test_batched_staging_with_a_small_ring_wraps_falls_back_and_frees_every_region(xs_engine, monkeypatch, caplog):
    """A ring with room for 2.5 images: images wrap around it, those that find no room are staged
    per image (counted in device_stats, one warning), results equal the host path's (the mirror
    starts as 7s: a range not copied in would show), and every region is freed after a run that
    ends, is stopped, or fails."""
    pytest.importorskip("cnpose_trt._C")
    import cv2 as _cv2

    from cnpose_trt.io.draw import demo_image

    monkeypatch.setattr(gpu_stage, "usable", lambda engine: None)
    monkeypatch.setattr(gpu_stage, "Uploader", _HostStaging)
    img, box = demo_image()
    rng = np.random.default_rng(2)
    items = []
    for i in range(20):
        scale = float(rng.uniform(0.5, 1.2))
        im = _cv2.resize(img, None, fx=scale, fy=scale, interpolation=_cv2.INTER_AREA)
        people = [np.array(box) * scale] * int(rng.integers(0, 3)) if i % 7 else []
        items.append((im, people))
    est = PoseEstimator(_FillsInput(xs_engine), staging_bytes=int(2.5 * img.nbytes), prep_threads=2)
    assert est.device_stats == {"staging": "batched", "ring_bytes": None, "staging_fallbacks": 0,
                                "gpu_jpeg_decoded": 0, "gpu_jpeg_failures": 0}
    with caplog.at_level(logging.WARNING, logger="cnpose_trt.pipeline.gpu_stage"):
        got = list(est.predict_iter(items))
        list(est.predict_iter(items))
    warned = [r.getMessage() for r in caplog.records if "no room" in r.getMessage()]
    assert len(warned) == 1 and "staging_bytes" in warned[0], warned
    stats = est.device_stats
    assert stats["ring_bytes"] == int(2.5 * img.nbytes) and stats["staging_fallbacks"] == est._uploader.staging_fallbacks
    want = list(PoseEstimator(xs_engine).predict_iter(items))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.image, b.image, rtol=1e-5, atol=1e-3)
    up = est._uploader
    assert up.staging_fallbacks > 0 and up.ring.size == int(2.5 * img.nbytes) and _ring_is_free(est)
    assert {r.start for r in up.ring.ring._live} != {0}  # regions were handed out around the ring
    stream = est.predict_iter(items)
    next(stream)
    stream.close()  # stopped after one result: the images staged ahead are freed
    assert _ring_is_free(est)
    bad = [*items[:6], (img, [box], -1.0), *items[6:]]
    with pytest.raises(ValueError, match="root_depth must be > 0"):
        list(est.predict_iter(bad))
    assert _ring_is_free(est)
    assert len(list(est.predict_iter(items))) == len(items)  # and the ring still serves


def test_batched_staging_reuses_the_ring_without_falling_back(xs_engine, monkeypatch):
    """The default ring (room for (prefetch + 4) x max_batch images) holds everything in flight:
    regions are freed after each engine call and reused, so no image is staged per image."""
    pytest.importorskip("cnpose_trt._C")
    from cnpose_trt.io.draw import demo_image

    monkeypatch.setattr(gpu_stage, "usable", lambda engine: None)
    monkeypatch.setattr(gpu_stage, "Uploader", _HostStaging)
    monkeypatch.setattr(gpu_stage, "RING_MIN_BYTES", 0)
    img, box = demo_image()
    est = PoseEstimator(_FillsInput(xs_engine), prep_threads=2, prefetch=2)
    logged = []
    release = ring_module.Lease.release

    def release_and_count(lease, images, calls):
        release(lease, images, calls)
        logged.append(len(lease))  # staged images of the run not freed yet

    monkeypatch.setattr(ring_module.Lease, "release", release_and_count)
    n = 4 * (2 + 4) * xs_engine.max_batch  # the ring wraps four times
    got = list(est.predict_iter((img, [box]) for _ in range(n)))
    assert len(got) == n and est._uploader.staging_fallbacks == 0 and _ring_is_free(est)
    per_image = -(-img.nbytes // 256) * 256
    assert est._uploader.ring.size == (2 + 4) * xs_engine.max_batch * per_image
    # the run's log of staged images stays within what can be in flight (it once grew without end)
    assert len(logged) == n // xs_engine.max_batch and max(logged) <= (2 + 1) * xs_engine.max_batch + 2
    copies = []
    images = gpu_stage.Fill._images

    def count_copies(fill):
        copies.append(len(ring_module.spans(fill.staged)))
        return images(fill)

    monkeypatch.setattr(gpu_stage.Fill, "_images", count_copies)
    list(PoseEstimator(_FillsInput(xs_engine), prep_threads=4, prep_chunk=4).predict_iter(
        (img, [box]) for _ in range(40)))
    assert len(copies) == 10 and max(copies) <= 2  # each call's images came as one run: one copy (two on a wrap)


class _UploadFails(_HostStaging):
    """Stand-in whose per-image uploads fail (as pinned allocations do when memory runs out)."""

    def upload(self, image):
        raise RuntimeError("out of pinned memory (stand-in)")


def test_a_failing_upload_frees_the_regions_of_its_run_and_keeps_the_items_before_it(xs_engine, monkeypatch):
    """A run's third image finds no room in the ring and its per-image upload fails: the regions
    taken for the run are freed (they would otherwise block the ring for good), and the items
    before the failing one are still delivered, then the error."""
    pytest.importorskip("cnpose_trt._C")
    from cnpose_trt.io.draw import demo_image

    img, box = demo_image()
    stager = _UploadFails("cuda:0 (stand-in)", ring_bytes=int(2.5 * img.nbytes))
    with pytest.raises(RuntimeError, match="out of pinned memory"):
        stager.stage_many([img, img, img])
    assert all(r.attached for r in stager.ring.ring._live) and stager.staging_fallbacks == 1
    monkeypatch.setattr(gpu_stage, "usable", lambda engine: None)
    monkeypatch.setattr(gpu_stage, "Uploader", _UploadFails)
    est = PoseEstimator(_FillsInput(xs_engine), prep_threads=1, prep_chunk=4, staging_bytes=int(2.5 * img.nbytes))
    got = []
    with pytest.raises(RuntimeError, match="out of pinned memory"):
        for result in est.predict_iter((img, [box]) for _ in range(8)):
            got.append(result)
    assert len(got) == 2 and _ring_is_free(est)


def test_prep_runs_never_leave_prep_threads_idle(xs_engine, monkeypatch):
    """prep_chunk is capped at max_batch x prefetch / prep_threads (a run as large as the window
    would leave all but one prep thread idle)."""
    est = PoseEstimator(xs_engine, prep_threads=4, prefetch=2, prep_chunk=100)
    seen = set()
    real = HostPath.prepare_run

    def spy(path, entries):
        seen.add(len(entries))
        return real(path, entries)

    monkeypatch.setattr(HostPath, "prepare_run", spy)
    from cnpose_trt.io.draw import demo_image

    img, box = demo_image()
    assert len(list(est.predict_iter((img, [box]) for _ in range(16)))) == 16
    assert max(seen) == 2 * xs_engine.max_batch // 4


def test_gpu_path_keeps_two_batches_enqueued(xs_engine, monkeypatch):
    """The host waits for batch k's result only after batches k+1 and k+2 are enqueued."""
    pytest.importorskip("cnpose_trt._C")
    from cnpose_trt.io.draw import demo_image

    monkeypatch.setattr(gpu_stage, "usable", lambda engine: None)
    monkeypatch.setattr(gpu_stage, "Uploader", _HostStaging)
    events = []

    class Logged(_FillsInput):
        def enqueue_device(self, fill, n, **kwargs):
            k = len([e for e in events if e[0] == "enqueue"])
            events.append(("enqueue", k))
            done = super().enqueue_device(fill, n, **kwargs)
            return type("Handle", (), {"result": lambda _self: (events.append(("result", k)), done.result())[1]})()

    img, box = demo_image()
    got = list(PoseEstimator(Logged(xs_engine)).predict_iter((img, [box]) for _ in range(6 * xs_engine.max_batch)))
    assert len(got) == 6 * xs_engine.max_batch
    assert events[:4] == [("enqueue", 0), ("enqueue", 1), ("enqueue", 2), ("result", 0)]
    np.testing.assert_allclose(got[-1].image, got[0].image, rtol=1e-6)


class _Marker:
    """Stand-in for the event a GPU fill records after its crop kernel (labelled: no GPU here)."""

    def __init__(self, call):
        self.call = call

    def synchronize(self):
        pass


def test_ring_regions_wait_for_the_last_call_that_reads_them(xs_engine, monkeypatch):
    """An image whose people span two engine calls keeps its ring region until the second call's
    event; the batch's calls share one record of copies (the image is copied to the device once);
    when the engine fails before the second call's fill ran, the first call's event still guards
    the region (it is not freed while the first call's crop kernel may be pending)."""
    pytest.importorskip("cnpose_trt._C")
    from cnpose_trt.io.draw import demo_image

    monkeypatch.setattr(gpu_stage, "usable", lambda engine: None)
    monkeypatch.setattr(gpu_stage, "Uploader", _HostStaging)
    fills, attached = [], []

    class MarkedFill(gpu_stage.Fill):
        def __call__(self, inputs, stream):
            super().__call__(inputs, stream)
            self.done = _Marker(len(fills))
            fills.append(self)

    real_attach = ring_module._Region.attach
    monkeypatch.setattr(gpu_stage, "Fill", MarkedFill)
    monkeypatch.setattr(ring_module._Region, "attach",
                        lambda region, done: (attached.append((region.start, done)), real_attach(region, done)))
    img, box = demo_image()
    assert xs_engine.max_batch == 4
    items = [(img, [box] * 6), (img[::-1].copy(), [box])]  # 6 people: calls of 4 and 2, then a batch of 1
    got = list(PoseEstimator(_FillsInput(xs_engine)).predict_iter(items))
    assert [len(r) for r in got] == [6, 1] and len(fills) == 3
    assert fills[0].copied is fills[1].copied and fills[1].copied is not fills[2].copied
    first, second = fills[0].staged[0].region.start, fills[2].staged[0].region.start
    assert [(start, done.call) for start, done in attached] == [(first, 1), (second, 2)]

    class FailsOnSecondCall(_FillsInput):
        def enqueue_device(self, fill, n, **kwargs):
            if fills:
                raise EngineError("the engine failed (stand-in)")
            return super().enqueue_device(fill, n, **kwargs)

    fills.clear()
    attached.clear()
    with pytest.raises(EngineError, match="stand-in"):
        list(PoseEstimator(FailsOnSecondCall(xs_engine)).predict_iter(items))
    assert len(fills) == 1 and attached[0][0] == fills[0].staged[0].region.start and attached[0][1].call == 0
    assert [done for _, done in attached[1:]] == [None]  # the next image, staged but never read: freed by the run


def test_a_file_with_nobody_in_it_frees_its_ring_region_at_once(xs_engine, monkeypatch, tmp_path):
    """An image file is staged before its boxes are known; with no people nothing reads it, so its
    region is freed at once, not held until the run ends (which made every later image that
    reached it fall back to per-image staging)."""
    pytest.importorskip("cnpose_trt._C")
    from cnpose_trt.io.draw import demo_image

    monkeypatch.setattr(gpu_stage, "usable", lambda engine: None)
    monkeypatch.setattr(gpu_stage, "Uploader", _HostStaging)
    monkeypatch.setattr(gpu_stage, "RING_MIN_BYTES", 0)  # a ring of (prefetch + 4) x max_batch images
    img, box = demo_image()
    path = tmp_path / "empty.png"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    est = PoseEstimator(_FillsInput(xs_engine), prefetch=1)
    n = 3 * est._uploader.ring_images  # enough images to wrap the ring several times
    got = list(est.predict_iter([(str(path), []), *((img, [box]) for _ in range(n))]))
    assert len(got) == n + 1 and len(got[0]) == 0
    assert est._uploader.staging_fallbacks == 0 and _ring_is_free(est)
    # Alone in a batch of nobody (the next image has more people than one batch holds).
    est = PoseEstimator(_FillsInput(xs_engine), prefetch=1)
    got = list(est.predict_iter([(str(path), []), (img, [box] * 6), *((img, [box]) for _ in range(n))]))
    assert [len(r) for r in got[:3]] == [0, 6, 1]
    assert est._uploader.staging_fallbacks == 0 and _ring_is_free(est)


def test_device_path_with_room_for_one_crop_falls_back_to_host_crops_for_the_flip_test(tmp_path, monkeypatch):
    from cnpose_trt import build_engine
    from cnpose_trt.io.draw import demo_image
    from cnpose_trt.pipeline import gpu_stage

    monkeypatch.setattr(gpu_stage, "usable", lambda engine: None)
    monkeypatch.setattr(gpu_stage, "Uploader", _HostStaging)
    one = load_engine(build_engine("XS", backend="onnxruntime", out_dir=tmp_path, max_batch=1).path)
    img, box = demo_image()
    engine = _FillsInput(one)
    est = PoseEstimator(engine)
    flipped = est.predict(img, [box], flip=True)  # host crops and infer_decode: no call of n = 2
    plain = est.predict(img, [box])
    assert engine.calls == [1]
    want = PoseEstimator(one).predict(img, [box], flip=True)
    np.testing.assert_allclose(flipped.image, want.image, rtol=1e-5, atol=1e-3)
    assert plain.image.shape == (1, 18, 3)


def test_write_rows_refuses_a_layout_that_does_not_fill_the_rows():
    from cnpose_trt.pipeline import gpu_stage

    dest = np.zeros((3, 3, 8, 8), np.float32)
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="must fill the rows"):
        gpu_stage.write_rows(dest, [img], np.zeros(1, np.int64), np.tile(np.eye(2, 3), (1, 1, 1)),
                             np.zeros(1, bool), [(0, np.zeros((1, 3, 8, 8), np.float32), None)], 8, 0)


def test_rotated_jpegs_are_not_given_to_the_gpu_decoder():
    import struct

    from cnpose_trt.io.imageio_guard import jpeg_orientation
    from cnpose_trt.pipeline import gpu_stage

    ok, buf = cv2.imencode(".jpg", np.zeros((40, 100, 3), np.uint8))
    plain = buf.tobytes()

    def tagged(orientation, order):
        end = "<" if order == b"II" else ">"
        tiff = (order + struct.pack(end + "HI", 42, 8) + struct.pack(end + "H", 1)
                + struct.pack(end + "HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(end + "I", 0))
        payload = b"Exif\x00\x00" + tiff
        return plain[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + plain[2:]

    assert jpeg_orientation(plain) is None and gpu_stage.gpu_decodable(plain)
    for order in (b"II", b"MM"):
        assert jpeg_orientation(tagged(6, order)) == 6 and not gpu_stage.gpu_decodable(tagged(6, order))
        assert gpu_stage.gpu_decodable(tagged(1, order))
    assert not gpu_stage.gpu_decodable(b"\x89PNG\r\n")


def test_cpu_engines_have_no_device_input(xs_engine):
    from cnpose_trt.pipeline import gpu_stage

    with pytest.raises(EngineError, match="runs on the CPU"):
        xs_engine.enqueue_device(lambda inputs, stream: None, 1)
    assert gpu_stage.usable(xs_engine) == "the engine runs on the CPU"
    est = PoseEstimator(xs_engine)
    assert not est.device_crops and est.device_crops_unavailable == "the engine runs on the CPU"
    assert est.device_stats is None
    assert gpu_stage.usable(_OnDevice(xs_engine)).endswith("has no device input path")


def test_jpeg_orientation_survives_damaged_headers():
    from cnpose_trt.io.imageio_guard import jpeg_orientation

    rng = np.random.default_rng(0)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    good = buf.tobytes()
    exif = b"\xff\xe1\x00\x22Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00"
    for _ in range(2000):
        data = bytearray(good[:2] + exif + good[2:])
        for _ in range(int(rng.integers(1, 6))):  # flip bytes in the header area, or cut the file short
            data[int(rng.integers(2, 80))] = int(rng.integers(0, 256))
        data = bytes(data[:int(rng.integers(2, len(data) + 1))])
        value = jpeg_orientation(data)
        assert value is None or isinstance(value, int)
    assert jpeg_orientation(good[:2] + exif + good[2:]) == 6


@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_device_path_delivers_earlier_results_before_a_bad_item(xs_engine, monkeypatch, chunk):
    from cnpose_trt.io.draw import demo_image
    from cnpose_trt.pipeline import gpu_stage

    monkeypatch.setattr(gpu_stage, "usable", lambda engine: None)
    monkeypatch.setattr(gpu_stage, "Uploader", _HostStaging)
    img, box = demo_image()
    items = [(img, [box])] * 5 + [(img, [box], -1.0)] + [(img, [box])] * 3
    got = []
    with pytest.raises(ValueError, match="root_depth must be > 0"):
        for result in PoseEstimator(_FillsInput(xs_engine), prep_chunk=chunk).predict_iter(items):
            got.append(result)
    assert len(got) == 5 and all(len(r) == 1 for r in got)


def _run_threads(worker, n):
    """worker(k) on n threads at once; True when all finished within a minute."""
    import threading

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return not any(t.is_alive() for t in threads)


class _CopyDone:
    """Stand-in for a CUDA event: the 'copy' out of a ring region finishes when synchronised,
    and checks that nobody overwrote the region before then."""

    def __init__(self, ring, region, pattern, log):
        self.ring, self.region, self.pattern, self.log = ring, region, pattern, log

    def synchronize(self):
        got = self.ring.buffer[self.region.start:self.region.start + len(self.pattern)]
        self.log.append(bool((got == self.pattern).all()))


def test_pinned_ring_never_hands_out_bytes_still_being_copied():
    from cnpose_trt.pipeline.staging import PinnedRing

    ring = PinnedRing(np.zeros(1 << 14, np.uint8))  # a few regions at a time: they wrap often
    assert ring.take(0) is None and ring.take((1 << 14) + 1) is None
    a, b = ring.take(1000), ring.take(1000)
    assert (a.start, b.start) == (0, 1024) and b.start % 256 == 0
    for r in (a, b):
        r.attach(None)
    log, errors, misses = [], [], []

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            done = 0
            while done < 300 and len(misses) < 100_000:
                n = int(rng.integers(1, 6000))
                region = ring.take(n)
                if region is None:  # another thread's region, not attached yet, is in the way
                    misses.append(n)
                    time.sleep(0)  # let that thread attach it (the spin count depends on scheduling)
                    continue
                done += 1
                pattern = rng.integers(0, 256, n, dtype=np.uint8)
                ring.buffer[region.start:region.start + n] = pattern
                region.attach(_CopyDone(ring, region, pattern, log) if rng.random() < 0.9 else None)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    assert _run_threads(worker, 4) and not errors
    assert len(log) > 500 and all(log)  # every waited-for copy still saw its own bytes
    assert len(misses) < 100_000
    with pytest.raises(ValueError, match="1-D uint8"):
        PinnedRing(np.zeros((4, 4), np.uint8))


def test_pinned_ring_does_not_wait_for_regions_not_handed_to_the_engine():
    """A region without an event belongs to an image still on its way to the engine: waiting for
    it could wait forever (the engine call that attaches it may be behind the waiting thread), so
    take() gives None instead; once attached, the region is waited for and reused."""
    from cnpose_trt.pipeline.staging import PinnedRing

    ring = PinnedRing(np.zeros(4096, np.uint8))
    a, b = ring.take(2048), ring.take(2048)
    assert ring.take(256) is None and ring.take(256) is None  # a is in the way, unattached
    synced = []
    a.attach(type("Event", (), {"synchronize": lambda self: synced.append("a")})())
    c = ring.take(256)
    assert (c.start, c.end) == (0, 256) and synced == ["a"]
    assert ring.take(2048) is None  # [256, 2304) overlaps b, still unattached
    b.attach(None)
    d = ring.take(2048)
    assert (d.start, d.end) == (256, 2304)


def test_attaching_a_region_never_waits_for_a_prep_thread_waiting_on_the_gpu():
    """A prep thread waiting in take() for an older region's event holds the ring's lock; the main
    thread attaches the regions of the batch it just enqueued meanwhile, and must not wait with it
    (it would stop enqueuing work, and the GPU would run dry)."""
    import threading

    from cnpose_trt.pipeline.staging import PinnedRing

    ring = PinnedRing(np.zeros(1024, np.uint8))
    a, b = ring.take(512), ring.take(512)
    waiting, gpu_done = threading.Event(), threading.Event()

    class SlowEvent:  # stand-in for a CUDA event still pending (labelled: no GPU here)
        def synchronize(self):
            waiting.set()
            gpu_done.wait(10)

    a.attach(SlowEvent())
    got = []
    prep = threading.Thread(target=lambda: got.append(ring.take(256)))
    prep.start()
    assert waiting.wait(10)  # the prep thread waits for a's event, under the ring's lock
    attached = threading.Event()
    threading.Thread(target=lambda: (b.attach(None), attached.set())).start()
    try:
        assert attached.wait(5), "attach() waited for the prep thread's GPU wait"
    finally:
        gpu_done.set()
        prep.join(10)
    assert b.attached and got and (got[0].start, got[0].end) == (0, 256)


def test_put_many_keeps_a_runs_images_side_by_side():
    """Images staged together get adjacent regions even while other threads stage theirs (one copy
    brings them over), wrapping to the ring's start at most once."""

    from cnpose_trt.pipeline.staging import StagingRing

    ring = StagingRing(np.zeros(4 << 20, np.uint8), np.zeros(4 << 20, np.uint8))
    bad, errors = [], []

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(200):
                images = [np.full((int(rng.integers(60, 120)), 400, 3), k, np.uint8) for k in range(5)]  # 72-144 KB
                staged = ring.put_many(images)
                got = [s for s in staged if s is not None]
                pairs = list(zip(got, got[1:], strict=False))
                breaks = sum(b.region.start != a.region.end for a, b in pairs)
                if breaks > 1 or any(b.region.start not in (a.region.end, 0) for a, b in pairs):
                    bad.append([(s.region.start, s.region.end) for s in got])
                for s, im in zip(staged, images, strict=True):
                    if s is not None:
                        np.testing.assert_array_equal(ring.ring.buffer[s.region.start:s.region.start + s.nbytes],
                                                      im.reshape(-1))
                ring.release(got, None)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    assert _run_threads(worker, 3) and not errors and not bad


def test_spans_merge_adjacent_regions_and_never_copy_gaps():
    from cnpose_trt.pipeline.staging import Staged, _Region, spans

    def staged(start, end):
        return Staged(_Region(start, end), (1, 1, 3), 3)

    a, b, c = staged(0, 256), staged(256, 768), staged(1024, 1280)
    assert spans([b, a, c, a]) == [(0, 768), (1024, 1280)]  # sorted, each region once, a gap kept out
    assert spans([c]) == [(1024, 1280)] and spans([]) == []
    assert spans([staged(3840, 4096), staged(0, 256)]) == [(0, 256), (3840, 4096)]  # wrapped: two copies


def test_staging_ring_round_trip_and_sizes():
    """put copies any uint8 image (strided views too) into the ring; copy_in brings exactly the
    staged ranges to the mirror; view gives the image back from the mirror."""
    from cnpose_trt.pipeline.staging import StagingRing

    rng = np.random.default_rng(3)
    host, mirror = np.zeros(1 << 16, np.uint8), np.full(1 << 16, 7, np.uint8)
    ring = StagingRing(host, mirror)
    big = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    images = [rng.integers(0, 256, (17, 23, 3), dtype=np.uint8), big[5:30:2, 10:50],  # a strided view
              rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)]
    staged = [ring.put(im) for im in images]
    assert [s.region.start for s in staged] == [0, 1280, 3072]  # 256-byte aligned, in order
    assert ring.copy_in(staged) == 1  # adjacent: one copy
    for s, im in zip(staged, images, strict=True):
        np.testing.assert_array_equal(ring.view(s), im)
    assert (mirror[3328:] == 7).all()  # nothing beyond the staged ranges was written
    ring.release(staged, None)
    assert all(s.region.attached for s in staged)
    assert ring.put(np.zeros((200, 200, 3), np.uint8)) is None  # larger than the whole ring
    with pytest.raises(ValueError, match="mirror must have the host ring's shape"):
        StagingRing(host, np.zeros(10, np.uint8))


def test_a_lease_frees_each_region_once_after_the_last_call_that_read_it(monkeypatch):
    """staging.Lease: release() attaches each image's region to the `done` of the last call that ran
    and read it (None when none did), close() frees only what was never released, and nothing is
    attached twice."""
    attached = []
    real_attach = ring_module._Region.attach
    monkeypatch.setattr(ring_module._Region, "attach",
                        lambda region, done: (attached.append((region.start, done)), real_attach(region, done)))
    stager = _HostStaging("cuda:0 (stand-in)", ring_bytes=8 * 1024)
    lease = stager.lease()
    img = np.zeros((10, 30, 3), np.uint8)  # 1024 ring bytes each
    (a, _), (b, _) = lease.stage_many([img, img])
    c, _ = lease.stage(img)
    assert len(lease) == 3 and not attached

    class Call:
        def __init__(self, staged, done):
            self.staged, self.done = staged, done

    first, second = _Marker(0), _Marker(1)
    lease.release([a, b, np.zeros(3)], [Call([a, b], first), Call([a], second), Call([b], None)])
    assert attached == [(a.region.start, second), (b.region.start, first)] and len(lease) == 1
    lease.close()
    assert attached[2:] == [(c.region.start, None)] and len(lease) == 0
    lease.close()
    assert len(attached) == 3 and all(r.attached for r in stager.ring.ring._live)


def test_stager_sizes_its_ring_from_the_first_image_and_falls_back_per_image(monkeypatch):
    monkeypatch.setattr(gpu_stage, "RING_MIN_BYTES", 0)
    stager = _HostStaging("cuda:0 (stand-in)", ring_images=3)
    img = np.zeros((10, 30, 3), np.uint8)  # 900 bytes: 1024 with alignment
    got = [stager.stage(img)[0] for _ in range(4)]
    assert stager.ring.size == 3 * 1024
    assert all(isinstance(g, gpu_stage.Staged) for g in got[:3])
    assert not isinstance(got[3], gpu_stage.Staged) and stager.staging_fallbacks == 1  # no room: per image
    stager.release(got[:3], None)
    assert isinstance(stager.stage(img)[0], gpu_stage.Staged)
    assert isinstance(stager.stage(np.zeros((10, 30, 3), np.float32))[0], np.ndarray)  # only uint8 is staged
    per_image = _HostStaging("cuda:0 (stand-in)", staging="per_image")
    assert isinstance(per_image.stage(img)[0], np.ndarray) and per_image.ring is None
    with pytest.raises(ValueError, match="staging must be one of batched, per_image"):
        gpu_stage.Stager("ring")
    with pytest.raises(ValueError, match="staging ring bytes must be at least 256"):
        gpu_stage.Stager(ring_bytes=100)

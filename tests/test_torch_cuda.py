"""The torch CUDA path (fp16, channels-last, CUDA graphs) with the fused decode on the device.
Runs where torch sees a GPU (benchmarks/gpu_check.sh); skipped elsewhere."""

import numpy as np
import pytest

from cnpose_trt import build_engine, load_engine
from cnpose_trt.build.verify import accuracy_inputs, joint_error
from cnpose_trt.io.draw import demo_image
from cnpose_trt.pipeline.estimator import PoseEstimator

pytestmark = pytest.mark.cuda
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)


@pytest.mark.parametrize("variant", ["XS", "M"])
def test_torch_cuda_fp16_matches_cpu_fp32(tmp_path, variant, monkeypatch):
    ref = load_engine(build_engine(variant, backend="onnxruntime", out_dir=tmp_path, max_batch=8).path)
    fp16 = build_engine(variant, backend="torch", precision="fp16", out_dir=tmp_path, max_batch=8)
    eager = load_engine(fp16.path, device="cuda")
    graphs = load_engine(fp16.path, device="cuda", cuda_graphs=True)
    assert eager.on_device and eager.device.startswith("cuda") and eager.output_dtype == np.float16
    x = accuracy_inputs(ref.spec, 6)
    heat_ref = ref.infer(x)
    for eng in (eager, graphs):
        err = joint_error(heat_ref, eng.infer(x), ref.spec)
        assert err["mean_cells"] < 0.1, err
    np.testing.assert_array_equal(graphs.infer(x), graphs.infer(x))  # replay is deterministic
    img, box = demo_image()
    items = [(img, np.array([box, [10, 10, 200, 300]]), 4000.0, [1500, 1500, 320, 240])] * 5
    x_host = graphs.infer(x)  # before the host path is closed below
    assert x_host.shape[0] == 6

    def no_host_copy(images):
        raise AssertionError("PoseEstimator copied heatmaps of a GPU engine to the host")

    monkeypatch.setattr(graphs, "_run", no_host_copy)  # infer()'s device -> host copy
    on_gpu = list(PoseEstimator(graphs).predict_iter(items, flip=True))
    on_cpu = list(PoseEstimator(ref).predict_iter(items, flip=True))
    for a, b in zip(on_gpu, on_cpu, strict=True):
        assert np.abs(a.image[..., :2] - b.image[..., :2]).max() < 5.0  # px, fp16 vs fp32
        assert a.camera is not None and np.isfinite(a.camera).all()


# ------------------------------------------------------------------ the device-resident pipeline

@pytest.fixture(scope="module")
def gpu_engines(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engines")
    fp16 = build_engine("XS", backend="torch", precision="fp16", out_dir=tmp, max_batch=8).path
    fp32 = build_engine("XS", backend="torch", precision="fp32", out_dir=tmp, max_batch=8).path
    return {"graphs": load_engine(fp16, device="cuda", cuda_graphs=True),
            "eager32": load_engine(fp32, device="cuda"),
            "cpu32": load_engine(build_engine("XS", backend="onnxruntime", out_dir=tmp, max_batch=8).path)}


def _scenes(count, seed=0):
    import cv2

    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        h, w = int(rng.integers(200, 900)), int(rng.integers(200, 1200))
        img = cv2.resize(rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8), (w, h))
        people = int(rng.integers(0, 4))
        boxes = np.array([[rng.uniform(-50, w - 20), rng.uniform(-50, h - 20), rng.uniform(20, w),
                           rng.uniform(20, h)] for _ in range(people)]).reshape(-1, 4)
        items.append({"image": img, "boxes": boxes, "root_depth": 3000.0 + 100 * i,
                      "intrinsics": [1500, 1500, w / 2, h / 2]})
    return items


@pytest.mark.parametrize("staging", ["batched", "per_image", "small_ring"])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("name", ["graphs", "eager32"])
def test_device_crops_equal_host_crops(gpu_engines, monkeypatch, name, flip, staging):
    """GPU crops into the engine's input give the joints host crops give on the same engine, with
    images staged in the ring (copied over once per engine call), per image, or both (a ring with
    room for about three images: those that find no room are staged per image)."""
    import cnpose_trt.pipeline.host as pipeline

    eng = gpu_engines[name]
    items = _scenes(13, seed=1 if flip else 2)
    host = list(PoseEstimator(eng, crop_method="opencv").predict_iter(items, flip=flip))
    options = {"staging_bytes": 3 << 20} if staging == "small_ring" else {"staging": staging}
    est = PoseEstimator(eng, **options)
    assert est.device_crops, est.device_crops_unavailable

    def no_host_crops(*a, **k):
        raise AssertionError("a uint8 image was cropped on the host on the device path")

    monkeypatch.setattr(pipeline, "crop_people", no_host_crops)
    dev = list(est.predict_iter(items, flip=flip))
    ring = est._uploader.ring
    assert (ring is None) == (staging == "per_image")
    if ring is not None:
        assert all(r.attached for r in ring.ring._live)
        assert (est.device_stats["staging_fallbacks"] > 0) == (staging == "small_ring")
    assert [len(r) for r in dev] == [len(r) for r in host]
    for a, b in zip(dev, host, strict=True):
        np.testing.assert_array_equal(a.crop_boxes, b.crop_boxes)
        if len(a):
            # Same engine, same rounded crops but for float32 ties (about 2 values in 100,000 differ
            # by one grey level), which move a random-weight network's joints a little.
            assert np.abs(a.image[..., :2] - b.image[..., :2]).max() < 0.1
            assert np.abs(a.camera - b.camera).max() < 1.0


def test_staging_ring_reuse_with_a_slow_engine_stream(gpu_engines, monkeypatch):
    """A 40 MiB ring (96 images of about 1.2 MB: it wraps), prefetch 1, and the engine's stream
    held back ~10 ms before each call's crop kernel (torch.cuda._sleep): regions are reused only
    after the crop kernels that read them (the prep threads wait for their events), so the poses
    equal the host path's; a region freed early would be overwritten before its kernel ran."""
    from cnpose_trt.ops._device import torch_stream
    from cnpose_trt.pipeline import gpu_stage
    from cnpose_trt.pipeline.staging import PinnedRing

    if not hasattr(torch.cuda, "_sleep"):
        pytest.skip("torch.cuda._sleep is not in this torch")
    eng = gpu_engines["eager32"]
    items = _scenes(96, seed=7)  # 68 with people, 87 MiB staged: the ring wraps twice
    host = list(PoseEstimator(eng, crop_method="opencv").predict_iter(items))
    real = gpu_stage.Fill.__call__

    def slow(self, inputs, stream):
        with torch.cuda.stream(torch_stream(stream, self.uploader.device)):  # the engine's stream
            torch.cuda._sleep(20_000_000)  # GPU clock cycles: about 10 ms
        real(self, inputs, stream)

    monkeypatch.setattr(gpu_stage.Fill, "__call__", slow)
    starts = []
    take = PinnedRing._take

    def logged(ring, nbytes):
        region = take(ring, nbytes)
        if region is not None:
            starts.append(region.start)
        return region

    monkeypatch.setattr(PinnedRing, "_take", logged)
    est = PoseEstimator(eng, prefetch=1, staging_bytes=40 << 20)
    dev = list(est.predict_iter(items))
    up = est._uploader
    assert up.ring.size == 40 << 20 and up.staging_fallbacks < len(items) // 2
    assert starts.count(0) >= 2  # the ring wrapped: regions were reused
    assert all(r.attached for r in up.ring.ring._live)
    for a, b in zip(dev, host, strict=True):
        np.testing.assert_array_equal(a.crop_boxes, b.crop_boxes)
        if len(a):
            assert np.abs(a.image[..., :2] - b.image[..., :2]).max() < 0.1


@pytest.mark.parametrize("staging", ["batched", "per_image"])
def test_crop_kernel_waits_for_a_slow_upload_stream(gpu_engines, monkeypatch, staging):
    """Every copy to the device (the ring's copy per call, or a per-image upload) held back ~10 ms
    on the upload stream (torch.cuda._sleep), the ring's device mirror filled with 7s first: the
    crop kernel on the engine's stream waits for the copies (their events), so the poses equal the
    host path's. A kernel not ordered after them would read the 7s (or an older image)."""
    from cnpose_trt.pipeline import gpu_stage
    from cnpose_trt.pipeline.staging import StagingRing

    if not hasattr(torch.cuda, "_sleep"):
        pytest.skip("torch.cuda._sleep is not in this torch")
    eng = gpu_engines["eager32"]
    items = _scenes(24, seed=8)
    host = list(PoseEstimator(eng, crop_method="opencv").predict_iter(items))
    real_copy, real_upload, real_allocate = (StagingRing.copy_in, gpu_stage.Uploader.upload,
                                             gpu_stage.Uploader._allocate)

    def slow_copy(ring, staged):  # called on the upload stream (Fill)
        torch.cuda._sleep(20_000_000)
        return real_copy(ring, staged)

    def slow_upload(up, image):
        with torch.cuda.stream(up.stream):
            torch.cuda._sleep(20_000_000)
        return real_upload(up, image)

    def sevens(up, size):
        ring = real_allocate(up, size)
        ring.mirror.fill_(7)
        torch.cuda.synchronize()
        return ring

    monkeypatch.setattr(StagingRing, "copy_in", slow_copy)
    monkeypatch.setattr(gpu_stage.Uploader, "upload", slow_upload)
    monkeypatch.setattr(gpu_stage.Uploader, "_allocate", sevens)
    dev = list(PoseEstimator(eng, staging=staging).predict_iter(items))
    for a, b in zip(dev, host, strict=True):
        np.testing.assert_array_equal(a.crop_boxes, b.crop_boxes)
        if len(a):
            assert np.abs(a.image[..., :2] - b.image[..., :2]).max() < 0.1


def test_device_crops_match_cpu_engine(gpu_engines):
    items = _scenes(9, seed=3)
    dev = list(PoseEstimator(gpu_engines["eager32"]).predict_iter(items, flip=True))
    cpu = list(PoseEstimator(gpu_engines["cpu32"]).predict_iter(items, flip=True))
    for a, b in zip(dev, cpu, strict=True):
        if len(a):
            assert np.abs(a.image[..., :2] - b.image[..., :2]).max() < 0.1  # fp32 GPU vs fp32 CPU, ties


def test_device_path_writes_the_engines_input_buffer(gpu_engines):
    eng = gpu_engines["graphs"]
    seen = []

    def fill(inputs, stream):
        seen.append((inputs.data_ptr(), tuple(inputs.shape), stream))
        inputs.normal_()

    packed = eng.enqueue_device(fill, 6, flip=True, boxes=np.tile([0, 0, 256, 256], (3, 1))).result()
    # cells, confidence, image px + mm written; camera not requested: NaN, as on the CPU
    assert packed.shape == (3, 18, 10) and np.isfinite(packed[..., :7]).all() and np.isnan(packed[..., 7:]).all()
    assert seen == [(eng.input_buffer().data_ptr(), (6, 3, 256, 256), torch.cuda.current_stream().cuda_stream)]
    with pytest.raises(ValueError, match="n must be an integer in 1..8"):
        eng.enqueue_device(fill, 9)
    with pytest.raises(ValueError, match="with flip, n must be even"):
        eng.enqueue_device(fill, 3, flip=True)


def test_device_path_mixed_float_and_uint8_images(gpu_engines):
    """Float images are cropped on the host and copied into their rows between GPU-cut ones."""
    items = _scenes(6, seed=4)
    for it in items[1::2]:
        it["image"] = it["image"].astype(np.float32)
    eng = gpu_engines["eager32"]
    for flip in (False, True):
        dev = list(PoseEstimator(eng).predict_iter(items, flip=flip))
        host = list(PoseEstimator(eng, crop_method="opencv").predict_iter(items, flip=flip))
        for a, b in zip(dev, host, strict=True):
            if len(a):
                assert np.abs(a.image[..., :2] - b.image[..., :2]).max() < 0.1


def test_device_path_reads_jpeg_files(gpu_engines, tmp_path):
    """JPEG files decode on the GPU (nvJPEG through torchvision) close to OpenCV, and the pipeline
    fed with the files gives exactly what it gives for the GPU-decoded pixels passed as arrays."""
    import cv2

    from cnpose_trt.io.preprocess import load_image
    from cnpose_trt.pipeline.gpu_stage import Uploader

    items = [it for it in _scenes(8, seed=5) if len(it["boxes"])]
    files, decoded = [], []
    up = Uploader("cuda", staging="per_image")  # load() gives (device tensor, event) for every file
    for i, it in enumerate(items):
        path = tmp_path / f"{i}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(it["image"], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        files.append({**it, "image": str(path)})
        dev, ready = up.load(path)
        ready.synchronize()
        pixels = dev.cpu().numpy()
        diff = np.abs(pixels.astype(int) - load_image(path).astype(int))
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg's: measured mean 2.47 grey levels
        # on these colour-edge-rich 4:2:0 files (H200, 2026-11-27); a wrong decode is far off.
        assert pixels.shape == it["image"].shape and diff.mean() < 4.0
        decoded.append({**it, "image": pixels})
    if up._decode_jpeg is not None:  # torchvision here: every file went through nvJPEG
        assert up.gpu_jpeg_failures == 0
    eng = gpu_engines["eager32"]
    from_files = list(PoseEstimator(eng).predict_iter(files))
    from_arrays = list(PoseEstimator(eng).predict_iter(decoded))
    for a, b in zip(from_files, from_arrays, strict=True):
        np.testing.assert_allclose(a.image, b.image, atol=1e-3)
    with pytest.raises(FileNotFoundError):
        list(PoseEstimator(eng).predict_iter([(str(tmp_path / "missing.jpg"), [[0, 0, 10, 10]])]))


def test_torch_stream_maps_raw_handles_to_the_streams_they_name():
    """Handle 0 is the legacy default stream (torch.cuda.ExternalStream(0) would be a new pool
    stream); the current stream's handle gives the current stream; others wrap the handle."""
    from cnpose_trt.ops._device import torch_stream

    dev = torch.device("cuda", torch.cuda.current_device())
    assert torch_stream(0, dev) == torch.cuda.default_stream(dev)
    side = torch.cuda.Stream(dev)
    with torch.cuda.stream(side):
        assert torch_stream(side.cuda_stream, dev) == side
    wrapped = torch_stream(side.cuda_stream, dev)
    assert wrapped.cuda_stream == side.cuda_stream and wrapped != torch.cuda.default_stream(dev)


@pytest.mark.skipif(not hasattr(torch.cuda, "_sleep"), reason="needs torch.cuda._sleep")
def test_a_failing_fill_still_orders_the_next_caller(gpu_engines):
    """A fill that fails after enqueuing work on the input buffer still leaves an event behind
    (_last_call): the next caller, on another stream, waits for that work before it writes.
    The failing fill's work is held back on the GPU; timing events show the next caller's fill
    started only after it, and that caller's joints equal those of its input computed alone."""
    eng = gpu_engines["eager32"]
    known = torch.randn((2, *eng.spec.input_shape), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    ref = eng.enqueue_device(lambda inputs, stream: inputs.copy_(known), 2).result()
    before = eng._last_call
    failed_end = torch.cuda.Event(enable_timing=True)
    next_start = torch.cuda.Event(enable_timing=True)

    def fails(inputs, stream):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU clock cycles on the engine's stream
        inputs.fill_(1.0)
        failed_end.record()
        raise RuntimeError("fill failed (test)")

    def next_fill(inputs, stream):
        next_start.record()
        inputs.copy_(known)

    side = torch.cuda.Stream()  # made first: the first pool stream's set-up blocks the host ~50 ms
    with pytest.raises(RuntimeError, match="fill failed"):
        eng.enqueue_device(fails, 2)
    assert eng._last_call is not None and eng._last_call is not before
    with torch.cuda.stream(side):
        pending = eng.enqueue_device(next_fill, 2)
    assert not failed_end.query()  # still held back: a host sync in between would void the check below
    packed = pending.result()
    torch.cuda.synchronize()
    assert failed_end.elapsed_time(next_start) >= 0.0  # ms from the failed fill's end to the next start
    assert packed.shape == (2, 18, 10)
    np.testing.assert_allclose(packed[..., :4], ref[..., :4], rtol=1e-5, atol=1e-5)

import threading

import numpy as np
import pytest

from cnpose_trt import estimate
from cnpose_trt.io.draw import demo_image
from cnpose_trt.pipeline.estimator import PoseEstimator


def _scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    base, _ = demo_image()
    for _ in range(n):
        h, w = int(rng.integers(200, 500)), int(rng.integers(200, 600))
        img = np.ascontiguousarray(np.roll(base, int(rng.integers(0, 300)), axis=1)[:h, :w])
        people = int(rng.integers(1, 4))
        boxes = np.column_stack([rng.uniform(0, w * 0.5, people), rng.uniform(0, h * 0.5, people),
                                 rng.uniform(30, w * 0.5, people), rng.uniform(30, h * 0.5, people)])
        yield img, boxes, rng.uniform(3000, 6000, people), [800.0, 800.0, w / 2, h / 2]


@pytest.fixture(scope="module")
def estimator(xs_engine):
    return PoseEstimator(xs_engine, prep_threads=2, prefetch=2)


def test_stream_matches_one_by_one(estimator, xs_engine):
    items = list(_scenes(11))
    streamed = list(estimator.predict_iter(iter(items), flip=True))
    assert len(streamed) == len(items)
    for (img, boxes, root, k), res in zip(items, streamed, strict=True):
        ref = estimate(xs_engine, img, boxes, root_depth=root, intrinsics=k, flip=True)
        np.testing.assert_allclose(res.image, ref.image, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(res.camera, ref.camera, rtol=1e-5, atol=1e-2)
        assert res.image.shape == (len(boxes), 18, 3) and res.joint_names[0] == "Pelvis"


def test_predict_single_and_list(estimator):
    items = list(_scenes(3, seed=1))
    one = estimator.predict(items[0][0], items[0][1])
    assert one.image.shape == (len(items[0][1]), 18, 3) and one.root_relative and one.camera is None
    many = estimator.predict([i[0] for i in items], [i[1] for i in items], root_depth=[i[2] for i in items],
                             intrinsics=items[0][3])
    assert [len(r) for r in many] == [len(i[1]) for i in items] and all(r.camera is not None for r in many)
    np.testing.assert_allclose(many[0].image[..., :2], one.image[..., :2], rtol=1e-6)
    with pytest.raises(ValueError, match="one \\(P, 4\\) array per image"):
        estimator.predict([items[0][0]], [items[0][1], items[1][1]])


def test_streaming_memory_is_bounded(estimator):
    pulled = 0

    def source():
        nonlocal pulled
        for item in _scenes(40, seed=2):
            pulled += 1
            yield item

    window = estimator.max_batch * estimator.prefetch
    for yielded, _ in enumerate(estimator.predict_iter(source()), start=1):
        assert pulled - yielded <= window + estimator.max_batch + 1
    assert pulled == 40


def test_shared_between_threads(estimator):
    sets = [list(_scenes(6, seed=s)) for s in (3, 4, 5)]
    expected = [list(estimator.predict_iter(items)) for items in sets]
    got = [None] * 3

    def work(i):
        got[i] = list(estimator.predict_iter(sets[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for exp, res in zip(expected, got, strict=True):
        for a, b in zip(exp, res, strict=True):
            np.testing.assert_array_equal(a.image, b.image)


def test_bad_items(estimator):
    img, boxes, _, _ = next(_scenes(1))
    with pytest.raises(TypeError, match="items must be"):
        list(estimator.predict_iter([img]))
    with pytest.raises(TypeError, match="items must be"):  # None is a bad item, not the end of the stream
        list(estimator.predict_iter([(img, boxes), None]))
    with pytest.raises(ValueError, match="needs 'image' and one of 'boxes'"):
        list(estimator.predict_iter([{"image": img}]))
    with pytest.raises(ValueError, match="intrinsics need root_depth"):
        list(estimator.predict_iter([{"image": img, "boxes": boxes, "intrinsics": [1, 1, 0, 0]}]))
    with pytest.raises(ValueError, match="prep_threads and prefetch"):
        PoseEstimator(estimator.engine, prep_threads=0)


def test_from_variant_and_path(tmp_path, xs_engine_path):
    est = PoseEstimator("XS", engine_dir=tmp_path, max_batch=2, backend="onnxruntime")
    assert est.max_batch == 2 and est.spec.name == "XS"
    assert PoseEstimator(xs_engine_path).engine.path == xs_engine_path


def test_variant_as_a_keyword(tmp_path, xs_engine_path):
    est = PoseEstimator(variant="XS", engine_dir=tmp_path, max_batch=2, backend="onnxruntime")
    assert est.max_batch == 2 and est.spec.name == "XS"
    with pytest.raises(ValueError, match="give the variant once: as the first argument \\('S'\\) or as variant= "
                                         "\\('XS'\\), not both"):
        PoseEstimator("S", variant="XS", engine_dir=tmp_path)


def test_unusable_images_and_values_are_refused_in_one_line(estimator, xs_engine):
    """What predict cannot use is refused naming the argument and what it wants, not misread
    as a list of 480 images or overflowed to inf."""
    from cnpose_trt.ops.decoding import decode

    img, box = demo_image()
    wanted = "one \\(H, W, 3\\) RGB image \\(uint8, or float in 0..255\\) or a list of them"
    with pytest.raises(ValueError, match=f"images must be {wanted}.*shape \\(480, 640\\): a grayscale image"):
        estimator.predict(img[:, :, 0], [box])
    with pytest.raises(TypeError, match="images\\[0\\] must be a numpy array .* got list: a nested list"):
        estimator.predict(img.tolist(), [box])
    with pytest.raises(TypeError, match=f"images must be {wanted}.*got builtins.dict"):
        estimator.predict({"image": img}, [box])
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=f"images must be {wanted}.*got torch.Tensor \\(convert it with "
                                        "\\.cpu\\(\\)\\.numpy\\(\\)\\)"):
        estimator.predict(torch.from_numpy(img), [box])
    with pytest.raises(ValueError, match="root_depth must be > 0 and at most 1e\\+09 mm .* got \\[1e\\+300\\]"):
        estimator.predict(img, [box], root_depth=1e300)
    with pytest.raises(ValueError, match="intrinsics must be fx, fy, cx, cy .* got \\[1e\\+300, 1.0, 0.0, 0.0\\]"):
        estimator.predict(img, [box], root_depth=4000.0, intrinsics=[1e300, 1.0, 0.0, 0.0])
    heat = np.zeros((1, *xs_engine.spec.heatmap_shape), np.float32)
    with pytest.raises(ValueError, match="root_depth must be >= 0 \\(0: root-relative\\) .* got \\[-5.0\\]"):
        decode(heat, 18, boxes=[[0, 0, 5, 5]], root_depth=[-5])
    with pytest.raises(ValueError, match="root_depth must be >= 0"):
        decode(heat, 18, boxes=[[0, 0, 5, 5]], root_depth=[1e300])
    assert decode(heat, 18, boxes=[[0, 0, 5, 5]], root_depth=[0.0]).packed.shape == (1, 18, 10)


@pytest.mark.parametrize("kind", ["boxes", "crop_boxes"])
def test_a_box_wholly_outside_the_image_is_refused(estimator, xs_engine, kind):
    img, box = demo_image()
    for bad in ([-1e6, -1e6, 10, 10], [640, 0, 100, 100], [0, -60, 100, 60]):
        with pytest.raises(ValueError, match=f"^{kind}\\[1\\] = .* lies outside the 640x480 image \\(no area in "
                                             "common with it\\): no person to estimate$"):
            estimator.predict(img, **{kind: [box, bad]})
        with pytest.raises(ValueError, match=f"^{kind}\\[1\\] = .* lies outside"):
            estimate(xs_engine, img, **{kind: [box, bad]})


def test_zero_people_give_empty_results(estimator):
    """An empty frame is a result, not an error: a stream of frames must survive it (flip test included)."""
    items = list(_scenes(3, seed=5))
    img = items[0][0]
    empty = estimator.predict(img, np.zeros((0, 4)), root_depth=4000.0, intrinsics=[800, 800, 100, 100])
    assert len(empty) == 0 and empty.image.shape == (0, 18, 3) and empty.camera.shape == (0, 18, 3)
    assert len(estimator.predict(img, [])) == 0
    stream = [items[0], (img, np.zeros((0, 4))), items[1], (img, []), (img, []), items[2]]
    for flip in (False, True):
        got = list(estimator.predict_iter(stream, flip=flip))
        assert [len(r) for r in got] == [len(it[1]) for it in stream]
        ref = estimator.predict(items[1][0], items[1][1], root_depth=items[1][2], intrinsics=items[1][3], flip=flip)
        np.testing.assert_allclose(got[2].image, ref.image, rtol=1e-6)
    only_empty = list(estimator.predict_iter([(img, [])] * 3))
    assert [len(r) for r in only_empty] == [0, 0, 0]


@pytest.mark.parametrize("chunk", [None, 1, 3, 16])
def test_failures_deliver_everything_before_them(xs_engine, chunk):
    """Whatever the runs of items the prep threads take (prep_chunk), a failing source or item
    ends the stream after every result before it (a run is cut at its failing item)."""
    estimator = PoseEstimator(xs_engine, prep_threads=2, prefetch=2, prep_chunk=chunk)
    items = list(_scenes(7, seed=6))

    def source(k):
        yield from items[:k]
        raise OSError("camera unplugged")

    got = []
    with pytest.raises(OSError, match="camera unplugged"):
        for res in estimator.predict_iter(source(5)):
            got.append(res)
    assert len(got) == 5
    for (img, boxes, root, k), res in zip(items, got, strict=False):
        np.testing.assert_allclose(res.image, estimator.predict(img, boxes, root_depth=root, intrinsics=k).image,
                                   rtol=1e-6)
    bad = items[:4] + [(items[4][0], [[10, 10, -5, 20]])] + items[5:]
    got = []
    with pytest.raises(ValueError, match="boxes\\[0\\] is empty"):
        for res in estimator.predict_iter(bad):
            got.append(res)
    assert len(got) == 4


def test_prep_chunk_and_staging_bytes_are_checked(xs_engine):
    """Checked on any engine, before anything is built (as crop_method and staging are)."""
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="prep_chunk must be a positive integer or None"):
            PoseEstimator(xs_engine, prep_chunk=bad)
    for bad in (0, 255, -1, 1e9, True, "1G"):
        with pytest.raises(ValueError, match="staging_bytes must be an integer >= 256"):
            PoseEstimator(xs_engine, staging_bytes=bad)


def test_one_value_for_all_images(estimator):
    """One K (4,) and one root depth for a list of images; per-image lists still work; 4 images with a
    4-number K is one K for all (a K is never one number per image)."""
    items = list(_scenes(4, seed=7))
    images, boxes = [i[0] for i in items], [i[1] for i in items]
    k = [900.0, 900.0, 200.0, 150.0]
    for intr in (k, tuple(k), np.asarray(k)):
        res = estimator.predict(images, boxes, root_depth=5000.0, intrinsics=intr)
        for img, b, r in zip(images, boxes, res, strict=True):
            np.testing.assert_allclose(r.camera, estimator.predict(img, b, root_depth=5000.0, intrinsics=k).camera,
                                       rtol=1e-6)
    per = estimator.predict(images, boxes, root_depth=[i[2] for i in items], intrinsics=[k] * 4)
    assert all(r.camera is not None for r in per)
    with pytest.raises(ValueError, match="intrinsics must be one value"):
        estimator.predict(images, boxes, root_depth=5000.0, intrinsics=[k] * 3)
    with pytest.raises(ValueError, match="root_depth must be > 0"):
        estimator.predict(images[0], boxes[0], root_depth=0.0)
    with pytest.raises(ValueError, match="root_depth must be > 0"):
        estimator.predict(images, boxes, root_depth=[-1.0, 2.0, 3.0, 4.0])


def test_crop_boxes_are_used_as_they_are(estimator):
    img, boxes, root, k = next(_scenes(1, seed=8))
    ref = estimator.predict(img, boxes, root_depth=root, intrinsics=k, flip=True)
    again = estimator.predict(img, crop_boxes=ref.crop_boxes, root_depth=root, intrinsics=k, flip=True)
    np.testing.assert_allclose(again.image, ref.image, rtol=1e-6)
    np.testing.assert_array_equal(again.crop_boxes, ref.crop_boxes)
    twice = estimator.predict(img, ref.crop_boxes)  # passed as person boxes, they would be enlarged again
    assert (twice.crop_boxes[:, 2] > ref.crop_boxes[:, 2]).any()
    with pytest.raises(ValueError, match="exactly one of boxes"):
        estimator.predict(img, boxes, crop_boxes=boxes)
    with pytest.raises(ValueError, match="exactly one of boxes"):
        estimator.predict(img)
    with pytest.raises(ValueError, match="crop_boxes\\[0\\] .* is empty"):
        estimator.predict(img, crop_boxes=[[0, 0, 0, 10]])


def test_crop_methods(xs_engine):
    img, boxes, root, k = next(_scenes(1, seed=9))
    with pytest.raises(ValueError, match="crop_method must be one of auto, opencv, fused"):
        PoseEstimator(xs_engine, crop_method="pillow")
    ref = PoseEstimator(xs_engine, crop_method="opencv").predict(img, boxes, flip=True)
    auto = PoseEstimator(xs_engine).predict(img, boxes, flip=True)
    # the fused kernel equals OpenCV's crops but for rare one-grey-level ties (tests/test_golden.py)
    np.testing.assert_allclose(auto.image[..., :2], ref.image[..., :2], atol=0.5)


def test_mixed_batches_keep_each_images_frame(estimator):
    """Images with and without root depth / intrinsics in one engine batch: each result is in its own
    frame (root-relative depth where no root was given, no camera without intrinsics)."""
    items = list(_scenes(4, seed=10))
    stream = [items[0], (items[1][0], items[1][1]), (items[2][0], items[2][1], items[2][2]), items[3]]
    got = list(estimator.predict_iter(stream))
    for item, res in zip(stream, got, strict=True):
        alone = estimator.predict(*item[:2], root_depth=item[2] if len(item) > 2 else None,
                                  intrinsics=item[3] if len(item) > 3 else None)
        np.testing.assert_allclose(res.image, alone.image, rtol=1e-6, atol=1e-3)
        assert res.root_relative == (len(item) < 3) and (res.camera is None) == (len(item) < 4)
    assert np.abs(got[1].image[..., 2]).max() < 1000  # root-relative: within the 2 m box around the root


class _Counting:
    """Wraps an engine: records the batch size of every call the estimator makes. With fake=True
    the network is skipped (flat heatmaps), so hundreds of people cost only their crops."""

    def __init__(self, engine, fake=False):
        self.engine, self.fake, self.calls = engine, fake, []
        self.spec = engine.spec

    def infer(self, images):
        self.calls.append(len(images))
        if self.fake:
            return np.zeros((len(images), *self.engine.spec.heatmap_shape), np.float32)
        return self.engine.infer(images)


@pytest.mark.parametrize("flip", [False, True])
def test_many_people_in_one_image_are_cut_into_engine_calls(xs_engine, monkeypatch, flip):
    """600 people in one image: engine calls of at most max_batch crops, and crops made at most
    one call's people at a time (memory bounded by max_batch, not by the image's people)."""
    import cnpose_trt.pipeline.host as pipeline

    img, box = demo_image()
    rng = np.random.default_rng(3)
    boxes = np.column_stack([rng.uniform(0, 500, 600), rng.uniform(0, 380, 600), rng.uniform(20, 140, 600),
                             rng.uniform(20, 100, 600)])
    est = PoseEstimator(xs_engine, prep_threads=2, prefetch=2)
    counting = _Counting(xs_engine, fake=True)
    monkeypatch.setattr(est, "engine", counting)
    cropped = []
    crop_people = getattr(pipeline, "crop_people", None)

    def counted(image, crop_boxes, *args, **kwargs):
        cropped.append(len(crop_boxes))
        return crop_people(image, crop_boxes, *args, **kwargs)

    monkeypatch.setattr(pipeline, "crop_people", counted, raising=False)
    got = est.predict([img, img], [boxes, [box]], root_depth=4000.0, intrinsics=[1000, 1000, 320, 240], flip=flip)
    per_call = xs_engine.max_batch // 2 if flip else xs_engine.max_batch
    assert counting.calls and max(counting.calls) <= xs_engine.max_batch, counting.calls
    assert sum(counting.calls) == 601 * (2 if flip else 1)
    assert cropped and max(cropped) <= per_call and sum(cropped) == 601, cropped
    assert [len(r) for r in got] == [600, 1]
    np.testing.assert_array_equal(got[0].boxes, boxes)
    assert got[0].camera.shape == (600, 18, 3) and got[0].image.shape == (600, 18, 3)


@pytest.mark.parametrize("flip", [False, True])
def test_an_image_cut_into_parts_gives_the_poses_of_small_groups(xs_engine, flip):
    """The parts of an image with many people, joined, equal the poses of its people estimated
    three at a time, on the host path and on an on-device engine's (infer_decode) path."""
    from cnpose_trt.runtime.engine import Engine

    class OnDevice(Engine):  # the device path (infer_decode on the engine's device), computed on the CPU
        device = "cuda:0"

        def __init__(self, real):
            super().__init__(real.path, real.meta)
            self.real, self.calls = real, []

        def infer_decode(self, images, **kwargs):
            self.calls.append(len(images))
            return self.real.infer_decode(images, **kwargs)

    img, box = demo_image()
    rng = np.random.default_rng(4)
    n = 3 * xs_engine.max_batch + 1
    boxes = np.column_stack([rng.uniform(0, 400, n), rng.uniform(0, 300, n), rng.uniform(40, 200, n),
                             rng.uniform(40, 200, n)])
    roots = rng.uniform(3000, 6000, n)
    k = [1000.0, 1000.0, 320.0, 240.0]
    host = _Counting(xs_engine)
    est = PoseEstimator(xs_engine)
    est.engine = host
    device = OnDevice(xs_engine)
    ref = PoseEstimator(xs_engine)
    small = [ref.predict(img, boxes[i:i + 3], root_depth=roots[i:i + 3], intrinsics=k, flip=flip)
             for i in range(0, n, 3)]
    for engine, calls in ((est, host.calls), (PoseEstimator(device), device.calls)):
        got = engine.predict([img, img], [boxes, [box]], root_depth=[roots, 4500.0], intrinsics=k, flip=flip)
        assert calls and max(calls) <= xs_engine.max_batch, calls
        for name in ("boxes", "crop_boxes", "image", "camera", "confidence", "cells"):
            np.testing.assert_allclose(getattr(got[0], name), np.concatenate([getattr(r, name) for r in small]),
                                       rtol=1e-6, atol=1e-4, err_msg=name)
        assert len(got[1]) == 1 and not got[0].root_relative


def test_timings_read_as_text():
    """Issue 21 item 6: est.timings printed `<Timings object at 0x...>`."""
    from cnpose_trt.pipeline.estimator import Timings

    t = Timings()
    assert repr(t) == "Timings(0 images, 0 people: prepare 0.000 s (0%), infer 0.000 s (0%), decode 0.000 s (0%))"
    t.add("prepare", 0.5, images=2, people=4)
    t.add("infer", 1.0)
    t.add("decode", 0.5)
    assert repr(t) == ("Timings(2 images, 4 people: prepare 0.500 s (25%), infer 1.000 s (50%), decode 0.500 s "
                       "(25%), 250.00 ms infer per person)")


@pytest.mark.parametrize("people, bound", [(12, "window"), (1, "reads ahead")])
def test_crops_read_ahead_stay_about_one_window(xs_engine, monkeypatch, people, bound):
    """Images read ahead are capped by the people seen per image: with 12 people per image the crops made
    but not yet sent to the engine stay near one window (max_batch x prefetch), not window x max_batch
    (a review measured +1.1 GB for 40 images of 600 people); with one person per image the whole window
    is still read ahead."""
    import threading

    import cnpose_trt.pipeline.host as pipeline

    img, box = demo_image()
    rng = np.random.default_rng(5)
    est = PoseEstimator(xs_engine, prep_threads=2, prefetch=2)
    counting = _Counting(xs_engine, fake=True)
    monkeypatch.setattr(est, "engine", counting)
    lock, made, ahead = threading.Lock(), [0], []
    crop_people = pipeline.crop_people

    def counted(image, crop_boxes, *args, **kwargs):
        out = crop_people(image, crop_boxes, *args, **kwargs)
        with lock:
            made[0] += len(crop_boxes)
            ahead.append(made[0] - sum(counting.calls))
        return out

    monkeypatch.setattr(pipeline, "crop_people", counted)
    items = [(img, np.column_stack([rng.uniform(0, 400, people), rng.uniform(0, 300, people),
                                    np.full(people, 80.0), np.full(people, 120.0)])) for _ in range(30)]
    got = list(est.predict_iter(items))
    assert [len(r) for r in got] == [people] * 30
    window = xs_engine.max_batch * est.prefetch
    if bound == "window":
        assert max(ahead) <= window + xs_engine.max_batch, ahead  # was up to window x max_batch
    else:
        assert max(ahead) >= window - xs_engine.max_batch, ahead  # one-person images: the full window


def test_predict_takes_any_iterable_of_images(xs_engine):
    """A generator of images worked before issue 20's stricter checks and must keep working (review)."""
    img, box = demo_image()
    got = PoseEstimator(xs_engine).predict((im for im in [img, img]), [[box], [box]])
    assert [len(r) for r in got] == [1, 1]
    with pytest.raises(TypeError, match="images must be one"):
        PoseEstimator(xs_engine).predict({"image": img}, [[box]])

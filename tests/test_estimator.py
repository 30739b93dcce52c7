import threading

import numpy as np
import pytest

from cnpose_trt import estimate
from cnpose_trt.draw import demo_image
from cnpose_trt.pipeline import PoseEstimator


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
    with pytest.raises(ValueError, match="needs 'image' and 'boxes'"):
        list(estimator.predict_iter([{"image": img}]))
    with pytest.raises(ValueError, match="intrinsics need root_depth"):
        list(estimator.predict_iter([{"image": img, "boxes": boxes, "intrinsics": [1, 1, 0, 0]}]))
    with pytest.raises(ValueError, match="prep_threads and prefetch"):
        PoseEstimator(estimator.engine, prep_threads=0)


def test_from_variant_and_path(tmp_path, xs_engine_path):
    est = PoseEstimator("XS", engine_dir=tmp_path, max_batch=2, backend="onnxruntime")
    assert est.max_batch == 2 and est.spec.name == "XS"
    assert PoseEstimator(xs_engine_path).engine.path == xs_engine_path

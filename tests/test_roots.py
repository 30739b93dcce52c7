"""Root depths without hand-given ones (issue 24): estimate_roots, PoseEstimator(rootnet=...), the prior.

References: upstream RootNet's own output on its golden image (tests/data/rootnet_golden), RootNet's
formulas written out here in float64, and PoseEstimator's own results with the same depths given by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from cnpose_trt import PoseEstimator, estimate_roots  # noqa: E402
from cnpose_trt.errors import EngineError  # noqa: E402
from cnpose_trt.ops.rootnet import roots_to_camera  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_rootnet_golden import DEPTH_RTOL, F32_PX_TOL, GOLDEN  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN / "rootnet_golden.npz"))


def _independent_k(process_bbox: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """upstream: k = sqrt(bbox_real_x * bbox_real_y * fx * fy / area), bbox_real 2000 mm, area of the processed box."""
    return np.array([np.sqrt(2000.0 * 2000.0 * cam[0] * cam[1] / (w * h)) for _, _, w, h in process_bbox])


def test_estimate_roots_is_upstream_rootnet(golden, rootnet_engine, rootnet_engine_path):
    """The whole path (box rule, crop, normalisation, engine, k, image mapping) on upstream's golden image and
    boxes: upstream's float64 roots to float32 rounding. By Engine and by engine file alike."""
    for engine in (rootnet_engine, rootnet_engine_path):
        roots = estimate_roots(engine, golden["image_rgb"], golden["boxes"], intrinsics=golden["intrinsics"],
                               crop_method="opencv")
        assert roots.shape == (5, 3)
        np.testing.assert_allclose(roots[:, :2], golden["root_img_f64"][:, :2], rtol=0, atol=F32_PX_TOL)
        np.testing.assert_allclose(roots[:, 2], golden["root_img_f64"][:, 2], rtol=DEPTH_RTOL, atol=0)
    camera = roots_to_camera(roots, golden["intrinsics"])
    np.testing.assert_allclose(camera[:, 2], golden["root_cam"][:, 2], rtol=DEPTH_RTOL, atol=0)


def test_estimate_roots_crop_boxes_and_scaling(golden, rootnet_engine):
    """Upstream's processed boxes given as crop_boxes give the same roots; depth scales with sqrt(fx * fy)
    and the principal point does not enter (rootnet.md, k value)."""
    cam = golden["intrinsics"]
    base = estimate_roots(rootnet_engine, golden["image_rgb"], crop_boxes=golden["process_bbox"], intrinsics=cam,
                          crop_method="opencv")
    np.testing.assert_allclose(base[:, 2], golden["root_img_f64"][:, 2], rtol=DEPTH_RTOL, atol=0)
    other = estimate_roots(rootnet_engine, golden["image_rgb"], crop_boxes=golden["process_bbox"],
                           intrinsics=[cam[0] * 4, cam[1], 17.0, 900.0], crop_method="opencv")
    np.testing.assert_allclose(other[:, :2], base[:, :2], rtol=0, atol=1e-9)
    np.testing.assert_allclose(other[:, 2], base[:, 2] * 2, rtol=1e-12, atol=0)


def test_prior_is_gamma_one(golden):
    """The prior: depth = k (gamma = 1), root at the processed box's centre; no network."""
    roots = estimate_roots("prior", golden["image_rgb"], golden["boxes"], intrinsics=golden["intrinsics"])
    box = golden["process_bbox"]
    np.testing.assert_allclose(roots[:, 2], _independent_k(box, golden["intrinsics"]), rtol=1e-12, atol=0)
    np.testing.assert_allclose(roots[:, 2].astype(np.float32), golden["k_value"], rtol=1.2e-7, atol=0)
    np.testing.assert_allclose(roots[:, 0], box[:, 0] + box[:, 2] / 2, rtol=0, atol=1e-9)
    np.testing.assert_allclose(roots[:, 1], box[:, 1] + box[:, 3] / 2, rtol=0, atol=1e-9)


@pytest.mark.parametrize("flip", [False, True])
def test_estimator_with_rootnet_equals_given_depths(golden, xs_engine, rootnet_engine, flip):
    """PoseEstimator(rootnet=) gives exactly the poses of the same estimator given RootNet's depths by hand
    (the same crops feed both engines), with its roots and root_source; 5 people through max_batch 4 with
    the flip test cut the image into parts."""
    image, boxes, cam = golden["image_rgb"], golden["boxes"], golden["intrinsics"]
    est = PoseEstimator(xs_engine, rootnet=rootnet_engine, crop_method="opencv")
    got = est.predict(image, boxes, intrinsics=cam, flip=flip)
    roots = estimate_roots(rootnet_engine, image, boxes, intrinsics=cam, crop_method="opencv")
    assert got.root_source == "rootnet" and not got.root_relative and got.camera is not None
    np.testing.assert_allclose(got.roots, roots, rtol=1e-6, atol=1e-4)
    plain = PoseEstimator(xs_engine, crop_method="opencv")
    want = plain.predict(image, boxes, root_depth=got.roots[:, 2], intrinsics=cam, flip=flip)
    assert want.root_source == "given"
    np.testing.assert_array_equal(got.image, want.image)
    np.testing.assert_array_equal(got.camera, want.camera)
    people = got.to_dict()
    assert people[0]["root_source"] == "rootnet" and people[0]["depth"] == "absolute"
    assert people[0]["root"]["depth_mm"] == pytest.approx(roots[0, 2], rel=1e-6)
    assert est.timings.seconds["roots"] > 0


def test_one_rootnet_call_per_pose_call(golden, xs_engine, rootnet_engine):
    """Both networks' engine calls batched together: one RootNet call per pose engine call, on that call's
    people (un-mirrored crops only); a hand-given depth is kept, not estimated."""
    calls = {"pose": [], "root": []}

    class Counting:
        def __init__(self, engine, log):
            self._engine, self._log = engine, log

        def __getattr__(self, name):
            return getattr(self._engine, name)

        def infer(self, images):
            self._log.append(len(images))
            return self._engine.infer(images)

    est = PoseEstimator(xs_engine, rootnet=rootnet_engine, crop_method="opencv")
    est.engine = Counting(xs_engine, calls["pose"])
    est.rootnet.engine = Counting(rootnet_engine, calls["root"])
    image, boxes, cam = golden["image_rgb"], golden["boxes"], golden["intrinsics"]
    items = [{"image": image, "boxes": boxes[:2], "intrinsics": cam},
             {"image": image, "boxes": boxes[2:3], "intrinsics": cam, "root_depth": 4321.0},
             {"image": image, "boxes": boxes[3:], "intrinsics": cam}]
    results = list(est.predict_iter(items, flip=True))
    assert [r.root_source for r in results] == ["rootnet", "given", "rootnet"]
    given = PoseEstimator(xs_engine, crop_method="opencv").predict(image, boxes[2:3], root_depth=4321.0,
                                                                   intrinsics=cam, flip=True)
    assert results[1].roots is None
    np.testing.assert_array_equal(results[1].camera, given.camera)
    # max_batch 4 with the flip test: 2 people (4 crops) per pose call; RootNet takes the un-mirrored 2 or fewer
    assert calls["pose"] == [4, 2, 4] and calls["root"] == [2, 2]


def test_prior_in_the_estimator(golden, xs_engine):
    est = PoseEstimator(xs_engine, rootnet="prior")
    got = est.predict(golden["image_rgb"], golden["boxes"], intrinsics=golden["intrinsics"])
    assert got.root_source == "prior" and got.to_dict()[0]["root_source"] == "prior"
    np.testing.assert_allclose(got.roots[:, 2], _independent_k(golden["process_bbox"], golden["intrinsics"]),
                               rtol=1e-12)
    want = PoseEstimator(xs_engine).predict(golden["image_rgb"], golden["boxes"], root_depth=got.roots[:, 2],
                                            intrinsics=golden["intrinsics"])
    np.testing.assert_array_equal(got.camera, want.camera)


def test_rootnet_checkpoint_is_built_or_reused(rootnet_snapshot, rootnet_engine_path, engine_dir, xs_engine):
    est = PoseEstimator(xs_engine, rootnet=rootnet_snapshot, backend="onnxruntime", engine_dir=engine_dir)
    assert Path(est.rootnet.engine.path) == Path(rootnet_engine_path)


def test_refusals(golden, xs_engine, xs_engine_path, rootnet_engine, tmp_path):
    image, boxes = golden["image_rgb"], golden["boxes"]
    est = PoseEstimator(xs_engine, rootnet=rootnet_engine)
    with pytest.raises(ValueError, match="intrinsics are needed"):
        est.predict(image, boxes)
    assert len(est.predict(image, np.zeros((0, 4)))) == 0  # nobody: no camera needed
    with pytest.raises(EngineError, match="root depths needs a RootNet engine"):
        PoseEstimator(xs_engine, rootnet=xs_engine)
    with pytest.raises(EngineError, match="root depths needs a RootNet engine"):
        estimate_roots(xs_engine_path, image, boxes, intrinsics=golden["intrinsics"])
    with pytest.raises(ValueError, match="rootnet: .* is neither an engine"):
        PoseEstimator(xs_engine, rootnet=tmp_path / "missing.pth.tar")
    with pytest.raises(ValueError, match="rootnet must be"):
        PoseEstimator(xs_engine, rootnet=3)
    with pytest.raises(ValueError, match="engine must be"):
        estimate_roots(None, image, boxes, intrinsics=golden["intrinsics"])
    with pytest.raises(ValueError, match="intrinsics"):
        estimate_roots("prior", image, boxes, intrinsics=[1500, -1, 320, 240])
    assert est.device_crops is False and "rootnet" in est.device_crops_unavailable


def test_rootnet_checkpoint_beside_a_torch_engine(rootnet_snapshot, rootnet_engine_path, engine_dir, tmp_path):
    """The torch backend builds no RootNet: a snapshot beside a torch pose engine is built on the default
    backend (ONNX Runtime here: the session's cached engine), not refused."""
    pytest.importorskip("torch")
    from cnpose_trt.build.builder import build_engine

    pose = build_engine("XS", backend="torch", out_dir=tmp_path, max_batch=2)
    est = PoseEstimator(pose.path, rootnet=rootnet_snapshot, engine_dir=engine_dir)
    assert est.engine.meta["backend"] != est.rootnet.engine.meta["backend"]
    assert Path(est.rootnet.engine.path) == Path(rootnet_engine_path)


def test_mixed_batch_estimates_only_those_without_depths(golden, xs_engine, rootnet_engine):
    """One pose call of 3 people whose middle one has a depth by hand: one RootNet call on the other two crops."""
    calls: list[int] = []
    est = PoseEstimator(xs_engine, rootnet=rootnet_engine, crop_method="opencv")
    infer = rootnet_engine.infer
    est.rootnet.engine = type("Spy", (), {"infer": lambda self, x: calls.append(len(x)) or infer(x),
                                          "input_dtype": rootnet_engine.input_dtype})()
    image, boxes, cam = golden["image_rgb"], golden["boxes"], golden["intrinsics"]
    items = [{"image": image, "boxes": boxes[0:1], "intrinsics": cam},
             {"image": image, "boxes": boxes[1:2], "intrinsics": cam, "root_depth": 3210.0},
             {"image": image, "boxes": boxes[2:3], "intrinsics": cam}]
    got = list(est.predict_iter(items))
    assert calls == [2]
    roots = estimate_roots(rootnet_engine, image, boxes[[0, 2]], intrinsics=cam, crop_method="opencv")
    np.testing.assert_allclose(np.concatenate([got[0].roots, got[2].roots]), roots, rtol=1e-6, atol=1e-4)
    assert [r.root_source for r in got] == ["rootnet", "given", "rootnet"]


def test_no_people_no_crops(golden, rootnet_engine):
    for engine in (rootnet_engine, "prior"):
        assert estimate_roots(engine, golden["image_rgb"], np.zeros((0, 4)), intrinsics=golden["intrinsics"]).shape \
            == (0, 3)


def test_a_depth_that_is_none_is_refused_in_order(golden, xs_engine, rootnet_engine):
    """RootNet's gamma <= 0 (weights that are not trained ones) is no depth: a clear error, after the results
    of the batches before it, never a pose placed at a negative depth."""
    class NegativeAfterFirst:
        input_dtype = rootnet_engine.input_dtype
        calls = 0

        def infer(self, x):
            raw = rootnet_engine.infer(x).copy()
            self.calls += 1
            if self.calls > 1:
                raw[:, 2] = -raw[:, 2]
            return raw

    est = PoseEstimator(xs_engine, rootnet=rootnet_engine)
    est.rootnet.engine = NegativeAfterFirst()
    image, boxes, cam = golden["image_rgb"], golden["boxes"], golden["intrinsics"]
    items = [{"image": image, "boxes": boxes[:4], "intrinsics": cam},  # 4 people: one engine call
             {"image": image, "boxes": boxes[4:], "intrinsics": cam}]
    results = est.predict_iter(items)
    first = next(results)
    assert first.root_source == "rootnet" and len(first) == 4 and (first.roots[:, 2] > 0).all()
    with pytest.raises(ValueError, match=r"RootNet gave person 0 a root depth of -\d.* mm .*trained ones"):
        next(results)


def test_rootnet_takes_only_its_backends_load_options(rootnet_engine_path):
    from cnpose_trt.pipeline.roots import load_rootnet

    engine = load_rootnet(rootnet_engine_path, {"device": "cuda", "threads": 1, "cuda_graphs": True})
    assert engine.network == "rootnet"

"""MPJPE / PA-MPJPE against independent float64 references; Human3.6M layout with hand-computed numbers."""

from __future__ import annotations

import argparse
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cnpose_trt.cli import eval as cli_eval
from cnpose_trt.eval import evaluate as ev
from cnpose_trt.spec import JOINT_NAMES, NUM_JOINTS

J = {name: i for i, name in enumerate(JOINT_NAMES)}
THORAX = J["Thorax"]
SCORED = [j for j in range(NUM_JOINTS) if j != THORAX]  # upstream's eval_joint, written out here


# ---------------------------------------------------------------- independent references (float64)

def horn_align(a, b, scale=False):
    """Best proper rotation (+ scale) + translation of a onto b by Horn's unit-quaternion method.

    Written independently of the SVD route: the optimal rotation is the quaternion of the largest
    eigenvalue of Horn's symmetric 4x4 matrix, which is always a proper rotation.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca, cb = a.mean(axis=0), b.mean(axis=0)
    a0, b0 = a - ca, b - cb
    s = np.zeros((3, 3))
    for p, q in zip(a0, b0, strict=True):
        s += np.outer(p, q)  # s[i, k] = sum a_i b_k
    (sxx, sxy, sxz), (syx, syy, syz), (szx, szy, szz) = s
    n = np.array([[sxx + syy + szz, syz - szy, szx - sxz, sxy - syx],
                  [syz - szy, sxx - syy - szz, sxy + syx, szx + sxz],
                  [szx - sxz, sxy + syx, -sxx + syy - szz, syz + szy],
                  [sxy - syx, szx + sxz, syz + szy, -sxx - syy + szz]])
    w, v = np.linalg.eigh(n)
    q0, qx, qy, qz = v[:, np.argmax(w)]
    r = np.array([[q0 * q0 + qx * qx - qy * qy - qz * qz, 2 * (qx * qy - q0 * qz), 2 * (qx * qz + q0 * qy)],
                  [2 * (qx * qy + q0 * qz), q0 * q0 - qx * qx + qy * qy - qz * qz, 2 * (qy * qz - q0 * qx)],
                  [2 * (qx * qz - q0 * qy), 2 * (qy * qz + q0 * qx), q0 * q0 - qx * qx - qy * qy + qz * qz]])
    rotated = np.array([r @ p for p in a0])
    k = 1.0
    if scale:
        den = float((a0 ** 2).sum())
        k = float(sum(np.dot(q, p) for p, q in zip(rotated, b0, strict=True))) / den if den > 0 else 0.0
    return k * rotated + cb


def loop_errors(pred, gt, align=None):
    """Per-person list of per-joint errors, by plain loops: root-align, optionally Horn-align, drop Thorax."""
    out = []
    for p, g in zip(np.asarray(pred, np.float64), np.asarray(gt, np.float64), strict=True):
        p = p - p[0]
        g = g - g[0]
        if align is not None:
            p = horn_align(p, g, scale=align == "similarity")
        out.append([math.dist(p[j], g[j]) for j in SCORED])
    return np.array(out)


def random_rotation(rng):
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def random_poses(rng, n):
    """Plausible-scale poses: skeletons from the synthetic sampler, placed ~5 m in front of a camera."""
    from cnpose_trt.io.synthetic import sample_pose

    return np.stack([sample_pose(rng).joints @ random_rotation(rng).T + [0, 0, 5000] for _ in range(n)])


# ---------------------------------------------------------------- metrics

def test_mpjpe_and_pa_mpjpe_equal_the_independent_reference_on_random_poses(rng):
    gt = random_poses(rng, 40)
    # Predictions: rotated, shifted, scaled and noisy versions of the truth, plus unrelated poses.
    pred = np.empty_like(gt)
    for i in range(len(gt)):
        r = random_rotation(rng) if i % 2 else np.eye(3)
        pred[i] = (gt[i] - gt[i, 0]) @ r.T * rng.uniform(0.7, 1.3) + rng.normal(0, 300, 3) \
            + rng.normal(0, rng.uniform(1, 80), gt[i].shape)
    pred[-5:] = random_poses(rng, 5)
    ref_root, ref_rigid, ref_sim = loop_errors(pred, gt), loop_errors(pred, gt, "rigid"), loop_errors(pred, gt, "similarity")
    np.testing.assert_allclose(ev.joint_errors(pred, gt), ref_root, rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(ev.joint_errors(pred, gt, align="rigid"), ref_rigid, rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(ev.joint_errors(pred, gt, align="similarity"), ref_sim, rtol=1e-9, atol=1e-7)
    assert math.isclose(ev.mpjpe(pred, gt), ref_root.mean(), rel_tol=1e-12)
    assert math.isclose(ev.pa_mpjpe(pred, gt), ref_rigid.mean(), rel_tol=1e-10)
    assert math.isclose(ev.pa_mpjpe(pred, gt, scale=True), ref_sim.mean(), rel_tol=1e-10)
    assert ev.pa_mpjpe(pred, gt, scale=True) <= ev.pa_mpjpe(pred, gt) <= ev.mpjpe(pred, gt) + 1e-9


def test_an_exact_rigid_or_similarity_copy_scores_zero(rng):
    gt = random_poses(rng, 6)
    r = random_rotation(rng)
    rigid = gt @ r.T + [100.0, -50.0, 300.0]
    assert ev.pa_mpjpe(rigid, gt) < 1e-9 and ev.pa_mpjpe(rigid, gt, scale=True) < 1e-9
    assert ev.mpjpe(rigid, gt) > 10  # root alignment alone does not undo a rotation
    scaled = gt * 1.3
    assert ev.pa_mpjpe(scaled, gt, scale=True) < 1e-9
    assert ev.pa_mpjpe(scaled, gt) > 1  # upstream's protocol 1 does not fit scale


def test_thorax_is_not_scored_and_the_root_is():
    rng = np.random.default_rng(1)
    gt = random_poses(rng, 1)
    pred = gt.copy()
    pred[0, THORAX] += [500.0, 0, 0]
    assert ev.mpjpe(pred, gt) == 0.0
    pred = gt.copy()
    pred[0, J["R_Ankle"]] += [3.0, 4.0, 0.0]
    assert math.isclose(ev.mpjpe(pred, gt), 5.0 / 17, rel_tol=1e-12)
    errs = ev.joint_errors(pred, gt)
    assert errs.shape == (1, 17) and math.isclose(errs[0, SCORED.index(J["R_Ankle"])], 5.0, rel_tol=1e-12)
    pred = gt.copy()
    pred[0, 0] += [0, 0, 17.0]  # a root error moves every other joint after root alignment
    assert math.isclose(ev.mpjpe(pred, gt), 16 * 17.0 / 17, rel_tol=1e-12)


def test_the_reflection_case_gives_a_rotation_not_a_mirror():
    rng = np.random.default_rng(5)
    for _ in range(20):
        gt = random_poses(rng, 1)[0]
        mirrored = gt * [-1.0, 1.0, 1.0] + rng.normal(0, 2, gt.shape)  # the best orthogonal fit is a reflection
        aligned = ev.rigid_align(mirrored, gt)[0]
        np.testing.assert_allclose(aligned, horn_align(mirrored, gt), atol=1e-6)
        # Congruent to the prediction with the same handedness (signed volumes keep their sign).
        d_in = np.linalg.norm(mirrored[:, None] - mirrored[None], axis=-1)
        d_out = np.linalg.norm(aligned[:, None] - aligned[None], axis=-1)
        np.testing.assert_allclose(d_out, d_in, atol=1e-6)
        for a, b, c, d in ((0, 3, 10, 13), (1, 6, 9, 16)):
            vol_in = np.linalg.det(np.stack([mirrored[b] - mirrored[a], mirrored[c] - mirrored[a], mirrored[d] - mirrored[a]]))
            vol_out = np.linalg.det(np.stack([aligned[b] - aligned[a], aligned[c] - aligned[a], aligned[d] - aligned[a]]))
            assert np.sign(vol_in) == np.sign(vol_out)
        # A mirror would fit almost exactly; a rotation cannot.
        assert np.linalg.norm(aligned - gt, axis=1).mean() > 5
        # With scale too.
        np.testing.assert_allclose(ev.rigid_align(mirrored, gt, scale=True)[0], horn_align(mirrored, gt, True),
                                   atol=1e-6)


def test_the_alignment_is_optimal_against_perturbed_rotations():
    rng = np.random.default_rng(9)
    gt = random_poses(rng, 1)[0]
    pred = gt @ random_rotation(rng).T + rng.normal(0, 40, gt.shape)
    aligned = ev.rigid_align(pred, gt)[0]
    best = ((aligned - gt) ** 2).sum()
    centre = aligned.mean(axis=0)
    for _ in range(200):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = rng.uniform(-0.05, 0.05)
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        r = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k
        moved = (aligned - centre) @ r.T + centre + rng.normal(0, 1, 3)
        assert ((moved - gt) ** 2).sum() >= best - 1e-6


def test_degenerate_poses():
    rng = np.random.default_rng(2)
    gt = random_poses(rng, 1)[0]
    point = np.full((NUM_JOINTS, 3), 7.0)  # every joint at one point: maps to gt's centroid
    for scale in (False, True):
        np.testing.assert_allclose(ev.rigid_align(point, gt, scale=scale)[0], np.broadcast_to(gt.mean(0), gt.shape),
                                   atol=1e-9)
    line = np.outer(np.linspace(-500, 500, NUM_JOINTS), [0.3, 0.9, 0.1])  # collinear: rotation about it is free
    for scale in (False, True):
        np.testing.assert_allclose(ev.rigid_align(line, gt, scale=scale)[0], horn_align(line, gt, scale), atol=1e-6)
    flat = gt.copy()
    flat[:, 2] = 0.0  # planar, mirrored in its plane: the reflection fix must not change the fit
    flat[:, 0] *= -1
    for scale in (False, True):
        np.testing.assert_allclose(ev.rigid_align(flat, gt, scale=scale)[0], horn_align(flat, gt, scale), atol=1e-6)
    # Identical pred and gt: zero everywhere, also through the summary.
    assert ev.pa_mpjpe(gt, gt) < 1e-9 and ev.mpjpe(gt, gt) == 0.0


def test_nonfinite_predictions_are_counted_and_left_out():
    rng = np.random.default_rng(4)
    gt = random_poses(rng, 5)
    pred = gt + rng.normal(0, 10, gt.shape)
    pred[2, 5, 1] = np.nan
    pred[4, 0, 0] = np.inf
    aligned = ev.rigid_align(pred, gt)
    assert np.isnan(aligned[2]).all() and np.isnan(aligned[4]).all()
    np.testing.assert_allclose(aligned[[0, 1, 3]], ev.rigid_align(pred[[0, 1, 3]], gt[[0, 1, 3]]), atol=1e-9)
    s = ev.summarize(pred, gt, gt, gt)
    assert s["people"] == 5 and s["nonfinite"] == 2
    assert math.isclose(s["mpjpe"], loop_errors(pred[[0, 1, 3]], gt[[0, 1, 3]]).mean(), rel_tol=1e-10)
    assert math.isclose(s["pa_mpjpe"], loop_errors(pred[[0, 1, 3]], gt[[0, 1, 3]], "rigid").mean(), rel_tol=1e-8)


@pytest.mark.parametrize("call,match", [
    (lambda: ev.mpjpe(np.zeros((2, 18, 3)), np.zeros((3, 18, 3))), "same shape"),
    (lambda: ev.mpjpe(np.zeros((2, 18, 2)), np.zeros((2, 18, 2))), r"\(N, J, 3\)"),
    (lambda: ev.joint_errors(np.zeros((1, 18, 3)), np.zeros((1, 18, 3)), align="affine"), "align"),
    (lambda: ev.joint_errors(np.zeros((1, 18, 3)), np.zeros((1, 18, 3)), eval_joints=[0, 18]), "eval_joints"),
    (lambda: ev.joint_errors(np.zeros((1, 18, 3)), np.zeros((1, 18, 3)), eval_joints=[]), "eval_joints"),
    (lambda: ev.pixel_errors(np.zeros((1, 18, 3)), np.zeros((1, 17, 3))), "pred_img and gt_img"),
])
def test_bad_metric_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_pixel_errors_use_x_and_y_only():
    gt = np.zeros((1, 18, 3))
    pred = gt.copy()
    pred[0, :, 2] = 1000.0  # depth is not a pixel error
    pred[0, J["Head"], :2] = [6.0, 8.0]
    pred[0, THORAX, :2] = [100.0, 0.0]
    e = ev.pixel_errors(pred, gt)
    assert e.shape == (1, 17) and math.isclose(e.sum(), 10.0) and math.isclose(e.mean(), 10 / 17)


# ---------------------------------------------------------------- Human3.6M layout

F1, F2, C1, C2 = 1145.0, 1143.5, 31.25, 23.75
T = (-120.0, 80.0, 5200.0)
# R maps world (x, y, z) to camera (x, -z, y): written out by hand below as cam = (x + tx, -z + ty, y + tz).
R = [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]


def _world_pose(rng):
    """17 Human3.6M joints in world mm (z up), no Thorax."""
    from cnpose_trt.io.synthetic import sample_pose

    j = sample_pose(rng).joints[:17]  # body frame: y up
    return np.stack([j[:, 0], j[:, 2], j[:, 1] + 900.0], axis=1) + rng.normal(0, 30, 3)


def _camera_by_hand(world17):
    thorax = [(a + b) / 2 for a, b in zip(world17[11], world17[14], strict=True)]
    joints = [list(p) for p in world17] + [thorax]
    cam = [[x + T[0], -z + T[1], y + T[2]] for x, y, z in joints]
    img = [[F1 * x / z + C1, F2 * y / z + C2, z] for x, y, z in cam]
    return np.array(cam), np.array(img)


def write_h36m(root: Path, rng) -> dict:
    """Two tested subjects (9, 11): 5 annotations of which 3 are kept (one off the 64-frame grid, one box
    that upstream's box rule rejects); subject 1 has no files at all (it must never be read)."""
    import cv2

    ann_dir, img_dir = root / "annotations", root / "images"
    ann_dir.mkdir(parents=True)
    specs = {  # subject: [(image id, action, subaction, cam, frame, bbox)]
        9: [(10, 2, 1, 1, 0, [8.0, 4.0, 40.0, 38.0]), (11, 2, 1, 1, 1, [8.0, 4.0, 40.0, 38.0]),
            (12, 3, 2, 2, 64, [-5.0, 2.5, 30.0, 44.0]), (13, 3, 2, 2, 128, [10.0, 10.0, 0.0, 20.0])],
        11: [(20, 2, 1, 1, 640, [20.0, 0.0, 50.0, 30.0])],
    }
    truth = {}
    for subject, rows in specs.items():
        images, anns, joints = [], [], {}
        for image_id, action, sub, cam, frame, bbox in rows:
            name = f"s_{subject:02d}_act_{action:02d}_subact_{sub:02d}_ca_{cam:02d}"
            file_name = f"{name}/{name}_{frame + 1:06d}.png"
            (img_dir / name).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(img_dir / file_name), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
            images.append({"id": image_id, "file_name": file_name, "width": 64, "height": 48, "subject": subject,
                           "action_name": "x", "action_idx": action, "subaction_idx": sub, "cam_idx": cam,
                           "frame_idx": frame})
            anns.append({"id": image_id * 10, "image_id": image_id, "bbox": bbox, "keypoints_vis": [True] * 17})
            world = _world_pose(rng)
            joints.setdefault(str(action), {}).setdefault(str(sub), {})[str(frame)] = world.tolist()
            cam_mm, img_px = _camera_by_hand(world)
            truth[image_id] = {"cam": cam_mm, "img": img_px, "bbox": bbox, "file": img_dir / file_name}
        cams = {str(c): {"R": R, "t": list(T), "f": [F1, F2], "c": [C1, C2]} for c in (1, 2)}
        for suffix, doc in (("data", {"images": images, "annotations": anns}), ("camera", cams), ("joint_3d", joints)):
            (ann_dir / f"Human36M_subject{subject}_{suffix}.json").write_text(json.dumps(doc))
    return truth


class FakeResult:
    def __init__(self, camera, image):
        self.camera, self.image = camera, image

    def __len__(self):
        return len(self.camera)


class FakeEstimator:
    """Returns planned predictions in order and records what it was given."""

    def __init__(self, planned):
        self.planned, self.seen = planned, []

    def predict(self, images, boxes=None, *, crop_boxes=None, root_depth=None, intrinsics=None, flip=False):
        raise AssertionError("predict_set streams through predict_iter")

    def predict_iter(self, items, flip=False):
        for item, (cam, img) in zip(items, self.planned, strict=True):
            self.seen.append(item)
            yield FakeResult(cam[None], img[None])


OFFSETS = {  # image id: [(joint, 3D offset mm, 2D offset px)]
    10: [("R_Ankle", (3.0, 4.0, 0.0), (0.0, 0.0)), ("Pelvis", (0.0, 0.0, 0.0), (0.3, 0.4))],
    12: [("Head", (0.0, 0.0, 12.0), (0.0, 0.0))],
    20: [("Thorax", (100.0, 0.0, 0.0), (9.0, 9.0)), ("L_Wrist", (0.0, 8.0, 6.0), (0.0, 2.0))],
}


def planned_predictions(truth, ids):
    out = []
    for i in ids:
        cam, img = truth[i]["cam"].copy(), truth[i]["img"].copy()
        cam += [200.0, -100.0, 50.0]  # a global shift: root alignment removes it
        for joint, d3, d2 in OFFSETS[i]:
            cam[J[joint]] += d3
            img[J[joint], :2] += d2
        out.append((cam, img))
    return out


@pytest.fixture
def h36m(tmp_path):
    rng = np.random.default_rng(36)
    root = tmp_path / "Human36M"
    return root, write_h36m(root, rng)


def test_h36m_set_follows_upstreams_selection_and_geometry(h36m):
    root, truth = h36m
    s = ev.h36m_set(root)
    assert [im.key for im in s.images] == ["10", "12", "20"]  # frame 1 off-grid, image 13's box rejected
    assert s.info["skipped_boxes"] == 1 and s.people == 3
    for im in s.images:
        t = truth[int(im.key)]
        np.testing.assert_allclose(im.gt_cam[0], t["cam"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(im.gt_img[0], t["img"], rtol=0, atol=1e-9)
        np.testing.assert_array_equal(im.boxes[0], t["bbox"])  # raw: the estimator applies the box rule
        assert not im.crop_boxes
        assert im.root_depth[0] == t["cam"][0, 2]
        np.testing.assert_array_equal(im.intrinsics[0], [F1, F2, C1, C2])
        assert im.load().shape == (48, 64, 3)
    assert [im.groups[0] for im in s.images] == ["Directions", "Discussion", "Directions"]
    p1 = ev.h36m_set(root, protocol=1)
    assert [im.key for im in p1.images] == ["20"]
    assert [im.key for im in ev.h36m_set(root, sampling=1).images] == ["10", "11", "12", "20"]
    assert [im.key for im in ev.h36m_set(root, limit=2).images] == ["10", "12"]


def test_h36m_metrics_equal_the_numbers_worked_out_by_hand(h36m):
    root, truth = h36m
    s = ev.h36m_set(root)
    fake = FakeEstimator(planned_predictions(truth, [10, 12, 20]))
    pred_cam, pred_img = ev.predict_set(fake, s.images, flip=True)
    gt_cam, gt_img, groups = s.ground_truth()
    m = ev.summarize(pred_cam, pred_img, gt_cam, gt_img, groups)
    # By hand: 5 mm (R_Ankle of image 10), 12 mm (Head of 12), 10 mm (L_Wrist of 20; its Thorax error is not
    # scored) over 3 people x 17 joints; 2D: 0.5 px + 2 px over 51 joints.
    assert math.isclose(m["mpjpe"], 27 / 51, rel_tol=1e-9)
    assert math.isclose(m["px_2d"], 2.5 / 51, rel_tol=1e-9)
    assert math.isclose(m["per_joint"]["mpjpe"]["R_Ankle"], 5 / 3, rel_tol=1e-9)
    assert math.isclose(m["per_joint"]["mpjpe"]["Head"], 4.0, rel_tol=1e-9)
    assert math.isclose(m["per_joint"]["mpjpe"]["L_Wrist"], 10 / 3, rel_tol=1e-9)
    assert m["per_joint"]["mpjpe"]["Neck"] < 1e-9 and "Thorax" not in m["per_joint"]["mpjpe"]
    assert math.isclose(m["per_group"]["Directions"]["mpjpe"], 15 / 34, rel_tol=1e-9)
    assert math.isclose(m["per_group"]["Discussion"]["mpjpe"], 12 / 17, rel_tol=1e-9)
    ref_pa = loop_errors(pred_cam, np.stack([truth[i]["cam"] for i in (10, 12, 20)]), "rigid").mean()
    assert math.isclose(m["pa_mpjpe"], ref_pa, rel_tol=1e-8)
    # Upstream fits the alignment on all 18 joints, Thorax included: its 100 mm error pulls the fit.
    gt3 = np.stack([truth[i]["cam"] for i in (10, 12, 20)])
    fit17 = [math.dist(horn_align(p[SCORED] - p[0], g[SCORED] - g[0])[k], (g[SCORED] - g[0])[k])
             for p, g in zip(pred_cam, gt3, strict=True) for k in range(17)]
    assert m["pa_mpjpe"] > np.mean(fit17) + 0.5
    # What the estimator was given: the annotation's box, the ground-truth root depth, the camera.
    for item, i in zip(fake.seen, (10, 12, 20), strict=True):
        np.testing.assert_array_equal(item["boxes"][0], truth[i]["bbox"])
        assert "crop_boxes" not in item
        assert item["root_depth"][0] == truth[i]["cam"][0, 2]
        np.testing.assert_array_equal(item["intrinsics"][0], [F1, F2, C1, C2])


def test_h36m_with_rootnet_boxes_and_roots(h36m, tmp_path):
    root, truth = h36m
    rootnet = [{"image_id": 10, "bbox": [1.5, -3.0, 52.0, 52.0], "root_cam": [-100.0, 50.0, 5123.0]},
               {"image_id": 12, "bbox": [-6.0, -2.0, 60.5, 60.5], "root_cam": [0.0, 0.0, 4999.5]},
               {"image_id": 13, "bbox": [0.0, 0.0, 10.0, 10.0], "root_cam": [0.0, 0.0, 4000.0]},
               {"image_id": 20, "bbox": [10.0, 0.0, 40.0, 40.0], "root_cam": [1.0, 2.0, 6100.0]}]
    path = tmp_path / "bbox_root_human36m_output.json"
    path.write_text(json.dumps(rootnet))
    s = ev.h36m_set(root, bbox_root=path)
    # Upstream uses RootNet's box as it is: image 13 (whose annotation box is empty) is kept.
    assert [im.key for im in s.images] == ["10", "12", "13", "20"]
    fake = FakeEstimator(planned_predictions(truth | {13: truth[10]}, [10, 12, 10, 20]))
    ev.predict_set(fake, s.images)
    for item, entry in zip(fake.seen, rootnet, strict=True):
        np.testing.assert_array_equal(item["crop_boxes"][0], entry["bbox"])
        assert "boxes" not in item
        assert item["root_depth"][0] == entry["root_cam"][2]
    path.write_text(json.dumps(rootnet[:2]))
    with pytest.raises(ValueError, match="no entry for image_id 13"):
        ev.h36m_set(root, bbox_root=path)


def test_rootnet_boxes_wholly_outside_the_image_count_as_failed(h36m, tmp_path, xs_engine, capsys):
    """A RootNet box wholly outside its image is not run: its person counts as failed, is left out
    of MPJPE, and the report says so; the other people are scored as without it."""
    root, truth = h36m
    rootnet = [{"image_id": 10, "bbox": [1.5, -3.0, 52.0, 52.0], "root_cam": [-100.0, 50.0, 5123.0]},
               {"image_id": 12, "bbox": [-1e6, -1e6, 10.0, 10.0], "root_cam": [0.0, 0.0, 4999.5]},
               {"image_id": 13, "bbox": [0.0, 0.0, 10.0, 10.0], "root_cam": [0.0, 0.0, 4000.0]},
               {"image_id": 20, "bbox": [64.0, 0.0, 40.0, 40.0], "root_cam": [1.0, 2.0, 6100.0]}]
    path = tmp_path / "bbox_root_human36m_output.json"
    path.write_text(json.dumps(rootnet))
    s = ev.h36m_set(root, bbox_root=path)
    assert [im.key for im in s.images] == ["10", "12", "13", "20"]
    assert [im.failed is not None for im in s.images] == [False, True, False, True]
    assert s.info["failed_boxes"] == 2
    assert s.info["failed_box_examples"][0] == ("image_id 12: RootNet bbox = [-1000000.0, -1000000.0, 10.0, 10.0] "
                                                "lies outside the 64x48 image (no area in common with it): no person "
                                                "to estimate")
    fake = FakeEstimator(planned_predictions(truth | {13: truth[10]}, [10, 10]))
    cam, img = ev.predict_set(fake, s.images)
    assert [item["root_depth"][0] for item in fake.seen] == [5123.0, 4000.0]  # 12 and 20 never reach it
    assert np.isnan(cam[[1, 3]]).all() and np.isfinite(cam[[0, 2]]).all()
    gt_cam, gt_img, groups = s.ground_truth()
    m = ev.summarize(cam, img, gt_cam, gt_img, groups)
    ok = [0, 2]
    want = ev.summarize(cam[ok], img[ok], gt_cam[ok], gt_img[ok], [groups[i] for i in ok])
    assert m["nonfinite"] == 2 and m["people"] == 4 and m["mpjpe"] == want["mpjpe"] and np.isfinite(m["mpjpe"])
    report = ev.evaluate([xs_engine], s, progress=False)
    (entry,) = report["engines"]
    assert entry["metrics"]["nonfinite"] == 2 and np.isfinite(entry["metrics"]["mpjpe"])
    text = cli_eval.format_report(report)
    assert "2 people not estimated (counted in 'failed', not in the means): the RootNet box is unusable, e.g. " \
           "image_id 12: RootNet bbox = [-1000000.0" in text


def test_h36m_missing_files_and_bad_arguments(h36m):
    root, truth = h36m
    with pytest.raises(FileNotFoundError, match="subject1_data.json"):
        ev.h36m_set(root, subjects=[1])
    with pytest.raises(ValueError, match="protocol"):
        ev.h36m_set(root, protocol=3)
    with pytest.raises(ValueError, match="sampling"):
        ev.h36m_set(root, sampling=0)
    truth[12]["file"].unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        ev.h36m_set(root)


# ---------------------------------------------------------------- end to end with a real engine

def eval_args(*argv):
    p = argparse.ArgumentParser()
    cli_eval.add_eval_arguments(p)
    return p.parse_args([str(a) for a in argv])


def test_eval_command_on_h36m_files_reproduces_hand_numbers_from_its_predictions(h36m, xs_engine_path, xs_engine,
                                                                                 tmp_path, capsys):
    from cnpose_trt.io.preprocess import load_image
    from cnpose_trt.pipeline.estimator import PoseEstimator

    root, truth = h36m
    out = tmp_path / "report.json"
    assert cli_eval.run_eval(eval_args("--engine", xs_engine_path, "--h36m", root, "--json", out, "--predictions")) == 0
    printed = capsys.readouterr()
    assert "MPJPE" in printed.out and "Directions" in printed.out and "XS fp32" in printed.out
    assert "3/3" in printed.err  # the progress bar
    report = json.loads(out.read_text())
    (entry,) = report["engines"]
    assert report["flip_test"] is True and report["dataset"]["people"] == 3
    ids = [p["id"] for p in entry["predictions"]]
    assert ids == [10, 12, 20]
    # By hand from the predictions the command wrote (root-relative camera mm) and the hand-made truth.
    errs, errs_px = [], []
    for p in entry["predictions"]:
        g = truth[p["id"]]["cam"]
        g = g - g[0]
        errs += [math.dist(p["joint_cam"][j], g[j]) for j in SCORED]
        errs_px += [math.dist(p["joint_img"][j][:2], truth[p["id"]]["img"][j][:2]) for j in SCORED]
    assert math.isclose(entry["metrics"]["mpjpe"], sum(errs) / len(errs), rel_tol=1e-9)
    assert math.isclose(entry["metrics"]["px_2d"], sum(errs_px) / len(errs_px), rel_tol=1e-9)
    # The predictions are the estimator's for upstream's inputs: box rule on the annotation box, GT root, flip.
    est = PoseEstimator(xs_engine)
    for p in entry["predictions"]:
        t = truth[p["id"]]
        res = est.predict(load_image(t["file"]), np.asarray([t["bbox"]]), root_depth=t["cam"][0, 2],
                          intrinsics=[F1, F2, C1, C2], flip=True)
        np.testing.assert_allclose(p["joint_cam"], res.camera[0] - res.camera[0, 0], atol=1e-6)


def test_eval_with_rootnet_boxes_runs_the_estimator_on_crop_boxes(h36m, xs_engine, tmp_path):
    from cnpose_trt.io.preprocess import load_image
    from cnpose_trt.pipeline.estimator import PoseEstimator

    if "crop_boxes" not in inspect.signature(PoseEstimator.predict).parameters:
        pytest.skip("PoseEstimator.predict has no crop_boxes yet (RootNet boxes need it)")
    root, truth = h36m
    rootnet = [{"image_id": i, "bbox": [2.0, 1.0, 44.0, 44.0], "root_cam": [0.0, 0.0, 5000.0 + i]}
               for i in (10, 12, 13, 20)]
    path = tmp_path / "rootnet.json"
    path.write_text(json.dumps(rootnet))
    report = ev.evaluate([xs_engine], ev.h36m_set(root, bbox_root=path), progress=False, keep_predictions=True)
    est = PoseEstimator(xs_engine)
    for p, entry in zip(report["engines"][0]["predictions"], rootnet, strict=True):
        res = est.predict(load_image(truth[p["id"]]["file"]), crop_boxes=np.asarray([entry["bbox"]]),
                          root_depth=entry["root_cam"][2], intrinsics=[F1, F2, C1, C2], flip=True)
        np.testing.assert_allclose(p["joint_img"], res.image[0], atol=1e-6)


def test_eval_on_synthetic_people_matches_a_direct_estimate(xs_engine, xs_engine_path, tmp_path):
    from cnpose_trt.io.synthetic import synthesize
    from cnpose_trt.pipeline.estimator import PoseEstimator

    out = tmp_path / "syn.json"
    args = eval_args("--engine", xs_engine_path, "--engine", xs_engine_path, "--seed", 4, "--count", 3,
                     "--size", 160, 128, "--no-flip", "--no-progress", "--json", out)
    assert cli_eval.run_eval(args) == 0
    report = json.loads(out.read_text())
    assert [e["label"] for e in report["engines"]] == ["XS fp32", "XS fp32 #2"]
    est = PoseEstimator(xs_engine)
    pred, gt = [], []
    for i in range(3):
        s = synthesize((4, i), width=160, height=128)
        res = est.predict(s.image, s.boxes, root_depth=s.root_depth, intrinsics=s.intrinsics)
        pred.append(res.camera)
        gt.append(s.joints_cam)
    pred, gt = np.concatenate(pred), np.concatenate(gt)
    for e in report["engines"]:
        assert math.isclose(e["metrics"]["mpjpe"], loop_errors(pred, gt).mean(), rel_tol=1e-6)
        assert math.isclose(e["metrics"]["pa_mpjpe"], loop_errors(pred, gt, "rigid").mean(), rel_tol=1e-6)
    assert report["baseline"]["mpjpe"] > 0 and report["machine"]["cores"] >= 1


def test_eval_argument_errors(xs_engine_path, tmp_path):
    with pytest.raises(ValueError, match="--engine"):
        cli_eval.run_eval(eval_args("--count", 2))
    with pytest.raises(ValueError, match="--label"):
        cli_eval.run_eval(eval_args("--engine", xs_engine_path, "--label", "a", "--label", "b"))
    with pytest.raises(ValueError, match="--h36m only"):
        cli_eval.run_eval(eval_args("--engine", xs_engine_path, "--limit", 3))
    with pytest.raises(ValueError, match="--count"):
        cli_eval.run_eval(eval_args("--engine", xs_engine_path, "--count", 0))
    assert cli_eval.main(["--engine", str(tmp_path / "nope.onnx"), "--count", "1"]) == 2


# ---------------------------------------------------------------- inconsistent Human3.6M inputs

def _edit(root: Path, subject: int, suffix: str, change) -> Path:
    path = root / "annotations" / f"Human36M_subject{subject}_{suffix}.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("subject,change,match", [
    # Image 11 relabelled 10: annotation 100 would be scored against frame 1's ground truth.
    (9, lambda d: d["images"][1].update(id=10), r"subject9_data\.json: images\[1\]: id 10 repeats .*images\[0\]"),
    # Subject 11's image carries subject 9's id: bbox-root and predictions are matched by id.
    (11, lambda d: d["images"][0].update(id=12), r"subject11_data\.json: images\[0\]: id 12 repeats "
                                                 r"Human36M_subject9_data\.json images\[2\]"),
    (9, lambda d: d["annotations"][2].update(image_id=10),
     r"subject9_data\.json: annotations\[2\]: image_id 10 repeats annotations\[0\]"),
    (9, lambda d: d["images"][0].update(id=[10]), r"images\[0\]: id must be an integer"),
])
def test_h36m_repeated_image_ids_are_refused_by_file_and_index(h36m, subject, change, match):
    root, _ = h36m
    _edit(root, subject, "data", change)
    with pytest.raises(ValueError, match=match):
        ev.h36m_set(root, sampling=1)


def _rootnet(path: Path, ids=(10, 12, 13, 20), **override) -> Path:
    rows = [{"image_id": i, "bbox": [2.0, 1.0, 44.0, 44.0], "root_cam": [0.0, 0.0, 5000.0 + k]}
            for k, i in enumerate(ids)]
    for index, fields in override.items():
        rows[int(index[1:])].update(fields)
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("ids,override,match", [
    ((10, 12, 13, 20, 12), {}, r"entry 4: image_id 12 repeats entry 1"),
    ((10, 12, 13, 20, "12"), {}, r"entry 4: image_id '12' repeats entry 1"),
    ((10, 12, 13, 20), {"e2": {"root_cam": [0.0, 5000.0]}}, r"entry 2 \(image_id 13\): root_cam must be 3 numbers"),
    ((10, 12, 13, 20), {"e0": {"root_cam": 5000.0}}, r"entry 0 \(image_id 10\): root_cam must be 3 numbers"),
    ((10, 12, 13, 20), {"e1": {"root_cam": [0.0, 0.0, -5.0]}}, r"entry 1 \(image_id 12\): root_cam .* Z > 0"),
    ((10, 12, 13, 20), {"e1": {"root_cam": [0.0, 0.0, 1e300]}}, r"entry 1 \(image_id 12\): root_cam must be finite"),
    ((10, 12, 13, 20), {"e3": {"bbox": [2.0, 1.0, 44.0]}}, r"entry 3 \(image_id 20\): bbox must be 4 numbers"),
    ((10, 12, 13, 20), {"e3": {"bbox": 7}}, r"entry 3 \(image_id 20\): bbox must be 4 numbers"),
    ((10, 12, 13, 20), {"e0": {"image_id": None}}, r"entry 0: image_id must be an integer"),
])
def test_h36m_bbox_root_inconsistent_entries_are_refused_by_entry_and_field(h36m, tmp_path, ids, override, match):
    root, _ = h36m
    path = _rootnet(tmp_path / "rootnet.json", ids, **override)
    with pytest.raises(ValueError, match=rf"{path.name}: {match}"):
        ev.h36m_set(root, bbox_root=path)


@pytest.mark.parametrize("change,match", [
    (lambda c: c["2"].update(R=(2 * np.eye(3)).tolist()), r"camera 2: R is not a rotation .*det 8"),
    (lambda c: c["2"].update(R=np.diag([1.0, 1.0, -1.0]).tolist()), r"camera 2: R is not a rotation .*det -1"),
    (lambda c: c["2"].update(R=(np.asarray(R) + 0.01).tolist()), r"camera 2: R is not a rotation"),
    (lambda c: c["1"].update(R=[[1.0, 0.0], [0.0, 1.0]]), r"camera 1: R must be 3 x 3"),
    (lambda c: c["1"].update(f=[1e-300, 1e-300]), r"camera 1: f must be focal lengths"),
    (lambda c: c["1"].update(f=[1145.0, -1143.0]), r"camera 1: f must be focal lengths"),
    (lambda c: c["1"].update(c=[1e300, 0.0]), r"camera 1: c must be finite"),
    (lambda c: c["1"].update(t=[0.0, float("nan"), 0.0]), r"camera 1: t must be finite"),
    (lambda c: c["1"].pop("t"), r"camera 1 needs R, t, f, c"),
])
def test_h36m_cameras_that_are_not_cameras_are_refused_by_name(h36m, change, match):
    root, _ = h36m
    path = _edit(root, 9, "camera", change)
    with pytest.raises(ValueError, match=rf"{path.name}: {match}"):
        ev.h36m_set(root)


def test_h36m_a_rotation_written_with_few_decimals_is_a_rotation(h36m):
    root, truth = h36m
    rot = random_rotation(np.random.default_rng(3)).round(4)
    _edit(root, 9, "camera", lambda c: c["1"].update(R=rot.tolist()))
    s = ev.h36m_set(root)
    assert [im.key for im in s.images] == ["10", "12", "20"]


def test_h36m_frames_with_unusable_ground_truth_are_left_out_counted_and_said(h36m):
    import warnings

    root, truth = h36m

    def spoil(doc):
        doc["2"]["1"]["0"][3][1] = float("nan")  # image 10: one coordinate of one joint
        doc["3"]["2"]["64"][5] = [0.0, -5200.0, 900.0]  # image 12: a joint on the camera plane (Z = y + 5200 = 0)

    _edit(root, 9, "joint_3d", spoil)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy divide/overflow warning on the way
        s = ev.h36m_set(root)
    assert [im.key for im in s.images] == ["20"]
    assert s.info["skipped_ground_truth"] == 2 and s.info["skipped_ground_truth_images"] == ["10", "12"]
    gt_cam, gt_img, _ = s.ground_truth()
    assert np.isfinite(gt_cam).all() and np.isfinite(gt_img).all()
    np.testing.assert_allclose(gt_cam[0], truth[20]["cam"], atol=1e-9)
    fake = FakeEstimator(planned_predictions(truth, [20]))
    pred_cam, pred_img = ev.predict_set(fake, s.images)
    m = ev.summarize(pred_cam, pred_img, gt_cam, gt_img)
    assert math.isclose(m["mpjpe"], 10 / 17, rel_tol=1e-9) and math.isclose(m["px_2d"], 2 / 17, rel_tol=1e-9)
    report = {"dataset": {"name": s.name, "people": s.people, **s.info}, "flip_test": True,
              "protocol": {"joints": [JOINT_NAMES[j] for j in SCORED]},
              "engines": [{"label": "fake", "metrics": m, "images_per_second": 1.0}]}
    table = cli_eval.format_report(report)
    assert "left out: 2 frames whose ground truth is unusable" in table and "image 10, 12" in table
    assert " - " not in table.splitlines()[4]  # the engine's row has numbers


def test_eval_command_scores_the_frames_whose_ground_truth_is_usable(h36m, xs_engine_path, capsys):
    root, _ = h36m
    _edit(root, 9, "joint_3d", lambda d: d["2"]["1"]["0"][0].__setitem__(2, float("nan")))
    assert cli_eval.run_eval(eval_args("--engine", xs_engine_path, "--h36m", root, "--no-progress")) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("XS fp32"))
    mpjpe, pa, pa_scaled, px = row.split()[2:6]
    assert all(math.isfinite(float(v)) for v in (mpjpe, pa, pa_scaled, px)), row
    assert "left out: 1 frame whose ground truth is unusable" in out and "image 10" in out


def test_h36m_ground_truth_box_wholly_outside_is_counted_apart(h36m):
    """A ground-truth box wholly outside its image is refused (issue 20), where upstream's process_bbox would
    shift it in and score it: counted apart from upstream's own skips, and said in the table (review)."""
    import json

    root, _ = h36m
    data = next(p for p in (root / "annotations").glob("*_data.json")
                if any(a["image_id"] == 12 for a in json.loads(p.read_text())["annotations"]))
    doc = json.loads(data.read_text())
    ann = next(a for a in doc["annotations"] if a["image_id"] == 12)
    ann["bbox"] = [-500.0, 10.0, 100.0, 100.0]
    data.write_text(json.dumps(doc))
    s = ev.h36m_set(root)
    assert [im.key for im in s.images] == ["10", "20"]
    assert s.info["skipped_boxes"] == 1 and s.info["outside_boxes"] == 1
    report = {"dataset": {"name": "h", "people": 2, **s.info}, "flip_test": False, "engines": [],
              "protocol": {"joints": []}}
    assert "left out: 1 ground-truth box wholly outside the image (upstream's process_bbox would shift" in \
        cli_eval.format_report(report)

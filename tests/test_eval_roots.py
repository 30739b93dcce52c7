"""`eval --rootnet` (issue 24): root depths from RootNet or the prior, scored by MRPE, root |dZ| and absolute MPJPE.

References written out here in float64: the metrics by plain loops over people and joints; the prior's roots
from the dataset's own boxes, intrinsics and truth (upstream's box rule and k = sqrt(2000 * 2000 * fx * fy /
(w * h)) of the processed box, typed in again, not imported); RootNet's roots from estimate_roots (checked
against upstream's golden output in test_roots.py) put through pixel2cam by hand.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from cnpose_trt.cli import eval as cli_eval  # noqa: E402
from cnpose_trt.eval import evaluate as ev  # noqa: E402
from cnpose_trt.spec import JOINT_NAMES, NUM_JOINTS  # noqa: E402

PELVIS = JOINT_NAMES.index("Pelvis")
SCORED = [j for j in range(NUM_JOINTS) if JOINT_NAMES[j] != "Thorax"]  # upstream's eval_joint, written out


# ---------------------------------------------------------------- independent references (float64)

def loop_root_figures(pred_root, gt_root, pred_cam, gt_cam):
    """MRPE, mean |dZ|, mean |dZ| / Z, absolute MPJPE by loops, over the people whose estimate is finite."""
    pos, dz, rel, absolute = [], [], [], []
    for pr, gr, pc, gc in zip(pred_root, gt_root, pred_cam, gt_cam, strict=True):
        if not (all(math.isfinite(v) for v in pr) and all(math.isfinite(v) for v in np.ravel(pc))):
            continue
        pos.append(math.dist(pr, gr))
        dz.append(abs(float(pr[2]) - float(gr[2])))
        rel.append(abs(float(pr[2]) - float(gr[2])) / float(gr[2]))
        absolute.append(sum(math.dist(pc[j], gc[j]) for j in SCORED) / len(SCORED))
    n = len(pos)
    mean = (lambda v: sum(v) / n) if n else (lambda v: math.nan)
    return {"mrpe": mean(pos), "root_dz": mean(dz), "root_dz_rel": mean(rel), "mpjpe_abs": mean(absolute),
            "root_people": n}


def upstream_process_bbox(box, width, height):
    """mks0601's process_bbox, typed in again: sanitise (x2 from the clipped x1), square to 1:1, x1.25."""
    x, y, w, h = (float(v) for v in box)
    x1, y1 = max(0.0, x), max(0.0, y)
    x2, y2 = min(width - 1.0, x1 + max(0.0, w - 1.0)), min(height - 1.0, y1 + max(0.0, h - 1.0))
    w, h = x2 - x1, y2 - y1
    cx, cy = x1 + w / 2.0, y1 + h / 2.0
    if w > h:
        h = w
    elif w < h:
        w = h
    w, h = w * 1.25, h * 1.25
    return cx - w / 2.0, cy - h / 2.0, w, h


def prior_root_camera(box, width, height, cam):
    """The prior's root in camera mm: the processed box's centre at depth k (gamma = 1), through pixel2cam."""
    x0, y0, w, h = upstream_process_bbox(box, width, height)
    fx, fy, cx, cy = (float(v) for v in cam)
    z = math.sqrt(2000.0 * 2000.0 * fx * fy / (w * h))
    u, v = x0 + w / 2.0, y0 + h / 2.0
    return [(u - cx) / fx * z, (v - cy) / fy * z, z]


def eval_args(*argv):
    p = argparse.ArgumentParser()
    cli_eval.add_eval_arguments(p)
    return p.parse_args([str(a) for a in argv])


def random_people(rng, n):
    from cnpose_trt.io.synthetic import sample_pose

    gt = np.stack([sample_pose(rng).joints for _ in range(n)]) + rng.uniform([-2000, -1000, 1500], [2000, 1000, 9000],
                                                                             (n, 1, 3))
    pred = gt + rng.normal(0, 60, gt.shape) + rng.normal(0, 400, (n, 1, 3))
    return pred, gt


# ---------------------------------------------------------------- the metrics

def test_root_metrics_equal_loops_on_random_people(rng):
    pred_cam, gt_cam = random_people(rng, 40)
    pred_root = gt_cam[:, PELVIS] + rng.normal(0, 300, (40, 3))
    got = ev.root_metrics(pred_root, gt_cam[:, PELVIS], pred_cam, gt_cam)
    want = loop_root_figures(pred_root, gt_cam[:, PELVIS], pred_cam, gt_cam)
    assert got["root_people"] == want["root_people"] == 40
    for key in ("mrpe", "root_dz", "root_dz_rel", "mpjpe_abs"):
        assert math.isclose(got[key], want[key], rel_tol=1e-12), key
    per = ev.root_errors(pred_root, gt_cam[:, PELVIS])
    for i in range(40):
        assert math.isclose(per["position"][i], math.dist(pred_root[i], gt_cam[i, PELVIS]), rel_tol=1e-12)
    errs = ev.joint_errors(pred_cam, gt_cam, align="none")
    assert errs.shape == (40, len(SCORED))
    assert math.isclose(errs[7, 3], math.dist(pred_cam[7, SCORED[3]], gt_cam[7, SCORED[3]]), rel_tol=1e-12)


def test_root_metrics_adversarial(rng):
    """A pure translation is absolute error only; a perfect root scores 0; huge and NaN estimates; bad input."""
    _, gt = random_people(rng, 6)
    shifted = gt + np.array([30.0, -40.0, 120.0])  # |shift| = 130 mm, dZ = 120
    m = ev.root_metrics(shifted[:, PELVIS], gt[:, PELVIS], shifted, gt)
    assert math.isclose(m["mrpe"], 130.0, rel_tol=1e-12) and math.isclose(m["root_dz"], 120.0, rel_tol=1e-12)
    assert math.isclose(m["mpjpe_abs"], 130.0, rel_tol=1e-12)
    assert math.isclose(m["root_dz_rel"], float(np.mean(120.0 / gt[:, PELVIS, 2])), rel_tol=1e-12)
    assert ev.mpjpe(shifted, gt) < 1e-9  # root-relative MPJPE does not see it
    perfect = ev.root_metrics(gt[:, PELVIS], gt[:, PELVIS], gt, gt)
    assert perfect["mrpe"] == perfect["root_dz"] == perfect["mpjpe_abs"] == 0.0
    huge = gt[:, PELVIS] * np.array([1.0, 1.0, 1e12])
    pred_root = huge.copy()
    pred_root[2] = np.nan
    pred_cam = gt.copy()
    pred_cam[4, 5] = np.inf
    got = ev.root_metrics(pred_root, gt[:, PELVIS], pred_cam, gt)
    want = loop_root_figures(pred_root, gt[:, PELVIS], pred_cam, gt)
    assert got["root_people"] == want["root_people"] == 4
    for key in ("mrpe", "root_dz", "root_dz_rel", "mpjpe_abs"):
        assert math.isclose(got[key], want[key], rel_tol=1e-12), key
    assert math.isnan(ev.root_metrics(np.full((2, 3), np.nan), gt[:2, PELVIS], gt[:2], gt[:2])["mrpe"])
    with pytest.raises(ValueError, match=r"gt_root must lie in front of the camera \(Z > 0\)"):
        ev.root_errors(gt[:2, PELVIS], gt[:2, PELVIS] * np.array([1, 1, -1]))
    with pytest.raises(ValueError, match=r"pred_root must have shape \(N, 3\)"):
        ev.root_errors(gt[:, :, :2], gt[:, PELVIS])
    with pytest.raises(ValueError, match="pred_root and gt_root must have the same shape"):
        ev.root_errors(gt[:2, PELVIS], gt[:3, PELVIS])
    with pytest.raises(ValueError, match="align must be"):
        ev.joint_errors(gt, gt, align="absolute")


# ---------------------------------------------------------------- eval --rootnet

SET = ("--seed", 3, "--count", 4, "--people", 2, "--size", 160, 128, "--no-flip", "--no-progress")


def _scenes():
    from cnpose_trt.io.synthetic import synthesize

    return [synthesize((3, i), width=160, height=128, people=2) for i in range(4)]


def test_eval_rootnet_prior_equals_the_prior_written_out(xs_engine, xs_engine_path, tmp_path, capsys):
    from cnpose_trt.pipeline.estimator import PoseEstimator

    out = tmp_path / "prior.json"
    assert cli_eval.run_eval(eval_args("--engine", xs_engine_path, *SET, "--rootnet", "prior", "--json", out)) == 0
    text = capsys.readouterr().out
    assert "root depths: the prior (depth = k, gamma = 1" in text and "MRPE" in text
    report = json.loads(out.read_text())
    assert report["roots"]["source"] == "prior" and report["dataset"]["root_depth"].startswith("the prior")
    entry = report["engines"][0]
    assert entry["root_source"] == "prior"
    est = PoseEstimator(xs_engine)
    pred_root, gt_root, pred_cam, gt_cam = [], [], [], []
    for s in _scenes():
        for p in range(2):
            pred_root.append(prior_root_camera(s.boxes[p], 160, 128, s.intrinsics))
        depths = [r[2] for r in pred_root[-2:]]
        pred_cam.append(est.predict(s.image, s.boxes, root_depth=depths, intrinsics=s.intrinsics).camera)
        gt_root += list(s.joints_cam[:, PELVIS])
        gt_cam.append(s.joints_cam)
    want = loop_root_figures(np.array(pred_root), np.array(gt_root), np.concatenate(pred_cam), np.concatenate(gt_cam))
    m = entry["metrics"]
    assert m["root_people"] == 8
    for key in ("mrpe", "root_dz", "root_dz_rel"):
        assert math.isclose(m[key], want[key], rel_tol=1e-9), key
    assert math.isclose(m["mpjpe_abs"], want["mpjpe_abs"], rel_tol=1e-6)
    assert f"{m['mrpe']:9.2f}" in text and f"{m['root_dz_rel'] * 100:9.2f}" in text
    # Root-relative MPJPE is what the ground-truth run gives (the depth moves the pose, barely its shape).
    plain = tmp_path / "plain.json"
    assert cli_eval.run_eval(eval_args("--engine", xs_engine_path, *SET, "--json", plain)) == 0
    base = json.loads(plain.read_text())
    assert "roots" not in base and "mrpe" not in base["engines"][0]["metrics"]
    assert "root depths:" not in capsys.readouterr().out
    assert m["mpjpe"] != base["engines"][0]["metrics"]["mpjpe"]  # the depth did reach the decode


def test_eval_rootnet_engine_and_checkpoint(xs_engine_path, rootnet_engine, rootnet_engine_path, rootnet_snapshot,
                                            engine_dir, tmp_path, capsys):
    from cnpose_trt import estimate_roots

    out = tmp_path / "rootnet.json"
    assert cli_eval.run_eval(eval_args("--engine", xs_engine_path, *SET, "--rootnet", rootnet_engine_path,
                                       "--json", out)) == 0
    assert f"root depths: RootNet ({rootnet_engine_path})" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["roots"]["source"] == "rootnet" and report["engines"][0]["root_source"] == "rootnet"
    pred_root, gt_root = [], []
    for s in _scenes():
        roots = estimate_roots(rootnet_engine, s.image, s.boxes, intrinsics=s.intrinsics)
        fx, fy, cx, cy = s.intrinsics
        pred_root += [[(u - cx) / fx * z, (v - cy) / fy * z, z] for u, v, z in roots]
        gt_root += list(s.joints_cam[:, PELVIS])
    pos = [math.dist(a, b) for a, b in zip(pred_root, gt_root, strict=True)]
    dz = [abs(a[2] - b[2]) for a, b in zip(pred_root, gt_root, strict=True)]
    m = report["engines"][0]["metrics"]
    assert math.isclose(m["mrpe"], sum(pos) / 8, rel_tol=1e-6)
    assert math.isclose(m["root_dz"], sum(dz) / 8, rel_tol=1e-6)
    # The checkpoint is built as the conftest engine was: the same cached engine, the same figures.
    again = tmp_path / "ckpt.json"
    assert cli_eval.run_eval(eval_args("--engine", xs_engine_path, *SET, "--rootnet", rootnet_snapshot,
                                       "--engines", engine_dir, "--json", again)) == 0
    m2 = json.loads(again.read_text())["engines"][0]["metrics"]
    assert m2["mrpe"] == m["mrpe"] and m2["mpjpe_abs"] == m["mpjpe_abs"]


def test_bad_rootnet_values_give_one_clear_line(xs_engine, xs_engine_path, tmp_path, capsys):
    base = ["--engine", str(xs_engine_path), "--count", "1", "--no-progress"]
    for value, words in ((str(tmp_path / "nope.onnx"), "--rootnet must be a RootNet engine file"),
                         ("", "--rootnet must be a RootNet engine file"),
                         ("Prior", "--rootnet must be"),
                         (str(xs_engine_path), "--rootnet: root depths needs a RootNet engine")):
        assert cli_eval.main([*base, "--rootnet", value]) == 2
        err = [line for line in capsys.readouterr().err.splitlines()
               if line.strip() and "has random weights" not in line]  # the pose engine's own warning
        assert len(err) == 1 and words in err[0], (value, err)
    dataset = ev.synthetic_set(3, 1, width=160, height=128)
    with pytest.raises(ValueError, match="rootnet must be"):
        ev.evaluate([xs_engine], dataset, progress=False, rootnet=42)
    dataset.images[0].crop_boxes = True  # as with RootNet's bbox_root file: its depths are estimates already
    with pytest.raises(ValueError, match="rootnet: this set's root depths already come from RootNet's file"):
        ev.evaluate([xs_engine], dataset, progress=False, rootnet="prior")

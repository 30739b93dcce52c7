"""Pictures: the 3D view beside the overlay (`predict --draw`) and the eval chart (`eval --plot`)."""

from __future__ import annotations

import numpy as np
import pytest

from cnpose_trt.io.draw import draw_3d, draw_poses_3d, eval_chart, pose_3d
from cnpose_trt.spec import JOINT_NAMES, NUM_JOINTS


def test_pose_3d_camera_is_kept_and_root_relative_is_scaled_by_the_crop():
    rng = np.random.default_rng(0)
    px = rng.uniform(0, 500, (2, NUM_JOINTS, 3))
    crops = np.array([[0, 0, 200, 200], [0, 0, 400, 100]], float)
    cam = rng.normal(0, 500, (2, NUM_JOINTS, 3))
    out, what = pose_3d(px, crops, cam)
    assert what == "camera mm" and np.array_equal(out, cam)
    out, what = pose_3d(px, crops, None)
    assert what == "root-relative mm"
    # 2000 mm span the crop: 10 mm/px for the first person, 5 and 20 mm/px (x, y) for the second
    np.testing.assert_allclose(out[0, :, :2], (px[0, :, :2] - px[0, 0, :2]) * 10)
    np.testing.assert_allclose(out[1, :, 0], (px[1, :, 0] - px[1, 0, 0]) * 5)
    np.testing.assert_allclose(out[1, :, 1], (px[1, :, 1] - px[1, 0, 1]) * 20)
    np.testing.assert_allclose(out[:, :, 2], px[:, :, 2] - px[:, :1, 2])


def _ink(panel: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.argwhere((np.abs(panel.astype(int) - colour) < 30).all(axis=2))


def test_3d_view_draws_a_standing_person_upright():
    pose = np.zeros((1, NUM_JOINTS, 3))
    head, ankle = JOINT_NAMES.index("Head"), JOINT_NAMES.index("L_Ankle")
    pose[0, :, 1] = np.linspace(0, -1700, NUM_JOINTS)  # y down in the camera frame: negative is up
    pose[0, ankle] = (0, 0, 0)
    pose[0, head] = (0, -1700, 0)
    panel = draw_3d(pose, 300, "camera mm")
    assert panel.shape == (300, 300, 3) and panel.dtype == np.uint8
    dots = _ink(panel, (40, 40, 40))  # joints are dark dots
    assert len(dots) > 0
    assert dots[:, 0].max() - dots[:, 0].min() > 150  # 1.7 m fills a good part of the panel's height
    empty = draw_3d(np.full((1, NUM_JOINTS, 3), np.nan), 100, "camera mm")
    assert empty.shape == (100, 100, 3)


def test_overlay_and_3d_side_by_side():
    image = np.zeros((240, 320, 3), np.uint8)
    px = np.random.default_rng(1).uniform(50, 200, (1, NUM_JOINTS, 3))
    out = draw_poses_3d(image, px, np.array([[40, 40, 160, 180]]), px * 5, "root-relative mm")
    assert out.shape == (240, 320 + 240, 3)
    assert out[:, 320:].mean() > 200  # a light panel beside the image


def _report(values: dict[str, list[float]]) -> dict:
    joints = list(JOINT_NAMES[:3])
    return {"dataset": {"name": "t", "people": 3}, "flip_test": False, "protocol": {"joints": joints},
            "engines": [{"label": k, "metrics": {"mpjpe": float(np.mean(v)), "pa_mpjpe": 1.0,
                                                 "per_joint": {"mpjpe": dict(zip(joints, v, strict=True))}}}
                        for k, v in values.items()]}


def test_eval_chart_bar_lengths_follow_the_errors():
    img = eval_chart(_report({"a": [50.0, 100.0, 25.0], "b": [100.0, 50.0, 0.0]}))
    blue, orange = _ink(img, (31, 119, 180)), _ink(img, (255, 127, 14))

    def bar_lengths(ink: np.ndarray) -> list[int]:
        rows = {}
        for y, x in ink:
            if x > 100:  # the bars, not the legend swatch
                rows.setdefault(y, []).append(x)
        lengths = sorted({max(xs) - min(xs) for xs in rows.values()})
        return lengths

    a, b = bar_lengths(blue), bar_lengths(orange)
    assert len(a) == 3 and a[2] == pytest.approx(2 * a[1], rel=0.05) and a[2] == pytest.approx(4 * a[0], rel=0.08)
    assert max(b) == pytest.approx(max(a), rel=0.02)  # both engines on one scale


def test_eval_plot_command(tmp_path, xs_engine_path, capsys):
    from cnpose_trt.cli.app import main as cli

    out = tmp_path / "eval.png"
    assert cli(["eval", "--engine", str(xs_engine_path), "--count", "2", "--no-progress", "--plot", str(out)]) == 0
    import cv2

    img = cv2.imread(str(out))
    assert img is not None and img.shape[1] == 1000
    assert cli(["eval", "--engine", str(xs_engine_path), "--count", "1", "--plot", str(tmp_path / "x.txt")]) == 2
    assert "--plot" in capsys.readouterr().err

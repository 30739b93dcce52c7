"""Stated facts, with expected values written here from the reference card, never from the package.

/work/shared/reference/convnextpose.md states the input normalisation (ImageNet mean/std in RGB
order on 0..255 values), the joint names and flip pairs, the post-processing formulas and the
flip test. Tests that build their expected values from the package's own constants cannot see a
wrong constant; these spell the values out.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cnpose_trt import decode
from cnpose_trt.io.preprocess import load_image, prepare
from cnpose_trt.pipeline.estimator import PoseEstimator
from cnpose_trt.spec import FLIP_PAIRS, JOINT_NAMES, PIXEL_MEAN, PIXEL_STD, SKELETON

# The card's values, copied by hand.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CARD_JOINTS = ("Pelvis", "R_Hip", "R_Knee", "R_Ankle", "L_Hip", "L_Knee", "L_Ankle", "Torso", "Neck", "Nose",
               "Head", "L_Shoulder", "L_Elbow", "L_Wrist", "R_Shoulder", "R_Elbow", "R_Wrist", "Thorax")
CARD_FLIP_PAIRS = ((1, 4), (2, 5), (3, 6), (14, 11), (15, 12), (16, 13))
CARD_SKELETON = ((0, 7), (7, 8), (8, 9), (9, 10), (8, 11), (11, 12), (12, 13), (8, 14), (14, 15), (15, 16),
                 (0, 1), (1, 2), (2, 3), (0, 4), (4, 5), (5, 6))
BBOX_3D_MM = 2000.0


def _card_flip_perm(joints=18):
    perm = list(range(joints))
    for a, b in CARD_FLIP_PAIRS:
        perm[a], perm[b] = b, a
    return perm


# ------------------------------------------------------------------------------ input convention

def test_imagenet_constants_in_rgb_order():
    assert tuple(PIXEL_MEAN) == IMAGENET_MEAN_RGB
    assert tuple(PIXEL_STD) == IMAGENET_STD_RGB


@pytest.mark.parametrize("rgb", [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 100, 50)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_pure_colour_normalises_to_stated_values(rgb, dtype):
    """(pixel - mean) / std per RGB channel on 0..255 values, no /255 (upstream's real behaviour);
    pixels outside the image are black (border 0)."""
    image = np.empty((60, 80, 3), dtype)
    image[:] = rgb
    x, crop_boxes = prepare(image, [[0, 0, 80, 60]])  # the crop box (x1.25) reaches past the image
    want = [(rgb[c] - IMAGENET_MEAN_RGB[c]) / IMAGENET_STD_RGB[c] for c in range(3)]
    np.testing.assert_allclose(x[0, :, 128, 128], want, rtol=1e-6)
    assert crop_boxes[0, 1] < 0  # so the crop's top-left corner lies outside: black
    black = [(0 - IMAGENET_MEAN_RGB[c]) / IMAGENET_STD_RGB[c] for c in range(3)]
    np.testing.assert_allclose(x[0, :, 0, 0], black, rtol=1e-6)


def test_red_pixel_value_spelled_out():
    """The brief's example, as plain numbers: a pure-red crop is about (1111.2, -2.04, -1.80)."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[..., 0] = 255
    x, _ = prepare(image, [[8, 8, 48, 48]])
    np.testing.assert_allclose(x[0, :, 128, 128], [(255 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 128, 128], [1111.419, -2.0357, -1.8044], rtol=1e-4)


def test_load_image_returns_rgb(tmp_path):
    rng = np.random.default_rng(4)
    bgr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    bgr[0, 0] = (255, 0, 0)  # pure blue in OpenCV's BGR order
    assert cv2.imwrite(str(tmp_path / "x.png"), bgr)
    rgb = load_image(tmp_path / "x.png")
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, bgr[:, :, ::-1])
    assert tuple(rgb[0, 0]) == (0, 0, 255)


def test_prepare_flip_mirrors_the_crop(rng):
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    plain, _ = prepare(image, [[10, 5, 60, 70]])
    mirrored, _ = prepare(image, [[10, 5, 60, 70]], flip=True)
    np.testing.assert_array_equal(mirrored, plain[:, :, :, ::-1])


# ------------------------------------------------------------------------------------- joints

def test_joint_names_flip_pairs_and_skeleton():
    assert tuple(JOINT_NAMES) == CARD_JOINTS
    assert {frozenset(p) for p in FLIP_PAIRS} == {frozenset(p) for p in CARD_FLIP_PAIRS}
    assert len(FLIP_PAIRS) == len(CARD_FLIP_PAIRS)
    assert {frozenset(p) for p in SKELETON} == {frozenset(p) for p in CARD_SKELETON}
    for a, b in FLIP_PAIRS:  # every pair is one left and one right joint of the same name
        names = sorted((JOINT_NAMES[a], JOINT_NAMES[b]))
        assert names[0].startswith("L_") and names[1] == "R_" + names[0][2:], names


# ---------------------------------------------------------------------------- post-processing

def _hot_voxels(joints, d, h, w, where):
    """Heatmaps (1, J*D, H, W) of -inf except one voxel per joint: the soft-argmax is that voxel exactly."""
    hm = np.full((1, joints * d, h, w), -np.inf, np.float32)
    for j, (zd, yh, xw) in enumerate(where):
        hm[0, j * d + zd, yh, xw] = 1.0
    return hm


@pytest.fixture(params=["compiled", "numpy"])
def decoder(request, monkeypatch):
    """decode() through the compiled kernel (when built) and through the NumPy path (geometry.py)."""
    import cnpose_trt.ops.decoding as dec

    if request.param == "numpy":
        monkeypatch.setattr(dec, "compiled", lambda: None)
    elif dec.compiled() is None:
        pytest.skip("compiled extension not built")
    return decode


def test_card_formulas_on_hot_voxels(decoder, rng):
    """x_px = x / W * box_w + box_x, y_px = y / H * box_h + box_y, z_mm = (z / D * 2 - 1) * 1000 + root,
    X = (x_px - cx) / fx * Z, Y = (y_px - cy) / fy * Z: on a non-square volume and box, where a
    mixed-up width and height would show."""
    j, d, h, w = 18, 6, 5, 9
    where = [(int(rng.integers(d)), int(rng.integers(h)), int(rng.integers(w))) for _ in range(j)]
    box = (30.0, -12.0, 160.0, 120.0)
    root, (fx, fy, cx, cy) = 4500.0, (1500.0, 1400.0, 320.0, 240.0)
    res = decoder(_hot_voxels(j, d, h, w, where), j, boxes=[box], root_depth=[root], intrinsics=[[fx, fy, cx, cy]])
    for k, (zd, yh, xw) in enumerate(where):
        x_px = xw / w * box[2] + box[0]
        y_px = yh / h * box[3] + box[1]
        z_mm = (zd / d * 2 - 1) * (BBOX_3D_MM / 2) + root
        np.testing.assert_allclose(res.cells[0, k], [xw, yh, zd], atol=1e-6)
        np.testing.assert_allclose(res.confidence[0, k], 1.0, rtol=1e-6)
        np.testing.assert_allclose(res.image[0, k], [x_px, y_px, z_mm], rtol=1e-6, atol=1e-3)
        np.testing.assert_allclose(res.camera[0, k], [(x_px - cx) / fx * z_mm, (y_px - cy) / fy * z_mm, z_mm],
                                   rtol=1e-5, atol=1e-2)


def test_card_flip_rule_on_hot_voxels(decoder, rng):
    """Flip test: the flipped pass's x -> W - 1 - x, left and right swapped, averaged with the plain pass."""
    j, d, h, w = 18, 4, 7, 11
    plain = [(int(rng.integers(d)), int(rng.integers(h)), int(rng.integers(w))) for _ in range(j)]
    flipped = [(int(rng.integers(d)), int(rng.integers(h)), int(rng.integers(w))) for _ in range(j)]
    res = decoder(_hot_voxels(j, d, h, w, plain), j, flipped=_hot_voxels(j, d, h, w, flipped))
    perm = _card_flip_perm(j)
    for k in range(j):
        zf, yf, xf = flipped[perm[k]]
        want = [(plain[k][2] + (w - 1 - xf)) / 2, (plain[k][1] + yf) / 2, (plain[k][0] + zf) / 2]
        np.testing.assert_allclose(res.cells[0, k], want, atol=1e-5)
    # A flipped pass that is the exact mirror of the plain one changes nothing.
    mirror = [(z, y, w - 1 - x) for z, y, x in (plain[perm[k]] for k in range(j))]
    same = decoder(_hot_voxels(j, d, h, w, plain), j, flipped=_hot_voxels(j, d, h, w, mirror))
    np.testing.assert_allclose(same.cells[0], [[x, y, z] for z, y, x in plain], atol=1e-5)


# -------------------------------------------------------------------------- pipeline flip test

def _soft_argmax64(heatmaps, joints):
    """(N, J*D, H, W) -> (N, J, 3) x, y, z: softmax over each joint's whole volume, expected indices."""
    n, c, h, w = heatmaps.shape
    vol = heatmaps.astype(np.float64).reshape(n, joints, c // joints, h, w)
    p = np.exp(vol - vol.max(axis=(2, 3, 4), keepdims=True))
    p /= p.sum(axis=(2, 3, 4), keepdims=True)
    return np.stack([(p.sum(axis=(2, 3)) * np.arange(w)).sum(-1), (p.sum(axis=(2, 4)) * np.arange(h)).sum(-1),
                     (p.sum(axis=(3, 4)) * np.arange(c // joints)).sum(-1)], axis=-1)


def test_pipeline_flip_test_runs_the_mirrored_crops(xs_engine, monkeypatch, rng):
    """The second pass of the flip test sees each crop mirrored, and its joints come back mirrored
    and swapped before averaging (checked against a float64 soft-argmax of what the engine returned)."""
    seen = []
    real = xs_engine.infer

    def recording(images):
        out = real(images)
        seen.append((images.copy(), out.copy()))
        return out

    monkeypatch.setattr(xs_engine, "infer", recording)
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    boxes = [[40, 30, 120, 180], [170, 50, 100, 150]]
    res = PoseEstimator(xs_engine).predict(image, boxes, flip=True)
    (crops, heat), = seen
    plain, _ = prepare(image, boxes, method="auto")  # the crops the pipeline makes (fused where built)
    assert crops.shape[0] == 4
    np.testing.assert_array_equal(crops[:2], plain)
    np.testing.assert_array_equal(crops[2:], plain[:, :, :, ::-1])
    w = heat.shape[3]
    a, b = _soft_argmax64(heat[:2], 18), _soft_argmax64(heat[2:], 18)
    b = b[:, _card_flip_perm()]
    b[..., 0] = w - 1 - b[..., 0]
    np.testing.assert_allclose(res.cells, (a + b) / 2, atol=1e-4)

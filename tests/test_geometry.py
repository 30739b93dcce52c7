import numpy as np
import pytest

from cnpose_trt.io.preprocess import check_image, crop_people, load_image, prepare
from cnpose_trt.ops.geometry import (
    cells_to_image,
    check_crop_boxes,
    check_inside,
    check_intrinsics,
    check_root_depth,
    crop_matrices,
    flip_back,
    flip_permutation,
    image_to_camera,
    process_boxes,
)
from cnpose_trt.spec import FLIP_PAIRS


def test_process_boxes_upstream_rule():
    """Hand-computed with upstream's process_bbox: inclusive width, shifted (not clipped), square, x1.25."""
    out = process_boxes([[10, 20, 100, 50], [-50, -50, 100, 100]], (640, 480))
    # (10, 20) .. (109, 69): w' = 99, h' = 49; squared to 99 around (59.5, 44.5), x1.25 = 123.75
    np.testing.assert_allclose(out[0], [59.5 - 61.875, 44.5 - 61.875, 123.75, 123.75])
    # crossing the top-left corner: shifted to (0, 0) .. (99, 99), not clipped to 50 x 50
    np.testing.assert_allclose(out[1], [49.5 - 61.875, 49.5 - 61.875, 123.75, 123.75])
    tall = process_boxes([600, 400, 100, 200], (640, 480))  # (600, 400) .. (639, 479): w' = 39, h' = 79
    np.testing.assert_allclose(tall[0], [619.5 - 49.375, 439.5 - 49.375, 98.75, 98.75])
    left = process_boxes([-99, 10, 100, 100], (640, 480))  # one px column inside: shifted in, as upstream
    np.testing.assert_allclose(left[0], [49.5 - 61.875, 59.5 - 61.875, 123.75, 123.75])
    line = process_boxes([5, 5, 1, 41], (640, 480))  # one pixel wide: w' = 0 grows to h' = 40
    np.testing.assert_allclose(line[0], [5 - 25, 25 - 25, 50, 50])
    assert process_boxes(np.zeros((0, 4)), (640, 480)).shape == (0, 4)
    assert process_boxes([], (640, 480)).shape == (0, 4)


_OUTSIDE = "lies outside the 640x480 image \\(no area in common with it\\)"


@pytest.mark.parametrize("box, message", [
    ([10, 10, 0, 50], "boxes\\[0\\] is empty"),
    ([10, 10, 30, -5], "is empty"),
    ([700, 10, 50, 50], "boxes\\[0\\] = \\[700.0, 10.0, 50.0, 50.0\\] " + _OUTSIDE),
    ([639.5, 10, 50, 50], "lies outside the 640x480 image$"),  # upstream's rule: x past W - 1
    ([-300, 10, 100, 100], _OUTSIDE),  # upstream would shift it in and estimate a pose
    ([-1e6, -1e6, 10, 10], _OUTSIDE),
    ([-100, 10, 100, 100], _OUTSIDE),  # touching the left edge: no area in common
    ([10, -50, 20, 50], _OUTSIDE),
    ([10, 480, 50, 50], _OUTSIDE),
    ([639, 479, 1, 1], "covers at most one pixel"),
    ([639, 479, 5, 5], "covers at most one pixel"),
    ([1, 2, np.nan, 4], "must be finite"),
    ([1, 2, 3], "boxes must have shape \\(N, 4\\)"),
    ("abc", "must be numeric|boxes must"),
])
def test_bad_boxes(box, message):
    with pytest.raises((ValueError, TypeError), match=message):
        process_boxes(box, (640, 480))


def _bilinear(img, x, y):
    """Reference sampler: zero outside, pixel centres at integers."""
    h, w = img.shape[:2]
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    out = np.zeros(img.shape[2])
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - abs(x - xi)) * (1 - abs(y - yi))
            if 0 <= xi < w and 0 <= yi < h and wgt > 0:
                out += wgt * img[yi, xi]
    return out


def test_crop_matches_independent_sampler(rng):
    img = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    boxes = process_boxes([[5, 10, 60, 80]], (90, 120))
    crops = crop_people(img, boxes, size=64)
    m = crop_matrices(boxes, 64)[0]
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # on 0..255 values (upstream)
    for v, u in [(0, 0), (10, 33), (63, 63), (31, 5), (50, 60)]:
        sx, sy, _ = inv @ [u, v, 1]
        want = (_bilinear(img.astype(np.float64), sx, sy) - mean) / std
        # OpenCV: 5-bit sample grid and a uint8 result, so within one grey level (1 / std normalised)
        np.testing.assert_allclose(crops[0, :, v, u], want, atol=1 / 0.224)
    flipped = crop_people(img, boxes, size=64, flip=True)
    np.testing.assert_array_equal(flipped[0], crops[0][:, :, ::-1])


@pytest.mark.parametrize("method", ["opencv", "fused"])
def test_non_square_crop_box_scales_x_and_y_apart(rng, method):
    """A non-square crop box (RootNet's are not always square) is warped with separate x and y
    scales: upstream's three-point map (centre, centre + half the width, centre + half the height
    -> the crop's centre, right and bottom edge midpoints), through cv2.getAffineTransform."""
    import cv2

    from cnpose_trt.ops.arrays import compiled

    if method == "fused" and compiled() is None:
        pytest.skip("the fused crop needs the compiled extension")
    img = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    boxes = np.array([[20.5, 10.0, 60.0, 100.0], [-10.0, 30.0, 150.0, 40.0]])
    size = 64
    for box, m in zip(boxes, crop_matrices(boxes, size), strict=True):
        x, y, w, h = box
        c = np.array([x + w / 2, y + h / 2])
        src = np.float32([c, c + [w / 2, 0], c + [0, h / 2]])
        dst = np.float32([[size / 2, size / 2], [size, size / 2], [size / 2, size]])
        ref = cv2.getAffineTransform(src, dst)
        np.testing.assert_allclose(m, ref, rtol=1e-5, atol=1e-4)
        assert not np.isclose(m[0, 0], m[1, 1])  # the two scales differ
    crops = crop_people(img, boxes, size, method=method)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for p, box in enumerate(boxes):
        x, y, w, h = box
        ref = np.array([[size / w, 0, -size / w * x], [0, size / h, -size / h * y]])
        want = cv2.warpAffine(img, ref, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        want = ((want - mean) / std).transpose(2, 0, 1)
        # the same cv2 warp: equal up to float32 arithmetic; the fused kernel rounds ties apart (one grey level)
        tol = 1e-4 if method == "opencv" else 1.01 / 0.224
        np.testing.assert_allclose(crops[p], want, atol=tol)
        assert np.abs(crops[p] - want).mean() < (1e-4 if method == "opencv" else 0.05)


def test_crop_boxes_checks():
    ok = check_crop_boxes([[10, 10, 50, 80], [-20, -20, 25, 25]], (640, 480))
    assert ok.shape == (2, 4)
    for box, message in [([0, 0, 1e12, 1e12], "crop_boxes\\[1\\] .* beyond \\+-2\\^30 px"),
                         ([0, 0, 1e-300, 100], "crop_boxes\\[1\\] .* too small"),
                         ([0, 0, 100, 0], "crop_boxes\\[1\\] .* is empty"),
                         ([-1e6, -1e6, 10, 10], "crop_boxes\\[1\\] = \\[-1000000.0, -1000000.0, 10.0, 10.0\\] " + _OUTSIDE),
                         ([640, 0, 10, 10], "crop_boxes\\[1\\] .* " + _OUTSIDE),
                         ([0, -10, 10, 10], "crop_boxes\\[1\\] .* " + _OUTSIDE)]:
        with pytest.raises(ValueError, match=message):
            check_crop_boxes([[10, 10, 50, 80], box], (640, 480))
    check_crop_boxes([[-1e6, -1e6, 10, 10]])  # no image size: no image to be outside of
    check_inside(np.array([[639.9, 479.9, 0.2, 0.2], [-9, -9, 9.5, 9.5]]), (640, 480))  # a sliver inside


def test_root_depth_and_intrinsics_checks():
    check_root_depth(np.array([1.0, 1e9]))
    check_root_depth(np.array([0.0]), zero=True)
    for bad in ([0.0], [-5.0], [1e300], [np.nan], [np.inf]):
        with pytest.raises(ValueError, match="root_depth must be > 0 and at most 1e\\+09 mm"):
            check_root_depth(np.array(bad))
    with pytest.raises(ValueError, match="root_depth must be >= 0"):
        check_root_depth(np.array([-5.0]), zero=True)
    check_intrinsics(np.array([1500.0, 1500.0, -320.0, 240.0]))
    for bad in ([1e300, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1e10, 0.0], [1.0, np.nan, 0.0, 0.0]):
        with pytest.raises(ValueError, match="intrinsics must be fx, fy, cx, cy"):
            check_intrinsics(np.array([[1.0, 1.0, 0.0, 0.0], bad]))


def test_cells_to_image_round_trip_through_crop():
    boxes = np.array([[-20.0, 30.0, 200.0, 200.0], [5.0, 5.0, 64.0, 64.0]])
    cells = np.array([[[0.0, 0.0, 0.0], [31.0, 16.0, 63.0]], [[10.5, 3.25, 32.0], [63.0, 63.0, 16.0]]])
    img = cells_to_image(cells, boxes, (64, 64), 64, root_depth=[5000.0, 3000.0])
    m = crop_matrices(boxes, 256)
    crop_px = np.einsum("pij,pkj->pki", m, np.concatenate([img[..., :2], np.ones((2, 2, 1))], -1))
    np.testing.assert_allclose(crop_px, cells[..., :2] / 64 * 256, atol=1e-9)
    np.testing.assert_allclose(img[0, 0, 2], 5000 - 1000)
    np.testing.assert_allclose(img[0, 1, 2], (63 / 64 * 2 - 1) * 1000 + 5000)
    np.testing.assert_allclose(img[1, 0, 2], 3000)
    rel = cells_to_image(cells, boxes, (64, 64), 64)
    np.testing.assert_allclose(rel[..., 2], img[..., 2] - [[5000], [3000]])


def test_camera_coordinates():
    img = np.array([[[700.0, 300.0, 4000.0], [500.0, 100.0, 2000.0]]])
    cam = image_to_camera(img, [1000.0, 1200.0, 500.0, 400.0])
    np.testing.assert_allclose(cam[0, 0], [(700 - 500) / 1000 * 4000, (300 - 400) / 1200 * 4000, 4000])
    np.testing.assert_allclose(cam[0, 1], [0.0, (100 - 400) / 1200 * 2000, 2000])
    with pytest.raises(ValueError, match="focal lengths"):
        image_to_camera(img, [0.0, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="intrinsics must have shape \\(1, 4\\)"):
        image_to_camera(img, [1.0, 1.0, 0.0])


def test_flip_back(rng):
    coords = rng.uniform(0, 31, (3, 18, 3))
    back = flip_back(coords, 32)
    perm = flip_permutation(18)
    assert sorted(perm) == list(range(18)) and (perm[perm] == np.arange(18)).all()
    for a, b in FLIP_PAIRS:
        np.testing.assert_allclose(back[:, a, 0], 31 - coords[:, b, 0])
        np.testing.assert_allclose(back[:, a, 1:], coords[:, b, 1:])
    np.testing.assert_allclose(back[:, 0, 0], 31 - coords[:, 0, 0])
    np.testing.assert_allclose(flip_back(back, 32), coords)
    with pytest.raises(ValueError, match="flip_pairs must index joints 0..4"):
        flip_permutation(5)


def test_image_checks(tmp_path):
    with pytest.raises(ValueError, match="\\(H, W, 3\\)"):
        check_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(TypeError, match="uint8 or float"):
        check_image(np.zeros((10, 10, 3), np.int64))
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        load_image(tmp_path / "fake.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="not an image file"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    grey = np.full((50, 40, 3), 100.0, np.float32)
    x, boxes = prepare(grey, [[10, 10, 20, 30]])
    assert x.shape == (1, 3, 256, 256) and x.dtype == np.float32 and x.flags.c_contiguous
    # upstream: (pixel - mean) / std on 0..255 values, no scaling to [0, 1]
    np.testing.assert_allclose(x[0, :, 128, 128], [99.515 / 0.229, 99.544 / 0.224, 99.594 / 0.225], rtol=1e-6)
    for bad, message in [(np.full((8, 8, 3), 0.5, np.float32), "looks scaled to 0..1"),
                         (np.full((8, 8, 3), 300.0), "in 0..255"), (np.full((8, 8, 3), -1.0), "in 0..255"),
                         (np.full((8, 8, 3), np.nan, np.float32), "finite")]:
        with pytest.raises(ValueError, match=message):
            check_image(bad)
    check_image(np.zeros((8, 8, 3), np.float32))  # black is fine


def test_huge_images_crop_by_region(rng, monkeypatch):
    """Over 2^31 bytes OpenCV's warp crashes: only the region a crop reads is warped (issue 10, item 8)."""
    import cnpose_trt.io.preprocess as pre

    img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    boxes = [[-50, -30, 120, 200], [100, 80, 150, 100], [350, 250, 80, 80], [5, 5, 390, 290]]
    whole, crop_boxes = prepare(img, boxes, flip=True)
    monkeypatch.setattr(pre, "_REGION_BYTES", 1000)
    regional, _ = prepare(img, boxes, flip=True)
    # the shifted affine map may round OpenCV's 1/32 px sample grid differently: within one grey level
    np.testing.assert_allclose(regional, whole, atol=1 / 0.224)
    assert np.mean(regional == whole) > 0.99
    outside = pre.crop_people(img, np.array([[1000.0, 1000.0, 50.0, 50.0]]))
    np.testing.assert_allclose(outside[0, :, 10, 10], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
    monkeypatch.undo()
    big = np.zeros((27000, 27000, 3), np.uint8)  # 2.2 GB, mostly never touched (zero pages)
    big[26000:26500, 100:400] = 200
    x, _ = prepare(big, [[100, 26000, 300, 500]])
    np.testing.assert_allclose(x[0, :, 128, 128], [199.515 / 0.229, 199.544 / 0.224, 199.594 / 0.225], rtol=1e-6)

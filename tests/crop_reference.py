"""The crop tests' float64 reference (tests/test_crop.py, tests/test_crop_cuda.py): written from
the contract in csrc/crop/crop.h, independently of the kernels and of OpenCV."""

import numpy as np

from cnpose_trt.spec import PIXEL_MEAN, PIXEL_STD

MEAN = np.asarray(PIXEL_MEAN, np.float64)
STD = np.asarray(PIXEL_STD, np.float64)


def reference(image, m, size, flip=False, round_pixels=False):
    """float64 (3, S, S) network input; round_pixels rounds the grey values first (half to even)."""
    val = reference_values(image, m, size, flip)
    return ((np.rint(val) if round_pixels else val) - MEAN[:, None, None]) / STD[:, None, None]


def reference_values(image, m, size, flip=False):
    """float64 (3, S, S) grey values: bilinear sample at M^-1 (u', v), black outside."""
    inv = np.linalg.inv(np.vstack([np.asarray(m, np.float64), [0, 0, 1]]))[:2]
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    if flip:
        u = size - 1 - u
    x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    y = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    h, w = image.shape[:2]
    val = np.zeros((size, size, 3))
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            tap = np.zeros((size, size, 3))
            tap[ok] = image[yy[ok].astype(np.int64), xx[ok].astype(np.int64)]
            val += (wy * wx)[..., None] * tap
    return val.transpose(2, 0, 1)


def box_affine(x, y, side_w, side_h, size):
    """image px -> crop px for a crop box (x, y, w, h), as geometry.crop_matrices builds it."""
    return np.array([[size / side_w, 0, -size / side_w * x], [0, size / side_h, -size / side_h * y]])


def random_affine(rng, h, w, size, general):
    cx, cy = rng.uniform(-0.5 * w, 1.5 * w), rng.uniform(-0.5 * h, 1.5 * h)
    side = float(np.exp(rng.uniform(np.log(0.3), np.log(3 * max(h, w) + 1))))
    m = box_affine(cx - side / 2, cy - side / 2, side, side * rng.uniform(0.5, 2), size)
    if general:  # rotation and shear about the crop centre
        a = rng.uniform(-np.pi, np.pi)
        r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1, rng.uniform(-0.5, 0.5)], [0, 1]])
        c = (size - 1) / 2
        m = np.vstack([np.column_stack([r, [c, c] - r @ [c, c]]), [0, 0, 1]]) @ np.vstack([m, [0, 0, 1]])
        m = m[:2]
    return m

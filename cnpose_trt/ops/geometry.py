"""Boxes, crops and coordinate frames: heatmap cells -> image px, depth mm, camera mm.

All functions are vectorised over the leading (person) axis and work in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..spec import BBOX_3D_DEPTH_MM, BOX_SCALE, FLIP_PAIRS

# Crop boxes must lie within this many px of the image origin: the crop kernel's limit
# (csrc/crop/crop.h kMaxCropCoord), far beyond any image.
MAX_CROP_COORD = 2.0**30
# A crop box narrower or lower than this samples one point of the image, not a crop of it (and
# 1e-300 becomes 0 in the float32 decode).
MIN_CROP_SIDE = 1e-3
# Root depths and intrinsics beyond these are no camera's (1,000 km; a 10^9 px focal length or
# principal point): refused, as larger ones overflow the float32 decode into inf.
MAX_ROOT_DEPTH_MM = 1e9
MAX_INTRINSICS_PX = 1e9
MIN_FOCAL_PX = 1e-3


def as_array(name: str, value: object, shape_tail: tuple[int, ...], n: int | None = None) -> np.ndarray:
    """float64 array of shape (n, *shape_tail) with finite values, or a ValueError naming `name`.

    An empty sequence is (0, *shape_tail): zero people is a valid input.
    """
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer past float64's range
        raise TypeError(f"{name} must be numeric, got {type(value).__name__}") from None
    if arr.size == 0 and arr.ndim <= 1 and shape_tail and (n is None or n == 0):
        arr = arr.reshape((0, *shape_tail))
    if arr.ndim == len(shape_tail):
        arr = arr[None]
    want = ("N" if n is None else str(n),) + tuple(map(str, shape_tail))
    if arr.ndim != len(shape_tail) + 1 or arr.shape[1:] != shape_tail or (n is not None and arr.shape[0] != n):
        raise ValueError(f"{name} must have shape ({', '.join(want)}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def per_person(name: str, value: object, p: int, tail: tuple[int, ...]) -> np.ndarray | None:
    """float64 (p, *tail) per-person values from one value for all (shape tail) or one per person;
    None stays None. Raises as as_array does, naming `name`."""
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer past float64's range
        raise TypeError(f"{name} must be numeric, got {type(value).__name__}") from None
    if arr.shape == tail:
        arr = np.broadcast_to(arr, (p, *tail))
    return as_array(name, arr, tail, p)


def check_root_depth(root_depth: np.ndarray | None, zero: bool = False) -> None:
    """Refuse a root depth that is no depth: each must be > 0 (>= 0 with zero: decode's
    root-relative placeholder) and at most MAX_ROOT_DEPTH_MM; NaN and inf fail too.

    Raises:
        ValueError: naming root_depth and the values.
    """
    if root_depth is None:
        return
    r = np.asarray(root_depth, np.float64)
    ok = ((r >= 0) if zero else (r > 0)) & (r <= MAX_ROOT_DEPTH_MM)
    if not ok.all():
        low = ">= 0 (0: root-relative)" if zero else "> 0"
        raise ValueError(f"root_depth must be {low} and at most {MAX_ROOT_DEPTH_MM:g} mm (the pelvis' depth in "
                         f"front of the camera), got {r.tolist()}")


def check_intrinsics(intrinsics: np.ndarray | None) -> None:
    """Refuse intrinsics fx, fy, cx, cy (..., 4) that are no camera's: fx, fy must be at least
    MIN_FOCAL_PX and every value at most MAX_INTRINSICS_PX in size; NaN and inf fail too.

    Raises:
        ValueError: naming intrinsics and the values.
    """
    if intrinsics is None:
        return
    k = np.asarray(intrinsics, np.float64)
    if k.shape[-1:] != (4,):
        return  # the shape is refused where it is used, naming what is wanted
    k = k.reshape(-1, 4)
    ok = (np.abs(k) <= MAX_INTRINSICS_PX).all(axis=1) & (k[:, :2] >= MIN_FOCAL_PX).all(axis=1)
    if not ok.all():
        raise ValueError(f"intrinsics must be fx, fy, cx, cy in px with fx, fy >= {MIN_FOCAL_PX:g} (focal lengths "
                         f"> 0) and every value at most {MAX_INTRINSICS_PX:g} in size, got {k[~ok][0].tolist()}")


def check_inside(boxes: np.ndarray, image_size: tuple[int, int], name: str = "boxes", first: int = 0) -> None:
    """Refuse a box wholly outside the image: one whose rectangle x..x+w, y..y+h shares no area
    with the image's 0..W, 0..H (touching an edge, or lying past it, is outside). The one rule for
    person boxes, crop boxes and RootNet boxes, in the API, `batch`, `predict` and `eval`.

    Args:
        boxes: (P, 4) finite x, y, w, h with w, h > 0.
        image_size: (width, height) of the image.
        name: the argument named in the message ("boxes", "crop_boxes").
        first: the index of boxes[0] in that argument.
    Raises:
        ValueError: naming the first such box as name[first + i].
    """
    width, height = float(image_size[0]), float(image_size[1])
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    # x + w computed as x >= -w: no overflow for huge values
    out = (b[:, 0] >= width) | (b[:, 1] >= height) | (b[:, 0] <= -b[:, 2]) | (b[:, 1] <= -b[:, 3])
    bad = np.flatnonzero(out)
    if len(bad):
        i = int(bad[0])
        w, h = image_size
        raise ValueError(f"{name}[{first + i}] = {b[i].tolist()} lies outside the {w}x{h} image (no area "
                         "in common with it): no person to estimate")


def process_boxes(boxes: object, image_size: tuple[int, int]) -> np.ndarray:
    """Person boxes (P, 4) as x, y, w, h -> the crop boxes the network sees (upstream process_bbox).

    Exactly upstream's rule, in float64: x1 = max(0, x), x2 = min(W - 1, x1 + max(0, w - 1)) (y the
    same), so the width is inclusive and a box crossing the left or top edge is shifted into the
    image, not clipped; then the shorter side grows to a square around the centre and both sides
    are scaled by 1.25. The result may extend past the image (the crop pads with black). Boxes that
    already went through this rule (e.g. RootNet's) must be passed as crop boxes instead
    (check_crop_boxes), or they are enlarged twice.

    Args:
        boxes: (P, 4) or (4,) x, y, w, h in pixels; P may be 0.
        image_size: (width, height) of the image.
    Returns:
        (P, 4) float64 crop boxes x, y, w, h.
    Raises:
        ValueError: an empty box, one wholly outside the image (check_inside: upstream would shift
            one left of or above the image into it), one that upstream rejects (it lies right of
            or below the image), one that collapses to a point, or bad shapes.
    """
    width, height = image_size
    b = as_array("boxes", boxes, (4,))
    right, bottom = float(width - 1.0), float(height - 1.0)  # float64 whatever type the size has
    out = np.empty((len(b), 4))
    # Row by row in Python floats: the same float64 arithmetic as NumPy's, several times faster
    # for the few boxes of one image (the GPU path runs this once per image).
    for i, (x, y, bw, bh) in enumerate(b.tolist()):
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2 = min(right, x1 + max(0.0, bw - 1))
        y2 = min(bottom, y1 + max(0.0, bh - 1))
        w, h = x2 - x1, y2 - y1
        if bw <= 0 or bh <= 0:
            raise ValueError(f"boxes[{i}] is empty: width and height must be > 0, got {b[i].tolist()}")
        check_inside(b[i:i + 1], image_size, "boxes", first=i)
        if x2 < x1 or y2 < y1:
            raise ValueError(f"boxes[{i}] = {b[i].tolist()} lies outside the {width}x{height} image")
        if w <= 0 and h <= 0:
            raise ValueError(f"boxes[{i}] = {b[i].tolist()} covers at most one pixel of the {width}x{height} image "
                             "(upstream's inclusive width makes it a point): nothing to crop")
        side = max(w, h) * BOX_SCALE  # input aspect 1:1: the shorter side grows to the longer one
        out[i] = (x1 + w / 2 - side / 2, y1 + h / 2 - side / 2, side, side)
    return out


def check_crop_boxes(crop_boxes: object, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Crop boxes (P, 4) x, y, w, h that already went through process_boxes, used as they are.

    Upstream's Human3.6M test feeds RootNet's output boxes this way. Any size from MIN_CROP_SIDE
    px up is allowed (a non-square box is warped with separate x and y scales, as upstream does),
    within MAX_CROP_COORD px of the origin (the crop kernel's reach).

    Args:
        crop_boxes: (P, 4) or (4,).
        image_size: (width, height): a box wholly outside the image is refused (check_inside).
    Raises:
        ValueError: bad shapes, non-finite values, a width or height <= 0 or below MIN_CROP_SIDE,
            a box reaching past MAX_CROP_COORD, or one wholly outside the image; naming
            crop_boxes[i].
    """
    b = as_array("crop_boxes", crop_boxes, (4,))
    for i, (x, y, w, h) in enumerate(b.tolist()):
        if w <= 0 or h <= 0:
            raise ValueError(f"crop_boxes[{i}] = {b[i].tolist()} is empty: width and height must be > 0")
        if w < MIN_CROP_SIDE or h < MIN_CROP_SIDE:
            raise ValueError(f"crop_boxes[{i}] = {b[i].tolist()} is too small: width and height must be at least "
                             f"{MIN_CROP_SIDE} px")
        if max(abs(x), abs(y), abs(x + w), abs(y + h)) > MAX_CROP_COORD:
            raise ValueError(f"crop_boxes[{i}] = {b[i].tolist()} reaches beyond +-2^30 px of the image origin: "
                             "not a crop of an image")
    if image_size is not None:
        check_inside(b, image_size, "crop_boxes")
    return b


def crop_matrices(crop_boxes: np.ndarray, size: int) -> np.ndarray:
    """(P, 2, 3) affine maps image px -> crop px for crop boxes (P, 4), upstream's to the last bit.

    Upstream (generate_patch_image -> gen_trans_from_patch_cv) solves cv2.getAffineTransform from
    float32 points: the box centre, centre + half the width, centre + half the height. So the centre
    and the half-sizes are rounded to float32 first, and the map is solved from those in float64.
    That moves the map by up to about 4e-5 px from the float64 one, enough to flip OpenCV's 1/32-px
    sample rounding in a few pixels of a fractional box (tests/test_rootnet_golden.py: bit-exact
    crops). Where float32 cannot hold a box (a side below float32's spacing at its coordinates, far
    outside any image) the float64 map is used instead of upstream's division by zero.
    """
    b = np.asarray(crop_boxes, np.float64).reshape(-1, 4)
    centre = (b[:, :2] + 0.5 * b[:, 2:]).astype(np.float32)
    half = (0.5 * b[:, 2:]).astype(np.float32)
    reach = (centre + half).astype(np.float64) - centre  # float32 sums, as upstream's src points
    exact = size / b[:, 2:]
    usable = (reach > 0) & (np.abs(reach - 0.5 * b[:, 2:]) <= 1e-3 * b[:, 2:])
    scale = np.where(usable, (size * 0.5) / np.where(usable, reach, 1.0), exact)
    origin = np.where(usable, centre.astype(np.float64), b[:, :2] + 0.5 * b[:, 2:])
    m = np.zeros((len(b), 2, 3), np.float64)
    m[:, 0, 0], m[:, 1, 1] = scale[:, 0], scale[:, 1]
    m[:, 0, 2] = size * 0.5 - scale[:, 0] * origin[:, 0]
    m[:, 1, 2] = size * 0.5 - scale[:, 1] * origin[:, 1]
    return m


def cells_to_image(coords: np.ndarray, crop_boxes: np.ndarray, heatmap_hw: tuple[int, int], depth_dim: int,
                   root_depth: object = None, depth_range_mm: float = BBOX_3D_DEPTH_MM) -> np.ndarray:
    """(P, J, 3) cells -> (P, J, 3) as x_px, y_px, depth_mm.

    x_px = x / W * box_w + box_x;  z_mm = (z / D * 2 - 1) * 1000 + root_depth  (root-relative
    when root_depth is None).
    """
    h, w = heatmap_hw
    p = coords.shape[0]
    root = np.zeros(p) if root_depth is None else as_array("root_depth", root_depth, (), p)
    out = np.empty(coords.shape, np.float64)
    out[..., 0] = coords[..., 0] / w * crop_boxes[:, None, 2] + crop_boxes[:, None, 0]
    out[..., 1] = coords[..., 1] / h * crop_boxes[:, None, 3] + crop_boxes[:, None, 1]
    out[..., 2] = (coords[..., 2] / depth_dim * 2 - 1) * (depth_range_mm / 2) + root[:, None]
    return out


def image_to_camera(image_mm: np.ndarray, intrinsics: object) -> np.ndarray:
    """(P, J, 3) x_px, y_px, depth_mm with intrinsics (P, 4) fx, fy, cx, cy -> camera mm."""
    k = as_array("intrinsics", intrinsics, (4,), image_mm.shape[0])
    if (k[:, :2] <= 0).any():
        raise ValueError(f"intrinsics focal lengths (fx, fy) must be > 0, got {k[:, :2].tolist()}")
    z = image_mm[..., 2]
    out = np.empty(image_mm.shape, np.float64)
    out[..., 0] = (image_mm[..., 0] - k[:, None, 2]) / k[:, None, 0] * z
    out[..., 1] = (image_mm[..., 1] - k[:, None, 3]) / k[:, None, 1] * z
    out[..., 2] = z
    return out


def flip_permutation(joints: int, flip_pairs: Sequence[tuple[int, int]] = FLIP_PAIRS) -> np.ndarray:
    """Index array that swaps left and right joints: values[:, perm] mirrors a pose's labels."""
    perm = np.arange(joints)
    for a, b in flip_pairs:
        if not (0 <= a < joints and 0 <= b < joints):
            raise ValueError(f"flip_pairs must index joints 0..{joints - 1}, got ({a}, {b})")
        perm[a], perm[b] = b, a
    return perm


def flip_back(coords: np.ndarray, heatmap_width: int,
              flip_pairs: Sequence[tuple[int, int]] = FLIP_PAIRS) -> np.ndarray:
    """(P, J, 3) coordinates decoded from horizontally flipped crops -> the unflipped frame.

    x -> W - 1 - x, then left and right joints swap.
    """
    out = np.asarray(coords, dtype=np.float64)[:, flip_permutation(coords.shape[1], flip_pairs)]
    out[..., 0] = heatmap_width - 1 - out[..., 0]
    return out

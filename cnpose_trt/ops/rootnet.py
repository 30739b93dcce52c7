"""RootNet's host-side math in float64: k from the processed box and the camera, and the network's
(x, y, gamma) -> root in image px and depth mm -> camera mm. No torch: the runtime runs it.

Upstream (mks0601/3DMPPE_ROOTNET_RELEASE, demo/demo.py and the datasets' evaluate()):
    k = sqrt(bbox_real_x * bbox_real_y * fx * fy / (w * h)), (x0, y0, w, h) = process_bbox(box)
    depth = gamma * k;  x_img = x / 64 * w + x0;  y_img = y / 64 * h + y0
    X = (x_img - cx) / fx * depth, Y = (y_img - cy) / fy * depth  (pixel2cam)
upstream computes k in float64 and rounds it to float32 before the multiplication inside the network;
here the engine returns gamma and everything after it stays float64 (nn/rootnet.py says why).
"""

from __future__ import annotations

import numpy as np

from ..spec import ROOTNET, RootNetSpec
from .geometry import as_array, check_intrinsics, image_to_camera, per_person


def k_values(crop_boxes: object, intrinsics: object, spec: RootNetSpec = ROOTNET) -> np.ndarray:
    """RootNet's k per person: sqrt(bbox_real_x * bbox_real_y * fx * fy / (w * h)), float64.

    Args:
        crop_boxes: (P, 4) x, y, w, h: the PROCESSED boxes (geometry.process_boxes: clipped, squared,
            x1.25), not the person boxes; w, h > 0.
        intrinsics: (4,) fx, fy, cx, cy for every person, or (P, 4); only fx, fy enter k.
        spec: bbox_real_mm (2000 x 2000 mm for the Human3.6M / MuCo / MuPoTS weights).
    Returns:
        (P,) float64; depth mm = gamma * k.
    Raises:
        ValueError: bad shapes, non-finite values, a box side <= 0, intrinsics that are no camera's.
    """
    boxes = as_array("crop_boxes", crop_boxes, (4,))
    cam = _per_person_intrinsics(intrinsics, len(boxes))
    empty = (boxes[:, 2:] <= 0).any(axis=1)
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise ValueError(f"crop_boxes[{i}] = {boxes[i].tolist()} is empty: width and height must be > 0")
    real_x, real_y = spec.bbox_real_mm
    return np.sqrt(real_x * real_y * cam[:, 0] * cam[:, 1] / (boxes[:, 2] * boxes[:, 3]))


def roots_to_image(raw: object, crop_boxes: object, k: object, spec: RootNetSpec = ROOTNET) -> np.ndarray:
    """The network's (P, 3) x, y (output cells), gamma -> (P, 3) x px, y px in the image, depth mm.

    x_img = x / output_size * w + x0 (y alike), with (x0, y0, w, h) the crop box the network saw;
    depth = gamma * k (k_values of the same boxes).

    Raises:
        ValueError: shapes that disagree, non-finite values.
    """
    out = as_array("roots", raw, (3,))
    boxes = as_array("crop_boxes", crop_boxes, (4,), len(out))
    kk = as_array("k", k, (), len(out))
    size = spec.output_size
    img = np.empty_like(out)
    img[:, 0] = out[:, 0] / size * boxes[:, 2] + boxes[:, 0]
    img[:, 1] = out[:, 1] / size * boxes[:, 3] + boxes[:, 1]
    img[:, 2] = out[:, 2] * kk
    return img


def roots_to_camera(roots_image: object, intrinsics: object) -> np.ndarray:
    """(P, 3) x px, y px, depth mm -> (P, 3) camera X, Y, Z mm (pixel2cam), intrinsics (4,) or (P, 4)."""
    img = as_array("roots_image", roots_image, (3,))
    return image_to_camera(img[:, None], _per_person_intrinsics(intrinsics, len(img)))[:, 0]



def prior_roots(crop_boxes: object, intrinsics: object, spec: RootNetSpec = ROOTNET) -> np.ndarray:
    """Roots without RootNet weights: (P, 3) x px, y px at each processed box's centre, depth = k * 1.

    RootNet's depth is gamma * k, k the depth at which a bbox_real_mm-sized person fills the box;
    gamma = 1 takes that literally (a person's processed box is bbox_real_mm wide at depth k). It is
    a prior, not a measurement: its error is the spread of people's heights and poses (README,
    "Root depth prior", states it as measured on synthetic people). Same arguments as k_values.
    """
    boxes = as_array("crop_boxes", crop_boxes, (4,))
    roots = np.empty((len(boxes), 3))
    roots[:, 0] = boxes[:, 0] + boxes[:, 2] / 2
    roots[:, 1] = boxes[:, 1] + boxes[:, 3] / 2
    roots[:, 2] = k_values(boxes, intrinsics, spec)
    return roots


def _per_person_intrinsics(intrinsics: object, p: int) -> np.ndarray:
    cam = per_person("intrinsics", intrinsics, p, (4,))
    check_intrinsics(cam)
    return cam

"""One image, several people: crop -> engine -> heatmaps -> decode -> image px, mm, camera mm."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .decoding import decode
from .engine import Engine
from .geometry import as_array
from .preprocess import check_image, prepare
from .spec import JOINT_NAMES


@dataclasses.dataclass
class PoseResult:
    """Poses of P people. Shapes: crop_boxes (P, 4); cells, image (P, J, 3); confidence (P, J).

    image holds x_px, y_px, depth_mm (root-relative when no root depth was given); camera holds
    X, Y, Z in mm (camera frame) when intrinsics and root depth were given, else None.
    """

    boxes: np.ndarray
    crop_boxes: np.ndarray
    cells: np.ndarray
    confidence: np.ndarray
    image: np.ndarray
    camera: np.ndarray | None
    root_relative: bool
    joint_names: tuple[str, ...] = JOINT_NAMES

    def __len__(self) -> int:
        return len(self.cells)

    def to_dict(self) -> list[dict[str, Any]]:
        """JSON-ready list, one entry per person, joints by name."""
        people = []
        for p in range(len(self)):
            joints = {}
            for j, name in enumerate(self.joint_names):
                entry = {"x_px": float(self.image[p, j, 0]), "y_px": float(self.image[p, j, 1]),
                         "depth_mm": float(self.image[p, j, 2]), "confidence": float(self.confidence[p, j])}
                if self.camera is not None:
                    entry["camera_mm"] = [float(v) for v in self.camera[p, j]]
                joints[name] = entry
            people.append({"bbox": [float(v) for v in self.boxes[p]],
                           "crop_box": [float(v) for v in self.crop_boxes[p]],
                           "depth": "root-relative" if self.root_relative else "absolute",
                           "joints": joints})
        return people


def estimate(engine: Engine, image: np.ndarray, boxes: Any, *, root_depth: Any = None,
             intrinsics: Any = None, flip: bool = False) -> PoseResult:
    """3D poses of the people in one image.

    Args:
        engine: from load_engine.
        image: (H, W, 3) RGB, uint8 or float 0..255.
        boxes: (P, 4) or (4,) person boxes x, y, w, h in pixels.
        root_depth: camera-space depth of each person's pelvis in mm, scalar or (P,); without it
            depths are root-relative.
        intrinsics: fx, fy, cx, cy as (4,) or (P, 4); needs root_depth.
        flip: average with the horizontally flipped crop (flip test).
    Raises:
        ValueError: bad boxes (empty, outside the image), intrinsics without root_depth, shapes.
    """
    image = check_image(image)
    spec = engine.spec
    inputs, crop_boxes = prepare(image, boxes, spec.input_size)
    p = len(crop_boxes)
    if intrinsics is not None and root_depth is None:
        raise ValueError("intrinsics need root_depth: camera coordinates require the absolute depth of the root")
    if flip:
        inputs = np.concatenate([inputs, inputs[:, :, :, ::-1]])
    heatmaps = engine.infer(np.ascontiguousarray(inputs))
    res = decode(heatmaps[:p], spec.joints, spec.depth_dim, boxes=crop_boxes,
                 root_depth=root_depth, intrinsics=intrinsics,
                 flipped=heatmaps[p:] if flip else None)
    cells = res.cells.astype(np.float64)
    conf = res.confidence.astype(np.float64)
    img = res.image.astype(np.float64)
    cam = None if intrinsics is None else res.camera.astype(np.float64)
    return PoseResult(as_array("boxes", boxes, (4,)), crop_boxes, cells, conf, img, cam, root_depth is None)


"""Image -> network input: crop each person box, warp to S x S, normalise, CHW float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .geometry import crop_matrices, process_boxes
from .spec import INPUT_SIZE, PIXEL_MEAN, PIXEL_STD

_MEAN = np.asarray(PIXEL_MEAN, np.float32) * 255.0
_INV_STD = 1.0 / (np.asarray(PIXEL_STD, np.float32) * 255.0)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an image OpenCV can decode.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise ValueError(f"image {path} is not an image file OpenCV can decode (png, jpg, bmp, ...)")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def check_image(image: object) -> np.ndarray:
    """(H, W, 3) uint8 or float RGB with values in 0..255."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array (H, W, 3) RGB, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3) RGB, got {image.shape}")
    if image.dtype != np.uint8 and image.dtype.kind != "f":
        raise TypeError(f"image must be uint8 or float (0..255), got {image.dtype}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    return image


def crop_people(image: np.ndarray, crop_boxes: np.ndarray, size: int = INPUT_SIZE,
                flip: bool = False) -> np.ndarray:
    """Square crop boxes (P, 4) -> normalised network input (P, 3, size, size) float32.

    With flip, each crop is mirrored horizontally (the flip test's second pass).
    """
    import cv2

    image = check_image(image)
    if image.dtype != np.uint8 and image.dtype != np.float32:
        image = image.astype(np.float32)
    mats = crop_matrices(crop_boxes, size)
    crops = np.empty((len(crop_boxes), size, size, 3), np.float32)
    for i, m in enumerate(mats):
        crop = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        crops[i] = crop[:, ::-1] if flip else crop
    crops -= _MEAN
    crops *= _INV_STD
    return np.ascontiguousarray(crops.transpose(0, 3, 1, 2))


def prepare(image: np.ndarray, boxes: object, size: int = INPUT_SIZE, flip: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
    """(network input (P, 3, S, S) float32, square crop boxes (P, 4)) for person boxes (P, 4)."""
    image = check_image(image)
    crop_boxes = process_boxes(boxes, (image.shape[1], image.shape[0]))
    return crop_people(image, crop_boxes, size, flip), crop_boxes

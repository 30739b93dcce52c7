"""Image -> network input: crop each person box, warp to S x S, normalise, CHW float32.

The conventions are upstream's, to the pixel (proven against its output by tests/test_golden.py):
boxes go through process_bbox (geometry.process_boxes), the crop is cv2.warpAffine (bilinear,
border 0) of the RGB image, and the network sees (pixel - mean) / std on 0..255 values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..ops.arrays import compiled
from ..ops.cropping import check_image, crop_normalize
from ..ops.geometry import check_crop_boxes, crop_matrices, process_boxes
from ..spec import INPUT_SIZE, PIXEL_MEAN, PIXEL_STD
from .imageio_guard import check_image_file

# Applied to 0..255 values as they are (spec.PIXEL_MEAN's comment says why); float32 like upstream.
_MEAN = np.asarray(PIXEL_MEAN, np.float32)
_STD = np.asarray(PIXEL_STD, np.float32)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) RGB pixel values in 0..255 -> the network's input values, float32.

    (pixel - mean) / std per channel without scaling to [0, 1] first: what the official weights
    were trained on.
    """
    return (np.asarray(pixels, np.float32) - _MEAN) / _STD


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an image OpenCV can decode, or its header claims more pixels
            than imageio_guard.MAX_IMAGE_PIXELS (an image bomb is refused before decoding).
    """
    return decode_image(read_image_file(path), path)


def read_image_file(path: str | Path) -> np.ndarray:
    """An image file's bytes, after checking that it exists and that its header is no image bomb."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    check_image_file(path)
    return np.fromfile(path, dtype=np.uint8)


def decode_image(data: np.ndarray, path: str | Path) -> np.ndarray:
    """An image file's bytes (read_image_file) as (H, W, 3) uint8 RGB, decoded by OpenCV; errors name `path`."""
    import cv2

    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV 4.10+: decodes to RGB, no extra copy
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR if rgb_flag is None else rgb_flag) if data.size else None
    except cv2.error as exc:  # OpenCV's own limits and damaged headers
        raise ValueError(f"image {path} cannot be decoded: {str(exc).strip().splitlines()[-1][:200]}") from None
    if image is None:
        raise ValueError(f"image {path} is not an image file OpenCV can decode (png, jpg, bmp, ...)")
    return image if rgb_flag is not None else np.ascontiguousarray(image[:, :, ::-1])


CROP_METHODS = ("auto", "opencv", "fused")


def crop_people(image: np.ndarray, crop_boxes: np.ndarray, size: int = INPUT_SIZE,
                flip: bool = False, method: str = "opencv", threads: int | None = None) -> np.ndarray:
    """Crop boxes (P, 4) -> normalised network input (P, 3, size, size) float32.

    With flip, each crop is mirrored horizontally (the flip test's second pass).

    Args:
        method: "opencv" (cv2.warpAffine + NumPy: upstream's exact crops), "fused" (the compiled
            crop-and-normalise kernel, one pass, rounding samples to grey levels as cv2 does:
            equal to OpenCV's crops but for rare rounding ties), or "auto" (fused for uint8
            images where the extension is built, else opencv).
        threads: the fused kernel's threads (None: all cores).
    """
    import cv2

    image = check_image(image)
    if method not in CROP_METHODS:
        raise ValueError(f"method must be one of {', '.join(CROP_METHODS)}, got {method!r}")
    if method != "opencv" and image.dtype == np.uint8 and len(crop_boxes) and compiled() is not None:
        return crop_normalize(image, None, crop_matrices(crop_boxes, size), size, flip=flip, threads=threads,
                              round_pixels=True)
    if method == "fused" and compiled() is None:
        raise ValueError("method 'fused' needs the compiled extension (cnpose_trt._C); use 'opencv' or 'auto'")
    if image.dtype != np.uint8 and image.dtype != np.float32:
        image = image.astype(np.float32)
    mats = crop_matrices(crop_boxes, size)
    crops = np.empty((len(crop_boxes), size, size, 3), np.float32)
    huge = image.nbytes >= _REGION_BYTES or max(image.shape[:2]) >= _CV2_MAX_SIDE
    for i, m in enumerate(mats):
        src = image
        if huge:  # OpenCV indexes with 32-bit ints: warp only the region the crop reads
            src, m = _region(image, crop_boxes[i], m)
        crop = cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        crops[i] = crop[:, ::-1] if flip else crop  # upstream's flip test mirrors the crop tensor
    crops -= _MEAN
    crops /= _STD
    return np.ascontiguousarray(crops.transpose(0, 3, 1, 2))


# OpenCV's warpAffine overflows (crashes) past 2^31 bytes and keeps coordinates in 16-bit ints.
_CV2_MAX_BYTES = 2**31 - 1
_CV2_MAX_SIDE = 32767
_REGION_BYTES = _CV2_MAX_BYTES  # images this large are cropped region by region


def _region(image: np.ndarray, box: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The part of a huge image one crop box samples (one pixel of margin for bilinear), and the
    affine map shifted to it. Pixels outside the image stay black, as with the whole image."""
    h, w = image.shape[:2]
    x0, y0 = max(0, int(np.floor(box[0])) - 1), max(0, int(np.floor(box[1])) - 1)
    x1, y1 = min(w, int(np.ceil(box[0] + box[2])) + 2), min(h, int(np.ceil(box[1] + box[3])) + 2)
    if x1 <= x0 or y1 <= y0:  # the crop lies outside the image: all black
        return np.zeros((1, 1, 3), image.dtype), np.array([[0, 0, -10.0], [0, 0, -10.0]])
    region = image[y0:y1, x0:x1]
    if region.nbytes >= _CV2_MAX_BYTES or max(region.shape[:2]) >= _CV2_MAX_SIDE:
        raise ValueError(f"crop box {box.tolist()} covers {x1 - x0}x{y1 - y0} px: OpenCV cannot warp regions of "
                         f"{_CV2_MAX_SIDE} px or 2 GiB; use smaller boxes or a downscaled image")
    shifted = m.copy()
    shifted[:, 2] += m[:, 0] * x0 + m[:, 1] * y0
    return np.ascontiguousarray(region), shifted


def prepare(image: np.ndarray, boxes: object = None, size: int = INPUT_SIZE, flip: bool = False, *,
            crop_boxes: object = None, method: str = "opencv", threads: int | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Network input for the people in one image.

    Args:
        image: (H, W, 3) RGB, uint8 or float in 0..255.
        boxes: (P, 4) person boxes x, y, w, h; they go through upstream's box rule
            (geometry.process_boxes: inclusive width, shifted into the image, squared, x1.25).
        crop_boxes: instead of boxes, (P, 4) boxes that already went through that rule (e.g.
            RootNet's output boxes), used as they are.
        flip: mirror each crop horizontally (the flip test's second pass).
        method, threads: see crop_people ("opencv", upstream's exact crops, by default).
    Returns:
        (network input (P, 3, S, S) float32, crop boxes (P, 4) float64).
    """
    image = check_image(image)
    crop = resolve_crop_boxes(boxes, crop_boxes, image.shape)
    return crop_people(image, crop, size, flip, method, threads), crop


def resolve_crop_boxes(boxes: object, crop_boxes: object, image_shape: tuple[int, ...]) -> np.ndarray:
    """The (P, 4) crop boxes for exactly one of person boxes (rule applied) or crop boxes (as they are).

    Raises:
        ValueError: both or neither given, or bad boxes (one wholly outside the image included).
    """
    if (boxes is None) == (crop_boxes is None):
        raise ValueError("give exactly one of boxes (person boxes x, y, w, h; upstream's box rule is applied) "
                         "or crop_boxes (boxes that already went through it, used as they are)")
    if crop_boxes is not None:
        return check_crop_boxes(crop_boxes, (image_shape[1], image_shape[0]))
    return process_boxes(boxes, (image_shape[1], image_shape[0]))

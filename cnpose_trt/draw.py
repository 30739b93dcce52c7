"""Skeleton overlays and the synthetic demo image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .spec import SKELETON

_LEFT = (0, 200, 255)
_RIGHT = (255, 80, 40)
_CENTRE = (60, 220, 60)


def _colour(a: int, b: int) -> tuple[int, int, int]:
    from .spec import JOINT_NAMES

    names = JOINT_NAMES[a] + JOINT_NAMES[b]
    return _LEFT if "L_" in names else _RIGHT if "R_" in names else _CENTRE


def draw_poses(image: np.ndarray, joints_px: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
    """A copy of an (H, W, 3) uint8 RGB image with skeletons (P, J, >=2 px) and boxes (P, 4) drawn."""
    import cv2

    canvas = np.ascontiguousarray(image, dtype=np.uint8).copy()
    thick = max(1, round(min(canvas.shape[:2]) / 200))
    for p, pose in enumerate(np.asarray(joints_px)):
        if boxes is not None:
            x, y, w, h = (float(v) for v in boxes[p])
            cv2.rectangle(canvas, (round(x), round(y)), (round(x + w), round(y + h)), (255, 255, 255), thick)
        finite = np.isfinite(pose[:, :2]).all(axis=1)
        for a, b in SKELETON:
            if finite[a] and finite[b]:
                cv2.line(canvas, tuple(int(round(v)) for v in pose[a, :2]),
                         tuple(int(round(v)) for v in pose[b, :2]), _colour(a, b), thick + 1, cv2.LINE_AA)
        for j in np.flatnonzero(finite):
            cv2.circle(canvas, tuple(int(round(v)) for v in pose[j, :2]), thick + 2, (255, 255, 255), -1, cv2.LINE_AA)
    return canvas


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def check_image_suffix(path: str | Path, what: str = "image file") -> str:
    """The lower-case suffix of an image file name this OpenCV can write.

    Raises:
        ValueError: another suffix (named, with the ones allowed).
    """
    import cv2

    suffix = Path(path).suffix.lower()
    allowed = [s for s in IMAGE_SUFFIXES if cv2.haveImageWriter("x" + s)]
    if suffix not in allowed:
        raise ValueError(f"{what} {str(path)!r} must end in {', '.join(allowed)}, got "
                         f"{suffix or 'no suffix'!r}")
    return suffix


def save_image(path: str | Path, image_rgb: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 RGB image; the format follows the suffix (see IMAGE_SUFFIXES)."""
    import cv2

    path = Path(path)
    suffix = check_image_suffix(path)
    try:
        ok, data = cv2.imencode(suffix, np.ascontiguousarray(image_rgb[:, :, ::-1]))
    except cv2.error as exc:
        raise ValueError(f"cannot encode an image as {suffix!r}: {str(exc).strip().splitlines()[-1]}") from None
    if not ok:
        raise ValueError(f"cannot encode an image as {suffix!r}; use .png or .jpg")
    try:
        path.write_bytes(data.tobytes())
    except OSError as exc:  # name the file even where the OS does not (a failed write: disk full, ...)
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    return path


def demo_image(width: int = 640, height: int = 480) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A generated RGB scene with one stick figure, and the person's box (x, y, w, h)."""
    import cv2

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([90 + 60 * yy / height, 110 + 40 * xx / width, 140 + 50 * (1 - yy / height)], -1)
    img = img.astype(np.uint8)
    cv2.rectangle(img, (0, int(height * 0.8)), (width, height), (80, 70, 60), -1)
    cx, top = width // 2, int(height * 0.12)
    s = height / 480
    skin, shirt, trousers = (230, 190, 160), (40, 90, 200), (40, 40, 60)
    cv2.circle(img, (cx, top + int(30 * s)), int(28 * s), skin, -1, cv2.LINE_AA)
    body = np.array([[cx - 45 * s, top + 70 * s], [cx + 45 * s, top + 70 * s], [cx + 35 * s, top + 210 * s],
                     [cx - 35 * s, top + 210 * s]], np.int32)
    cv2.fillConvexPoly(img, body, shirt, cv2.LINE_AA)
    # Each limb: shoulder/hip, elbow/knee, wrist/ankle as (dx from centre, dy from top) at scale 1.
    limbs = [(((-45, 80), (-95, 160), (-110, 230)), shirt), (((45, 80), (90, 150), (140, 110)), shirt),
             (((-22, 210), (-40, 290), (-45, 360)), trousers), (((22, 210), (35, 290), (50, 360)), trousers)]
    for joints, colour in limbs:
        a, b, c = [(int(cx + dx * s), int(top + dy * s)) for dx, dy in joints]
        cv2.line(img, a, b, colour, int(22 * s), cv2.LINE_AA)
        cv2.line(img, b, c, colour, int(18 * s), cv2.LINE_AA)
    box = (int(cx - 160 * s), int(top - 10 * s), int(320 * s), int(390 * s))
    return img, box

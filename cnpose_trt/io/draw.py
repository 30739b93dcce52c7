"""Skeleton overlays and the synthetic demo image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..spec import JOINT_NAMES, SKELETON

_LEFT = (0, 200, 255)
_RIGHT = (255, 80, 40)
_CENTRE = (60, 220, 60)


def _colour(a: int, b: int) -> tuple[int, int, int]:
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


DEPTH_RANGE_MM = 2000.0  # upstream's bbox_3d_shape: the crop's depth span, and the scale of its x/y for the 3D view


def pose_3d(image_px: np.ndarray, crop_boxes: np.ndarray, camera_mm: np.ndarray | None) -> tuple[np.ndarray, str]:
    """(P, J, 3) mm for a 3D view, and what they are: camera mm when known, else root-relative mm, x and y
    scaled from pixels by the crop (whose side spans DEPTH_RANGE_MM, as its depth does)."""
    if camera_mm is not None:
        return np.asarray(camera_mm, np.float64), "camera mm"
    px = np.asarray(image_px, np.float64)
    scale = DEPTH_RANGE_MM / np.maximum(np.asarray(crop_boxes, np.float64)[:, 2:4], 1e-9)  # (P, 2) mm per px
    out = np.empty_like(px)
    out[..., :2] = (px[..., :2] - px[:, :1, :2]) * scale[:, None, :]
    out[..., 2] = px[..., 2] - px[:, :1, 2]
    return out, "root-relative mm"


def draw_3d(joints_mm: np.ndarray, size: int, title: str, yaw_deg: float = 35.0, pitch_deg: float = 20.0) -> np.ndarray:
    """A (size, size, 3) uint8 panel: skeletons (P, J, 3) mm seen from above and to the side (orthographic,
    camera frame: x right, y down, z away), with the floor grid under the lowest joint and a scale bar.
    Root-relative poses are spread side by side; camera-space poses keep their places."""
    import cv2

    panel = np.full((size, size, 3), 250, np.uint8)
    pts = np.asarray(joints_mm, np.float64).copy()
    ok = np.isfinite(pts).all(axis=2)
    if not ok.any():
        cv2.putText(panel, "no finite joints", (10, size // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
        return panel
    if title.startswith("root"):
        pts[..., 0] += np.arange(len(pts))[:, None] * 1200.0  # one person beside the next
    centre = np.array([np.nanmean(np.where(ok, pts[..., k], np.nan)) for k in range(3)])
    pts -= centre
    yaw, pitch = np.radians(yaw_deg), np.radians(pitch_deg)
    r_yaw = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    r_pitch = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    rot = r_pitch @ r_yaw
    floor_y = np.nanmax(np.where(ok, pts[..., 1], np.nan))
    extent = float(np.nanmax(np.abs(np.where(ok[..., None], pts, np.nan)))) or 1.0
    grid = np.linspace(-extent, extent, 7)
    margin, head = 0.1 * size, 22
    scale = (size - 2 * margin - head) / (2 * extent * 1.2)

    def to_px(p: np.ndarray) -> np.ndarray:
        q = p @ rot.T
        return np.stack([size / 2 + q[..., 0] * scale, (size + head) / 2 + q[..., 1] * scale], -1)

    for g in grid:  # the floor under the lowest joint
        for a, b in (((g, floor_y, -extent), (g, floor_y, extent)), ((-extent, floor_y, g), (extent, floor_y, g))):
            pa, pb = to_px(np.array(a)), to_px(np.array(b))
            cv2.line(panel, tuple(int(v) for v in pa), tuple(int(v) for v in pb), (215, 215, 215), 1, cv2.LINE_AA)
    proj = to_px(pts)
    depth = (pts @ rot.T)[..., 2]
    for p in np.argsort(-np.nanmean(np.where(ok, depth, np.nan), axis=1)):  # far people first
        for a, b in sorted(SKELETON, key=lambda e: -(depth[p, e[0]] + depth[p, e[1]])):
            if ok[p, a] and ok[p, b]:
                cv2.line(panel, tuple(int(round(v)) for v in proj[p, a]), tuple(int(round(v)) for v in proj[p, b]),
                         _colour(a, b), 3, cv2.LINE_AA)
        for j in np.flatnonzero(ok[p]):
            cv2.circle(panel, tuple(int(round(v)) for v in proj[p, j]), 3, (40, 40, 40), -1, cv2.LINE_AA)
    bar_mm = 500.0  # scale bar
    x0, y0 = int(margin / 2), size - int(margin / 2)
    cv2.line(panel, (x0, y0), (x0 + int(bar_mm * scale), y0), (0, 0, 0), 2)
    cv2.putText(panel, f"{bar_mm:.0f} mm", (x0, y0 - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(panel, f"3D, {title}", (8, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return panel


def draw_poses_3d(image: np.ndarray, joints_px: np.ndarray, boxes: np.ndarray | None, joints_mm: np.ndarray,
                  title: str) -> np.ndarray:
    """The 2D overlay (draw_poses) with a square 3D view of the same people beside it, as tall as the image."""
    overlay = draw_poses(image, joints_px, boxes)
    return np.concatenate([overlay, draw_3d(joints_mm, overlay.shape[0], title)], axis=1)


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


_SERIES = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def eval_chart(report: dict, width: int = 1000) -> np.ndarray:
    """An `eval` report as an RGB picture: per-joint MPJPE as horizontal bars, the engines side by side in
    each joint's row, with each engine's overall MPJPE / PA-MPJPE in the legend."""
    import cv2

    engines = report["engines"]
    joints = list(report["protocol"]["joints"])
    n = max(len(engines), 1)
    row, bar, top, left, right = 6 + 12 * n, 11, 60 + 18 * n, 110, 70
    height = top + row * len(joints) + 40
    img = np.full((height, width, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    values = [[e["metrics"]["per_joint"]["mpjpe"].get(j) for j in joints] for e in engines]
    finite = [v for vs in values for v in vs if v is not None and np.isfinite(v)]
    vmax = max(finite) * 1.1 if finite else 1.0
    step = 10 ** np.floor(np.log10(vmax / 2)) if vmax > 0 else 1.0
    scale = (width - left - right) / vmax
    ds = report["dataset"]
    cv2.putText(img, f"MPJPE per joint (mm): {ds['name']}, {ds['people']} people, flip test "
                     f"{'on' if report.get('flip_test') else 'off'}", (10, 22), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    for k, e in enumerate(engines):
        m = e["metrics"]
        c = _SERIES[k % len(_SERIES)]
        y = 44 + 18 * k
        cv2.rectangle(img, (10, y - 10), (24, y + 2), c, -1)
        overall = "" if m.get("mpjpe") is None else f": MPJPE {m['mpjpe']:.1f}, PA-MPJPE {m.get('pa_mpjpe') or 0:.1f}"
        cv2.putText(img, f"{e['label']}{overall}", (30, y), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for t in np.arange(0, vmax, step):  # value grid
        x = int(left + t * scale)
        cv2.line(img, (x, top - 4), (x, height - 34), (225, 225, 225), 1)
        cv2.putText(img, f"{t:g}", (x - 8, height - 18), font, 0.4, (80, 80, 80), 1, cv2.LINE_AA)
    for j, name in enumerate(joints):
        y0 = top + j * row
        cv2.putText(img, name, (8, y0 + row // 2 + 4), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        for k, vs in enumerate(values):
            v = vs[j]
            yb = y0 + 3 + k * 12
            if v is None or not np.isfinite(v):
                cv2.putText(img, "-", (left + 2, yb + bar - 1), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
                continue
            x1 = int(left + v * scale)
            cv2.rectangle(img, (left, yb), (max(left + 1, x1), yb + bar - 1), _SERIES[k % len(_SERIES)], -1)
            cv2.putText(img, f"{v:.0f}", (x1 + 4, yb + bar - 1), font, 0.38, (60, 60, 60), 1, cv2.LINE_AA)
    cv2.line(img, (left, top - 4), (left, height - 34), (0, 0, 0), 1)
    return img

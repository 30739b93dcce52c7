"""Synthetic people with exact ground truth: a random 3D pose, a pinhole camera, a rendered image.

A scene is drawn from a seed: per person a plausible pose of the 18-joint skeleton (Human3.6M-like
bone lengths, joint-angle limits, a random and mostly upright global rotation), a root depth,
and one pinhole camera for the image; the people are rendered as shaded capsules (limbs), a slab
(torso), feet, hands and a head with a face, far to near (painter's algorithm), over a textured
background, optionally behind occluders. Left limbs are drawn in cool hues, right limbs in warm
ones, and the face, feet and a chest mark show which way the person faces, so a network can
learn left from right.

Conventions: body frame X = the person's left, Y = up, Z = forward (right-handed); camera frame
x right, y down, z into the scene (mm). joints_img[..., :2] = f * (X, Y) / Z + (cx, cy) exactly,
and joints_img[..., 2] is the absolute camera depth Z in mm. Thorax is the midpoint of the
shoulders, as upstream's Human36M.add_thorax defines it.

Everything is numpy and OpenCV: no torch.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .. import checks
from ..spec import JOINT_NAMES, NUM_JOINTS

# Joint indices (spec.JOINT_NAMES order).
PELVIS, R_HIP, R_KNEE, R_ANKLE, L_HIP, L_KNEE, L_ANKLE, TORSO, NECK, NOSE, HEAD = range(11)
L_SHOULDER, L_ELBOW, L_WRIST, R_SHOULDER, R_ELBOW, R_WRIST, THORAX = range(11, 18)
if JOINT_NAMES[THORAX] != "Thorax" or JOINT_NAMES[R_WRIST] != "R_Wrist":  # one place knows the order
    raise ImportError("cnpose_trt.synthetic expects the Human3.6M joint order of spec.JOINT_NAMES")

# (parent, child, mean length mm): Human3.6M subject averages. Left and right share a length.
BONES: tuple[tuple[int, int, float], ...] = (
    (PELVIS, R_HIP, 133.0), (R_HIP, R_KNEE, 443.0), (R_KNEE, R_ANKLE, 454.0),
    (PELVIS, L_HIP, 133.0), (L_HIP, L_KNEE, 443.0), (L_KNEE, L_ANKLE, 454.0),
    (PELVIS, TORSO, 233.0), (TORSO, NECK, 257.0), (NECK, NOSE, 121.0), (NOSE, HEAD, 115.0),
    (NECK, L_SHOULDER, 151.0), (L_SHOULDER, L_ELBOW, 279.0), (L_ELBOW, L_WRIST, 252.0),
    (NECK, R_SHOULDER, 151.0), (R_SHOULDER, R_ELBOW, 279.0), (R_ELBOW, R_WRIST, 252.0),
)
# A person's scale (height factor) and each bone's own jitter around it: every bone length lies in
# mean * [SCALE_RANGE[0] * BONE_JITTER[0], SCALE_RANGE[1] * BONE_JITTER[1]].
SCALE_RANGE = (0.88, 1.12)
BONE_JITTER = (0.95, 1.05)
NOMINAL_HEIGHT_MM = 1750.0

# Joint-angle limits in degrees: (low, high, neutral, spread of the neutral-centred half of the mixture).
_LIMITS = {
    "hip_flex": (-25.0, 120.0, 5.0, 15.0), "hip_abd": (-15.0, 50.0, 5.0, 6.0), "hip_rot": (-35.0, 35.0, 0.0, 10.0),
    "knee": (0.0, 150.0, 5.0, 15.0), "ankle": (-20.0, 45.0, 0.0, 10.0),
    "spine_bend": (-20.0, 70.0, 5.0, 8.0), "spine_side": (-25.0, 25.0, 0.0, 5.0),
    "spine_twist": (-35.0, 35.0, 0.0, 8.0),
    "head_bend": (-30.0, 45.0, 5.0, 10.0), "head_side": (-25.0, 25.0, 0.0, 6.0), "head_yaw": (-60.0, 60.0, 0.0, 20.0),
    "sh_elev": (0.0, 170.0, 15.0, 15.0), "sh_az": (-40.0, 130.0, 30.0, 30.0), "sh_roll": (-90.0, 60.0, 0.0, 20.0),
    "elbow": (0.0, 150.0, 20.0, 20.0),
}
# Body-part radii in mm (rendering and the person box).
_RADII = {"thigh": 75.0, "shin": 55.0, "upper_arm": 48.0, "forearm": 38.0, "neck": 45.0, "head": 105.0,
          "foot": 42.0, "hand": 45.0, "spine": 115.0, "torso_edge": 60.0}


@dataclass(frozen=True)
class SyntheticScene:
    """One rendered image with the exact ground truth of its P people.

    Shapes: image (H, W, 3) uint8 RGB; boxes (P, 4) x, y, w, h px (tight around the drawn body, a
    small margin, inside the image); joints_img (P, 18, 3) x_px, y_px, absolute depth mm;
    joints_cam (P, 18, 3) X, Y, Z camera mm; root_depth (P,) mm (the pelvis' Z); intrinsics (4,)
    fx, fy, cx, cy; bone_lengths (P, 16) mm in BONES order.
    """

    image: np.ndarray
    boxes: np.ndarray
    joints_img: np.ndarray
    joints_cam: np.ndarray
    root_depth: np.ndarray
    intrinsics: np.ndarray
    bone_lengths: np.ndarray
    seed: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.boxes)


@dataclass(frozen=True)
class Pose:
    """A 3D pose in the body frame (X left, Y up, Z forward), pelvis at the origin, mm.

    joints (18, 3); bone_lengths (16,) in BONES order; directions (unit vectors, body frame) that
    the renderer needs: head and chest forward, each foot's toe direction.
    """

    joints: np.ndarray
    bone_lengths: np.ndarray
    head_forward: np.ndarray
    chest_forward: np.ndarray
    feet: np.ndarray  # (2, 3): left, right toe directions


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _rot(axis: Sequence[float], angle: float) -> np.ndarray:
    """Rotation matrix about a unit axis by angle (radians), right-hand rule (Rodrigues)."""
    x, y, z = axis
    c, s = math.cos(angle), math.sin(angle)
    t = 1.0 - c
    return np.array([[t * x * x + c, t * x * y - s * z, t * x * z + s * y],
                     [t * x * y + s * z, t * y * y + c, t * y * z - s * x],
                     [t * x * z - s * y, t * y * z + s * x, t * z * z + c]])


_EX, _EY, _EZ = np.eye(3)


def _angle(rng: np.random.Generator, name: str) -> float:
    """One joint angle in radians: half neutral-centred, half uniform over the limits, always inside them."""
    lo, hi, mid, sd = _LIMITS[name]
    value = rng.normal(mid, sd) if rng.random() < 0.5 else rng.uniform(lo, hi)
    return math.radians(min(hi, max(lo, value)))


def sample_pose(rng: np.random.Generator) -> Pose:
    """A random plausible pose: a style (free, walking, sitting, crouching), then angles inside limits."""
    scale = rng.uniform(*SCALE_RANGE)
    lengths = np.array([b[2] for b in BONES]) * scale * rng.uniform(*BONE_JITTER, size=len(BONES))
    # Left and right of a pair share a length (Human3.6M skeletons are symmetric).
    for right, left in ((0, 3), (1, 4), (2, 5), (13, 10), (14, 11), (15, 12)):
        lengths[right] = lengths[left]
    length = {(a, b): lengths[i] for i, (a, b, _) in enumerate(BONES)}

    style = rng.choice(4, p=(0.55, 0.2, 0.15, 0.1))  # free, walking, sitting, crouching
    joints = np.zeros((NUM_JOINTS, 3))
    angles = {name: _angle(rng, name) for name in ("spine_bend", "spine_side", "spine_twist", "head_bend",
                                                      "head_side", "head_yaw")}
    if style == 3:
        angles["spine_bend"] = math.radians(rng.uniform(20.0, 60.0))

    # Spine: half the bend below Torso, all of it above.
    bend, side, twist = angles["spine_bend"], angles["spine_side"], angles["spine_twist"]
    r_half = _rot(_EX, bend / 2) @ _rot(_EZ, side / 2) @ _rot(_EY, twist / 2)
    r_chest = _rot(_EX, bend) @ _rot(_EZ, side) @ _rot(_EY, twist)
    xc, yc, zc = r_chest.T
    joints[TORSO] = length[(PELVIS, TORSO)] * (r_half @ _EY)
    joints[NECK] = joints[TORSO] + length[(TORSO, NECK)] * yc
    r_head = r_chest @ _rot(_EX, angles["head_bend"]) @ _rot(_EZ, angles["head_side"]) @ _rot(_EY, angles["head_yaw"])
    joints[NOSE] = joints[NECK] + length[(NECK, NOSE)] * (r_head @ _unit(np.array([0.0, 1.0, 0.35])))
    joints[HEAD] = joints[NOSE] + length[(NOSE, HEAD)] * (r_head @ _unit(np.array([0.0, 1.0, -0.1])))

    # Legs. Walking swings them in opposite phase; sitting and crouching flex both hips and knees.
    phase = rng.uniform(-1.0, 1.0)
    feet = np.zeros((2, 3))
    for k, (s, hip, knee, ankle) in enumerate(((1.0, L_HIP, L_KNEE, L_ANKLE), (-1.0, R_HIP, R_KNEE, R_ANKLE))):
        flex, abd, hrot = _angle(rng, "hip_flex"), _angle(rng, "hip_abd"), s * _angle(rng, "hip_rot")
        kf, af = _angle(rng, "knee"), _angle(rng, "ankle")
        if style == 1:
            flex = math.radians(25.0 * phase * s + rng.normal(0, 4))
            kf = math.radians(max(0.0, 30.0 * (1 - phase * s) / 2 + rng.normal(5, 5)))
            abd = math.radians(rng.uniform(0.0, 8.0))
        elif style == 2:
            flex, kf = math.radians(rng.uniform(65.0, 100.0)), math.radians(rng.uniform(65.0, 110.0))
        elif style == 3:
            flex, kf = math.radians(rng.uniform(70.0, 115.0)), math.radians(rng.uniform(110.0, 150.0))
        joints[hip] = length[(PELVIS, hip)] * _unit(s * _EX - 0.15 * _EY)
        thigh = _unit(math.sin(abd) * s * _EX + math.cos(abd) * (-math.cos(flex) * _EY + math.sin(flex) * _EZ))
        front = math.sin(flex) * _EY + math.cos(flex) * _EZ
        front = _rot(thigh, hrot) @ _unit(front - (front @ thigh) * thigh)
        shin = math.cos(kf) * thigh - math.sin(kf) * front
        joints[knee] = joints[hip] + length[(hip, knee)] * thigh
        joints[ankle] = joints[knee] + length[(knee, ankle)] * shin
        toe = math.sin(kf) * thigh + math.cos(kf) * front
        feet[k] = _unit(math.cos(af) * toe + math.sin(af) * shin)

    # Arms: upper arm by elevation (from hanging) and azimuth (0 sideways, 90 forward), the elbow
    # bending towards the front of the arm, rolled about it.
    for s, shoulder, elbow, wrist in ((1.0, L_SHOULDER, L_ELBOW, L_WRIST), (-1.0, R_SHOULDER, R_ELBOW, R_WRIST)):
        elev, az, roll, kf = (_angle(rng, n) for n in ("sh_elev", "sh_az", "sh_roll", "elbow"))
        if style == 1:
            elev = math.radians(abs(rng.normal(12.0, 6.0)))
            az = math.radians(90.0 - 90.0 * math.copysign(1.0, -phase * s) * rng.uniform(0.7, 1.0))
        joints[shoulder] = joints[NECK] + length[(NECK, shoulder)] * _unit(s * xc - 0.15 * yc)
        upper = _unit(math.cos(elev) * -yc + math.sin(elev) * (math.cos(az) * s * xc + math.sin(az) * zc))
        ref = zc if abs(upper @ zc) < 0.9 else yc
        bend_dir = _rot(upper, s * roll) @ _unit(ref - (ref @ upper) * upper)
        fore = math.cos(kf) * upper + math.sin(kf) * bend_dir
        joints[elbow] = joints[shoulder] + length[(shoulder, elbow)] * upper
        joints[wrist] = joints[elbow] + length[(elbow, wrist)] * fore

    joints[THORAX] = (joints[L_SHOULDER] + joints[R_SHOULDER]) / 2
    return Pose(joints, lengths, r_head @ _EZ, zc, feet)


def global_rotation(rng: np.random.Generator) -> np.ndarray:
    """Body frame -> camera frame rotation: random heading, mostly upright, camera elevation -10..35 deg."""
    yaw = rng.uniform(0.0, 2 * math.pi)
    if rng.random() < 0.9:
        tilt = _rot(_EX, math.radians(rng.normal(0, 6))) @ _rot(_EZ, math.radians(rng.normal(0, 6)))
    else:  # bending over, lying, falling: a large tilt about a random horizontal axis
        a = rng.uniform(0.0, 2 * math.pi)
        tilt = _rot((math.cos(a), 0.0, math.sin(a)), math.radians(rng.uniform(20.0, 90.0)))
    # Body X (left), Y (up), Z (forward) -> camera +x, -y, -z: a person with yaw 0 faces the camera.
    to_camera = np.diag([1.0, -1.0, -1.0])
    elevation = _rot(_EX, math.radians(rng.uniform(-10.0, 35.0)))
    return elevation @ to_camera @ _rot(_EY, yaw) @ tilt


def project(points_cam: np.ndarray, intrinsics: Sequence[float]) -> np.ndarray:
    """(..., 3) camera mm -> (..., 3) x_px, y_px, depth mm with fx, fy, cx, cy."""
    fx, fy, cx, cy = intrinsics
    p = np.asarray(points_cam, np.float64)
    out = np.empty(p.shape)
    out[..., 0] = fx * p[..., 0] / p[..., 2] + cx
    out[..., 1] = fy * p[..., 1] / p[..., 2] + cy
    out[..., 2] = p[..., 2]
    return out


# ----------------------------------------------------------------------------------------------
# Rendering


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


@dataclass
class _Look:
    """A person's colours (RGB 0..255 float): side-coded limbs, torso, skin, hair, shoes."""

    left_arm: np.ndarray
    left_leg: np.ndarray
    right_arm: np.ndarray
    right_leg: np.ndarray
    torso: np.ndarray
    skin: np.ndarray
    hair: np.ndarray
    shoes: np.ndarray
    mark: np.ndarray


def _look(rng: np.random.Generator) -> _Look:
    left, right = rng.uniform(0.5, 0.7), rng.uniform(-0.03, 0.11)  # cyan..blue, red..orange
    sat = rng.uniform(0.5, 0.9)
    torso_h = rng.uniform(0.0, 1.0)
    tone = rng.uniform(0.0, 1.0)
    skin = np.array([225.0, 180.0, 150.0]) * (1 - tone) + np.array([110.0, 75.0, 55.0]) * tone
    return _Look(_hsv(left, sat, rng.uniform(0.8, 1.0)), _hsv(left + 0.03, sat, rng.uniform(0.45, 0.7)),
                 _hsv(right, sat, rng.uniform(0.8, 1.0)), _hsv(right + 0.03, sat, rng.uniform(0.45, 0.7)),
                 _hsv(torso_h, rng.uniform(0.0, 0.35), rng.uniform(0.35, 0.85)), skin,
                 _hsv(rng.uniform(0.02, 0.12), rng.uniform(0.3, 0.8), rng.uniform(0.08, 0.5)),
                 _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.3), rng.uniform(0.05, 0.3)),
                 _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.3), rng.uniform(0.85, 1.0)))


_SHIFT = 4          # OpenCV fixed-point bits: shapes are placed to 1/16 px
_ONE = 1 << _SHIFT


def _fix(p: np.ndarray) -> tuple[int, int]:
    return int(round(p[0] * _ONE)), int(round(p[1] * _ONE))


def _shade(colour: np.ndarray, k: float) -> tuple[float, float, float]:
    r, g, b = (min(255.0, max(0.0, float(c) * k)) for c in colour)
    return r, g, b


# A primitive: (depth for sorting, kind, data). Kinds: "capsule" (a, b, r_px, colour),
# "poly" (points (K, 2), colour, light factor), "head" (centre, r_px, face offset px, look, facing).
Primitive = tuple


def _draw_capsule(img: np.ndarray, a: np.ndarray, b: np.ndarray, r: float, colour: np.ndarray,
                  light: np.ndarray) -> None:
    """A limb: a dark rim, a lit body shifted towards the light, a highlight (a cylinder, cheaply)."""
    import cv2

    t = max(1, int(round(2 * r)))
    cv2.line(img, _fix(a), _fix(b), _shade(colour, 0.55), t, cv2.LINE_AA, _SHIFT)
    if t >= 4:
        off = light * (0.3 * r)
        cv2.line(img, _fix(a + off), _fix(b + off), _shade(colour, 0.9), max(1, int(round(1.2 * r))),
                 cv2.LINE_8, _SHIFT)
        off = light * (0.5 * r)
        cv2.line(img, _fix(a + off), _fix(b + off), _shade(colour, 1.15), max(1, int(round(0.4 * r))),
                 cv2.LINE_8, _SHIFT)


def _draw_head(img: np.ndarray, centre: np.ndarray, r: float, face: np.ndarray, facing: float,
               look: _Look, light: np.ndarray) -> None:
    import cv2

    ri = max(1, int(round(r * _ONE)))
    cv2.circle(img, _fix(centre), ri, _shade(look.hair, 1.0), -1, cv2.LINE_AA, _SHIFT)
    if facing > -0.3:  # the face (skin) is towards the camera, offset by where the head looks
        fr = max(1, int(round(r * (0.55 + 0.3 * max(0.0, facing)) * _ONE)))
        fc = centre + face * r * 0.45
        cv2.circle(img, _fix(fc), fr, _shade(look.skin, 0.8), -1, cv2.LINE_AA, _SHIFT)
        cv2.circle(img, _fix(fc + light * r * 0.15), max(1, fr * 2 // 3), _shade(look.skin, 1.0), -1,
                   cv2.LINE_8, _SHIFT)
        if facing > 0.25 and r >= 4:
            side = np.array([-face[1], face[0]])
            side = side / (np.linalg.norm(side) + 1e-9) if np.linalg.norm(face) > 0.2 else np.array([1.0, 0.0])
            eye_r = max(1, int(round(r * 0.12 * _ONE)))
            for sgn in (-1, 1):
                cv2.circle(img, _fix(fc + face * r * 0.2 + sgn * side * r * 0.3 - np.array([0, r * 0.1])),
                           eye_r, (20, 20, 20), -1, cv2.LINE_8, _SHIFT)


def _person_primitives(joints_cam: np.ndarray, pose: Pose, rot: np.ndarray, look: _Look,
                       k: np.ndarray) -> tuple[list[Primitive], np.ndarray]:
    """Primitives of one person (camera frame) and the extent (x0, y0, x1, y1) px of what they cover."""
    fx = k[0]
    px = project(joints_cam, k)
    cam = joints_cam
    prims: list[Primitive] = []
    extent = [np.inf, np.inf, -np.inf, -np.inf]

    def cover(p: np.ndarray, r: float) -> None:
        extent[0] = min(extent[0], p[0] - r)
        extent[1] = min(extent[1], p[1] - r)
        extent[2] = max(extent[2], p[0] + r)
        extent[3] = max(extent[3], p[1] + r)

    def capsule(pa: np.ndarray, pb: np.ndarray, radius_mm: float, colour: np.ndarray) -> None:
        za, zb = pa[2], pb[2]
        a, b = project(pa, k), project(pb, k)
        r = fx * radius_mm / ((za + zb) / 2)
        prims.append(((za + zb) / 2, "capsule", (a[:2], b[:2], r, colour)))
        cover(a, r)
        cover(b, r)

    limbs = ((L_HIP, L_KNEE, "thigh", look.left_leg), (L_KNEE, L_ANKLE, "shin", look.left_leg),
             (R_HIP, R_KNEE, "thigh", look.right_leg), (R_KNEE, R_ANKLE, "shin", look.right_leg),
             (L_SHOULDER, L_ELBOW, "upper_arm", look.left_arm), (L_ELBOW, L_WRIST, "forearm", look.left_arm),
             (R_SHOULDER, R_ELBOW, "upper_arm", look.right_arm), (R_ELBOW, R_WRIST, "forearm", look.right_arm),
             (NECK, NOSE, "neck", look.skin))
    for a, b, part, colour in limbs:
        capsule(cam[a], cam[b], _RADII[part], colour)
    for (ankle, foot) in ((L_ANKLE, 0), (R_ANKLE, 1)):
        capsule(cam[ankle], cam[ankle] + 150.0 * (rot @ pose.feet[foot]), _RADII["foot"], look.shoes)
    for elbow, wrist in ((L_ELBOW, L_WRIST), (R_ELBOW, R_WRIST)):
        d = cam[wrist] - cam[elbow]
        capsule(cam[wrist], cam[wrist] + 70.0 * d / np.linalg.norm(d), _RADII["hand"], look.skin)

    # Torso: a slab through shoulders and hips (its brightness follows how much it faces the
    # camera), a spine capsule giving it thickness seen edge-on, and a mark on the chest's front.
    chest = rot @ pose.chest_forward
    lateral_l = cam[L_SHOULDER] - cam[R_SHOULDER]
    lateral_l /= np.linalg.norm(lateral_l)
    hip_l = cam[L_HIP] - cam[R_HIP]
    hip_l /= np.linalg.norm(hip_l)
    corners = np.array([cam[L_SHOULDER] + 40.0 * lateral_l, cam[R_SHOULDER] - 40.0 * lateral_l,
                        cam[R_HIP] - 50.0 * hip_l, cam[L_HIP] + 50.0 * hip_l])
    corners_px = project(corners, k)[:, :2]
    torso_z = float(np.mean(corners[:, 2]))
    facing = float(-chest[2])
    prims.append((torso_z, "capsule", (px[PELVIS, :2], px[NECK, :2], fx * _RADII["spine"] / torso_z, look.torso)))
    prims.append((torso_z - 1e-3, "poly", (corners_px, look.torso, 0.6 + 0.4 * abs(facing))))
    r_edge = fx * _RADII["torso_edge"] / torso_z
    for c in corners_px:
        cover(c, r_edge)
    if facing > 0.15:
        mark = cam[THORAX] * 0.6 + cam[PELVIS] * 0.4 + 110.0 * chest
        m = project(mark, k)
        prims.append((torso_z - 2e-3, "capsule", (m[:2], m[:2], fx * 45.0 / mark[2], look.mark)))

    head_c = (cam[NOSE] + cam[HEAD]) / 2
    hc = project(head_c, k)
    r_head = fx * _RADII["head"] / head_c[2]
    fwd = rot @ pose.head_forward
    # Where the face sits on the head's disc: the forward direction's image-plane part.
    face = np.array([fwd[0], fwd[1]])
    prims.append((head_c[2], "head", (hc[:2], r_head, face, float(-fwd[2]), look)))
    cover(hc, r_head)
    return prims, np.array(extent)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour field + floor + clutter shapes: enough texture that a person must be found, not assumed."""
    import cv2

    # Built at 1/8 scale and enlarged bilinearly: a full-size cubic resize costs more than the person.
    sw, sh = max(2, width // 8), max(2, height // 8)
    base = rng.uniform(20, 235, size=(rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.float32)
    small = cv2.resize(base, (sw, sh), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.7:
        horizon = int(sh * rng.uniform(0.45, 0.8))
        small[horizon:] = small[horizon:] * 0.3 + rng.uniform(30, 200, size=3).astype(np.float32) * 0.7
    small = np.clip(small, 0, 255).astype(np.uint8)
    img = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    side = max(width, height)
    for _ in range(int(rng.integers(3, 12))):
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        kind = rng.integers(3)
        p = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        size = int(side * rng.uniform(0.03, 0.25))
        if kind == 0:
            q = (p[0] + int(rng.integers(-size, size + 1)), p[1] + int(rng.integers(-size, size + 1)))
            cv2.rectangle(img, p, q, colour, -1)
        elif kind == 1:
            cv2.ellipse(img, p, (size, max(1, size // 2)), float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
        else:
            q = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.line(img, p, q, colour, int(rng.integers(1, max(2, side // 40))), cv2.LINE_AA)
    return img


def _occluder(img: np.ndarray, rng: np.random.Generator, box: np.ndarray) -> None:
    """A shape in front of the person covering 10-40 % of its box."""
    import cv2

    x, y, w, h = box
    area = rng.uniform(0.1, 0.4) * w * h
    aspect = rng.uniform(0.3, 3.0)
    ow, oh = math.sqrt(area * aspect), math.sqrt(area / aspect)
    cx, cy = x + rng.uniform(0, w), y + rng.uniform(0, h)
    colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
    if rng.random() < 0.5:
        cv2.rectangle(img, (int(cx - ow / 2), int(cy - oh / 2)), (int(cx + ow / 2), int(cy + oh / 2)), colour, -1)
    else:
        cv2.ellipse(img, (int(cx), int(cy)), (max(1, int(ow / 2)), max(1, int(oh / 2))), float(rng.uniform(0, 180)),
                    0, 360, colour, -1, cv2.LINE_AA)


def _render(img: np.ndarray, prims: list[Primitive], light: np.ndarray) -> None:
    import cv2

    for _, kind, data in sorted(prims, key=lambda p: -p[0]):  # far to near
        if kind == "capsule":
            a, b, r, colour = data
            _draw_capsule(img, a, b, r, colour, light)
        elif kind == "poly":
            pts, colour, k = data
            fixed = np.round(pts * _ONE).astype(np.int32)
            cv2.fillPoly(img, [fixed], _shade(colour, k), cv2.LINE_AA, _SHIFT)
        else:
            centre, r, face, facing, look = data
            _draw_head(img, centre, r, face, facing, look, light)


def _check_range(name: str, value: object, lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name} must satisfy {lo} <= low <= high <= {hi}, got {value!r}")
    return a, b


def _seed_tuple(seed: int | Sequence[int]) -> tuple[int, ...]:
    items = (seed,) if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) else seed
    try:
        out = tuple(int(s) for s in items)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"seed must be a non-negative integer or a sequence of them, got {seed!r}") from None
    if not out or any(s < 0 for s in out) or any(isinstance(s, bool) for s in items):  # type: ignore[union-attr]
        raise ValueError(f"seed must be a non-negative integer or a sequence of them, got {seed!r}")
    return out


def synthesize(seed: int | Sequence[int], *, width: int = 256, height: int = 256, people: int = 1,
               depth_range: tuple[float, float] = (3000.0, 7000.0),
               person_height: tuple[float, float] = (0.45, 0.85), occluder_prob: float = 0.0,
               box_margin: float = 0.05, noise: bool = True) -> SyntheticScene:
    """Render one scene of `people` synthetic people with their exact ground truth.

    Args:
        seed: an int or a sequence of ints (np.random.default_rng); equal seeds, equal scenes.
        width, height: image size in px (16..4096).
        people: number of people (1..8); all fit inside the image, they may overlap.
        depth_range: root (pelvis) depth range in mm.
        person_height: a standing person of nominal height would span this fraction of the image
            height (this sets the focal length from the first person's depth).
        occluder_prob: per person, the chance of a shape in front of it (the ground truth stays).
        box_margin: the box grows by this fraction of its size on each side.
        noise: add sensor noise and sometimes a slight blur.
    Returns:
        SyntheticScene: image (H, W, 3) uint8, boxes (P, 4), joints_img / joints_cam (P, 18, 3),
        root_depth (P,), intrinsics (4,), bone_lengths (P, 16).
    Raises:
        ValueError: an argument out of its range (the message names it).
    """
    seeds = _seed_tuple(seed)
    for name, v, lo, hi in (("width", width, 16, 4096), ("height", height, 16, 4096), ("people", people, 1, 8)):
        checks.integer(name, v, lo, hi)
    z_range = _check_range("depth_range", depth_range, 500.0, 1e6)
    h_lo, h_hi = _check_range("person_height", person_height, 0.05, 2.0)
    if not 0.0 <= float(occluder_prob) <= 1.0:
        raise ValueError(f"occluder_prob must be in [0, 1], got {occluder_prob!r}")
    if not 0.0 <= float(box_margin) <= 0.5:
        raise ValueError(f"box_margin must be in [0, 0.5], got {box_margin!r}")
    width, height, people = int(width), int(height), int(people)
    rng = np.random.default_rng(seeds)
    cx = width / 2 + float(np.clip(rng.normal(0, 0.02 * width), -0.05 * width, 0.05 * width))
    cy = height / 2 + float(np.clip(rng.normal(0, 0.02 * height), -0.05 * height, 0.05 * height))
    img = _background(rng, width, height)
    light = _unit(np.array([rng.uniform(-1, 1), rng.uniform(-1, 0.3)]))
    focal = None  # set by the first person's depth
    prims: list[Primitive] = []
    joints_cam = np.zeros((people, NUM_JOINTS, 3))
    extents = np.zeros((people, 4))
    lengths = np.zeros((people, len(BONES)))
    for p in range(people):
        pose = sample_pose(rng)
        rot = global_rotation(rng)
        rel = pose.joints @ rot.T  # camera-frame offsets from the pelvis
        z0 = rng.uniform(*z_range)
        if focal is None:
            focal = rng.uniform(h_lo, h_hi) * height * z0 / NOMINAL_HEIGHT_MM
        joints_cam[p] = rel + _place_root(rng, rel, z0, focal, (cx, cy), (width, height))
        joints_cam[p, THORAX] = (joints_cam[p, L_SHOULDER] + joints_cam[p, R_SHOULDER]) / 2
        lengths[p] = pose.bone_lengths
        k = np.array([focal, focal, cx, cy])
        person, extents[p] = _person_primitives(joints_cam[p], pose, rot, _look(rng), k)
        prims += person
    intrinsics = np.array([focal, focal, cx, cy])
    _render(img, prims, light)
    boxes = np.zeros((people, 4))
    for p in range(people):
        x0, y0, x1, y1 = extents[p]
        mx, my = (x1 - x0) * box_margin, (y1 - y0) * box_margin
        x0, y0 = max(0.0, x0 - mx), max(0.0, y0 - my)
        x1, y1 = min(float(width), x1 + mx), min(float(height), y1 + my)
        boxes[p] = (x0, y0, x1 - x0, y1 - y0)
        if rng.random() < occluder_prob:
            _occluder(img, rng, boxes[p])
    if noise:
        img = _sensor_noise(img, rng)
    return SyntheticScene(img, boxes, project(joints_cam, intrinsics), joints_cam, joints_cam[:, PELVIS, 2].copy(),
                          intrinsics, lengths, seeds)


def _place_root(rng: np.random.Generator, rel: np.ndarray, z0: float, focal: float, centre: tuple[float, float],
                size: tuple[int, int]) -> np.ndarray:
    """The root's camera position (3,) mm, a pixel drawn where the padded body (rel: (18, 3) offsets from the
    pelvis) stays inside the image. The root's pixel (u0, v0) moves each joint's pixel linearly (u_j = (u0 - cx)
    z0 / z_j + ...), so that interval of u0 is exact. A body too big for the image moves further away."""
    (cx, cy), (width, height), margin = centre, size, 2.0
    for _ in range(40):
        zj = z0 + rel[:, 2]
        pad = focal * 130.0 / zj  # head radius and limb thickness, generously
        lo_u = np.max((margin + pad - cx - focal * rel[:, 0] / zj) * zj / z0) + cx
        hi_u = np.min((width - margin - pad - cx - focal * rel[:, 0] / zj) * zj / z0) + cx
        lo_v = np.max((margin + pad - cy - focal * rel[:, 1] / zj) * zj / z0) + cy
        hi_v = np.min((height - margin - pad - cy - focal * rel[:, 1] / zj) * zj / z0) + cy
        if lo_u <= hi_u and lo_v <= hi_v:
            break
        z0 *= 1.15
    else:
        raise RuntimeError("could not place a synthetic person inside the image")  # unreachable in practice
    u0, v0 = rng.uniform(lo_u, hi_u), rng.uniform(lo_v, hi_v)
    return np.array([(u0 - cx) * z0 / focal, (v0 - cy) * z0 / focal, z0])


def _sensor_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sometimes a slight blur, always uniform noise in [-amp, amp], saturating (two cheap uint8 passes)."""
    import cv2

    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), rng.uniform(0.3, 1.0))
    amp = int(rng.integers(2, 9))
    return cv2.subtract(cv2.add(img, rng.integers(0, 2 * amp + 1, size=img.shape, dtype=np.uint8)),
                        np.full(img.shape, amp, np.uint8))


def dataset(seed: int, count: int, **options: object) -> Iterator[SyntheticScene]:
    """`count` scenes; scene i is synthesize((seed, i), **options), so any one can be re-made alone."""
    checks.integer("count", count, 0)
    seeds = _seed_tuple(seed)
    for i in range(int(count)):
        yield synthesize((*seeds, i), **options)  # type: ignore[arg-type]


def bone_lengths(joints: np.ndarray) -> np.ndarray:
    """(..., 18, 3) joints -> (..., 16) bone lengths in BONES order."""
    j = np.asarray(joints, np.float64)
    parents = [b[0] for b in BONES]
    children = [b[1] for b in BONES]
    return np.linalg.norm(j[..., children, :] - j[..., parents, :], axis=-1)


def mean_pose(poses: int = 2000, seed: int = 0) -> np.ndarray:
    """(18, 3) root-relative mean of the synthetic pose distribution in camera mm (a trivial baseline).

    Global rotations included: the mean of what a camera sees, the baseline a trained model must beat.
    """
    rng = np.random.default_rng((seed, 0xBA5E))
    acc = np.zeros((NUM_JOINTS, 3))
    for _ in range(poses):
        pose = sample_pose(rng)
        acc += pose.joints @ global_rotation(rng).T
    return acc / poses

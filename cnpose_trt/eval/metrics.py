"""Accuracy metrics: MPJPE and PA-MPJPE (upstream's Human3.6M protocols), per joint, and 2D pixel error.

Metrics follow upstream's Human36M.evaluate (medialab-ku/ConvNeXtPose, data/Human36M/Human36M.py):
- camera-space joints are aligned at the root (Pelvis) by subtracting it from prediction and
  ground truth;
- protocol 1 (PA-MPJPE) then fits a rigid transform (rotation and translation, no scale: upstream's
  rigid_transform_3D, the Kabsch solution with the reflection case turned into a rotation) of the
  prediction to the ground truth, on all 18 joints (Thorax included);
- errors are Euclidean distances in mm over the 17 evaluation joints (Thorax excluded, Pelvis kept),
  averaged over people and joints.
Many papers' PA-MPJPE also fits a scale (similarity Procrustes); that is reported next to it as
"PA-MPJPE (scaled)". The 2D error is the mean pixel distance of the same 17 joints. summarize puts
them together for one engine on one set (means, per joint, per group). Plain numpy, no engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..spec import JOINT_NAMES, NUM_JOINTS, ROOT_JOINT

THORAX = JOINT_NAMES.index("Thorax")
# Upstream's eval_joint: every joint but Thorax (the root is kept; its root-aligned error is 0).
EVAL_JOINTS: tuple[int, ...] = tuple(j for j in range(NUM_JOINTS) if j != THORAX)


def _poses(name: str, value: object, joints: int | None = None) -> np.ndarray:
    """float64 (N, J, 3) from (N, J, 3) or (J, 3)."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a numeric array (N, J, 3), got {type(value).__name__}") from None
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[2] != 3 or (joints is not None and arr.shape[1] != joints):
        want = f"(N, {joints if joints is not None else 'J'}, 3)"
        raise ValueError(f"{name} must have shape {want} or ({joints or 'J'}, 3), got {np.shape(value)}")
    return arr


def _pair(pred: object, gt: object) -> tuple[np.ndarray, np.ndarray]:
    p, g = _poses("pred", pred), _poses("gt", gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape (N, J, 3), got {p.shape} and {g.shape}")
    if p.shape[1] < 3:
        raise ValueError(f"poses need at least 3 joints, got {p.shape[1]}")
    return p, g


def root_align(joints: object, root: int = ROOT_JOINT) -> np.ndarray:
    """(N, J, 3) -> the same with the root joint subtracted (root-relative)."""
    j = _poses("joints", joints)
    with np.errstate(invalid="ignore"):  # inf - inf: a non-finite pose stays non-finite
        return j - j[:, root:root + 1]


def rigid_align(pred: object, gt: object, *, scale: bool = False) -> np.ndarray:
    """Move each pose in pred (N, J, 3) onto gt (N, J, 3) by the least-squares rigid transform.

    Upstream's rigid_transform_3D: centre both, H = A_c^T B_c, SVD H = U S V^T, R = V U^T; when
    det R < 0 the last row of V^T is negated (the best proper rotation, never a reflection).
    With scale, the least-squares scale of that rotation is fitted too (Umeyama). A pose whose
    joints all coincide maps to gt's centroid; a pose with non-finite values gives NaN.

    Returns:
        (N, J, 3) aligned predictions (float64).
    """
    a, b = _pair(pred, gt)
    out = np.full(a.shape, np.nan)
    ok = np.isfinite(a).all(axis=(1, 2)) & np.isfinite(b).all(axis=(1, 2))
    if not ok.any():
        return out
    a, b = a[ok], b[ok]
    ca, cb = a.mean(axis=1, keepdims=True), b.mean(axis=1, keepdims=True)
    ac, bc = a - ca, b - cb
    h = np.swapaxes(ac, 1, 2) @ bc
    u, s, vt = np.linalg.svd(h)
    r = np.swapaxes(vt, 1, 2) @ np.swapaxes(u, 1, 2)
    flip = np.linalg.det(r) < 0
    if flip.any():
        vt[flip, 2] *= -1
        r[flip] = np.swapaxes(vt[flip], 1, 2) @ np.swapaxes(u[flip], 1, 2)
    rotated = ac @ np.swapaxes(r, 1, 2)
    if scale:
        var = (ac ** 2).sum(axis=(1, 2))
        trace = s[:, 0] + s[:, 1] + np.where(flip, -s[:, 2], s[:, 2])
        k = np.divide(trace, var, out=np.zeros_like(var), where=var > 0)
        rotated = rotated * k[:, None, None]
    out[ok] = rotated + cb
    return out


def joint_errors(pred_cam: object, gt_cam: object, *, align: str = "root",
                 eval_joints: Sequence[int] = EVAL_JOINTS, root: int = ROOT_JOINT) -> np.ndarray:
    """Per-person, per-joint 3D errors in mm: (N, len(eval_joints)).

    Args:
        pred_cam, gt_cam: (N, J, 3) camera-space joints in mm (absolute or not: both are root-aligned).
        align: "root" (MPJPE, protocol 2), "rigid" (PA-MPJPE as upstream's protocol 1, no scale),
            "similarity" (Procrustes with scale) or "none" (absolute MPJPE: camera space as given, which
            scores the root's position too; meaningful only with estimated root depths).
        eval_joints: joints scored after the alignment (which uses all joints).
    """
    if align not in ("root", "rigid", "similarity", "none"):
        raise ValueError(f"align must be 'root', 'rigid', 'similarity' or 'none', got {align!r}")
    p, g = _pair(pred_cam, gt_cam)
    idx = _joint_indices(eval_joints, p.shape[1])
    if not 0 <= root < p.shape[1]:
        raise ValueError(f"root must index a joint 0..{p.shape[1] - 1}, got {root}")
    if align == "none":
        with np.errstate(invalid="ignore"):  # inf - inf: a non-finite pose stays non-finite
            return np.linalg.norm(p[:, idx] - g[:, idx], axis=-1)
    p, g = root_align(p, root), root_align(g, root)
    if align != "root":
        p = rigid_align(p, g, scale=align == "similarity")
    return np.linalg.norm(p[:, idx] - g[:, idx], axis=-1)


def _joint_indices(eval_joints: Sequence[int], joints: int) -> np.ndarray:
    idx = np.asarray(list(eval_joints), dtype=np.int64)
    if idx.ndim != 1 or idx.size == 0 or (idx < 0).any() or (idx >= joints).any():
        raise ValueError(f"eval_joints must be a non-empty list of joint indices 0..{joints - 1}, got {eval_joints!r}")
    return idx


def pixel_errors(pred_img: object, gt_img: object, eval_joints: Sequence[int] = EVAL_JOINTS) -> np.ndarray:
    """(N, len(eval_joints)) image-plane distances in px between (N, J, >=2) joint arrays."""
    p, g = np.asarray(pred_img, np.float64), np.asarray(gt_img, np.float64)
    if p.ndim == 2:
        p, g = p[None], g[None]
    if p.shape != g.shape or p.ndim != 3 or p.shape[2] < 2:
        raise ValueError(f"pred_img and gt_img must have the same shape (N, J, 2 or 3), got {p.shape} and {g.shape}")
    idx = _joint_indices(eval_joints, p.shape[1])
    return np.linalg.norm(p[:, idx, :2] - g[:, idx, :2], axis=-1)


def mpjpe(pred_cam: object, gt_cam: object, eval_joints: Sequence[int] = EVAL_JOINTS) -> float:
    """Mean per-joint position error (mm) after root alignment, over people and eval joints (protocol 2)."""
    return float(np.mean(joint_errors(pred_cam, gt_cam, eval_joints=eval_joints)))


def pa_mpjpe(pred_cam: object, gt_cam: object, *, scale: bool = False,
             eval_joints: Sequence[int] = EVAL_JOINTS) -> float:
    """MPJPE after a rigid (upstream's protocol 1; with scale: similarity) alignment, in mm."""
    return float(np.mean(joint_errors(pred_cam, gt_cam, align="similarity" if scale else "rigid",
                                      eval_joints=eval_joints)))


def root_errors(pred_root: object, gt_root: object) -> dict[str, np.ndarray]:
    """Per-person errors of estimated roots (N, 3) against true ones (N, 3), camera X, Y, Z mm.

    Returns:
        {"position": (N,) Euclidean distance mm (its mean is MRPE, RootNet's metric),
         "dz": (N,) |Z_pred - Z_gt| mm, "dz_rel": (N,) |Z_pred - Z_gt| / Z_gt}.
    Raises:
        ValueError: shapes other than (N, 3) and (N, 3), or a true root at or behind the camera (Z <= 0).
    """
    p, g = (_roots(name, v) for name, v in (("pred_root", pred_root), ("gt_root", gt_root)))
    if p.shape != g.shape:
        raise ValueError(f"pred_root and gt_root must have the same shape (N, 3), got {p.shape} and {g.shape}")
    if (g[:, 2] <= 0).any():
        i = int(np.flatnonzero(g[:, 2] <= 0)[0])
        raise ValueError(f"gt_root must lie in front of the camera (Z > 0), got Z = {g[i, 2]!r} at person {i}")
    with np.errstate(invalid="ignore"):  # a non-finite estimate stays non-finite (summarize leaves it out)
        dz = np.abs(p[:, 2] - g[:, 2])
        return {"position": np.linalg.norm(p - g, axis=-1), "dz": dz, "dz_rel": dz / g[:, 2]}


def _roots(name: str, value: object) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a numeric array (N, 3), got {type(value).__name__}") from None
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3) camera X, Y, Z mm, got {np.shape(value)}")
    return arr


def root_metrics(pred_root: object, gt_root: object, pred_cam: object, gt_cam: object) -> dict[str, Any]:
    """The root figures of one engine on one set when root depths are estimated, means over the people
    whose estimate (root and pose) is finite: MRPE (mrpe, mm), mean |dZ| of the root (root_dz mm,
    root_dz_rel as a fraction of the true depth) and absolute MPJPE (mpjpe_abs: camera space, no
    alignment, the eval joints), with 'nonfinite' people left out.

    Shapes: pred_root, gt_root (N, 3) camera mm; pred_cam, gt_cam (N, J, 3) camera mm.
    """
    errs = root_errors(pred_root, gt_root)
    p, g = _pair(pred_cam, gt_cam)
    if len(p) != len(errs["dz"]):
        raise ValueError(f"pred_cam has {len(p)} people, pred_root {len(errs['dz'])}")
    finite = np.isfinite(p).all(axis=(1, 2)) & np.isfinite(np.asarray(pred_root, np.float64)).all(axis=1)
    values = {"mrpe": errs["position"], "root_dz": errs["dz"], "root_dz_rel": errs["dz_rel"],
              "mpjpe_abs": joint_errors(p, g, align="none").mean(axis=1)}
    out: dict[str, Any] = {k: float(v[finite].mean()) if finite.any() else math.nan for k, v in values.items()}
    out["root_people"] = int(finite.sum())
    return out


def summarize(pred_cam: np.ndarray, pred_img: np.ndarray | None, gt_cam: np.ndarray, gt_img: np.ndarray | None,
              groups: Sequence[str | None] | None = None) -> dict[str, Any]:
    """All metrics of one engine on one set: means, per joint, per group (e.g. action).

    People whose prediction is not finite are counted in 'nonfinite' and left out of the means.
    """
    pred_cam, gt_cam = _pair(pred_cam, gt_cam)
    finite = np.isfinite(pred_cam).all(axis=(1, 2))
    if pred_img is not None:
        finite &= np.isfinite(np.asarray(pred_img, np.float64)).all(axis=(1, 2))
    names = [JOINT_NAMES[j] for j in EVAL_JOINTS]
    errs = {"mpjpe": joint_errors(pred_cam, gt_cam)[finite],
            "pa_mpjpe": joint_errors(pred_cam, gt_cam, align="rigid")[finite],
            "pa_mpjpe_scaled": joint_errors(pred_cam, gt_cam, align="similarity")[finite]}
    if pred_img is not None and gt_img is not None:
        errs["px_2d"] = pixel_errors(pred_img, gt_img)[finite]
    out: dict[str, Any] = {"people": int(len(gt_cam)), "nonfinite": int((~finite).sum())}
    for key, e in errs.items():
        out[key] = float(e.mean()) if e.size else math.nan
    out["per_joint"] = {key: {n: float(v) for n, v in zip(names, e.mean(axis=0) if len(e) else
                                                          np.full(len(names), np.nan), strict=True)}
                        for key, e in errs.items()}
    if groups is not None:
        g = np.asarray([str(x) for x in groups], dtype=object)[finite]
        out["per_group"] = {str(name): {key: float(e[g == name].mean()) for key, e in errs.items()}
                            for name in dict.fromkeys(g)}
    return out

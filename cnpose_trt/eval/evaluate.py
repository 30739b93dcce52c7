"""Accuracy: MPJPE and PA-MPJPE (upstream's Human3.6M protocols), per joint, and 2D pixel error.

Metrics follow upstream's Human36M.evaluate (medialab-ku/ConvNeXtPose, data/Human36M/Human36M.py):
- camera-space joints are aligned at the root (Pelvis) by subtracting it from prediction and
  ground truth;
- protocol 1 (PA-MPJPE) then fits a rigid transform (rotation and translation, no scale: upstream's
  rigid_transform_3D, the Kabsch solution with the reflection case turned into a rotation) of the
  prediction to the ground truth, on all 18 joints (Thorax included);
- errors are Euclidean distances in mm over the 17 evaluation joints (Thorax excluded, Pelvis kept),
  averaged over people and joints.
Many papers' PA-MPJPE also fits a scale (similarity Procrustes); that is reported next to it as
"PA-MPJPE (scaled)". The 2D error is the mean pixel distance of the same 17 joints.

Datasets: synthetic people (cnpose_trt.synthetic, from a seed) and Human3.6M in the layout upstream
reads (annotations/Human36M_subject{S}_data.json, _camera.json, _joint_3d.json and images/, with
RootNet's bbox_root_human36m_output.json optional), with upstream's test protocol.

    python -m cnpose_trt.evaluate --engine engines/XS-fp32.onnx --engine engines/XS-int8.onnx --count 500
    python -m cnpose_trt.evaluate --engine E --h36m data/Human36M [--bbox-root bbox_root_human36m_output.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .. import checks
from ..progress import Bar, say
from ..shipped import flip_for
from ..spec import JOINT_NAMES, NUM_JOINTS, ROOT_JOINT

log = logging.getLogger(__name__)

THORAX = JOINT_NAMES.index("Thorax")
# Upstream's eval_joint: every joint but Thorax (the root is kept; its root-aligned error is 0).
EVAL_JOINTS: tuple[int, ...] = tuple(j for j in range(NUM_JOINTS) if j != THORAX)
# Human3.6M actions; action_idx 2..16 in the annotation files.
H36M_ACTIONS = ("Directions", "Discussion", "Eating", "Greeting", "Phoning", "Posing", "Purchases", "Sitting",
                "SittingDown", "Smoking", "Photo", "Waiting", "Walking", "WalkDog", "WalkTogether")
# Upstream's test protocols: subjects evaluated, and the metric the paper reports for each.
H36M_PROTOCOLS = {1: ((11,), "pa_mpjpe"), 2: ((9, 11), "mpjpe")}
H36M_TEST_SAMPLING = 64  # every 64th frame (upstream get_subsampling_ratio for 'test')
DEFAULT_SYNTHETIC_SEED = 1  # the training script draws from seed 0: seed 1 is held out

# ----------------------------------------------------------------------------------------------
# Metrics


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
        align: "root" (MPJPE, protocol 2), "rigid" (PA-MPJPE as upstream's protocol 1, no scale) or
            "similarity" (Procrustes with scale).
        eval_joints: joints scored after the alignment (which uses all joints).
    """
    if align not in ("root", "rigid", "similarity"):
        raise ValueError(f"align must be 'root', 'rigid' or 'similarity', got {align!r}")
    p, g = _pair(pred_cam, gt_cam)
    idx = _joint_indices(eval_joints, p.shape[1])
    if not 0 <= root < p.shape[1]:
        raise ValueError(f"root must index a joint 0..{p.shape[1] - 1}, got {root}")
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


# ----------------------------------------------------------------------------------------------
# Evaluation sets


@dataclasses.dataclass
class EvalImage:
    """One image's people with their ground truth.

    Shapes: boxes (P, 4) x, y, w, h (person boxes, or crop boxes used as they are when
    crop_boxes); root_depth (P,) mm used to place the prediction; intrinsics (P, 4); gt_cam,
    gt_img (P, 18, 3) camera mm and x_px, y_px, depth mm; groups and ids (P,). failed: why
    the image's people cannot be estimated (a RootNet box wholly outside the image): they are
    not run, count as failed and are left out of the means.
    """

    key: str
    load: Callable[[], np.ndarray]
    boxes: np.ndarray
    crop_boxes: bool
    root_depth: np.ndarray
    intrinsics: np.ndarray
    gt_cam: np.ndarray
    gt_img: np.ndarray
    groups: tuple[str | None, ...]
    ids: tuple[Any, ...]
    failed: str | None = None


@dataclasses.dataclass
class EvalSet:
    """A named list of EvalImages and how it was made (recorded in the report)."""

    name: str
    images: list[EvalImage]
    info: dict[str, Any]
    baseline: dict[str, Any] | None = None

    @property
    def people(self) -> int:
        return sum(len(im.boxes) for im in self.images)

    def ground_truth(self) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """(gt_cam (N, 18, 3), gt_img (N, 18, 3), groups (N,)) over all people in order."""
        if not self.images:
            return np.zeros((0, NUM_JOINTS, 3)), np.zeros((0, NUM_JOINTS, 3)), []
        return (np.concatenate([im.gt_cam for im in self.images]), np.concatenate([im.gt_img for im in self.images]),
                [g for im in self.images for g in im.groups])


def synthetic_set(seed: int = DEFAULT_SYNTHETIC_SEED, count: int = 500, **options: Any) -> EvalSet:
    """`count` synthetic scenes (cnpose_trt.synthetic.dataset(seed, count, **options)), boxes and root from GT.

    Images are re-rendered when needed (rendering is deterministic), not kept in memory.
    The report's baseline is the training distribution's mean pose predicted for everybody.
    """
    from ..io.synthetic import dataset, mean_pose, synthesize

    images = []
    for i, scene in enumerate(dataset(seed, count, **options)):
        p = len(scene)
        seeds = scene.seed

        def load(seeds: tuple[int, ...] = seeds) -> np.ndarray:
            return synthesize(seeds, **options).image

        images.append(EvalImage(f"{seed}:{i}", load, scene.boxes, False, scene.root_depth,
                                np.broadcast_to(scene.intrinsics, (p, 4)).copy(), scene.joints_cam, scene.joints_img,
                                (None,) * p, tuple(f"{seed}:{i}:{k}" for k in range(p))))
    gt_cam = np.concatenate([im.gt_cam for im in images]) if images else np.zeros((0, NUM_JOINTS, 3))
    mean = mean_pose()
    baseline = None
    if len(gt_cam):
        guess = np.broadcast_to(mean, gt_cam.shape)
        baseline = {"what": "the synthetic pose distribution's mean pose (root-relative camera mm) for everybody",
                    **{k: v for k, v in summarize(guess, None, gt_cam, None).items() if k != "per_joint"}}
    info = {"kind": "synthetic", "seed": seed, "count": count, "options": {k: _jsonable(v) for k, v in options.items()},
            "boxes": "ground truth (tight, small margin), upstream's box rule", "root_depth": "ground truth"}
    return EvalSet(f"synthetic seed {seed}, {count} images", images, info, baseline)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from None


def h36m_set(root: str | Path, *, protocol: int = 2, subjects: Sequence[int] | None = None,
             sampling: int = H36M_TEST_SAMPLING, bbox_root: str | Path | None = None,
             limit: int | None = None) -> EvalSet:
    """Human3.6M test people exactly as upstream's Human36M('test') selects and prepares them.

    Layout: root/annotations/Human36M_subject{S}_data.json (COCO-style 'images' and
    'annotations'), _camera.json ({cam_idx: {R, t, f, c}}), _joint_3d.json
    ({action: {subaction: {frame: 17 x 3 world mm}}}), and root/images/<file_name>.

    Per annotation, in file order: keep it when the image's subject is tested and
    frame_idx % sampling == 0; joints: world -> camera (X_cam = R X_world + t) with Thorax
    appended as the shoulders' midpoint, -> pixels (x = f X / Z + c). Without bbox_root the
    annotation's bbox goes through upstream's box rule (people whose box it rejects are left out)
    and the ground-truth root depth places the prediction (upstream's use_gt_info); with RootNet's
    bbox_root JSON ([{image_id, bbox, root_cam}]), its box is used as the crop box as it is and its
    root_cam's depth places the prediction.

    Inconsistent files are refused in one line naming the file, the entry and the field: an image
    id listed twice (in 'images', across the subjects' files, or as two annotations' image_id),
    an image_id twice in bbox_root, a root_cam that is not 3 finite numbers with Z > 0, a camera
    whose R is not a rotation (orthonormal within 1e-3, det +1) or whose t, f, c are not finite
    and in range. A frame whose ground truth is unusable (a joint not finite or beyond 1e9 mm, or
    at or behind the camera, Z <= 0) is left out and counted: info['skipped_ground_truth'], its
    image ids in info['skipped_ground_truth_images'] (the first 10), and a line of the table.

    Args:
        protocol: 1 (subject 11) or 2 (subjects 9 and 11); subjects overrides.
        sampling: keep every sampling-th frame (64 in upstream's test).
        limit: keep only the first `limit` people (quick checks).
    Raises:
        FileNotFoundError: a missing annotation file or image. ValueError: bad arguments or files.
    """
    from ..ops.geometry import process_boxes

    root = Path(root)
    if protocol not in H36M_PROTOCOLS:
        raise ValueError(f"protocol must be 1 or 2, got {protocol!r}")
    subject_list = tuple(int(s) for s in (subjects if subjects is not None else H36M_PROTOCOLS[protocol][0]))
    if not subject_list:
        raise ValueError("subjects must name at least one subject")
    checks.integer("sampling", sampling, 1)
    checks.integer("limit", limit, 1, none=True)
    annot = root / "annotations"
    rootnet = None if bbox_root is None else _read_bbox_root(Path(bbox_root))

    images: list[EvalImage] = []
    skipped = 0
    outside = 0  # ground-truth boxes wholly outside their image: refused here (issue 20), not upstream
    failed_boxes: list[str] = []  # RootNet boxes the estimator cannot use (wholly outside the image, ...)
    bad_truth: list[str] = []  # frames left out: unusable ground truth (_usable_truth)
    seen_ids: dict[Any, str] = {}  # image id -> where it was first listed, over all subjects' files
    for subject in subject_list:
        prefix = annot / f"Human36M_subject{subject}"
        data = _read_json(Path(f"{prefix}_data.json"), "Human3.6M annotation file")
        cameras = _read_json(Path(f"{prefix}_camera.json"), "Human3.6M camera file")
        joints = _read_json(Path(f"{prefix}_joint_3d.json"), "Human3.6M joint file")
        by_id, anns = _index_h36m_data(data, Path(f"{prefix}_data.json"), seen_ids)
        checked_cams: dict[str, tuple[np.ndarray, ...]] = {}
        for ann in anns:
            try:
                img = by_id[ann["image_id"]]
                if int(img["subject"]) not in subject_list or int(img["frame_idx"]) % sampling:
                    continue
                cam_key = str(img["cam_idx"])
                cam = cameras[cam_key]
                world = np.asarray(joints[str(img["action_idx"])][str(img["subaction_idx"])][str(img["frame_idx"])],
                                   np.float64)
                width, height, file_name = int(img["width"]), int(img["height"]), str(img["file_name"])
                action = int(img["action_idx"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{prefix}_*.json: annotation {ann.get('id')!r} (image {ann.get('image_id')!r}) "
                                 f"lacks or garbles {exc}") from None
            if cam_key not in checked_cams:
                checked_cams[cam_key] = _h36m_camera(cam, Path(f"{prefix}_camera.json"), cam_key)
            rot, t, f, c = checked_cams[cam_key]
            if world.shape != (NUM_JOINTS - 1, 3):
                raise ValueError(f"{prefix}_joint_3d.json: image {img['id']}: joints must be 17 x 3, "
                                 f"got {world.shape}")
            with np.errstate(all="ignore"):  # unusable values are found below, by name, without numpy warnings
                world = np.concatenate([world, (world[11:12] + world[14:15]) / 2])  # add_thorax
                gt_cam = world @ rot.T + t
                gt_img = np.stack([gt_cam[:, 0] / gt_cam[:, 2] * f[0] + c[0],
                                   gt_cam[:, 1] / gt_cam[:, 2] * f[1] + c[1], gt_cam[:, 2]], axis=1)
            if not _usable_truth(world, gt_cam, gt_img):
                bad_truth.append(str(img["id"]))
                continue
            if rootnet is not None:
                entry = rootnet.get(str(img["id"]))
                if entry is None:
                    raise ValueError(f"{bbox_root} has no entry for image_id {img['id']}")
                box, root_depth, is_crop = entry["bbox"], float(entry["root"][2]), True
                failed = _unusable_crop_box(box, (width, height), img["id"])
                if failed is not None:
                    failed_boxes.append(failed)
            else:
                box = np.asarray(ann["bbox"], np.float64)
                try:
                    process_boxes(box, (width, height))
                except ValueError as exc:
                    if "lies outside" in str(exc):  # upstream would shift it into the image and score it
                        outside += 1
                    else:
                        skipped += 1  # upstream: process_bbox returned None -> `continue`
                    continue
                root_depth, is_crop, failed = float(gt_cam[ROOT_JOINT, 2]), False, None
            path = root / "images" / file_name
            images.append(EvalImage(str(img["id"]), _ImageFile(path), box[None], is_crop, np.array([root_depth]),
                                    np.array([[f[0], f[1], c[0], c[1]]]), gt_cam[None], gt_img[None],
                                    (_action_name(action),), (img["id"],), failed))
            if limit is not None and len(images) >= limit:
                break
        if limit is not None and len(images) >= limit:
            break
    missing = [im.load.path for im in images if isinstance(im.load, _ImageFile) and not im.load.path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} Human3.6M images are missing, e.g. {', '.join(map(str, missing[:3]))}")
    info = {"kind": "human36m", "root": str(root), "protocol": protocol, "subjects": list(subject_list),
            "sampling": sampling, "limit": limit, "skipped_boxes": skipped, "outside_boxes": outside,
            "skipped_ground_truth": len(bad_truth), "skipped_ground_truth_images": bad_truth[:_NAMED],
            "boxes": "RootNet (used as crop boxes)" if rootnet is not None else "ground truth, upstream's box rule",
            "root_depth": f"RootNet ({bbox_root})" if rootnet is not None else "ground truth"}
    if rootnet is not None:
        info["failed_boxes"] = len(failed_boxes)
        info["failed_box_examples"] = failed_boxes[:3]
    return EvalSet(f"Human3.6M protocol {protocol} (subjects {', '.join(map(str, subject_list))})", images, info)


def _unusable_crop_box(box: np.ndarray, size: tuple[int, int], image_id: Any) -> str | None:
    """Why the estimator cannot use a RootNet box as a crop box (geometry.check_crop_boxes: wholly
    outside the image, empty, too large), or None. A box of another shape is refused later."""
    from ..ops.geometry import check_crop_boxes

    if box.shape != (4,):
        return None
    try:
        check_crop_boxes(box[None], size)
    except ValueError as exc:
        return f"image_id {image_id}: RootNet " + str(exc).replace("crop_boxes[0]", "bbox", 1)
    return None


# Camera and world values beyond this (mm or px), or a focal length under its inverse, are no camera
# or person: refused (camera) or left out (ground truth), as float64 would overflow downstream.
_LIMIT = 1e9
_ROTATION_TOL = 1e-3  # max |R R^T - I|: a rotation written with a few decimals passes, 2 I does not
_NAMED = 10  # image ids named in the report per kind of skipped frame


def _read_bbox_root(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """RootNet's [{image_id, bbox, root_cam}] -> {str(image_id): {bbox (4,), root (3,)}}, every entry checked."""
    rows = _read_json(path, "RootNet bbox/root file")
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of {{image_id, bbox, root_cam}}, got {type(rows).__name__}")
    out: dict[str, dict[str, np.ndarray]] = {}
    first: dict[str, int] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not all(k in r for k in ("image_id", "bbox", "root_cam")):
            raise ValueError(f"{path}: entry {i}: every entry needs image_id, bbox, root_cam")
        image_id = r["image_id"]
        if not checks.identifier(image_id):
            raise ValueError(f"{path}: entry {i}: image_id must be an integer or a string, got {image_id!r}")
        key = str(image_id)
        if key in first:
            raise ValueError(f"{path}: entry {i}: image_id {image_id!r} repeats entry {first[key]} "
                             f"(one RootNet box and root per image)")
        first[key] = i
        bbox = _numbers(r["bbox"], (4,), f"{path}: entry {i} (image_id {image_id!r}): bbox", "4 numbers x, y, w, h")
        root = _numbers(r["root_cam"], (3,), f"{path}: entry {i} (image_id {image_id!r}): root_cam",
                        "3 numbers X, Y, Z mm")
        if not np.isfinite(root).all() or np.abs(root).max() > _LIMIT or root[2] <= 0:
            raise ValueError(f"{path}: entry {i} (image_id {image_id!r}): root_cam must be finite, within "
                             f"+-{_LIMIT:g} mm, with Z > 0 (in front of the camera), got {root.tolist()}")
        out[key] = {"bbox": bbox, "root": root}
    return out


def _numbers(value: Any, shape: tuple[int, ...], where: str, what: str) -> np.ndarray:
    """float64 array of the given shape, or a ValueError: `where` must be `what`."""
    try:
        arr = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != shape:
        raise ValueError(f"{where} must be {what}, got {json.dumps(value)[:80]}")
    return arr


def _index_h36m_data(data: Any, path: Path, seen_ids: dict[Any, str]) -> tuple[dict[Any, dict], list[dict]]:
    """(images by id, annotations) of one _data.json; a repeated image id (in images, also across the
    subjects' files, or as the image_id of two annotations: one person per image) is refused by index."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path} must hold 'images' (with 'id') and 'annotations'")
    by_id: dict[Any, dict] = {}
    for i, img in enumerate(data["images"]):
        image_id = img.get("id") if isinstance(img, dict) else None
        if not checks.identifier(image_id):
            raise ValueError(f"{path}: images[{i}]: id must be an integer or a string, got {image_id!r}")
        if image_id in seen_ids:
            raise ValueError(f"{path}: images[{i}]: id {image_id!r} repeats {seen_ids[image_id]} "
                             f"(image ids must be unique)")
        seen_ids[image_id] = f"{path.name} images[{i}]"
        by_id[image_id] = img
    first: dict[Any, int] = {}
    for i, ann in enumerate(data["annotations"]):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not checks.identifier(image_id):
            raise ValueError(f"{path}: annotations[{i}]: image_id must be an integer or a string, got {image_id!r}")
        if image_id in first:
            raise ValueError(f"{path}: annotations[{i}]: image_id {image_id!r} repeats annotations[{first[image_id]}] "
                             f"(one person per Human3.6M image)")
        first[image_id] = i
    return by_id, data["annotations"]


def _h36m_camera(cam: Any, path: Path, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(R (3, 3), t (3,), f (2,), c (2,)) of one camera entry; refused, naming it, unless R is a rotation
    (orthonormal within _ROTATION_TOL, det +1) and t, f, c are finite and in range (f > 0)."""
    where = f"{path}: camera {key}"
    if not isinstance(cam, dict) or not all(k in cam for k in ("R", "t", "f", "c")):
        raise ValueError(f"{where} needs R, t, f, c")
    rot = _numbers(cam["R"], (3, 3), f"{where}: R", "3 x 3 numbers")
    t = _numbers(cam["t"], (3,), f"{where}: t", "3 numbers (mm)")
    f = _numbers(cam["f"], (2,), f"{where}: f", "2 numbers fx, fy (px)")
    c = _numbers(cam["c"], (2,), f"{where}: c", "2 numbers cx, cy (px)")
    for name, v in (("R", rot), ("t", t), ("c", c)):
        if not np.isfinite(v).all() or np.abs(v).max() > _LIMIT:
            raise ValueError(f"{where}: {name} must be finite and within +-{_LIMIT:g}, got {v.tolist()}")
    if not np.isfinite(f).all() or (f < 1 / _LIMIT).any() or (f > _LIMIT).any():
        raise ValueError(f"{where}: f must be focal lengths in px between {1 / _LIMIT:g} and {_LIMIT:g}, "
                         f"got {f.tolist()}")
    off = float(np.abs(rot @ rot.T - np.eye(3)).max())
    det = float(np.linalg.det(rot))
    if off > _ROTATION_TOL or det <= 0:
        raise ValueError(f"{where}: R is not a rotation (R R^T differs from I by up to {off:.3g}, det {det:.3g}; "
                         f"allowed: {_ROTATION_TOL:g}, det +1)")
    return rot, t, f, c


def _usable_truth(world: np.ndarray, gt_cam: np.ndarray, gt_img: np.ndarray) -> bool:
    """A frame is scored only when its joints are finite, in range, and all in front of the camera (Z > 0)."""
    return bool(np.isfinite(world).all() and np.abs(world).max() <= _LIMIT and (gt_cam[:, 2] > 0).all()
                and np.isfinite(gt_img).all())


def _action_name(action_idx: int) -> str:
    k = action_idx - 2
    return H36M_ACTIONS[k] if 0 <= k < len(H36M_ACTIONS) else f"action {action_idx}"


class _ImageFile:
    """A lazy image loader that knows its path (checked up front, read when needed)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> np.ndarray:
        from ..io.preprocess import load_image

        return load_image(self.path)


def _jsonable(v: Any) -> Any:
    """JSON-ready copy: numpy values to Python, paths to strings, NaN/inf to None."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (tuple, list, np.ndarray)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Path):
        return str(v)
    return v


# ----------------------------------------------------------------------------------------------
# Running engines


def Progress(total: int, label: str, enabled: bool = True, stream: TextIO | None = None) -> Bar:  # noqa: N802
    """The evaluation's bar (images per engine)."""
    return Bar(total, label, unit="images", enabled=enabled, stream=stream)


def predict_set(estimator: Any, images: Sequence[EvalImage], *, flip: bool = True,
                progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run a PoseEstimator over the set: (pred_cam (N, 18, 3), pred_img (N, 18, 3)) in the set's order.

    Person boxes go through upstream's box rule; crop boxes (RootNet) are used as they are. The
    people of an image marked failed are not run: their predictions are NaN (counted as failed).
    """
    def items() -> Iterator[dict[str, Any]]:
        for im in images:
            if im.failed is None:
                yield {"image": im.load(), ("crop_boxes" if im.crop_boxes else "boxes"): im.boxes,
                       "root_depth": im.root_depth, "intrinsics": im.intrinsics}

    if any(im.crop_boxes for im in images):
        import inspect

        if "crop_boxes" not in inspect.signature(estimator.predict).parameters:
            raise ValueError("this PoseEstimator cannot take crop boxes (RootNet boxes are used as they are); "
                             "update cnpose_trt or evaluate with ground-truth boxes (no --bbox-root)")
    cams, imgs = [], []
    results = iter(estimator.predict_iter(items(), flip=flip))
    for im in images:
        if im.failed is not None:
            cams.append(np.full((len(im.boxes), NUM_JOINTS, 3), np.nan))
            imgs.append(np.full((len(im.boxes), NUM_JOINTS, 3), np.nan))
            if progress is not None:
                progress.update()
            continue
        res = next(results, None)
        if res is None:
            raise RuntimeError(f"image {im.key}: the estimator gave fewer results than images")
        if res.camera is None or len(res) != len(im.boxes):
            raise RuntimeError(f"image {im.key}: expected {len(im.boxes)} people with camera coordinates")
        cams.append(np.asarray(res.camera, np.float64))
        imgs.append(np.asarray(res.image, np.float64))
        if progress is not None:
            progress.update()
    if not cams:
        return np.zeros((0, NUM_JOINTS, 3)), np.zeros((0, NUM_JOINTS, 3))
    return np.concatenate(cams), np.concatenate(imgs)


def engine_label(engine: Any) -> str:
    """'XS fp32', 'XS int8 entropy', ... from the engine's metadata."""
    meta = getattr(engine, "meta", {}) or {}
    label = f"{meta.get('variant', engine.spec.name)} {meta.get('precision', 'fp32')}"
    method = (meta.get("precision_options") or {}).get("calib_method")
    if meta.get("precision") == "int8" and method:
        label += f" {method}"
    return label


def evaluate(engines: Sequence[Any], dataset: EvalSet, *, flip: bool = True, labels: Sequence[str] | None = None,
             progress: bool = True, keep_predictions: bool = False, threads: int | None = None,
             spinning: bool | None = None, **estimator_options: Any) -> dict[str, Any]:
    """Evaluate engines side by side on one set.

    Args:
        engines: loaded Engines (cnpose_trt.load_engine) or engine paths.
        dataset: from synthetic_set or h36m_set.
        flip: the flip test (upstream's published numbers use it); off for the shipped synthetic
            model, which it misleads (shipped.flip_for: the entry's flip_test and flip_notice say so).
        labels: one name per engine (default: variant, precision, calibration method).
        keep_predictions: put each person's root-relative camera joints and image joints in the report.
        threads, spinning: session options for the engines given as paths (load_engine's; None: defaults).
    Returns:
        the report: dataset info, protocol, machine, and per engine its metrics (summarize).
    """
    from ..backends import session_options
    from ..pipeline.estimator import PoseEstimator
    from ..runtime.engine import load_engine

    if not engines:
        raise ValueError("engines must name at least one engine")
    options = session_options(threads, spinning)
    loaded = [e if hasattr(e, "infer") else load_engine(e, **options) for e in engines]
    names = list(labels) if labels is not None else [engine_label(e) for e in loaded]
    if len(names) != len(loaded):
        raise ValueError(f"labels must give one name per engine ({len(loaded)}), got {len(names)}")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # identical labels (two fp32 files) get a suffix
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n} #{seen[n]}"
    gt_cam, gt_img, groups = dataset.ground_truth()
    has_groups = any(g is not None for g in groups)
    report: dict[str, Any] = {
        "dataset": {"name": dataset.name, "images": len(dataset.images), "people": dataset.people, **dataset.info},
        "flip_test": flip,
        "protocol": {"joints": [JOINT_NAMES[j] for j in EVAL_JOINTS], "root": JOINT_NAMES[ROOT_JOINT],
                     "mpjpe": "root-aligned, Thorax excluded (upstream protocol 2)",
                     "pa_mpjpe": "rigid (rotation + translation, no scale) alignment on all 18 joints, "
                                 "then as MPJPE (upstream protocol 1)",
                     "pa_mpjpe_scaled": "similarity (with scale) alignment, then as MPJPE",
                     "px_2d": "mean image distance of the same joints, px"},
        "machine": machine_info(), "engines": []}
    if dataset.baseline is not None:
        report["baseline"] = dataset.baseline
    for engine, name in zip(loaded, names, strict=True):
        est = PoseEstimator(engine, **estimator_options)
        bar = Progress(len(dataset.images), name, enabled=progress)
        started = time.perf_counter()
        engine_flip, notice = flip_for(getattr(engine, "meta", None), flip)
        try:
            pred_cam, pred_img = predict_set(est, dataset.images, flip=engine_flip, progress=bar)
        finally:
            bar.close()  # stops its ticker however the set ends
        seconds = time.perf_counter() - started
        entry = {"label": name, "engine": str(getattr(engine, "path", "")), "variant": engine.spec.name,
                 "flip_test": engine_flip, **({"flip_notice": notice} if notice else {}),
                 "precision": getattr(engine, "precision", "fp32"), "backend": getattr(engine, "backend", "?"),
                 "weights": (getattr(engine, "meta", {}) or {}).get("weights", {}),
                 "seconds": round(seconds, 3), "images_per_second": round(len(dataset.images) / max(seconds, 1e-9), 2),
                 "metrics": summarize(pred_cam, pred_img, gt_cam, gt_img, groups if has_groups else None)}
        if keep_predictions:
            ids = [i for im in dataset.images for i in im.ids]
            rel = pred_cam - pred_cam[:, ROOT_JOINT:ROOT_JOINT + 1]
            entry["predictions"] = [{"id": _jsonable(i), "joint_cam": r.tolist(), "joint_img": p.tolist()}
                                    for i, r, p in zip(ids, rel, pred_img, strict=True)]
        report["engines"].append(entry)
    return report


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


# ----------------------------------------------------------------------------------------------
# Tables and command line


def _fmt(v: Any, width: int = 9) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return f"{'-':>{width}}"
    return f"{v:>{width}.2f}"


def _flip_words(report: dict[str, Any]) -> str:
    flips = {e.get("flip_test", report["flip_test"]) for e in report["engines"]} or {report["flip_test"]}
    if len(flips) == 1:
        return "on" if flips.pop() else "off"
    return "on for " + ", ".join(e["label"] for e in report["engines"] if e["flip_test"]) + ", off for the others"


def format_report(report: dict[str, Any]) -> str:
    """The report as terminal tables: summary, per joint (MPJPE), per group (H3.6M actions)."""
    lines = [f"{report['dataset']['name']}: {report['dataset']['people']} people, "
             f"flip test {_flip_words(report)}; mm unless noted"]
    bad_truth = report["dataset"].get("skipped_ground_truth", 0)
    if bad_truth:
        named = [str(i) for i in report["dataset"].get("skipped_ground_truth_images", [])]
        lines.append(f"left out: {bad_truth} frame{'s' if bad_truth > 1 else ''} whose ground truth is unusable "
                     f"(not finite, or a joint at Z <= 0): image {', '.join(named)}"
                     f"{', ...' if bad_truth > len(named) else ''}")
    outside = report["dataset"].get("outside_boxes", 0)
    if outside:
        lines.append(f"left out: {outside} ground-truth box{'es' if outside > 1 else ''} wholly outside the image "
                     "(upstream's process_bbox would shift such a box into the image and score it)")
    width = max([len(e["label"]) for e in report["engines"]] + [24])
    head = f"{'engine':<{width}} {'MPJPE':>9} {'PA-MPJPE':>9} {'PA(scale)':>9} {'2D px':>9} {'people':>7} " \
           f"{'failed':>6} {'img/s':>7}"
    lines += [head, "-" * len(head)]
    for e in report["engines"]:
        m = e["metrics"]
        lines.append(f"{e['label']:<{width}} {_fmt(m['mpjpe'])} {_fmt(m['pa_mpjpe'])} {_fmt(m['pa_mpjpe_scaled'])} "
                     f"{_fmt(m.get('px_2d'))} {m['people']:>7} {m['nonfinite']:>6} {e['images_per_second']:>7.1f}")
    failed = report["dataset"].get("failed_boxes")
    if failed:
        examples = report["dataset"].get("failed_box_examples") or ["?"]
        lines.append(f"{failed} {'person' if failed == 1 else 'people'} not estimated (counted in 'failed', not in "
                     f"the means): the RootNet box is unusable, e.g. {examples[0]}")
    if "baseline" in report:
        b = report["baseline"]
        lines.append(f"{'mean pose (no network)':<{width}} {_fmt(b['mpjpe'])} {_fmt(b['pa_mpjpe'])} "
                     f"{_fmt(b['pa_mpjpe_scaled'])} {_fmt(None)} {b['people']:>7}")
    labels = [e["label"] for e in report["engines"]]
    col = max(10, *(len(lb) for lb in labels)) if labels else 10
    lines += ["", "MPJPE per joint (mm)", f"{'joint':<12} " + " ".join(f"{lb:>{col}}" for lb in labels)]
    for name in report["protocol"]["joints"]:
        lines.append(f"{name:<12} " + " ".join(_fmt(e["metrics"]["per_joint"]["mpjpe"][name], col)
                                               for e in report["engines"]))
    groups = report["engines"][0]["metrics"].get("per_group") if report["engines"] else None
    if groups:
        lines += ["", "MPJPE / PA-MPJPE per action (mm)",
                  f"{'action':<14} " + " ".join(f"{lb:>{col + 8}}" for lb in labels)]
        for g in groups:
            cells = []
            for e in report["engines"]:
                v = e["metrics"]["per_group"].get(g, {})
                cells.append(f"{_fmt(v.get('mpjpe'), 8)} /{_fmt(v.get('pa_mpjpe'), 7)}".rjust(col + 8))
            lines.append(f"{g:<14} " + " ".join(cells))
    return "\n".join(lines)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cnpose-trt eval` / `python -m cnpose_trt.evaluate`."""
    from ..spec import VARIANTS

    e = p.add_argument_group("engines (one or several, evaluated side by side)")
    e.add_argument("--engine", type=Path, action="append", default=[], metavar="FILE",
                   help="a built engine (file or .json sidecar); repeat for several (e.g. fp32, fp16, int8)")
    e.add_argument("--label", action="append", default=None, help="a name per --engine (default: variant precision)")
    e.add_argument("--variant", type=str.upper, choices=list(VARIANTS), default=None,
                   help="also evaluate the fp32 onnxruntime engine of this variant (built or reused)")
    e.add_argument("--checkpoint", type=Path, help="weights for --variant (default: random, meaningless)")
    e.add_argument("--engines", type=Path, default=None, help="engine cache folder for --variant (default ./engines)")
    from ..backends import add_session_arguments

    add_session_arguments(e)
    d = p.add_argument_group("data (default: synthetic people)")
    d.add_argument("--seed", type=int, default=DEFAULT_SYNTHETIC_SEED,
                   help=f"synthetic set seed (default {DEFAULT_SYNTHETIC_SEED}; training uses 0)")
    d.add_argument("--count", type=int, default=500, help="synthetic images (default 500)")
    d.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("W", "H"),
                   help="synthetic image size (default 256 256)")
    d.add_argument("--people", type=int, default=1, help="people per synthetic image (default 1)")
    d.add_argument("--occluders", type=float, default=0.0,
                   help="chance of an occluder per synthetic person (default 0)")
    d.add_argument("--h36m", type=Path, metavar="DIR",
                   help="Human3.6M in upstream's layout (DIR/annotations/*.json, DIR/images/) instead of synthetic")
    d.add_argument("--protocol", type=int, choices=(1, 2), default=2,
                   help="Human3.6M protocol: 1 = subject 11, 2 = subjects 9 and 11 (default 2)")
    d.add_argument("--subjects", type=lambda s: [int(x) for x in s.split(",")], default=None, metavar="S1,S2",
                   help="Human3.6M subjects (overrides --protocol's)")
    d.add_argument("--sampling", type=int, default=H36M_TEST_SAMPLING,
                   help=f"Human3.6M: every n-th frame (default {H36M_TEST_SAMPLING}, upstream's test)")
    d.add_argument("--bbox-root", type=Path, metavar="FILE",
                   help="RootNet's bbox_root_human36m_output.json: its boxes and root depths instead of ground truth")
    d.add_argument("--limit", type=int, default=None, help="Human3.6M: only the first N people")
    o = p.add_argument_group("output")
    o.add_argument("--no-flip", dest="flip", action="store_false", help="no flip test (default: on, as upstream)")
    o.add_argument("--json", type=Path, help="write the report as JSON")
    o.add_argument("--predictions", action="store_true", help="include every person's predicted joints in the JSON")
    o.add_argument("--plot", type=Path, metavar="PNG", help="picture of the per-joint MPJPE, engines side by side")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")


def run_eval(args: argparse.Namespace) -> int:
    """Run `cnpose-trt eval` from parsed add_eval_arguments options; prints the tables, returns 0."""
    from ..runtime.engine import load_engine

    if args.plot is not None:
        from ..io.draw import check_image_suffix

        check_image_suffix(args.plot, "--plot")
    from ..backends import session_options

    options = session_options(args.threads, args.spinning)
    engines = [load_engine(path, **options) for path in args.engine]
    labels = list(args.label) if args.label else None
    if labels is not None and len(labels) != len(args.engine):
        raise ValueError(f"--label must be given once per --engine ({len(args.engine)}), got {len(labels)}")
    if args.variant is not None:
        from ..config import BuildConfig, EngineRequest
        from ..runtime.open import open_engine

        config = BuildConfig(args.variant, args.checkpoint, backend="onnxruntime", out_dir=args.engines)
        engines.append(open_engine(EngineRequest(build=config, load=options), progress=say))
        if labels is not None:
            labels.append(f"{args.variant} fp32 (built)")
    elif args.checkpoint is not None:
        raise ValueError("--checkpoint goes with --variant (engines given with --engine carry their weights)")
    if not engines:
        raise ValueError("give at least one --engine FILE (or --variant to build one)")
    for e in engines:
        if (getattr(e, "meta", {}) or {}).get("weights", {}).get("random"):
            print(f"warning: {e.path} has random weights: its accuracy is meaningless", file=sys.stderr)
    if args.h36m is not None:
        dataset = h36m_set(args.h36m, protocol=args.protocol, subjects=args.subjects, sampling=args.sampling,
                           bbox_root=args.bbox_root, limit=args.limit)
    else:
        if args.bbox_root is not None or args.limit is not None or args.subjects is not None:
            raise ValueError("--bbox-root, --limit and --subjects apply to --h36m only")
        if args.count < 1:
            raise ValueError(f"--count must be >= 1, got {args.count}")
        dataset = synthetic_set(args.seed, args.count, width=args.size[0], height=args.size[1], people=args.people,
                                occluder_prob=args.occluders)
    if not dataset.images:
        raise ValueError(f"{dataset.name}: no people to evaluate (check the subjects, sampling and files)")
    for e in engines:
        notice = flip_for(getattr(e, "meta", None), args.flip)[1]
        if notice:
            print(f"{e.path}: {notice}", file=sys.stderr)
    report = evaluate(engines, dataset, flip=args.flip, labels=labels, progress=args.progress,
                      keep_predictions=args.predictions)
    print(format_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_jsonable(report), indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot is not None:
        from ..io.draw import eval_chart, save_image

        save_image(args.plot, eval_chart(report))
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    """`python -m cnpose_trt.evaluate ...` (the same as `cnpose-trt eval ...`)."""
    from ..errors import CnposeError

    parser = argparse.ArgumentParser(prog="python -m cnpose_trt.evaluate", description=__doc__.splitlines()[0])
    add_eval_arguments(parser)
    args = parser.parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        return run_eval(args)
    except (CnposeError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

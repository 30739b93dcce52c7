"""Evaluation sets: people with their ground truth, ready for the estimator (EvalSet of EvalImages).

Two sources: synthetic people (cnpose_trt.synthetic, from a seed; images re-rendered when needed)
and Human3.6M in the layout upstream reads (annotations/Human36M_subject{S}_data.json, _camera.json,
_joint_3d.json and images/, with RootNet's bbox_root_human36m_output.json optional), selected and
prepared as upstream's test protocol does; every file is checked as it is read, and what is left
out is counted for the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import checks
from ..io.preprocess import load_image
from ..io.synthetic import dataset, mean_pose, synthesize
from ..ops.geometry import check_crop_boxes, process_boxes
from ..spec import NUM_JOINTS, ROOT_JOINT
from .metrics import summarize

# Human3.6M actions; action_idx 2..16 in the annotation files.
H36M_ACTIONS = ("Directions", "Discussion", "Eating", "Greeting", "Phoning", "Posing", "Purchases", "Sitting",
                "SittingDown", "Smoking", "Photo", "Waiting", "Walking", "WalkDog", "WalkTogether")
# Upstream's test protocols: subjects evaluated, and the metric the paper reports for each.
H36M_PROTOCOLS = {1: ((11,), "pa_mpjpe"), 2: ((9, 11), "mpjpe")}
H36M_TEST_SAMPLING = 64  # every 64th frame (upstream get_subsampling_ratio for 'test')
DEFAULT_SYNTHETIC_SEED = 1  # the training script draws from seed 0: seed 1 is held out


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
    root = Path(root)
    if protocol not in H36M_PROTOCOLS:
        raise ValueError(f"protocol must be 1 or 2, got {protocol!r}")
    subject_list = tuple(int(s) for s in (subjects if subjects is not None else H36M_PROTOCOLS[protocol][0]))
    if not subject_list:
        raise ValueError("subjects must name at least one subject")
    checks.integer("sampling", sampling, 1)
    checks.integer("limit", limit, 1, none=True)
    reader = _H36mReader(root, subject_list, sampling, limit, bbox_root)
    for subject in subject_list:
        reader.read_subject(subject)
        if reader.full():
            break
    images = reader.images
    missing = [im.load.path for im in images if isinstance(im.load, _ImageFile) and not im.load.path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} Human3.6M images are missing, e.g. {', '.join(map(str, missing[:3]))}")
    return EvalSet(f"Human3.6M protocol {protocol} (subjects {', '.join(map(str, subject_list))})", images,
                   reader.info(protocol))


@dataclasses.dataclass
class _Frame:
    """One annotation that upstream's test selects, read from a subject's three files."""

    image_id: Any
    cam_key: str
    camera: Any  # the camera file's entry, checked by _h36m_camera
    world: np.ndarray  # as the joint file gives it (17 x 3 world mm when well formed)
    size: tuple[int, int]  # width, height px
    file_name: str
    action: int


def _select(ann: dict, by_id: dict[Any, dict], cameras: Any, joints: Any, subjects: tuple[int, ...],
            sampling: int, prefix: Path) -> _Frame | None:
    """The annotation's frame when upstream's test keeps it (a tested subject, frame_idx % sampling == 0),
    else None; a missing or garbled field is refused, naming the annotation."""
    try:
        img = by_id[ann["image_id"]]
        if int(img["subject"]) not in subjects or int(img["frame_idx"]) % sampling:
            return None
        cam_key = str(img["cam_idx"])
        cam = cameras[cam_key]
        world = np.asarray(joints[str(img["action_idx"])][str(img["subaction_idx"])][str(img["frame_idx"])],
                           np.float64)
        width, height, file_name = int(img["width"]), int(img["height"]), str(img["file_name"])
        action = int(img["action_idx"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{prefix}_*.json: annotation {ann.get('id')!r} (image {ann.get('image_id')!r}) "
                         f"lacks or garbles {exc}") from None
    return _Frame(img["id"], cam_key, cam, world, (width, height), file_name, action)


def _ground_truth(frame: _Frame, camera: tuple[np.ndarray, ...], prefix: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(gt_cam (18, 3) camera mm, gt_img (18, 3) x_px, y_px, depth mm) of a frame: world -> camera
    (X_cam = R X_world + t) with Thorax appended as the shoulders' midpoint, -> pixels (x = f X / Z + c);
    None when the ground truth is unusable (_usable_truth)."""
    rot, t, f, c = camera
    world = frame.world
    if world.shape != (NUM_JOINTS - 1, 3):
        raise ValueError(f"{prefix}_joint_3d.json: image {frame.image_id}: joints must be 17 x 3, got {world.shape}")
    with np.errstate(all="ignore"):  # unusable values are found below, by name, without numpy warnings
        world = np.concatenate([world, (world[11:12] + world[14:15]) / 2])  # add_thorax
        gt_cam = world @ rot.T + t
        gt_img = np.stack([gt_cam[:, 0] / gt_cam[:, 2] * f[0] + c[0],
                           gt_cam[:, 1] / gt_cam[:, 2] * f[1] + c[1], gt_cam[:, 2]], axis=1)
    if not _usable_truth(world, gt_cam, gt_img):
        return None
    return gt_cam, gt_img


class _H36mReader:
    """h36m_set's steps over the subjects' files, in file order: select each annotation's frame, check its
    camera (once per camera), compute its ground truth, choose its box and root depth; it keeps the
    people and counts what it leaves out, for the report."""

    def __init__(self, root: Path, subjects: tuple[int, ...], sampling: int, limit: int | None,
                 bbox_root: str | Path | None) -> None:
        self.root, self.subjects, self.sampling, self.limit, self.bbox_root = root, subjects, sampling, limit, bbox_root
        self.rootnet = None if bbox_root is None else _read_bbox_root(Path(bbox_root))
        self.images: list[EvalImage] = []
        self.skipped = 0  # boxes upstream's box rule rejects (its process_bbox returns None: `continue`)
        self.outside = 0  # ground-truth boxes wholly outside their image: refused here (issue 20), not upstream
        self.failed_boxes: list[str] = []  # RootNet boxes the estimator cannot use (wholly outside the image, ...)
        self.bad_truth: list[str] = []  # frames left out: unusable ground truth (_usable_truth)
        self.seen_ids: dict[Any, str] = {}  # image id -> where it was first listed, over all subjects' files

    def full(self) -> bool:
        return self.limit is not None and len(self.images) >= self.limit

    def read_subject(self, subject: int) -> None:
        prefix = self.root / "annotations" / f"Human36M_subject{subject}"
        data = _read_json(Path(f"{prefix}_data.json"), "Human3.6M annotation file")
        cameras = _read_json(Path(f"{prefix}_camera.json"), "Human3.6M camera file")
        joints = _read_json(Path(f"{prefix}_joint_3d.json"), "Human3.6M joint file")
        by_id, anns = _index_h36m_data(data, Path(f"{prefix}_data.json"), self.seen_ids)
        checked_cams: dict[str, tuple[np.ndarray, ...]] = {}
        for ann in anns:
            frame = _select(ann, by_id, cameras, joints, self.subjects, self.sampling, prefix)
            if frame is None:
                continue
            if frame.cam_key not in checked_cams:
                checked_cams[frame.cam_key] = _h36m_camera(frame.camera, Path(f"{prefix}_camera.json"), frame.cam_key)
            truth = _ground_truth(frame, checked_cams[frame.cam_key], prefix)
            if truth is None:
                self.bad_truth.append(str(frame.image_id))
                continue
            self.add(ann, frame, checked_cams[frame.cam_key], *truth)
            if self.full():
                break

    def add(self, ann: dict, frame: _Frame, camera: tuple[np.ndarray, ...], gt_cam: np.ndarray,
            gt_img: np.ndarray) -> None:
        placed = self.box_and_root(ann, frame, gt_cam)
        if placed is None:
            return
        box, root_depth, is_crop, failed = placed
        _, _, f, c = camera
        path = self.root / "images" / frame.file_name
        self.images.append(EvalImage(str(frame.image_id), _ImageFile(path), box[None], is_crop, np.array([root_depth]),
                                     np.array([[f[0], f[1], c[0], c[1]]]), gt_cam[None], gt_img[None],
                                     (_action_name(frame.action),), (frame.image_id,), failed))

    def box_and_root(self, ann: dict, frame: _Frame,
                     gt_cam: np.ndarray) -> tuple[np.ndarray, float, bool, str | None] | None:
        """(box, root depth, is a crop box, why the estimator cannot use it) of a frame's person: RootNet's
        when given, else the annotation's box under upstream's box rule and the ground-truth root depth
        (None: the rule rejects the box, or it lies wholly outside the image; counted)."""
        if self.rootnet is not None:
            entry = self.rootnet.get(str(frame.image_id))
            if entry is None:
                raise ValueError(f"{self.bbox_root} has no entry for image_id {frame.image_id}")
            failed = _unusable_crop_box(entry["bbox"], frame.size, frame.image_id)
            if failed is not None:
                self.failed_boxes.append(failed)
            return entry["bbox"], float(entry["root"][2]), True, failed
        box = np.asarray(ann["bbox"], np.float64)
        try:
            process_boxes(box, frame.size)
        except ValueError as exc:
            if "lies outside" in str(exc):  # upstream would shift it into the image and score it
                self.outside += 1
            else:
                self.skipped += 1  # upstream: process_bbox returned None -> `continue`
            return None
        return box, float(gt_cam[ROOT_JOINT, 2]), False, None

    def info(self, protocol: int) -> dict[str, Any]:
        """How the set was made and what was left out (the report's dataset entry)."""
        rootnet = self.rootnet is not None
        info = {"kind": "human36m", "root": str(self.root), "protocol": protocol, "subjects": list(self.subjects),
                "sampling": self.sampling, "limit": self.limit, "skipped_boxes": self.skipped,
                "outside_boxes": self.outside, "skipped_ground_truth": len(self.bad_truth),
                "skipped_ground_truth_images": self.bad_truth[:_NAMED],
                "boxes": "RootNet (used as crop boxes)" if rootnet else "ground truth, upstream's box rule",
                "root_depth": f"RootNet ({self.bbox_root})" if rootnet else "ground truth"}
        if rootnet:
            info["failed_boxes"] = len(self.failed_boxes)
            info["failed_box_examples"] = self.failed_boxes[:3]
        return info


def _unusable_crop_box(box: np.ndarray, size: tuple[int, int], image_id: Any) -> str | None:
    """Why the estimator cannot use a RootNet box as a crop box (geometry.check_crop_boxes: wholly
    outside the image, empty, too large), or None. A box of another shape is refused later."""
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

"""Root depths without hand-given ones: a RootNet engine, or the prior (gamma = 1).

RootNet sees exactly the crops ConvNeXtPose sees (upstream's box rule, a 256 x 256 patch, the same
(v - mean) / std on 0..255 RGB values: reference/rootnet.md), so PoseEstimator crops each person
once and hands the same crops to both engines: per engine call of the pose network, one RootNet
call on the un-mirrored crops (Engine.infer cuts it where RootNet's max_batch is smaller). The
depths enter the decode as root_depth; the RootNet roots (x px, y px, depth mm) come back in
PoseResult.roots, and PoseResult.root_source says where the depths came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import backends
from ..cache import sidecar_path
from ..config import BuildConfig, EngineRequest
from ..io.preprocess import check_image, crop_people, resolve_crop_boxes
from ..ops.rootnet import k_values, prior_roots, roots_to_image
from ..runtime.engine import Engine
from ..runtime.open import engine_path, open_engine, options_taken

PRIOR = "prior"
SOURCES = ("given", "rootnet", PRIOR)  # PoseResult.root_source: hand-given, a RootNet engine, the prior
ROOTNET_WANTED = ("a RootNet engine (loaded, or its engine file / .json), an EngineRequest, a RootNet checkpoint "
                  "(.pth.tar snapshot; its engine is built or reused from the cache) or 'prior'")


class RootStep:
    """(P, 3) roots (x px, y px, depth mm) of a batch's people from their crops: a RootNet engine's, or
    the prior's (processed box centre, depth = k: no engine, no crops needed)."""

    def __init__(self, engine: Engine | None) -> None:
        if engine is not None:
            engine.require_model("rootnet", "root depths")
        self.engine = engine
        self.source = PRIOR if engine is None else "rootnet"

    @property
    def needs_crops(self) -> bool:
        return self.engine is not None

    def check_crops(self, input_shape: tuple[int, ...], what: str) -> None:
        """Refuse, at construction, a pose engine whose crops RootNet cannot take (a custom input size)."""
        if self.engine is not None and tuple(self.engine.spec.input_shape) != tuple(input_shape):
            raise ValueError(f"rootnet: the RootNet engine takes {self.engine.spec.input_shape} crops, {what} "
                             f"makes {tuple(input_shape)}; both engines run on the same crops")

    def __call__(self, crops: np.ndarray | None, crop_boxes: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
        """Roots of P people: crops (P, 3, S, S) normalised (None for the prior), crop_boxes (P, 4) the
        boxes they were cut from, intrinsics (4,) or (P, 4) fx, fy, cx, cy."""
        if self.engine is None:
            return prior_roots(crop_boxes, intrinsics)
        if not len(crop_boxes):
            return np.zeros((0, 3))
        if crops is None or len(crops) != len(crop_boxes):
            raise ValueError("RootNet needs one crop per crop box")
        raw = self.engine.infer(np.ascontiguousarray(crops, dtype=self.engine.input_dtype))
        roots = roots_to_image(np.asarray(raw, np.float64), crop_boxes, k_values(crop_boxes, intrinsics))
        bad = ~(np.isfinite(roots).all(axis=1) & (roots[:, 2] > 0))
        if bad.any():  # gamma <= 0 or overflow: no depth to place a pose at (weights not RootNet's trained ones?)
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"RootNet gave person {i} a root depth of {roots[i, 2]:.6g} mm (gamma "
                             f"{raw[i][2]:.6g}): not a depth; are the RootNet weights trained ones?")
        return roots


def open_rootnet(rootnet: Any, *, backend: str = "auto", precision: str = "fp32", engine_dir: Any = None,
                 load: dict[str, Any] | None = None) -> RootStep | None:
    """A RootStep from what a caller names as `rootnet` (None: none; a RootStep as it is; see
    ROOTNET_WANTED). A checkpoint is built as resolve_rootnet builds it.

    Raises:
        ValueError: something that is none of those. EngineError: an engine of another network, ...
    """
    if rootnet is None or isinstance(rootnet, RootStep):
        return rootnet
    if isinstance(rootnet, Engine):
        return RootStep(rootnet)
    if isinstance(rootnet, EngineRequest):
        return RootStep(open_engine(rootnet))
    where = resolve_rootnet(rootnet, backend=backend, precision=precision, engine_dir=engine_dir)
    if where == PRIOR:
        return RootStep(None)
    return RootStep(load_rootnet(where, load))


def load_rootnet(path: str | Path, options: dict[str, Any] | None = None) -> Engine:
    """A RootNet engine file loaded with those of the pose engine's load options its own backend takes (a
    torch pose engine's device means nothing to an ONNX Runtime RootNet)."""
    return open_engine(EngineRequest(engine=path, load=options_taken(path, options or {})))


def resolve_rootnet(rootnet: Any, *, backend: str = "auto", precision: str = "fp32", engine_dir: Any = None,
                    progress: Any = None) -> Path | str:
    """What `rootnet` names, as a RootNet engine file or "prior", without loading it: an engine file (its
    sidecar beside it) as it is; a checkpoint built into a RootNet engine (or found in the cache) with
    the pose engine's backend (the default backend where that one builds no RootNet: torch, openvino) and
    precision (fp32 for an int8 pose engine: an INT8 RootNet needs calibration images, `build --model rootnet
    --int8`; fp32 for bf16 on the default backend).
    Batch jobs resolve here once and ship the file (Ray) or load it.

    Raises:
        ValueError: a value that is none of those (an Engine or EngineRequest: see open_rootnet).
    """
    if isinstance(rootnet, str) and rootnet == PRIOR:
        return PRIOR
    if not isinstance(rootnet, (str, Path)) or not str(rootnet):
        raise ValueError(f"rootnet must be {ROOTNET_WANTED}, got {rootnet!r:.80}")
    path = Path(rootnet)
    if sidecar_path(path).is_file():  # an engine: its sidecar is what makes a file an engine
        return path
    if not path.is_file():
        raise ValueError(f"rootnet: {path} is neither an engine (no {sidecar_path(path).name} beside it) nor a "
                         f"checkpoint file; give {ROOTNET_WANTED}")
    if backend in backends.NAMES and "rootnet" not in backends.get(backend).MODELS:
        backend = "auto"  # a pose engine on a backend that builds no RootNet (torch, openvino): the default
    if precision == "int8" or (backend == "auto" and precision not in ("fp32", "fp16")):
        precision = "fp32"  # INT8 needs calibration images; bf16 is openvino's alone
    config = BuildConfig(None, path, model="rootnet", backend=backend, precision=precision, out_dir=engine_dir)
    return engine_path(EngineRequest(build=config), progress)


def estimate_roots(engine: Any, image: np.ndarray, boxes: Any = None, *, crop_boxes: Any = None,
                   intrinsics: Any, crop_method: str = "auto") -> np.ndarray:
    """Each person's root (pelvis) in one image: (P, 3) x px, y px in the image, depth mm (camera Z).

    Args:
        engine: a RootNet engine (load_engine / open_engine, or an engine file), or "prior" (depth = k,
            gamma = 1: a prior from the box size, no network; x, y the processed box's centre).
        image: (H, W, 3) RGB, uint8 or float 0..255.
        boxes: (P, 4) or (4,) person boxes x, y, w, h px; upstream's box rule is applied.
        crop_boxes: instead of boxes, boxes that already went through that rule.
        intrinsics: fx, fy, cx, cy: (4,) or (P, 4); fx, fy enter k (depth scales with the focal length).
        crop_method: "auto", "fused" or "opencv" (see PoseEstimator).
    Camera coordinates: cnpose_trt.ops.rootnet.roots_to_camera(roots, intrinsics).
    Raises:
        ValueError: bad boxes, intrinsics or image; EngineError: an engine that is not RootNet's.
    """
    step = open_rootnet(engine)
    if step is None:
        raise ValueError(f"engine must be {ROOTNET_WANTED}, got None")
    image = check_image(image)
    boxes_ = resolve_crop_boxes(boxes, crop_boxes, image.shape)
    crops = None
    if step.needs_crops and len(boxes_):
        crops = crop_people(image, boxes_, step.engine.spec.input_size, method=crop_method)
    return step(crops, boxes_, intrinsics)

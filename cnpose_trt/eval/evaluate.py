"""Engines side by side on one evaluation set: each engine's predictions (predict_set) scored
(metrics.summarize) into one report with the dataset, the protocol and the machine (evaluate).

cnpose_trt.evaluate is this module (the old path): it also carries the metrics' and the datasets'
public names (mpjpe, pa_mpjpe, summarize, synthetic_set, h36m_set, EvalSet, ...), re-exported from
eval.metrics and eval.datasets. The command line is cnpose_trt.cli.eval:

    python -m cnpose_trt.evaluate --engine engines/XS-fp32.onnx --engine engines/XS-int8.onnx --count 500
    python -m cnpose_trt.evaluate --engine E --h36m data/Human36M [--bbox-root bbox_root_human36m_output.json]
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import numpy as np

from ..backends import session_options
from ..ops.rootnet import roots_to_camera
from ..pipeline.estimator import PoseEstimator
from ..pipeline.roots import PRIOR, open_rootnet
from ..progress import Bar
from ..runtime.engine import load_engine
from ..shipped import flip_for
from ..spec import JOINT_NAMES, NUM_JOINTS, ROOT_JOINT
from .datasets import (  # noqa: F401  (re-exports: cnpose_trt.evaluate's names)
    DEFAULT_SYNTHETIC_SEED,
    H36M_ACTIONS,
    H36M_PROTOCOLS,
    H36M_TEST_SAMPLING,
    EvalImage,
    EvalSet,
    _jsonable,
    h36m_set,
    synthetic_set,
)
from .metrics import (  # noqa: F401  (re-exports: cnpose_trt.evaluate's names)
    EVAL_JOINTS,
    THORAX,
    joint_errors,
    mpjpe,
    pa_mpjpe,
    pixel_errors,
    rigid_align,
    root_align,
    root_errors,
    root_metrics,
    summarize,
)


def Progress(total: int, label: str, enabled: bool = True, stream: TextIO | None = None) -> Bar:  # noqa: N802
    """The evaluation's bar (images per engine)."""
    return Bar(total, label, unit="images", enabled=enabled, stream=stream)


def predict_set(estimator: Any, images: Sequence[EvalImage], *, flip: bool = True,
                progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run a PoseEstimator over the set: (pred_cam (N, 18, 3), pred_img (N, 18, 3)) in the set's order.

    Person boxes go through upstream's box rule; crop boxes (RootNet) are used as they are. The
    people of an image marked failed are not run: their predictions are NaN (counted as failed).
    """
    pred_cam, pred_img, _ = predict_set_roots(estimator, images, flip=flip, progress=progress, estimated=None)
    return pred_cam, pred_img


def predict_set_roots(estimator: Any, images: Sequence[EvalImage], *, flip: bool = True,
                      progress: Progress | None = None,
                      estimated: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """predict_set, and with `estimated` (the estimator's root source, "rootnet" or "prior") the root depths
    are the estimator's own (the set's are not passed): then also its roots in camera space (N, 3) mm
    (PoseResult.roots through the image's intrinsics; NaN for failed people), else None.
    """
    def items() -> Iterator[dict[str, Any]]:
        for im in images:
            if im.failed is None:
                item = {"image": im.load(), ("crop_boxes" if im.crop_boxes else "boxes"): im.boxes,
                        "intrinsics": im.intrinsics}
                if estimated is None:
                    item["root_depth"] = im.root_depth
                yield item

    if any(im.crop_boxes for im in images):
        import inspect

        if "crop_boxes" not in inspect.signature(estimator.predict).parameters:
            raise ValueError("this PoseEstimator cannot take crop boxes (RootNet boxes are used as they are); "
                             "update cnpose_trt or evaluate with ground-truth boxes (no --bbox-root)")
    cams, imgs, roots = [], [], []
    results = iter(estimator.predict_iter(items(), flip=flip))
    for im in images:
        if im.failed is not None:
            for out in (cams, imgs):
                out.append(np.full((len(im.boxes), NUM_JOINTS, 3), np.nan))
            roots.append(np.full((len(im.boxes), 3), np.nan))
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
        if estimated is not None:
            roots.append(_camera_roots(res, im, estimated))
        if progress is not None:
            progress.update()
    if not cams:
        cams, imgs, roots = [np.zeros((0, NUM_JOINTS, 3))], [np.zeros((0, NUM_JOINTS, 3))], [np.zeros((0, 3))]
    return np.concatenate(cams), np.concatenate(imgs), None if estimated is None else np.concatenate(roots)


def _camera_roots(res: Any, im: EvalImage, estimated: str) -> np.ndarray:
    """An image's estimated roots in camera mm (P, 3); a result whose depths came from elsewhere is refused."""
    if len(res) and (res.root_source != estimated or res.roots is None):
        raise RuntimeError(f"image {im.key}: expected root depths from {estimated}, the estimator's came from "
                           f"{res.root_source}")
    if not len(res):
        return np.zeros((0, 3))
    return roots_to_camera(res.roots, im.intrinsics)


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
             spinning: bool | None = None, rootnet: Any = None, **estimator_options: Any) -> dict[str, Any]:
    """Evaluate engines side by side on one set.

    Args:
        engines: loaded Engines (cnpose_trt.load_engine) or engine paths.
        dataset: from synthetic_set or h36m_set.
        flip: the flip test (upstream's published numbers use it); off for the shipped synthetic
            model, which it misleads (shipped.flip_for: the entry's flip_test and flip_notice say so).
        labels: one name per engine (default: variant, precision, calibration method).
        keep_predictions: put each person's root-relative camera joints and image joints in the report.
        threads, spinning: session options for the engines given as paths (load_engine's; None: defaults).
        rootnet: None (the set's root depths: ground truth), or where root depths come from instead:
            a RootNet engine (loaded, its file, an EngineRequest), a RootNet checkpoint (built with
            estimator_options' backend, fp32) or "prior" (depth = k, gamma = 1). Opened once for all
            engines; each engine's metrics then gain the root figures (root_metrics: MRPE, |dZ|,
            absolute MPJPE), and the report says the source in report["roots"].
    Returns:
        the report: dataset info, protocol, machine, and per engine its metrics (summarize).
    """
    if not engines:
        raise ValueError("engines must name at least one engine")
    options = session_options(threads, spinning)
    roots, root_engine = _open_roots(rootnet, dataset, estimator_options, options)
    loaded = [e if hasattr(e, "infer") else load_engine(e, **options) for e in engines]
    names = _labels(loaded, labels)
    truth = dataset.ground_truth()
    report = _report_head(dataset, flip)
    if roots is not None:
        report["roots"] = roots
        report["dataset"]["root_depth"] = roots["what"]
        report["protocol"].update(ROOT_PROTOCOL)
        estimator_options = {**estimator_options, "rootnet": root_engine or PRIOR}
    for engine, name in zip(loaded, names, strict=True):
        report["engines"].append(_engine_entry(engine, name, dataset, truth, flip, progress, keep_predictions,
                                               estimator_options, None if roots is None else roots["source"]))
    return report


ROOT_PROTOCOL = {"mrpe": "mean root position error: Euclidean distance of the estimated root (RootNet's or the "
                         "prior's x, y, depth through the camera) from the true pelvis, camera mm",
                 "root_dz": "mean |Z estimated - Z true| of the root, mm (root_dz_rel: over Z true)",
                 "mpjpe_abs": "absolute MPJPE: camera space, no alignment, the same joints as MPJPE"}


def _open_roots(rootnet: Any, dataset: EvalSet, estimator_options: dict[str, Any],
                load: dict[str, Any]) -> tuple[dict[str, Any] | None, Any]:
    """(the report's roots entry {source, what[, engine path]}, the RootNet engine opened once or None for
    the prior); (None, None) without `rootnet`."""
    if rootnet is None:
        return None, None
    if any(im.crop_boxes for im in dataset.images):
        raise ValueError("rootnet: this set's root depths already come from RootNet's file (bbox_root); "
                         "evaluate with ground-truth boxes to estimate root depths")
    step = open_rootnet(rootnet, backend=estimator_options.get("backend", "auto"),
                        engine_dir=estimator_options.get("engine_dir"), load=load)
    if step is None:
        return None, None
    if step.engine is None:
        return {"source": step.source, "what": PRIOR_WORDS}, None
    path = str(getattr(step.engine, "path", ""))
    return {"source": step.source, "engine": path, "what": f"RootNet ({path})"}, step.engine


PRIOR_WORDS = "the prior (depth = k, gamma = 1: a 2000 mm person filling the processed box)"


def _labels(loaded: list[Any], labels: Sequence[str] | None) -> list[str]:
    """One name per engine (engine_label by default, with the backend where the engines' backends differ);
    identical ones (two fp32 files) get a suffix."""
    names = list(labels) if labels is not None else [engine_label(e) for e in loaded]
    kinds = {(getattr(e, "meta", None) or {}).get("backend") for e in loaded}
    if labels is None and len(kinds) > 1:  # engines of several backends side by side: say which is which
        names = [f"{n} {(getattr(e, 'meta', None) or {}).get('backend', '?')}" for n, e in zip(names, loaded,
                                                                                             strict=True)]
    if len(names) != len(loaded):
        raise ValueError(f"labels must give one name per engine ({len(loaded)}), got {len(names)}")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n} #{seen[n]}"
    return names


def _report_head(dataset: EvalSet, flip: bool) -> dict[str, Any]:
    """The report before any engine ran: the dataset, the protocol, the machine (and the set's baseline)."""
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
    return report


def _engine_entry(engine: Any, name: str, dataset: EvalSet, truth: tuple[np.ndarray, np.ndarray, list[str | None]],
                  flip: bool, progress: bool, keep_predictions: bool,
                  estimator_options: dict[str, Any], estimated: str | None = None) -> dict[str, Any]:
    """One engine's entry of the report: it runs over the set, timed, and its predictions are scored
    against the set's ground truth (EvalSet.ground_truth); with estimated root depths (estimated: the
    root source), its roots are scored too (root_metrics)."""
    gt_cam, gt_img, groups = truth
    has_groups = any(g is not None for g in groups)
    est = PoseEstimator(engine, **estimator_options)
    bar = Progress(len(dataset.images), name, enabled=progress)
    started = time.perf_counter()
    engine_flip, notice = flip_for(getattr(engine, "meta", None), flip)
    try:
        pred_cam, pred_img, pred_root = predict_set_roots(est, dataset.images, flip=engine_flip, progress=bar,
                                                          estimated=estimated)
    finally:
        bar.close()  # stops its ticker however the set ends
    seconds = time.perf_counter() - started
    entry = {"label": name, "engine": str(getattr(engine, "path", "")), "variant": engine.spec.name,
             "flip_test": engine_flip, **({"flip_notice": notice} if notice else {}),
             "precision": getattr(engine, "precision", "fp32"), "backend": getattr(engine, "backend", "?"),
             "weights": (getattr(engine, "meta", {}) or {}).get("weights", {}),
             "seconds": round(seconds, 3), "images_per_second": round(len(dataset.images) / max(seconds, 1e-9), 2),
             "metrics": summarize(pred_cam, pred_img, gt_cam, gt_img, groups if has_groups else None)}
    if pred_root is not None:
        entry["root_source"] = estimated
        entry["metrics"].update(root_metrics(pred_root, gt_cam[:, ROOT_JOINT], pred_cam, gt_cam))
    if keep_predictions:
        ids = [i for im in dataset.images for i in im.ids]
        rel = pred_cam - pred_cam[:, ROOT_JOINT:ROOT_JOINT + 1]
        entry["predictions"] = [{"id": _jsonable(i), "joint_cam": r.tolist(), "joint_img": p.tolist()}
                                for i, r, p in zip(ids, rel, pred_img, strict=True)]
    return entry


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

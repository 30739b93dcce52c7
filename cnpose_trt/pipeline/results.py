"""What PoseEstimator gives back: PoseResult (one image's people), Timings (seconds per stage), and
the step that turns a batch's (P, J, 10) decode result into one PoseResult per image (an image cut
into parts joined into one when its last part comes)."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..spec import JOINT_NAMES


@dataclasses.dataclass
class PoseResult:
    """Poses of P people. Shapes: crop_boxes (P, 4); cells, image (P, J, 3); confidence (P, J).

    image holds x_px, y_px, depth_mm (root-relative when no root depth was given); camera holds
    X, Y, Z in mm (camera frame) when intrinsics and root depth were given, else None.
    root_source says where the root depths came from: "given" (by the caller), "rootnet" (a RootNet
    engine), "prior" (depth = k, gamma = 1: a guess from the box size) or None (root-relative);
    roots (P, 3) holds RootNet's (or the prior's) root x px, y px, depth mm, else None.
    """

    boxes: np.ndarray
    crop_boxes: np.ndarray
    cells: np.ndarray
    confidence: np.ndarray
    image: np.ndarray
    camera: np.ndarray | None
    root_relative: bool
    joint_names: tuple[str, ...] = JOINT_NAMES
    roots: np.ndarray | None = None
    root_source: str | None = None

    def __len__(self) -> int:
        return len(self.cells)

    def to_dict(self) -> list[dict[str, Any]]:
        """JSON-ready list, one entry per person, joints by name."""
        people = []
        for p in range(len(self)):
            joints = {}
            for j, name in enumerate(self.joint_names):
                entry = {"x_px": float(self.image[p, j, 0]), "y_px": float(self.image[p, j, 1]),
                         "depth_mm": float(self.image[p, j, 2]), "confidence": float(self.confidence[p, j])}
                if self.camera is not None:
                    entry["camera_mm"] = [float(v) for v in self.camera[p, j]]
                joints[name] = entry
            person = {"bbox": [float(v) for v in self.boxes[p]],
                      "crop_box": [float(v) for v in self.crop_boxes[p]],
                      "depth": "root-relative" if self.root_relative else "absolute",
                      "joints": joints}
            if self.root_source is not None:
                person["root_source"] = self.root_source
            if self.roots is not None:
                person["root"] = dict(zip(("x_px", "y_px", "depth_mm"), map(float, self.roots[p]), strict=True))
            people.append(person)
        return people


class Timings:
    """Seconds spent per stage (prepare runs on several threads: its time is summed over them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.seconds = {"prepare": 0.0, "infer": 0.0, "decode": 0.0}  # "roots" joins once RootNet ran
            self.images = self.people = 0

    def add(self, stage: str, seconds: float, images: int = 0, people: int = 0) -> None:
        with self._lock:
            if stage not in ("prepare", "infer", "roots", "decode"):
                raise ValueError(f"stage must be prepare, infer, roots or decode, got {stage!r}")
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.images += images
            self.people += people

    def shares(self) -> dict[str, float]:
        """Each stage's share of the summed stage time."""
        total = sum(self.seconds.values()) or 1.0
        return {k: v / total for k, v in self.seconds.items()}

    def __repr__(self) -> str:
        with self._lock:
            seconds, images, people = dict(self.seconds), self.images, self.people
        total = sum(seconds.values()) or 1.0
        stages = ", ".join(f"{k} {v:.3f} s ({v / total:.0%})" for k, v in seconds.items())
        per = f", {seconds['infer'] / people * 1e3:.2f} ms infer per person" if people else ""
        return f"Timings({images} images, {people} people: {stages}{per})"


def to_host(packed: Any) -> np.ndarray:
    """float64 numpy copy of a decode result (numpy or torch, host or device)."""
    if hasattr(packed, "detach"):
        packed = packed.detach().cpu().numpy()
    return np.asarray(packed, dtype=np.float64)


def assemble(batch: list[Any], packed: np.ndarray | None, joints: int) -> list[PoseResult]:
    """Split a batch's (P, J, 10) decode result into one PoseResult per image (an image cut into
    parts: one when its last part comes; batches are assembled in order). batch: items.Item."""
    results, offset = [], 0
    for it in batch:
        p = len(it.boxes)
        part = np.zeros((0, joints, 10)) if p == 0 else np.asarray(packed[offset:offset + p], np.float64)
        offset += p
        source = it.root_source or (None if it.root_depth is None else "given")
        res = PoseResult(it.boxes, it.crop_boxes, part[..., 0:3], part[..., 3], part[..., 4:7],
                         None if it.intrinsics is None else part[..., 7:10], it.root_depth is None,
                         roots=it.roots, root_source=source)
        if it.whole is None:
            results.append(res)
            continue
        it.whole.parts.append(res)
        if it.rest is None:
            results.append(joined(it.whole.parts))
    return results


def joined(parts: list[PoseResult]) -> PoseResult:
    """One image's PoseResult from the PoseResults of its parts, in order."""
    first = parts[0]

    def cat(name: str) -> Any:
        return None if getattr(first, name) is None else np.concatenate([getattr(r, name) for r in parts])

    return PoseResult(cat("boxes"), cat("crop_boxes"), cat("cells"), cat("confidence"), cat("image"), cat("camera"),
                      first.root_relative, roots=cat("roots"), root_source=first.root_source)


def finished(results: list[PoseResult]) -> Future[list[PoseResult]]:
    """Results already computed, as the Future a path's run() returns."""
    done: Future[list[PoseResult]] = Future()
    done.set_result(results)
    return done


class Later:
    """A batch's results, computed when asked for (after the GPU work behind them is enqueued)."""

    def __init__(self, compute: Any) -> None:
        self._compute = compute

    def result(self) -> list[PoseResult]:
        return self._compute()

"""The items PoseEstimator works on: what a caller's item may be (read, image_list, per_image), one
image's people on their way through the pipeline (Item; Rest and Whole for an image with more
people than one engine call takes), how people are cut into engine calls (call_chunks), and a
batch's engine input and decode post-processing inputs (crops, post)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from ..ops.geometry import as_array, check_intrinsics, check_root_depth, per_person
from .results import PoseResult


class Whole:
    """The PoseResults of an image's parts, joined into one when its last part is decoded."""

    def __init__(self) -> None:
        self.parts: list[PoseResult] = []


@dataclasses.dataclass
class Rest:
    """An image's people from `first` on, not cropped yet (arrays over all of its people)."""

    image: np.ndarray
    boxes: np.ndarray
    crop_boxes: np.ndarray
    root_depth: np.ndarray | None
    intrinsics: np.ndarray | None
    first: int
    whole: Whole


@dataclasses.dataclass(eq=False)
class Item:
    """One image's people on their way through the pipeline."""

    boxes: np.ndarray
    crop_boxes: np.ndarray
    root_depth: np.ndarray | None
    intrinsics: np.ndarray | None
    crops: Any = None          # (P, 3, S, S) host crops, or device crops (float images on the device path)
    mirrored: Any = None       # (P, 3, S, S) the mirrored crops when flipping (host crops), else None
    image_dev: Any = None      # device path: the uint8 image cut by the crop kernel: on the device, or staged
    ready: Any = None          # device path: event marking the upload's (or device crops') arrival
    affines: np.ndarray | None = None  # device path: (P, 2, 3) crop maps of image_dev
    host_image: np.ndarray | None = None  # device path: a uint8 image its prep run still has to stage
    whole: Whole | None = None  # a part of an image with more people than one engine call takes
    rest: Rest | None = None    # the people after this part, cropped when this part is taken
    roots: np.ndarray | None = None  # (P, 3) x px, y px, depth mm from RootNet or the prior (roots.RootStep)
    root_source: str | None = None   # where root_depth came from: roots.SOURCES, None for root-relative


def call_chunks(people: int, per_call: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most per_call people covering 0..people: how an image's people
    (or a batch's) are cut into engine calls on every path, host crops and GPU crops alike."""
    per_call = max(1, int(per_call))
    return [(start, min(people, start + per_call)) for start in range(0, people, per_call)]


def per_call(max_batch: int, flip: bool) -> int:
    """People per engine call: with the flip test each person is two crops."""
    return max(1, max_batch // 2) if flip else max(1, max_batch)


_ITEM_KEYS = ("image", "boxes", "crop_boxes", "root_depth", "intrinsics")


def read(entry: Any, estimated_roots: bool = False) -> dict[str, Any]:
    """An item as a dict with every key of _ITEM_KEYS (missing ones None); bad items refused.
    estimated_roots: root depths come from RootNet or the prior, so intrinsics alone are enough."""
    if isinstance(entry, dict):
        unknown = set(entry) - set(_ITEM_KEYS)
        if unknown or "image" not in entry or (("boxes" in entry) == ("crop_boxes" in entry)):
            raise ValueError("an item dict needs 'image' and one of 'boxes' (person boxes) or 'crop_boxes' "
                             f"(already processed, used as they are); optional 'root_depth', 'intrinsics'; "
                             f"got keys {sorted(entry)}")
        item = {k: entry.get(k) for k in _ITEM_KEYS}
    elif isinstance(entry, (tuple, list)) and 2 <= len(entry) <= 4:
        image, boxes, *rest = entry
        rest += [None] * (2 - len(rest))
        item = {"image": image, "boxes": boxes, "crop_boxes": None, "root_depth": rest[0], "intrinsics": rest[1]}
    else:
        raise TypeError("items must be (image, boxes[, root_depth[, intrinsics]]) tuples or dicts with 'image' and "
                        f"'boxes' or 'crop_boxes', got {type(entry).__name__}")
    if item["intrinsics"] is not None and item["root_depth"] is None and not estimated_roots:
        raise ValueError("intrinsics need root_depth: camera coordinates require the absolute depth of the root "
                         "(or let RootNet estimate it: PoseEstimator(..., rootnet=...))")
    return item


NEEDS_CAMERA = ("intrinsics are needed to estimate root depths: RootNet's depth is gamma * k, k from the focal "
                "lengths (give fx, fy, cx, cy per image; upstream's demo assumes 1500, 1500 and the image centre)")


def people(item: dict[str, Any], crop_boxes: np.ndarray, estimated_roots: bool = False) -> dict[str, Any]:
    """An item's per-person arrays (Item's first fields), checked: boxes (the crop boxes where only
    those were given), crop_boxes, root_depth and intrinsics. estimated_roots: an item without
    root_depth has it estimated (RootNet or the prior), for which it needs intrinsics."""
    p = len(crop_boxes)
    boxes = crop_boxes if item["boxes"] is None else as_array("boxes", item["boxes"], (4,))
    root = per_person("root_depth", item["root_depth"], p, ())
    check_root_depth(root)
    k = per_person("intrinsics", item["intrinsics"], p, (4,))
    check_intrinsics(k)
    if estimated_roots and p and root is None and k is None:
        raise ValueError(NEEDS_CAMERA)
    return {"boxes": boxes, "crop_boxes": crop_boxes, "root_depth": root, "intrinsics": k}


_IMAGES_WANTED = "one (H, W, 3) RGB image (uint8, or float in 0..255) or a list of them (arrays or file paths)"


def image_list(images: Any) -> tuple[bool, list[Any]]:
    """predict's images as (one image?, list of images); anything else refused in one line."""
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            return True, [images]
        if images.ndim == 4:
            return False, list(images)
        hint = ": a grayscale image? stack it to (H, W, 3) uint8" if images.ndim == 2 else ""
        raise ValueError(f"images must be {_IMAGES_WANTED}, got a numpy array of shape {images.shape}{hint}")
    if isinstance(images, (str, Path)):
        return True, [images]
    if hasattr(images, "detach") or isinstance(images, (dict, bytes)) or not hasattr(images, "__iter__"):
        raise TypeError(f"images must be {_IMAGES_WANTED}, got {type(images).__module__}.{type(images).__name__}"
                        f"{' (convert it with .cpu().numpy())' if hasattr(images, 'detach') else ''}")
    images = list(images)  # any iterable of images, a generator included (as before issue 20)
    for i, im in enumerate(images):
        if not isinstance(im, (np.ndarray, str, Path)):
            raise TypeError(f"images[{i}] must be a numpy array (H, W, 3) or an image file path ({_IMAGES_WANTED}), "
                            f"got {type(im).__name__}"
                            f"{': a nested list? pass np.asarray(image, np.uint8)' if isinstance(im, list) else ''}")
    return False, list(images)


def per_image(name: str, value: Any, n: int, tail: tuple[int, ...]) -> list[Any]:
    """Split a predict() argument over n images: one value of shape `tail` for all, or n per-image values."""
    if value is None:
        return [None] * n
    try:
        if np.asarray(value, dtype=np.float64).shape == tail:
            return [value] * n
    except (TypeError, ValueError):  # ragged: per-image values of different lengths
        pass
    if not hasattr(value, "__len__") or len(value) != n:
        raise ValueError(f"{name} must be one value of shape {tail} for all images or a sequence with one entry "
                         f"per image ({n} images), got {np.shape(value) if hasattr(value, '__len__') else value!r}")
    return list(value)


def crops(batch: list[Item], flip: bool) -> np.ndarray:
    """The engine's input for a batch: every person's crop, then (flip test) every mirrored crop."""
    parts = [it.crops for it in batch] + ([it.mirrored for it in batch] if flip else [])
    return np.concatenate(parts)


def post(batch: list[Item]) -> dict[str, np.ndarray | None]:
    """A batch's decode post-processing inputs. Images without a root depth get 0 (root-relative
    depth) and without intrinsics a placeholder camera whose output results.assemble drops."""
    boxes = np.concatenate([it.crop_boxes for it in batch])
    root = k = None
    if any(it.root_depth is not None for it in batch):
        root = np.concatenate([np.zeros(len(it.boxes)) if it.root_depth is None else it.root_depth for it in batch])
    if any(it.intrinsics is not None for it in batch):
        k = np.concatenate([np.tile([1.0, 1.0, 0.0, 0.0], (len(it.boxes), 1)) if it.intrinsics is None
                            else it.intrinsics for it in batch])
    return {"boxes": boxes, "root_depth": root, "intrinsics": k}

"""The XS model shipped with the package, and the one flip-test rule that follows from it.

The model was trained on synthetic people only (tools/train_xs.py; its record is the .json beside
it). Those people have left limbs cool-coloured and right limbs warm, so a mirrored crop is not a
mirrored person to it: upstream's flip test averages in a swapped left/right guess (measured: MPJPE
87.8 mm without, 190.2 mm with it; data/README.md). Every command and PoseEstimator recognise the
model, from a checkpoint file's bytes or from an engine sidecar's weights hash (no torch needed:
both hashes are in the record), and run it without the flip test, saying so in one line.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from .cache import file_sha256

SHIPPED_XS = Path(__file__).parent / "data" / "convnextpose_xs_synthetic.pth.tar"
RECORD = SHIPPED_XS.with_name("convnextpose_xs_synthetic.json")
FLIP_NOTICE = ("flip test off: the shipped synthetic XS model tells left from right by limb colour, so a "
               "mirrored crop misleads it (MPJPE 88 mm without the flip test, 190 mm with it)")


@functools.cache
def record() -> dict[str, Any]:
    """The shipped model's record (training set-up, file_sha256, weights_sha256); {} if it is missing."""
    try:
        return json.loads(RECORD.read_text())
    except (OSError, ValueError):
        return {}


def is_shipped_checkpoint(path: str | Path | None) -> bool:
    """True when the file holds the shipped model's bytes (compared by sha256, without torch)."""
    if path is None or not Path(path).is_file() or not record().get("file_sha256"):
        return False
    if Path(path).stat().st_size != record().get("bytes"):
        return False
    return file_sha256(path) == record()["file_sha256"]


def is_shipped_engine(meta: dict[str, Any] | None) -> bool:
    """True when an engine's metadata says it was built from the shipped model's weights."""
    weights = (meta or {}).get("weights") or {}
    return bool(record().get("weights_sha256")) and weights.get("sha256") == record()["weights_sha256"]


def flip_for(meta: dict[str, Any] | None, flip: bool) -> tuple[bool, str | None]:
    """The flip test to run for an engine: (flip, notice), the notice set when a requested flip test is
    turned off for the shipped model."""
    if flip and is_shipped_engine(meta):
        return False, FLIP_NOTICE
    return flip, None

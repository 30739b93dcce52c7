"""Heatmaps -> joints: the soft-argmax (integral regression), in NumPy.

`soft_argmax_reference` is the float64 oracle the compiled kernel is tested against.
Contract, shared with csrc/: for image n and joint j the D*H*W logits of channels
j*D .. j*D+D-1 form one softmax; x, y, z are the expected w, h, d (0-based heatmap cells);
confidence is the peak probability max p = 1 / sum(exp(logit - max)). A volume holding NaN
or +inf, or only -inf, has no well-defined distribution: its x, y, z and confidence are NaN.
"""

from __future__ import annotations

import numpy as np

from .spec import NUM_JOINTS


def check_heatmaps(heatmaps: np.ndarray, joints: int, depth_dim: int | None) -> tuple[int, int, int, int, int]:
    """Validate a (N, J*D, H, W) array; returns (N, J, D, H, W)."""
    if not isinstance(heatmaps, np.ndarray):
        raise TypeError(f"heatmaps must be a numpy array, got {type(heatmaps).__name__}")
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must have 4 dimensions (N, J*D, H, W), got {heatmaps.ndim}")
    if heatmaps.dtype.kind != "f":
        raise TypeError(f"heatmaps must be float32, float16 or float64, got {heatmaps.dtype}")
    if isinstance(joints, bool) or not isinstance(joints, (int, np.integer)) or joints <= 0:
        raise ValueError(f"joints must be a positive integer, got {joints!r}")
    n, c, h, w = heatmaps.shape
    if c % joints:
        raise ValueError(f"heatmaps channels ({c}) must be divisible by joints ({joints})")
    d = c // joints if depth_dim is None else depth_dim
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d <= 0 or d * joints != c:
        raise ValueError(f"depth_dim must be a positive integer with joints * depth_dim == {c} channels, "
                         f"got depth_dim={depth_dim!r}, joints={joints}")
    if min(n, h, w) <= 0:
        raise ValueError(f"heatmaps must not be empty, got shape {heatmaps.shape}")
    return n, int(joints), int(d), h, w


def soft_argmax_reference(heatmaps: np.ndarray, joints: int = NUM_JOINTS, depth_dim: int | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Soft-argmax in float64, image by image.

    Args:
        heatmaps: (N, J*D, H, W) floating array.
    Returns:
        (coords (N, J, 3) float64 as x, y, z in cells, confidence (N, J) float64).
    """
    n, j, d, h, w = check_heatmaps(heatmaps, joints, depth_dim)
    coords = np.empty((n, j, 3), np.float64)
    conf = np.empty((n, j), np.float64)
    grids = [np.arange(k, dtype=np.float64) for k in (w, h, d)]
    with np.errstate(invalid="ignore", over="ignore"):
        for i in range(n):  # one image at a time bounds the float64 temporaries
            vol = heatmaps[i].astype(np.float64).reshape(j, d, h, w)
            peak = vol.max(axis=(1, 2, 3), keepdims=True)
            e = np.exp(vol - peak)
            total = e.sum(axis=(1, 2, 3))
            coords[i, :, 0] = e.sum(axis=(1, 2)) @ grids[0] / total
            coords[i, :, 1] = e.sum(axis=(1, 3)) @ grids[1] / total
            coords[i, :, 2] = e.sum(axis=(2, 3)) @ grids[2] / total
            conf[i] = 1.0 / total
            bad = ~np.isfinite(peak.reshape(j))  # NaN, +inf, or a volume of -inf only
            coords[i, bad] = np.nan
            conf[i, bad] = np.nan
    return coords, conf

"""How far the root depth prior (depth = k, gamma = 1; no RootNet weights) is from the truth, measured on
synthetic people whose depth is known (cnpose_trt.io.synthetic scenes: boxes, root_depth, intrinsics).

For each setting (depth range, people per image), scenes (seed, i) give the people's ground-truth boxes;
they go through upstream's box rule (geometry.process_boxes), the prior places each root at its processed
box's centre at depth k (ops.rootnet.prior_roots), pixel2cam takes it to camera mm, and it is compared with
the true pelvis (eval.metrics.root_errors): |dZ| mm and relative, signed dZ (bias) and the root position
error (MRPE). No network runs, so the figures do not depend on any weights; the images are rendered
without sensor noise (noise only changes pixels, never boxes or truth).

    python benchmarks/root_prior.py [--seed 1] [--people-total 1000] > benchmarks/results/root-prior-DATE.txt
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from cnpose_trt._version import __version__
from cnpose_trt.eval.evaluate import machine_info
from cnpose_trt.eval.metrics import root_errors
from cnpose_trt.io.synthetic import dataset
from cnpose_trt.ops.geometry import process_boxes
from cnpose_trt.ops.rootnet import prior_roots, roots_to_camera
from cnpose_trt.spec import ROOT_JOINT

# (depth range mm, people per image): the default range, one nearer and one farther, one and several people.
SETTINGS = (((3000.0, 7000.0), 1), ((3000.0, 7000.0), 3), ((1500.0, 3000.0), 1), ((8000.0, 20000.0), 1),
            ((8000.0, 20000.0), 3))


def measure(seed: int, people_total: int, depth_range: tuple[float, float], people: int,
            size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Per-person errors of the prior over ceil(people_total / people) scenes of one setting."""
    count = -(-people_total // people)
    pred, gt = [], []
    for scene in dataset(seed, count, width=size[0], height=size[1], people=people, depth_range=depth_range,
                         noise=False):
        crop_boxes = process_boxes(scene.boxes, size)
        pred.append(roots_to_camera(prior_roots(crop_boxes, scene.intrinsics), scene.intrinsics))
        gt.append(scene.joints_cam[:, ROOT_JOINT])
    p, g = np.concatenate(pred), np.concatenate(gt)
    errs = root_errors(p, g)
    errs["signed_dz"] = p[:, 2] - g[:, 2]
    return errs


def row(name: str, v: np.ndarray, scale: float = 1.0, unit: str = "", signed: bool = False) -> str:
    v = v * scale
    spread = (f"p10 {np.percentile(v, 10):8.1f}{unit}  " if signed else "") + f"p90 {np.percentile(v, 90):8.1f}{unit}"
    return f"  {name:<14} mean {v.mean():8.1f}{unit}  median {np.median(v):8.1f}{unit}  {spread}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="synthetic seed (default 1, the eval set's)")
    parser.add_argument("--people-total", type=int, default=1000, help="people per setting (default 1000)")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("W", "H"))
    args = parser.parse_args()
    print(f"command: python benchmarks/root_prior.py {' '.join(sys.argv[1:])}".rstrip())
    m = machine_info()
    print(f"cnpose_trt {__version__}, numpy {np.__version__}; machine: {m['cpu']}, {m['cores']} cores, "
          f"{m['platform']}, python {m['python']}")
    print(f"prior: depth = k = sqrt(2000 * 2000 * fx * fy / (w * h)) of the processed box, root at its centre; "
          f"synthetic seed {args.seed}, images {args.size[0]} x {args.size[1]}, ground-truth boxes")
    everything = []
    for depth_range, people in SETTINGS:
        started = time.perf_counter()
        e = measure(args.seed, args.people_total, depth_range, people, tuple(args.size))
        everything.append(e)
        n = len(e["dz"])
        print(f"\ndepth {depth_range[0]:.0f}..{depth_range[1]:.0f} mm, {people} per image: {n} people "
              f"({time.perf_counter() - started:.1f} s)")
        print(row("|dZ| mm", e["dz"]))
        print(row("|dZ| / Z", e["dz_rel"], 100, " %"))
        print(row("dZ (signed) mm", e["signed_dz"], signed=True))
        print(row("MRPE mm", e["position"]))
    all_rel = np.concatenate([e["dz_rel"] for e in everything])
    all_pos = np.concatenate([e["position"] for e in everything])
    print(f"\nall settings ({len(all_rel)} people): |dZ| / Z mean {all_rel.mean() * 100:.1f} %, median "
          f"{np.median(all_rel) * 100:.1f} %, p90 {np.percentile(all_rel, 90) * 100:.1f} %; MRPE mean "
          f"{all_pos.mean():.0f} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())

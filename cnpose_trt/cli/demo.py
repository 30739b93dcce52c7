"""`cnpose-trt demo`: a generated person (io.synthetic, with its ground truth), the default engine built
or reused (the XS model shipped with the package where nothing else is asked for), predict's JSON and
picture of it, and the error against the scene's ground truth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..eval.metrics import mpjpe, pixel_errors
from ..io.draw import save_image
from ..io.synthetic import synthesize
from ..shipped import SHIPPED_XS
from .common import add_engine_arguments, default_variant
from .predict import run_predict


def add_demo_arguments(d: argparse.ArgumentParser) -> None:
    add_engine_arguments(d)
    d.add_argument("--out-dir", default="demo_output", help="where demo.png/json and demo_pose.png go "
                   "(default demo_output)")
    d.add_argument("--seed", type=int, default=7, help="the synthetic person's seed (default 7)")


def run_demo(args: argparse.Namespace) -> int:
    """`cnpose-trt demo` from parsed options: demo.png, demo.json and demo_pose.png in --out-dir."""
    import numpy as np

    default_variant(args)
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out-dir {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None and args.engine is None and args.variant in (None, "XS") and SHIPPED_XS.is_file():
        checkpoint = SHIPPED_XS
        print(f"weights: the XS model shipped with cnpose_trt ({SHIPPED_XS.name}), trained on synthetic people "
              "only: a demonstration, not an official checkpoint (pass --checkpoint for real weights)",
              file=sys.stderr)
    scene = synthesize(args.seed, width=640, height=480)
    image, box = scene.image, [float(v) for v in scene.boxes[0]]
    fx, fy, cx, cy = (float(v) for v in scene.intrinsics)
    img_path = save_image(out / "demo.png", image)
    print(f"generated a synthetic person {img_path} (seed {args.seed}) with box {[round(v, 1) for v in box]}, "
          f"root depth {scene.root_depth[0]:.0f} mm", file=sys.stderr)
    ns = argparse.Namespace(image=img_path, bbox=[box], crop_box=None, root_depth=float(scene.root_depth[0]),
                            rootnet=None, focal=(fx, fy), principal=(cx, cy), engine=args.engine, variant=args.variant,
                            checkpoint=checkpoint, engines=args.engines, flip=True, output=out / "demo.json",
                            draw=out / "demo_pose.png")
    run_predict(ns)
    people = json.loads(ns.output.read_text())["people"]
    cam = np.array([[people[0]["joints"][name]["camera_mm"] for name in people[0]["joints"]]])
    img = np.array([[[j["x_px"], j["y_px"]] for j in people[0]["joints"].values()]])
    print(f"against the scene's ground truth: MPJPE {mpjpe(cam, scene.joints_cam):.1f} mm (root-aligned), "
          f"2D error {float(np.mean(pixel_errors(img, scene.joints_img[..., :2]))):.1f} px", file=sys.stderr)
    print(f"demo done: {ns.output}, {ns.draw}")
    return 0

"""Which layers does INT8 cost? Per-group sensitivity of a trained checkpoint, measured in mm.

For each group of convolutions (each downsampling layer, the stem being downsample_layers.0, each
stage, the backbone's closing norm, each head layer) two INT8 engines are built from the same
calibration (synthetic people): one with only that group kept out of INT8 ("exclude one"), and
one where that group alone is quantised ("only one"). Each is evaluated with `cnpose_trt.eval.evaluate`
on held-out synthetic people (no flip test unless --flip) beside FP32, all-INT8 and the default
exclusion (precision.DEFAULT_INT8_EXCLUDE), and the table says how many mm of the INT8 loss each
group carries. A prefix that matches no node stops the build (precision._matching).

    .venv/bin/python tools/int8_sensitivity.py --checkpoint cnpose_trt/data/convnextpose_xs_synthetic.pth.tar \
        --count 300 --json benchmarks/results/int8-sensitivity-xs.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnpose_trt import build_engine, load_engine  # noqa: E402
from cnpose_trt.build.precision import DEFAULT_INT8_EXCLUDE  # noqa: E402
from cnpose_trt.eval.evaluate import evaluate, machine_info, synthetic_set  # noqa: E402
from cnpose_trt.spec import get_spec  # noqa: E402


def groups(variant: str) -> list[str]:
    """ONNX node-name prefixes of the network's convolution groups, input to output."""
    spec = get_spec(variant)
    out = []
    for i in range(len(spec.depths)):
        out += [f"/backbone/downsample_layers.{i}/", f"/backbone/stages.{i}/"]
    return out + ["/backbone/norm/"] + [f"/head/deconv_layers_{k}/" for k in (1, 2, 3)] + ["/head/final_layer/"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--variant", default="XS")
    ap.add_argument("--count", type=int, default=300, help="held-out synthetic people (seed --seed)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--calib-method", default="entropy")
    ap.add_argument("--calib-count", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("engines/sensitivity"), help="engine folder")
    ap.add_argument("--mode", choices=("exclude", "only", "both", "none"), default="both",
                    help="which per-group rows (none: fp32, all-INT8 and the default exclusion only)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--flip", action="store_true",
                    help="flip test (off by default: the shipped synthetic model's people are coloured left/right, "
                         "so a mirrored crop is not a mirrored person to it)")
    args = ap.parse_args(argv)

    names = groups(args.variant)
    common = {"backend": "onnxruntime", "out_dir": args.out, "max_batch": 16, "progress": lambda _line: None}
    int8 = {**common, "precision": "int8", "calib_synthetic": True, "calib_count": args.calib_count,
            "calib_method": args.calib_method}
    builds: list[tuple[str, dict]] = [("fp32", {**common}), ("int8 (nothing kept float)", {**int8, "int8_exclude": ()}),
                                      ("int8, default exclusion", {**int8, "int8_exclude": DEFAULT_INT8_EXCLUDE})]
    if args.mode in ("exclude", "both"):
        builds += [(f"int8, float: {g}", {**int8, "int8_exclude": (g,)}) for g in names]
    if args.mode in ("only", "both"):
        builds += [(f"int8 only: {g}", {**int8, "int8_exclude": tuple(n for n in names if n != g)}) for g in names]
    dataset = synthetic_set(seed=args.seed, count=args.count)
    rows = []
    fp32 = None
    for label, options in builds:
        started = time.perf_counter()
        built = build_engine(args.variant, args.checkpoint, **options)
        engine = load_engine(built.path)
        report = evaluate([engine], dataset, flip=args.flip, labels=[label], progress=False)
        m = report["engines"][0]["metrics"]
        fp32 = m["mpjpe"] if fp32 is None else fp32
        rows.append({"label": label, "int8_exclude": list(options.get("int8_exclude", [])), "mpjpe": m["mpjpe"],
                     "pa_mpjpe": m["pa_mpjpe"], "px_2d": m.get("px_2d"), "delta_mpjpe": m["mpjpe"] - fp32,
                     "engine": str(built.path), "seconds": round(time.perf_counter() - started, 1)})
        print(f"{label:44} MPJPE {m['mpjpe']:8.2f} mm  ({m['mpjpe'] - fp32:+6.2f} vs fp32)  PA {m['pa_mpjpe']:7.2f}"
              f"  [{rows[-1]['seconds']:.0f} s]", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "variant": args.variant,
                                         "set": f"synthetic seed {args.seed}, {args.count} people",
                                         "flip_test": args.flip,
                                         "calibration": f"{args.calib_method}, {args.calib_count} synthetic crops",
                                         "machine": machine_info(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

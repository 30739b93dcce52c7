"""The batch command line: `cnpose-trt batch` and `python -m cnpose_trt.batch` (same options).

The options become a batch.job.run call; its Summary is printed (one line, then the JSON), progress
and messages go to stderr. Exit status 0 when the job completed (error rows included), 2 for bad
input or a failed step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from ..backends import BACKENDS, DEFAULT_MAX_BATCH, add_session_arguments
from ..batch.job import run
from ..batch.manifest import FORMATS
from ..spec import VARIANTS
from .errors import run as run_reported

DESCRIPTION = "Batch jobs: 3D poses of every person in a manifest of images, written to Parquet part by part."


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """The `cnpose-trt batch` options."""
    p.add_argument("manifest", type=Path, help="JSON Lines, CSV or Parquet (image, boxes or crop_boxes, optional "
                   "root_depth, intrinsics; or video and frame for a video frame, or video and detections for "
                   "every frame of a video), or COCO detections (.json) with --image-root")
    p.add_argument("--out", type=Path, required=True, help="output folder: Parquet parts, _summary.json; rerun "
                   "with the same folder to resume")
    p.add_argument("--format", choices=FORMATS, default="auto", help="manifest format (default: from the suffix)")
    p.add_argument("--image-root", type=Path, default=None,
                   help="folder relative image (video, detections) paths are resolved against; COCO: the image folder "
                        "(default: the manifest's folder)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="COCO: minimum detection score (default 0.5)")
    p.add_argument("--category-id", type=int, default=None,
                   help="COCO: the person category (default: the file's 'person' category, else 1)")
    e = p.add_argument_group("engine (as `build`)")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--engine", type=Path, help="a built engine (file or .json sidecar)")
    g.add_argument("--variant", type=str.upper, choices=list(VARIANTS), default="XS",
                   help="build (or reuse) this variant's engine (default XS)")
    e.add_argument("--checkpoint", type=Path, help="weights for --variant (default: random)")
    e.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="fp32, fp16 or bf16 (--backend openvino; default fp32; int8: build it with `cnpose-trt build "
                   "--int8` and pass --engine)")
    e.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="default auto: tensorrt where TensorRT and a GPU are present, else onnxruntime")
    e.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help=f"default {DEFAULT_MAX_BATCH}")
    e.add_argument("--engines", type=Path, default=None, help="engine cache folder (default ./engines)")
    p.add_argument("--flip", action="store_true", help="flip test: average with the mirrored crop")
    p.add_argument("--rootnet", metavar="ENGINE_OR_CHECKPOINT", default=None,
                   help="root depths for records without root_depth: a RootNet engine, a RootNet snapshot (built with "
                   "the pose engine's backend and precision) or 'prior' (gamma = 1, marked root_source 'prior'); "
                   "those records need intrinsics (else their image gets an error row)")
    p.add_argument("--readers", type=int, default=None,
                   help="threads reading and decoding images ahead (default: half the CPU cores, at most 8; "
                        "Ray: the actor's CPUs, at least 4 with a GPU)")
    add_session_arguments(e)
    p.add_argument("--part-images", type=int, default=1024, help="images per Parquet part (default 1024)")
    p.add_argument("--part-seconds", type=float, default=60.0,
                   help="commit a part at least this often (default 60 s): the most a killed job redoes")
    p.add_argument("--redo-changed", action="store_true",
                   help="redo the done images whose manifest record (boxes, root_depth, intrinsics) changed since "
                        "(without it such a rerun is refused); their old rows are replaced")
    p.add_argument("--retry-errors", action="store_true",
                   help="redo the done images whose rows are all errors (missing or unreadable then); their old "
                        "rows are replaced")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    r = p.add_argument_group("Ray (pip install 'cnpose_trt[ray]')")
    r.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster with Ray Data: ADDRESS (e.g. auto, ray://head:10001), or none for "
                        "$RAY_ADDRESS or a new local cluster")
    r.add_argument("--ray-actors", type=int, default=None,
                   help="actor pool size (default: the cluster's GPUs, or CPUs / --ray-cpus-per-actor)")
    r.add_argument("--ray-cpus-per-actor", type=float, default=1.0,
                   help="CPUs per actor, also its onnxruntime threads unless --threads says (default 1)")
    r.add_argument("--ray-gpus-per-actor", type=float, default=None,
                   help="GPUs per actor (default 1 for TensorRT, and torch on a cluster with GPUs; else 0)")
    r.add_argument("--ray-batch-size", type=int, default=64, help="images per actor call (default 64)")
    r.add_argument("--ray-engine", choices=("auto", "ship", "build"), default="auto",
                   help="ship the engine built here to the workers, or build it on each (default: build for "
                        "TensorRT, which is GPU-specific; else ship)")


def run_batch(args: argparse.Namespace) -> int:
    """Run `cnpose-trt batch` from parsed arguments; prints the summary. 0 when the job completed
    (error rows included: see the summary), 2 for bad input or a failed step."""
    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.ray is not None and logging.getLogger().getEffectiveLevel() > logging.INFO:
        # Ray Data logs every execution plan at INFO (configured when it is imported): our progress line says it.
        with contextlib.suppress(ImportError):
            import ray.data  # noqa: F401

            logging.getLogger("ray.data").setLevel(logging.WARNING)
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"

    summary = run(args.manifest, args.out, engine=args.engine, variant=args.variant or "XS",
                  checkpoint=args.checkpoint, precision=args.precision, backend=args.backend,
                  max_batch=args.max_batch, engine_dir=args.engines, flip=args.flip, format=args.format,
                  image_root=args.image_root, score_threshold=args.score_threshold,
                  category_id=args.category_id, readers=args.readers, part_images=args.part_images,
                  part_seconds=args.part_seconds, progress=not args.no_progress, ray=args.ray,
                  ray_actors=args.ray_actors, ray_cpus_per_actor=args.ray_cpus_per_actor,
                  ray_gpus_per_actor=args.ray_gpus_per_actor, ray_batch_size=args.ray_batch_size,
                  ray_engine=args.ray_engine, redo_changed=args.redo_changed,
                  retry_errors=args.retry_errors, threads=args.threads, spinning=args.spinning, say=say,
                  rootnet=args.rootnet)
    print(summary.text())
    print(json.dumps(summary.to_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cnpose_trt.batch` (the same as `cnpose-trt batch`)."""
    parser = argparse.ArgumentParser(prog="python -m cnpose_trt.batch", description=DESCRIPTION)
    add_batch_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    return run_reported(run_batch, args)

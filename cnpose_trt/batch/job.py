"""Batch jobs: 3D poses of every person in a manifest of images, written to Parquet part by part.

    cnpose-trt batch MANIFEST --out DIR [--variant XS | --engine FILE] [--flip] [--ray [ADDRESS]]

run() is the job: its options are one BatchConfig, checked when made and passed whole down the
run. Before any image is done the job settles its engine, its flip test and its identity (written
to every part: a folder holding another job's results is refused), and reads the whole manifest
once (the plan: every record checked, the images done before skipped, changed ones refused or
redone). Then the images to do run locally (reader threads ahead of PoseEstimator, here) or on a
Ray cluster (batch/ray.py), and are committed in parts (batch/output.py): a job killed at any
point and rerun with the same --out ends with every image in the output exactly once. The folder
is locked while a job runs. The command line is cli/batch.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import backends, checks
from ..cache import file_lock, sidecar_path, write_json
from ..errors import BatchError, ManifestError, need_pyarrow
from ..interrupts import raise_if_stopped
from ..pipeline.estimator import PoseEstimator
from ..pipeline.roots import PRIOR, load_rootnet, resolve_rootnet
from ..runtime.engine import Engine, engine_model, load_engine, read_sidecar
from ..shipped import flip_for, is_shipped_checkpoint, record
from .engine import EngineOptions, capability, engine_id
from .manifest import Entry, manifest_format, read_manifest
from .output import (
    LOCK_FILE,
    SUMMARY_FILE,
    PartWriter,
    Progress,
    Summary,
    _Done,
    _failed_images,
    _parts,
    drop_superseded,
    remove_temporaries,
    scan_output,
)
from .ray import run_ray
from .stream import estimate_stream, read_ahead

log = logging.getLogger(__name__)


def _positive(name: str, value: Any, number: bool = False) -> Any:
    """value as an int (a finite float with `number`) > 0; the message names the argument."""
    ok = (checks.is_number(value) and math.isfinite(value)) if number else checks.is_integer(value)
    if not ok or value <= 0:
        raise ValueError(f"{name} must be {'a number' if number else 'an integer'} > 0, got {value!r}")
    return float(value) if number else int(value)


def _to_log(message: str) -> None:
    log.info("%s", message)


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """run()'s options, checked when made (ValueError names the option) and passed whole down the job.

    engine: an engine file, or a loaded Engine (local runs); else variant, checkpoint, precision
        (fp32 or fp16), backend, max_batch, engine_dir as build_engine takes them.
    flip: the flip test.
    format, image_root, score_threshold, category_id: how the manifest is read (see read_manifest).
    readers: threads reading and decoding images ahead of the engine (default: local runs half
        the CPU cores, at most 8; Ray actors their CPUs, at least 4 on a GPU).
    part_images, part_seconds: a part is committed every part_images images or part_seconds
        seconds, whichever comes first (a killed job redoes at most that much).
    progress: progress on stderr (default on: a bar on a terminal, else a line at least every 5 s).
    ray: None for a local run; True or "" for Ray's default cluster (RAY_ADDRESS, or a new
        local one), or a cluster address. A Ray session already initialised is used as it is.
    ray_actors: actor pool size (default: as many as the cluster's GPUs, or CPUs, allow).
    ray_cpus_per_actor: CPUs per actor (also the onnxruntime threads of each actor).
    ray_gpus_per_actor: GPUs per actor (default 1 for TensorRT engines and for torch engines on
        a cluster with GPUs, else 0).
    ray_batch_size: images per Ray Data batch (one actor call).
    ray_engine: "ship" (the engine file built here is sent to every worker), "build" (each
        worker builds it from the same options: TensorRT engines are GPU-specific), or "auto"
        (build for TensorRT, else ship).
    redo_changed: redo the done images whose record (boxes, root_depth, intrinsics) changed
        instead of refusing the run; their old rows are replaced.
    retry_errors: redo the done images whose rows are all error rows (a file missing or
        unreadable then); their old rows are replaced.
    threads, spinning: the engine's session options (load_engine's: ONNX Runtime intra-op threads,
        0 one per core, and whether idle threads spin; None: the defaults, and on Ray an onnxruntime
        actor's threads are its CPUs). Not for an Engine passed in loaded.
    say: where progress messages (engine build) go (default: this module's logger, at INFO).
    rootnet: root depths for records that give none: a RootNet engine file, a RootNet checkpoint (built
        here with the pose engine's backend and precision, or found in the cache), "prior" (depth = k,
        gamma = 1), or (local runs) a loaded RootNet Engine; such records need intrinsics. Rows then carry
        the estimated root_depth and root_source. Part of the job's identity.
    """

    engine: Any = None
    variant: str = "XS"
    checkpoint: str | Path | None = None
    precision: str = "fp32"
    backend: str = "auto"
    max_batch: int = 32
    engine_dir: str | Path | None = None
    flip: bool = False
    format: str = "auto"
    image_root: str | Path | None = None
    score_threshold: float = 0.5
    category_id: int | None = None
    readers: int | None = None
    part_images: int = 1024
    part_seconds: float = 60.0
    progress: bool | None = None
    ray: str | bool | None = None
    ray_actors: int | None = None
    ray_cpus_per_actor: float = 1
    ray_gpus_per_actor: float | None = None
    ray_batch_size: int = 64
    ray_engine: str = "auto"
    redo_changed: bool = False
    retry_errors: bool = False
    threads: int | None = None
    spinning: bool | None = None
    say: Callable[[str], None] | None = None
    rootnet: Any = None

    def __post_init__(self) -> None:
        if self.load_options and self.engine is not None and not isinstance(self.engine, (str, Path)):
            raise ValueError(f"{' and '.join(self.load_options)} apply where batch loads the engine; pass them to "
                             "load_engine for an Engine that is already loaded")
        checked = {"part_images": _positive("part_images", self.part_images),
                   "part_seconds": _positive("part_seconds", self.part_seconds, number=True),
                   "ray_batch_size": _positive("ray_batch_size", self.ray_batch_size),
                   "redo_changed": bool(self.redo_changed), "retry_errors": bool(self.retry_errors),
                   "say": self.say or _to_log}
        for name in ("readers", "ray_actors"):
            if getattr(self, name) is not None:
                checked[name] = _positive(name, getattr(self, name))
        checks.one_of("ray_engine", self.ray_engine, ("auto", "ship", "build"))
        _check_rootnet(self.rootnet, self.use_ray)
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16 (build an int8 engine with `cnpose-trt build "
                             f"--int8 ...` and pass it as the engine), got {self.precision!r}")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def load_options(self) -> dict[str, Any]:
        """load_engine's options from threads and spinning (checked: ValueError)."""
        return backends.session_options(self.threads, self.spinning)

    @property
    def use_ray(self) -> bool:
        return self.ray is not None and self.ray is not False

    @property
    def ray_address(self) -> str:
        """The cluster to connect to; "" for Ray's default (RAY_ADDRESS, or a new local cluster)."""
        return "" if self.ray is True else str(self.ray)

    def engine_options(self) -> EngineOptions:
        """How to get the engine (the engine file, if given as one, is set when the job settles it)."""
        # By name, from EngineOptions' own fields: the two field lists cannot drift apart in order.
        return EngineOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineOptions)
                                if f.name != "engine"})

    def manifest_args(self, manifest: str | Path) -> dict[str, Any]:
        """read_manifest's arguments for this job's manifest."""
        return {"path": manifest, "format": self.format, "image_root": self.image_root,
                "score_threshold": self.score_threshold, "category_id": self.category_id,
                "estimated_roots": self.rootnet is not None}


def _check_rootnet(rootnet: Any, use_ray: bool) -> None:
    """BatchConfig.rootnet before any work: "prior", an existing file, or (local) a loaded Engine."""
    if rootnet is None or (isinstance(rootnet, str) and rootnet == PRIOR):
        return
    if isinstance(rootnet, Engine):
        if use_ray:
            raise ValueError("rootnet: a loaded Engine cannot go to Ray workers; give its engine file")
        return
    if not isinstance(rootnet, (str, Path)) or not str(rootnet) or not Path(rootnet).is_file():
        raise ValueError(f"rootnet must be a RootNet engine file, a RootNet checkpoint or 'prior', got {rootnet!r:.80}"
                         + (" (no such file)" if isinstance(rootnet, (str, Path)) and str(rootnet) else ""))


def run(manifest: str | Path, out: str | Path, config: BatchConfig | None = None, **options: Any) -> Summary:
    """3D poses of every person in a manifest, into Parquet parts in `out`; resumes a killed job.

    Args:
        manifest: the manifest (see read_manifest; config's format, image_root, score_threshold and
            category_id say how to read it).
        out: output folder (created). Rerun with the same folder to resume: images in committed
            parts are skipped. A folder holding another job's results (other engine or flip) is
            refused, and so is an image whose manifest record changed since its poses were made.
        config: the job's options (BatchConfig).
        **options: BatchConfig's fields as keywords (engine=, variant=, flip=, ray=, threads=, ...),
            instead of a config or replacing some of its fields.
    Returns:
        the Summary (also written to out/_summary.json).
    Raises:
        ManifestError: a bad manifest record (before any work). BatchError: the output folder
        cannot be used. EngineError/BuildError: the engine. ValueError: bad arguments.
    """
    need_pyarrow()
    if config is None:
        config = BatchConfig(**options)
    elif isinstance(config, BatchConfig):
        config = dataclasses.replace(config, **options) if options else config
    else:
        raise TypeError(f"config must be a BatchConfig, got {config!r}")
    if manifest_format(manifest, config.format) == "coco" and config.rootnet is not None:
        raise ValueError("rootnet: COCO detections carry no camera intrinsics, which RootNet's depths need (they scale "
                         "with the focal length): give a JSONL, CSV or Parquet manifest with intrinsics per record")
    if not Path(manifest).is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BatchError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    try:
        with file_lock(out / LOCK_FILE, blocking=False):
            return _run_locked(config.manifest_args(manifest), out, config)
    except BlockingIOError:
        raise BatchError(f"another batch job is writing to {out} (its lock {out / LOCK_FILE} is held)") from None


# ---------------------------------------------------------------------------------------------
# What a run does, settled before its first image


@dataclasses.dataclass
class _Job:
    """What a run settled before its first image: the output folder, the engine (`path`, the file to load
    or ship; `engine`, an Engine passed in loaded; neither where Ray workers build it), how the workers get
    it, the flip test after the flip rule, and the identity written to every part."""

    out: Path
    options: EngineOptions
    flip: bool
    identity: dict[str, Any]
    path: Path | None = None
    engine: Any = None
    ray_engine: str = "ship"
    rootnet: Any = None  # the RootNet engine file (a Path), "prior", a loaded RootNet Engine, or None


@dataclasses.dataclass
class _Plan:
    """What a run does: the manifest's images, those to do, and of those the ones done before and redone."""

    total: int
    todo: int
    redo: set[str]              # images done before and redone (changed records, --retry-errors)
    unknown: int                # images done by parts that recorded no record hashes: kept unchecked
    no_camera: int = 0          # images to do whose depths are to be estimated but that give no intrinsics


def _settle(out: Path, config: BatchConfig) -> _Job:
    """The job's engine (resolved or built here, unless the Ray workers build it), its flip test and identity."""
    engine, opts = config.engine, config.engine_options()
    loaded: Engine | None = engine if isinstance(engine, Engine) else None
    path: Path | None = None
    ray_engine = config.ray_engine
    if loaded is None:
        opts.engine = engine
        if config.use_ray and ray_engine == "auto":  # TensorRT engines are built for one GPU model: on the workers
            ray_engine = "build" if engine is None and not capability(opts.backend, "PORTABLE_ENGINE", True) \
                else "ship"
        if config.use_ray and ray_engine == "build":
            if engine is not None:
                raise ValueError("ray_engine='build' builds from the variant options; an engine file is shipped")
        else:
            path = opts.resolve(config.say)
    elif config.use_ray:  # an Engine loaded here: its file is shipped (the workers cannot build it from options)
        if ray_engine == "build":
            raise ValueError("ray_engine='build' builds from the variant options; an engine file is shipped")
        path, ray_engine = Path(loaded.path), "ship"
    meta = read_sidecar(path) if path is not None else getattr(loaded, "meta", None)
    flip = _flip_rule(meta, opts, config.flip, config.say)
    if path is not None and meta.get("weights", {}).get("random"):
        config.say("warning: the engine uses random weights: the poses are meaningless; pass a checkpoint for real "
                   "ones")
    identity = _identity(meta, path, loaded, opts, flip)
    rootnet = _settle_rootnet(config, meta, opts)
    if rootnet is not None:  # added only with a RootNet: the identity of jobs without one keeps its form
        identity["rootnet"] = (rootnet if isinstance(rootnet, str) else engine_id(rootnet)
                               if isinstance(rootnet, Engine) else read_sidecar(rootnet)["engine_file"])
    return _Job(out, opts, flip, identity, path, loaded, ray_engine, rootnet)


def _settle_rootnet(config: BatchConfig, meta: dict[str, Any] | None, opts: EngineOptions) -> Any:
    """The job's RootNet: "prior", a loaded Engine, or its engine file (a checkpoint built here, with the pose
    engine's backend and precision); on Ray the file is shipped, so it must be a portable engine."""
    rootnet = config.rootnet
    if rootnet is None or isinstance(rootnet, Engine) or (isinstance(rootnet, str) and rootnet == PRIOR):
        if isinstance(rootnet, Engine):
            rootnet.require_model("rootnet", "rootnet")
        return rootnet
    backend = (meta or {}).get("backend", opts.backend)
    if config.use_ray and not sidecar_path(rootnet).is_file() and not capability(backend, "PORTABLE_ENGINE", True):
        raise ValueError(f"rootnet: on Ray, a RootNet checkpoint beside a {backend} pose engine would be built for "
                         "this machine's GPU; build a portable RootNet engine (`cnpose-trt build --model rootnet "
                         "--checkpoint FILE --backend onnxruntime`) and give its file")
    path = resolve_rootnet(rootnet, backend=backend, precision=(meta or {}).get("precision", opts.precision),
                           engine_dir=opts.engine_dir, progress=config.say)
    side = read_sidecar(path)
    if engine_model(side) != "rootnet":
        raise ValueError(f"rootnet: {path} is a ConvNeXtPose (pose) engine, not a RootNet engine")
    if config.use_ray and not capability(side["backend"], "PORTABLE_ENGINE", True):
        raise ValueError(f"rootnet: {path} is a {side['backend']} engine, built for this machine's GPU; on Ray give a "
                         "portable RootNet engine (ONNX Runtime)")
    if side.get("weights", {}).get("random"):
        config.say("warning: the RootNet engine uses random weights: its root depths are meaningless")
    return Path(path)


def _identity(meta: dict[str, Any] | None, path: Path | None, loaded: Any, opts: EngineOptions,
              flip: bool) -> dict[str, Any]:
    """The job as every part records it: the engine file's name (or, for engines the Ray workers build, the
    build options) and the flip test. Resuming compares it byte for byte: never change its form."""
    if path is not None:
        assert meta is not None
        return {"engine": meta["engine_file"], "flip": bool(flip)}
    if loaded is not None:
        return {"engine": engine_id(loaded), "flip": bool(flip)}
    kw = opts.build_kwargs()
    return {"engine": "build:" + ",".join(f"{k}={kw[k]}" for k in ("variant", "checkpoint", "precision", "backend",
                                                                   "max_batch")), "flip": bool(flip)}


def _flip_rule(meta: dict[str, Any] | None, opts: EngineOptions, flip: bool, say: Callable[[str], None]) -> bool:
    """shipped.flip_for on the job's engine (its metadata, or, for engines the Ray workers build, the
    checkpoint file), saying so when a requested flip test is turned off."""
    if meta is None and is_shipped_checkpoint(opts.checkpoint):
        meta = {"weights": {"sha256": record()["weights_sha256"]}}
    flip, notice = flip_for(meta, flip)
    if notice:
        say(notice)
    return flip
def _prepass(manifest_args: dict[str, Any], done: _Done, redo_changed: bool = False,
             failed: set[str] | None = None) -> _Plan:
    """Read the whole manifest once before any work: every record checked (a ManifestError stops the
    job before it starts), no image listed twice, and each done image's record compared with the
    one its poses were computed from (a change stops the job unless redo_changed). failed: images
    to redo because their rows are all errors (--retry-errors)."""
    seen: set[str] = set()
    todo = unknown = no_camera = 0
    redo: set[str] = set()
    changed: list[Entry] = []
    for entry in read_manifest(**manifest_args):
        if entry.key in seen:
            first = next(e.where for e in read_manifest(**manifest_args) if e.key == entry.key)
            what = "image" if entry.video is None else "frame"  # a frame's key: "clip.mp4#12"
            raise ManifestError(f"{entry.where}, field {what!r}: {entry.key!r} is listed again (first at "
                                f"{first}); every {what} appears once, with all its boxes")
        seen.add(entry.key)
        if entry.key not in done.images:
            todo += 1
            no_camera += bool(manifest_args.get("estimated_roots") and entry.people and entry.root_depth is None
                              and entry.intrinsics is None)
            continue
        record = done.records.get(entry.key)
        if record is None:
            unknown += 1
        elif record != entry.record_hash():
            changed.append(entry)
            if redo_changed:
                redo.add(entry.key)
        if failed is not None and entry.key in failed:
            redo.add(entry.key)
    if changed and not redo_changed:
        e = changed[0]
        raise BatchError(f"{e.where}: the record of {e.key!r} changed since its poses were computed (its boxes, "
                         f"root_depth or intrinsics; {len(changed)} image{'s' * (len(changed) > 1)} in all): rerun "
                         "with --redo-changed to redo them, or use another --out")
    return _Plan(len(seen), todo + len(redo), redo, unknown, no_camera)



# ---------------------------------------------------------------------------------------------
# The run


def _run_locked(manifest_args: dict[str, Any], out: Path, config: BatchConfig) -> Summary:
    remove_temporaries(out)  # a killed run's uncommitted part: its images were never done
    job = _settle(out, config)
    scan_output(out, job.identity)  # refuses another job's folder before anything in it is touched
    drop_superseded(out)  # a run killed after redoing images, before it removed their old rows
    done = scan_output(out, job.identity)
    plan = _prepass(manifest_args, done, config.redo_changed,
                    _failed_images(_parts(out)) if config.retry_errors else None)
    total, todo = plan.total, plan.todo
    if plan.no_camera:
        config.say(f"warning: images to do that give neither root_depth nor intrinsics: {plan.no_camera}; RootNet's "
                   "depths need the camera, so each gets an error row")
    if plan.unknown:
        config.say(f"{plan.unknown} done images are in parts written before records were hashed: kept as done "
                   f"without checking their records (use another --out to redo them)")
    config.say(f"{total} images in the manifest, {total - todo} already done in {out}, {todo} to do"
               + (f" ({len(plan.redo)} of them redone)" if plan.redo else ""))
    bar = Progress(todo, enabled=True if config.progress is None else config.progress)
    started = time.perf_counter()
    try:
        entries = (e for e in read_manifest(**manifest_args) if e.key not in done.images or e.key in plan.redo)
        if config.use_ray:
            writer, mode = run_ray(config, job, entries, done.next_index, bar, todo)
        else:
            writer, mode = _run_local(config, job, entries, done.next_index, bar), "local"
    finally:
        bar.close()  # stops its ticker however the job ends
    seconds = time.perf_counter() - started
    if plan.redo:
        drop_superseded(out)
    return _summarise(job, plan, writer, mode, seconds)


def _summarise(job: _Job, plan: _Plan, writer: PartWriter, mode: str, seconds: float) -> Summary:
    """The run's Summary, written to the folder's _summary.json."""
    final = scan_output(job.out, job.identity)
    summary = Summary(str(job.out), job.identity["engine"], len(final.images), final.people, final.errors,
                      final.parts, writer.images, writer.people, writer.errors, plan.total - plan.todo,
                      round(seconds, 3), round(writer.images / seconds, 2) if seconds > 0 else 0.0, mode,
                      len(plan.redo))
    write_json(job.out / SUMMARY_FILE, summary.to_dict())
    return summary


def _run_local(config: BatchConfig, job: _Job, entries: Iterator[Entry], next_index: int,
               bar: Progress) -> PartWriter:
    """The entries through PoseEstimator in this process, reader threads ahead of it; returns the writer."""
    engine = job.engine
    if engine is None:
        assert job.path is not None
        engine = load_engine(job.path, **config.load_options)
    # On a CPU engine the readers take cores from it: more threads than half the cores slowed the whole
    # job down on a 2-core machine (benchmarks/test_batch.py); a GPU engine leaves the cores to them.
    readers = config.readers or max(1, min(8, (os.cpu_count() or 2) // 2))
    rootnet = load_rootnet(job.rootnet, config.load_options) if isinstance(job.rootnet, Path) else job.rootnet
    estimator = PoseEstimator(engine, rootnet=rootnet)
    writer = PartWriter(job.out, next_index, job.identity, engine.spec.joints, engine_id(engine),
                        config.part_images, config.part_seconds)
    ok = False
    try:
        with ThreadPoolExecutor(readers, thread_name_prefix="cnpose-read") as pool:
            # A batch of images beyond the estimator's own look-ahead, so a slow file delays no batch.
            window = 2 * readers + estimator.max_batch
            stream = estimate_stream(estimator, read_ahead(pool, entries, window), job.flip)
            for loaded, result in stream:
                raise_if_stopped()  # a Ctrl-C that library code swallowed stops the run before this image is kept
                bar.update(1, *writer.add(loaded, result))
        raise_if_stopped()
        ok = True
    finally:
        # An interrupted run drops the images gathered since the last commit (redone on resume).
        writer.close(commit=ok)
    return writer

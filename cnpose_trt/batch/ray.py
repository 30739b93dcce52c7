"""A batch job on a Ray cluster with Ray Data: the manifest's entries become a Dataset, an actor pool
maps them through RayPredictor (the engine loaded once per actor; shipped from here or built on each
worker), and the rows stream back to this process, which commits them in parts as a local run does.

A cluster this process starts (a new local one) is its own: a watchdog (batch/watchdog.py) ends its
processes if this process is killed, and a run that ends in any other way shuts it down and waits
for its processes to exit. ray is imported only when a job runs on it (`pip install 'cnpose_trt[ray]'`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cache import atomic_write, sidecar_path
from ..config import BuildConfig, EngineRequest
from ..errors import BatchError, need_pyarrow
from ..interrupts import held_stops, raise_if_stopped
from ..pipeline.estimator import PoseEstimator
from ..pipeline.roots import load_rootnet
from ..runtime.engine import load_engine, read_sidecar
from ..runtime.open import engine_path, options_taken
from ..spec import get_spec
from .engine import capability, engine_id
from .manifest import Entry
from .output import PartWriter, Progress, RowBuffer
from .stream import estimate_stream, read_ahead
from .watchdog import alive, ray_descendants, start_time

if TYPE_CHECKING:
    from .job import BatchConfig, _Job


def _engine_files(engine_path: Path) -> dict[str, bytes]:
    """The engine file and its sidecar, by name: what is shipped to Ray workers."""
    meta = read_sidecar(engine_path)
    side = sidecar_path(engine_path)
    return {side.name: side.read_bytes(), meta["engine_file"]: side.with_name(meta["engine_file"]).read_bytes()}


def install_shipped_engine(files: dict[str, bytes], folder: Path | None = None) -> Path:
    """Write shipped engine files into a per-node folder (atomically; shared by the actors of a
    node) and return the sidecar path to load. The folder is named after the engine file's bytes."""
    engine_name = next(n for n in files if not n.endswith(".json"))
    digest = hashlib.sha256(files[engine_name]).hexdigest()[:16]
    folder = (folder or Path(tempfile.gettempdir()) / "cnpose_trt-shipped-engines") / digest
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        target = folder / name
        if not (target.is_file() and target.stat().st_size == len(data)):
            atomic_write(target, data)
    return folder / next(n for n in files if n.endswith(".json"))



class RayPredictor:
    """Ray Data UDF: loads the engine once per actor; a batch of entries -> one row holding the
    batch's image keys and its output rows (Arrow IPC), which the driver commits."""

    def __init__(self, engine: dict[str, Any], flip: bool, readers: int, threads: int | None, device: str | None,
                 spinning: bool | None = None) -> None:
        if engine["mode"] == "ship":
            import ray

            path = install_shipped_engine(ray.get(engine["files"]))
        else:
            path = engine_path(EngineRequest(build=BuildConfig(**engine["build"])))
        given = {k: v for k, v in {"threads": threads or None, "spinning": spinning, "device": device or None}.items()
                 if v is not None}  # each engine takes those its backend takes (options_taken)
        self.engine = load_engine(path, **options_taken(path, given))
        rootnet = engine.get("rootnet")  # None, "prior", or a shipped RootNet engine's files
        if isinstance(rootnet, dict):
            import ray

            rootnet = load_rootnet(install_shipped_engine(ray.get(rootnet["files"])), given)
        self.estimator = PoseEstimator(self.engine, rootnet=rootnet)
        self.flip, self.readers = flip, readers
        self.pool = ThreadPoolExecutor(readers, thread_name_prefix="cnpose-read")
        self.engine_id = engine_id(self.engine)

    def __call__(self, batch: Any) -> Any:
        pa, _ = need_pyarrow()
        entries = [Entry.from_json(t) for t in batch.column("entry").to_pylist()]
        rows = RowBuffer(self.engine.spec.joints, self.engine_id)
        window = 2 * self.readers + self.estimator.max_batch
        unseen: list[str] = []  # files this worker cannot open: the driver checks whether it can
        for loaded, result in estimate_stream(self.estimator, read_ahead(self.pool, entries, window), self.flip):
            rows.add(loaded, result)
            if loaded.image is None and not os.access(loaded.entry.path, os.R_OK):
                unseen.append(loaded.entry.path)
        sink = pa.BufferOutputStream()
        table = rows.table()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return pa.table({"images": pa.array([rows.images], pa.list_(pa.string())),
                         "records": pa.array([[e.record_hash() for e in entries]], pa.list_(pa.string())),
                         "unseen": pa.array([unseen], pa.list_(pa.string())),
                         "node": pa.array([socket.gethostname()], pa.string()),
                         "rows": pa.array([sink.getvalue().to_pybytes()], pa.binary())})


def _check_unseen(paths: list[str], node: str) -> None:
    """Images a worker could not open: the job fails when this process can read one of them (the
    workers do not see the files the manifest names), instead of ending with error rows for all."""
    for path in paths:
        if os.access(path, os.R_OK):
            raise BatchError(f"a Ray worker on {node} cannot read {path}, which this process reads: every node "
                             "must see the images at the manifest's paths (a shared file system)")


def _ray_rows(blob: bytes) -> Any:
    pa, _ = need_pyarrow()
    with pa.ipc.open_stream(pa.py_buffer(blob)) as reader:
        return reader.read_all()


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise BatchError("--ray needs Ray Data: pip install 'cnpose_trt[ray]'") from None
    return ray


def run_ray(config: BatchConfig, job: _Job, entries: Iterator[Entry], next_index: int, bar: Progress,
            todo: int) -> tuple[PartWriter, str]:
    """The job's `todo` entries on the Ray cluster (config.ray: its address); returns the writer that
    committed their parts and the run's mode for the summary."""
    ray = _import_ray()
    need_pyarrow()
    if todo == 0:  # nothing left: no cluster needed
        writer = PartWriter(job.out, next_index, job.identity, 18, job.identity["engine"], config.part_images,
                            config.part_seconds)
        writer.close()
        return writer, "ray, nothing to do"
    with _session(ray, config.ray_address):
        return _run_on_cluster(ray, config, job, entries, next_index, bar, todo)


@contextlib.contextmanager
def _session(ray: Any, address: str) -> Iterator[None]:
    """A Ray session: the one already initialised as it is, else one started here (a new local cluster
    when there is no address), shut down with its processes however the job ends."""
    if ray.is_initialized():
        yield
        return
    before = set(_ray_processes().items())
    watchdog = _start_watchdog()  # a kill -9 of this process leaves no cluster behind
    try:  # a Ctrl-C waits for ray.init, then the session (and a local cluster) is shut down
        held_stops(ray.init, address=address or None, include_dashboard=False, log_to_driver=False,
                   configure_logging=False)
        yield
    finally:
        _shutdown_ray(ray, before)
        _stop_watchdog(watchdog)


def _run_on_cluster(ray: Any, config: BatchConfig, job: _Job, entries: Iterator[Entry], next_index: int,
                    bar: Progress, todo: int) -> tuple[PartWriter, str]:
    resources = ray.cluster_resources()
    engine_spec, backend, joints = _shipping(ray, job)
    gpus, actors = _pool(config, backend, resources)
    cpus = config.ray_cpus_per_actor
    threads = config.load_options.get("threads") or max(1, int(cpus))
    # Ray Data gives each actor task whole blocks (then calls the UDF on batch_size images at a time):
    # about four blocks per actor spread the work, at most 4096 entries each.
    tables = _blocks(entries, max(1, min(4096, math.ceil(todo / (4 * actors)))))
    writer = PartWriter(job.out, next_index, job.identity, joints, job.identity["engine"], config.part_images,
                        config.part_seconds)
    if not tables:
        writer.close()
        return writer, f"ray, {actors} actors"
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # ours counts images; restored below
    ok = False
    try:
        ds = ray.data.from_arrow(tables).map_batches(
            RayPredictor, batch_size=config.ray_batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=gpus or None,
            fn_constructor_kwargs={"engine": engine_spec, "flip": job.flip,
                                   "readers": config.readers or (max(4, threads) if gpus else threads),
                                   "threads": threads, "device": "cuda" if gpus > 0 else "cpu",
                                   "spinning": config.load_options.get("spinning")})
        del tables
        _collect(ds, writer, bar)
        ok = True
    finally:
        ctx.enable_progress_bars = bars
        writer.close(commit=ok)
    return writer, f"ray, {actors} actors x {cpus:g} CPU{f' x {gpus:g} GPU' if gpus else ''}"


def _shipping(ray: Any, job: _Job) -> tuple[dict[str, Any], str, int]:
    """How the actors get the engine (RayPredictor's `engine`): the files resolved here, put in the object
    store ("ship"), or the options to build it on each worker ("build"); with its backend and joints."""
    rootnet = {"files": ray.put(_engine_files(job.rootnet))} if isinstance(job.rootnet, Path) else job.rootnet
    if job.ray_engine == "ship":
        assert job.path is not None
        meta = read_sidecar(job.path)
        return ({"mode": "ship", "files": ray.put(_engine_files(job.path)), "rootnet": rootnet}, meta["backend"],
                int(meta["spec"].get("joints", 18)))
    opts = job.options
    return ({"mode": "build", "build": opts.build_kwargs(), "rootnet": rootnet}, opts.backend,
            get_spec(opts.variant).joints)


def _pool(config: BatchConfig, backend: str, resources: dict[str, float]) -> tuple[float, int]:
    """GPUs per actor and the actor pool's size: as given, else what the backend and the cluster allow."""
    gpus, actors = config.ray_gpus_per_actor, config.ray_actors
    if gpus is None:
        gpu = capability(backend, "GPU", "never")
        gpus = 1.0 if gpu == "required" or (gpu == "optional" and resources.get("GPU", 0) > 0) else 0.0
    if actors is None:
        actors = int(resources.get("GPU", 0) // gpus) if gpus > 0 else \
            int(resources.get("CPU", 1) // config.ray_cpus_per_actor)
        actors = max(1, actors)
    return gpus, actors


def _blocks(entries: Iterator[Entry], rows: int) -> list[Any]:
    """The entries as Arrow tables of `rows` entries (key, entry JSON): the Dataset's blocks."""
    pa, _ = need_pyarrow()
    tables = []
    chunk: list[Entry] = []
    for entry in itertools.chain(entries, [None]):
        if entry is not None:
            chunk.append(entry)
        if chunk and (entry is None or len(chunk) >= rows):
            tables.append(pa.table({"key": [e.key for e in chunk], "entry": [e.to_json() for e in chunk]}))
            chunk = []
    return tables


def _collect(ds: Any, writer: PartWriter, bar: Progress) -> None:
    """The actors' rows as they come back, committed by the writer (a Ctrl-C stops before the next batch)."""
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for keys, records, blob, unseen, node in zip(
                batch.column("images").to_pylist(), batch.column("records").to_pylist(),
                batch.column("rows").to_pylist(), batch.column("unseen").to_pylist(),
                batch.column("node").to_pylist(), strict=True):
            raise_if_stopped()
            _check_unseen(unseen, node)
            bar.update(len(keys), *writer.add_table(keys, _ray_rows(blob), records))
    raise_if_stopped()


def _ray_processes() -> dict[int, bytes]:
    """This process's descendants that run Ray (pid -> start time)."""
    return ray_descendants(os.getpid())


def _start_watchdog() -> subprocess.Popen[bytes] | None:
    """The watchdog that ends the cluster's processes if this process dies without ending them (watchdog.py)."""
    start = start_time(os.getpid())
    if start is None:  # no /proc: nothing to watch with
        return None
    return subprocess.Popen([sys.executable, "-m", "cnpose_trt.batch.watchdog", str(os.getpid()), start.decode()],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop_watchdog(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def _shutdown_ray(ray: Any, before: set[tuple[int, bytes]], grace: float = 10.0) -> None:
    """ray.shutdown() (not cut by a Ctrl-C: held until it is done), then wait for the Ray processes
    started since `before` (a local cluster's raylet, GCS, agents, workers) to exit, killing those
    left after `grace` seconds: ray.shutdown returns before they are gone, and an interrupted
    start-up left some that it did not stop."""
    ours = {pid: t for pid, t in _ray_processes().items() if (pid, t) not in before}
    held_stops(ray.shutdown)
    deadline = time.monotonic() + grace
    while ours:
        ours = {pid: t for pid, t in ours.items() if alive(pid, t)}
        if not ours:
            break
        if time.monotonic() > deadline:
            for pid in ours:
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)
            break
        time.sleep(0.05)


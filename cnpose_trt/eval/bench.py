"""Speed: trtexec-style measurements of engines, one row per variant, backend, precision and batch.

For each: engine-only latency (p50/p90/p99) and throughput, end-to-end PoseEstimator latency and
throughput on generated scenes, and the decode's share of the end-to-end stage time; the run is
planned first (a time estimate per configuration, a budget), then each configuration's engine is
built or loaded and measured batch by batch. Random weights unless a checkpoint is given: speed does
not depend on the weights. The table, JSON and plot of `cnpose-trt bench` are cli.bench's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from .. import backends, checks
from ..backends import session_options
from ..config import BuildConfig, EngineRequest
from ..errors import CnposeError
from ..io.draw import demo_image
from ..io.preprocess import prepare
from ..pipeline.estimator import PoseEstimator
from ..runtime.open import open_engine
from ..spec import get_spec

MAX_BATCH = 4096  # the largest engine profile build_engine makes
MEMORY_SHARE = 0.5  # of physical memory that one measurement may plan to use


def _physical_memory() -> int | None:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_args(variants: Sequence[str], batches: Sequence[int], iterations: int, warmup: int) -> None:
    """Refuse settings that cannot be measured, before anything is built.

    A batch needs its input, its heatmaps and the estimator's copies of both, about
    3 x (3*S*S + J*D*H*W) x 4 bytes per person; more than half the physical memory is refused.

    Raises:
        ValueError: naming the option and what is allowed.
    """
    bad = [b for b in batches if not checks.is_integer(b) or not 1 <= b <= MAX_BATCH]
    if bad or not batches:
        raise ValueError(f"--batch must be integers in 1..{MAX_BATCH}, got {bad or list(batches)}")
    if not checks.is_integer(iterations) or iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {iterations!r}")
    if not checks.is_integer(warmup) or warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup!r}")
    memory = _physical_memory()
    if memory is None:
        return
    for variant in variants:
        spec = get_spec(variant)
        per_person = 3 * 4 * (int(np.prod(spec.input_shape)) + int(np.prod(spec.heatmap_shape)))
        need = max(batches) * per_person
        if need > MEMORY_SHARE * memory:
            fits = int(MEMORY_SHARE * memory // per_person)
            raise ValueError(f"--batch {max(batches)} needs about {need / 2**30:.1f} GiB for variant {spec.name}, more "
                             f"than half of this machine's {memory / 2**30:.1f} GiB; use --batch {fits} or less")


def _scenes(batch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    img, box = demo_image()
    return [img] * batch, [np.asarray([box], np.float64)] * batch


def _crops(images: list[np.ndarray], boxes: list[np.ndarray], dtype: Any) -> np.ndarray:
    """The network inputs end to end feeds the engine: engine-only times the same data (a random-weight
    network's speed can depend on its input values, e.g. through denormals)."""
    return np.ascontiguousarray(np.concatenate([prepare(i, b)[0] for i, b in zip(images, boxes, strict=True)]),
                                dtype=dtype)


def _interleaved(engine_call: Callable[[], Any], e2e_call: Callable[[], Any], iterations: int,
                 warmup: int) -> tuple[np.ndarray, np.ndarray]:
    """Engine-only and end-to-end timings in alternating iterations: load that comes and goes on a
    shared machine lands on both columns alike instead of on whichever ran second."""
    for _ in range(warmup):
        engine_call()
        e2e_call()
    eng, e2e = np.empty(iterations), np.empty(iterations)
    for i in range(iterations):
        first, second = (engine_call, e2e_call) if i % 2 == 0 else (e2e_call, engine_call)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        a, b = t1 - t0, t2 - t1
        eng[i], e2e[i] = (a, b) if i % 2 == 0 else (b, a)
    return eng, e2e


def _stats(seconds: np.ndarray, batch: int) -> dict[str, float]:
    p50, p90, p99 = np.percentile(seconds, [50, 90, 99]) * 1e3
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "img_s": float(batch / seconds.mean())}


# Multiply-accumulates per image of each variant (asserted by tests/test_model.py) and each CPU engine's
# rough speed relative to a NumPy float32 matmul on the same machine: only for the time estimate.
GMACS = {"XS": 0.82, "S": 1.74, "M": 2.79, "L": 4.26}
SPEED_VS_MATMUL = {"onnxruntime": 1.0, "torch": 0.35, "tensorrt": 20.0}
BUILD_S = {"fp32": 15.0, "fp16": 20.0, "int8": 60.0}  # a build that is not cached, on a 2-core CPU


def matmul_gflops(seconds: float = 0.25) -> float:
    """This machine's float32 matmul rate now (GFLOP/s), from a short probe."""
    a = np.random.default_rng(0).random((384, 384), dtype=np.float32)
    a @ a
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        n += 1
    return n * 2 * 384 ** 3 / (time.perf_counter() - t0) / 1e9


def estimate_seconds(variant: str, backend: str, precision: str, batches: Sequence[int], iterations: int,
                     warmup: int, gflops: float) -> float:
    """Rough time for one configuration: a build, then engine and end to end at every batch."""
    per_image = 2 * GMACS.get(variant, 2.79) / (gflops * SPEED_VS_MATMUL.get(backend, 1.0))
    people = sum(batches) * (iterations + warmup + 1) * 2
    return BUILD_S.get(precision, 20.0) + people * per_image * 1.15


def _takes(backend: str) -> tuple[str, ...]:
    """The load options a named backend takes (none for "auto")."""
    return backends.get(backend).LOAD_OPTIONS if backend in backends.NAMES else ()


def _slow_reason(variant: str, backend: str) -> str | None:
    """Configurations that measure nothing a CPU user runs, opt-in with --all."""
    if backend not in backends.NAMES or not backends.get(backend).CPU_IS_REFERENCE or variant in ("XS", "S"):
        return None
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except ImportError:
        return None
    return (f"the torch backend on the CPU is a reference, not an engine: {variant} runs at well under 1 img/s "
            "on 2 cores; --all measures it")


def run_bench(variants: Sequence[str], backends: Sequence[str], precisions: Sequence[str], batches: Sequence[int],
              *, iterations: int = 10, warmup: int = 2, engine_dir: Any = None, checkpoint: Any = None,
              calib_images: Any = None, cuda_graphs: bool = False, budget: float | None = None,
              include_slow: bool = False, progress: Callable[[str], None] | None = None,
              on_row: Callable[[dict[str, Any]], None] | None = None, threads: int | None = None,
              spinning: bool | str | None = None) -> list[dict[str, Any]]:
    """Measure every combination; unsupported ones are reported as skipped rows with the reason.

    Engine-only and end-to-end timings alternate iteration by iteration, on the same inputs. Each
    row goes to `on_row` as soon as it is measured (a run that is cut off keeps what it measured).
    With `budget` (seconds), a configuration whose estimated time would overrun it is skipped with
    the estimate; the estimate is rescaled by what the finished configurations really took.
    threads, spinning: ONNX Runtime session options of the onnxruntime engines (threads also for
    torch engines); None: the defaults.
    """
    say = progress or (lambda m: None)
    run = _Run(batches, iterations, warmup, engine_dir, checkpoint, calib_images, cuda_graphs,
               session_options(threads, spinning), say, on_row or (lambda r: None))
    check_args(variants, batches, iterations, warmup)
    if budget is not None and not (checks.is_number(budget) and budget > 0):
        raise ValueError(f"--budget must be a positive number of seconds, got {budget!r}")
    combos, guesses = _plan(variants, backends, precisions, run, budget)
    started, spent, guessed = time.perf_counter(), 0.0, 0.0
    for k, ((spec, backend, precision), guess) in enumerate(zip(combos, guesses, strict=True), 1):
        base = run.base(spec, backend, precision)
        slow = None if include_slow else _slow_reason(spec.name, backend)
        scale = spent / guessed if guessed else 1.0
        elapsed = time.perf_counter() - started
        if slow is None and budget is not None and elapsed + guess * scale > budget:
            slow = f"over --budget {budget:.0f} s: {elapsed:.0f} s spent, this one needs about {guess * scale:.0f} s"
        if slow:
            run.add({**base, "skipped": slow})
            say(f"[{k}/{len(combos)}] {spec.name} {backend} {precision}: skipped: {slow}")
            continue
        say(f"[{k}/{len(combos)}] {spec.name} {backend} {precision}: building or loading the engine "
            f"(about {guess * scale:.0f} s)")
        t_cfg = time.perf_counter()
        if run.configuration(base, spec, backend, precision):  # a configuration that failed to build: no time
            spent += time.perf_counter() - t_cfg
            guessed += guess
    return run.rows


def _plan(variants: Sequence[str], backend_names: Sequence[str], precisions: Sequence[str], run: _Run,
          budget: float | None) -> tuple[list[tuple[Any, str, str]], list[float]]:
    """Every (spec, backend, precision) and its estimated seconds; the total is said before anything runs."""
    combos = [(get_spec(v), b, p) for v in variants for b in backend_names for p in precisions]
    gflops = matmul_gflops()
    guesses = [estimate_seconds(s.name, b, p, run.batches, run.iterations, run.warmup, gflops) for s, b, p in combos]
    run.say(f"{len(combos)} configurations x batch {', '.join(map(str, run.batches))}: about "
            f"{sum(guesses) / 60:.1f} min (a rough estimate from the variants' MACs and a {gflops:.0f} GFLOP/s "
            "matmul probe of this machine; builds that are cached take less)"
            + (f"; budget {budget:.0f} s" if budget else ""))
    return combos, guesses


@dataclass
class _Run:
    """What every configuration of one bench run shares, and the rows measured so far (each handed to
    `emit` as it is added)."""

    batches: Sequence[int]
    iterations: int
    warmup: int
    engine_dir: Any
    checkpoint: Any
    calib_images: Any
    cuda_graphs: bool
    session: dict[str, Any]
    say: Callable[[str], None]
    emit: Callable[[dict[str, Any]], None]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.emit(row)

    def base(self, spec: Any, backend: str, precision: str) -> dict[str, Any]:
        """The columns every row of a configuration starts with."""
        graphs = self.cuda_graphs and "cuda_graphs" in _takes(backend)
        return {"variant": spec.name, "head": spec.head_tag, "precision": precision,
                "backend": backend + ("+graphs" if graphs else "")}

    def configuration(self, base: dict[str, Any], spec: Any, backend: str, precision: str) -> bool:
        """One configuration: its engine built or loaded, then a row per batch; False when it cannot be built."""
        engine = self.open(base, spec, backend, precision)
        if engine is None:
            return False
        est = PoseEstimator(engine)
        for batch in self.batches:
            row = self.measure(base, engine, est, batch)
            self.add(row)
            self.say(f"      batch {batch}: engine {row['engine']['img_s']:.1f} img/s, end-to-end "
                     f"{row['e2e']['img_s']:.1f} img/s")
        return True

    def open(self, base: dict[str, Any], spec: Any, backend: str, precision: str) -> Any:
        """The configuration's engine (built if not cached), or None with a skipped row saying why."""
        calib = {}
        if precision == "int8":
            calib = ({"calib_images": self.calib_images} if self.calib_images
                     else {"calib_synthetic": True, "calib_count": 16})
        try:
            options = {k: v for k, v in self.session.items() if k in _takes(backend)}
            if self.cuda_graphs and "cuda_graphs" in _takes(backend):
                options["cuda_graphs"] = True
            config = BuildConfig(spec, self.checkpoint, backend=backend, precision=precision, out_dir=self.engine_dir,
                                 max_batch=max(self.batches), **calib)
            return open_engine(EngineRequest(build=config, load=options))
        except (CnposeError, ValueError) as exc:
            self.add({**base, "skipped": str(exc).splitlines()[0]})
            self.say(f"      skipped: {self.rows[-1]['skipped']}")
            return None

    def measure(self, base: dict[str, Any], engine: Any, est: Any, batch: int) -> dict[str, Any]:
        """One batch's row: engine only and end to end, interleaved, on the same people."""
        images, boxes = _scenes(batch)
        x = _crops(images, boxes, engine.input_dtype)
        est.predict(images, boxes)
        est.timings.reset()
        t_eng, t_e2e = _interleaved(partial(engine.infer, x), partial(est.predict, images, boxes), self.iterations,
                                    self.warmup)
        eng, e2e = _stats(t_eng, batch), _stats(t_e2e, batch)
        shares = est.timings.shares()
        return {**base, "batch": batch, "engine": eng, "e2e": e2e, "e2e_of_engine": e2e["img_s"] / eng["img_s"],
                "decode_share": shares["decode"], "prepare_share": shares["prepare"]}

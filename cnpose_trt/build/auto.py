"""`--backend auto` on the CPU: build each CPU engine that can serve the request, time them on this
processor, keep the fastest within the accuracy bound, and remember the choice per processor.

Where a GPU engine is available (TensorRT and a GPU), auto stays what it was: TensorRT, nothing measured
(backends.resolve). On the CPU the candidates are every installed backend that runs real CPU engines
(capabilities: GPU "never" or "optional", not CPU_IS_REFERENCE: the torch backend serves PyTorch itself,
the reference) at the requested precision, and for an fp32 request also bf16 where a backend builds it
and this CPU has the instructions (precision_problem). Each candidate is built (and verified) like a
named backend's engine and cached as one; a candidate that cannot be built here is recorded as skipped,
with its reason.

The accuracy bound. A candidate at the requested precision is within it: it passed the build check of
that precision, the one a named backend's engine passes. A candidate at a lower precision than asked
for (bf16 for fp32) changes the numerics the caller asked for, so it is kept only where its decoded
joints, recorded at its build against PyTorch float32 on verify.ACCURACY_SAMPLES synthetic crops, move
by at most BF16_BOUND_MM on average: issue 25's bound for bf16 is 1 mm of MPJPE over FP32, and the
mean joint shift between two engines bounds how much their mean per-joint error can differ. (On the
shipped trained XS model bf16 moves joints 0.8 mm on average; on random weights, whose flat heatmaps
magnify rounding, 1.2-1.3 mm: auto then keeps float32. To keep float32 whatever the figures, name a backend.)

The timing: the engines are loaded with their default options and run on the same batch of
min(TIMING_BATCH, max_batch) synthetic crops, one warm-up call each, then interleaved rounds (the
order rotated each round, so load on a shared machine falls on every candidate alike) for about
BUDGET_S seconds per candidate; a candidate's figure is its median ms per batch. The fastest wins, but
another engine replaces the first candidate (ONNX Runtime, the embedded default) only when it is more than
SWITCH_MARGIN faster: a lead inside the noise of a short measurement is no reason to switch. The candidates'
figures, the processor (model name, the flags that matter, usable cores) and the choice go to
<engines>/auto/<key>.json, keyed by the request, the candidates' library versions and the processor
fingerprint, and into the chosen engine's sidecar ("auto"). A later auto build of the same request on
a processor with the same fingerprint reads the choice and measures nothing; another processor has
another key, and is measured.

CNPOSE_TRT_AUTO=first keeps the old fixed rule (the first available backend of backends.AUTO_ORDER, no
measuring): for runs that must not depend on timing, such as the test suite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import backends
from .._version import __version__
from ..cache import cache_key, default_engine_dir, file_lock, sidecar_path, write_json
from ..config import BuildConfig
from ..errors import BuildError, CheckpointError, EngineError
from ..runtime.engine import load_engine, read_sidecar
from ..spec import VariantSpec, get_spec
from .lookup import checkpoint_sha256
from .storage import engine_folder

log = logging.getLogger(__name__)

AUTO_ENV = "CNPOSE_TRT_AUTO"
AUTO_MODES = ("measure", "first")
FOLDER = "auto"
TIMING_BATCH = 8
BUDGET_S = 3.0  # timing seconds per candidate, after the warm-up
MIN_ROUNDS, MAX_ROUNDS = 3, 30
BF16_BOUND_MM = 1.0
# INT8 candidates (each backend's own Q/DQ scheme) pass their build checks, but not alike: one is kept only
# where its decoded joints move at most this much more from FP32 than the most faithful INT8 candidate's
# (issue 25: INT8 within 1 mm of FP32), so speed cannot buy a scheme that costs more accuracy.
INT8_SPREAD_MM = 1.0
# How much faster (share of its median) another engine must be to replace the first candidate, ONNX Runtime:
# on the shared 2-core EPYC, medians of ~10 interleaved rounds moved by several %, and a 4% lead of OpenVINO
# FP32 on XS in auto's own timing was 0.61x when re-timed a minute later (benchmarks/results/openvino-auto-*).
SWITCH_MARGIN = 0.05
# The processor's flags that decide which engine is fastest: the vector widths and the int8 / bf16 dot products.
FINGERPRINT_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
                     "amx_bf16", "amx_int8", "avx512_fp16")
# Lower precisions a request may be served in, with the accuracy bound a candidate must then keep.
LOWER = {"fp32": ("bf16",)}


def mode() -> str:
    """What `auto` does on the CPU: "measure" (default) or "first" ($CNPOSE_TRT_AUTO).

    Raises:
        ValueError: another value.
    """
    value = os.environ.get(AUTO_ENV, "measure").strip().lower() or "measure"
    if value not in AUTO_MODES:
        raise ValueError(f"{AUTO_ENV} must be one of {', '.join(AUTO_MODES)}, got {value!r}")
    return value


def measures(config: BuildConfig) -> bool:
    """Whether this build's `auto` is measured: auto asked for, measuring on, and no GPU engine available."""
    if config.backend != "auto" or mode() != "measure":
        return False
    return backends.get(backends.resolve("auto")).GPU != "required"


def read_cpuinfo() -> str:
    """/proc/cpuinfo's text ('' where it cannot be read); tests replace it to fake another processor."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read(1 << 20)
    except OSError:
        return ""


def cpu_fingerprint() -> dict[str, Any]:
    """The processor as far as engine speed goes: model name, FINGERPRINT_FLAGS it has, usable cores."""
    model, flags = "unknown", set()
    for line in read_cpuinfo().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name" and model == "unknown":
            model = " ".join(value.split())
        elif name.strip() == "flags" and not flags:
            flags = set(value.split())
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return {"model": model, "flags": [f for f in FINGERPRINT_FLAGS if f in flags], "cores": cores}


@dataclasses.dataclass
class Candidate:
    """One (backend, precision) auto considered. status: "pending", "measured", "skipped" (reason),
    "over bound" (reason), "failed" (its build failed: reason)."""

    backend: str
    precision: str
    status: str = "pending"
    reason: str = ""
    ms_per_batch: float | None = None
    rounds_ms: list[float] = dataclasses.field(default_factory=list)
    accuracy: dict[str, Any] | None = None
    engine: str | None = None
    version: str | None = None

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"

    def skip(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "", [])}


def _problem(module: Any, precision: str, model: str) -> str | None:
    """Why this backend is no CPU candidate for the precision here, or None."""
    if module.GPU == "required":
        return "a GPU engine"
    if module.CPU_IS_REFERENCE:
        return "serves PyTorch itself on the CPU: the reference, not a CPU engine"
    if not module.available():
        return getattr(module, "INSTALL_HINT", "") or "not installed"
    if model not in module.MODELS:
        return f"builds {', '.join(module.MODELS)} engines, not {model}"
    if precision not in module.PRECISIONS:
        return f"builds {', '.join(module.PRECISIONS)}, not {precision}"
    return getattr(module, "precision_problem", lambda _: None)(precision)


def candidates(precision: str, model: str = "convnextpose") -> list[Candidate]:
    """Every (backend, precision) auto considers for the request, those it cannot use marked skipped."""
    pairs = [(name, precision) for name in backends.NAMES]
    pairs += [(name, lower) for lower in LOWER.get(precision, ()) for name in backends.builders_of(lower)]
    found = []
    for name, p in pairs:
        cand = Candidate(name, p)
        try:
            module = backends.get(name)
        except EngineError as exc:
            cand.skip("skipped", str(exc))
        else:
            problem = _problem(module, p, model)
            if problem:
                cand.skip("skipped", problem)
            else:
                cand.version = module.version()
        found.append(cand)
    return found


def within_bound(cand: Candidate, requested: str, meta: Mapping[str, Any]) -> str | None:
    """Why a built candidate is over the accuracy bound (module docstring), or None where it is within."""
    if cand.precision == requested:
        return None
    acc = meta.get("accuracy_vs_torch")
    mean = acc.get("mean_mm") if isinstance(acc, Mapping) else None
    if not isinstance(mean, (int, float)):
        return f"its sidecar records no decoded-joint accuracy against PyTorch to hold to {BF16_BOUND_MM} mm"
    cand.accuracy = dict(acc)
    if not mean <= BF16_BOUND_MM:
        return (f"its joints move {mean:.2f} mm on average from PyTorch float32's (on {acc.get('samples', '?')} "
                f"crops); an {requested} request allows {BF16_BOUND_MM} mm")
    return None


def time_rounds(runs: Mapping[str, Callable[[], Any]], budget_s: float = BUDGET_S,
                clock: Callable[[], float] = time.perf_counter,
                say: Callable[[str], None] = lambda _: None) -> dict[str, list[float]]:
    """Seconds per call of each run: one warm-up call each (which sizes the rounds: about budget_s per
    run, MIN_ROUNDS to MAX_ROUNDS), then interleaved rounds, the order rotated each round."""
    labels = list(runs)
    first = {}
    for label in labels:
        t0 = clock()
        runs[label]()
        first[label] = clock() - t0
    slowest = max(max(first.values()), 1e-6)
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(budget_s / slowest)))
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for i in range(len(labels)):
            label = labels[(i + r) % len(labels)]
            t0 = clock()
            runs[label]()
            times[label].append(clock() - t0)
        if (r + 1) % max(1, rounds // 4) == 0 or r + 1 == rounds:  # a few lines, not one per round
            say(f"      round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()))
    return times


def choose(cands: list[Candidate], margin: float | None = None) -> Candidate:
    """The measured candidate with the smallest median ms per batch; the first measured one listed (ONNX
    Runtime, the embedded default, where it is measured) unless another beats it by more than `margin`
    (default SWITCH_MARGIN) of its median.

    Raises:
        BuildError: no candidate was measured.
    """
    margin = SWITCH_MARGIN if margin is None else margin
    measured = [c for c in cands if c.status == "measured"]
    if not measured:
        raise BuildError("auto found no CPU engine to choose: " + "; ".join(f"{c.label}: {c.reason}" for c in cands))
    first = measured[0]
    best = min(measured, key=lambda c: math.inf if c.ms_per_batch is None else c.ms_per_batch)
    if first.ms_per_batch is not None and best.ms_per_batch is not None \
            and not best.ms_per_batch < first.ms_per_batch * (1 - margin):
        return first
    return best


def request_fields(config: BuildConfig) -> dict[str, Any]:
    """What identifies an auto request apart from the backend: the weights file's bytes (or the seed),
    the variant, the precision and every option that shapes the engines."""
    c = config
    variant = None if c.variant is None else get_spec(c.variant).to_dict()
    return {"checkpoint_sha256": None if c.checkpoint is None else checkpoint_sha256(c.checkpoint),
            "seed": c.seed if c.checkpoint is None else None, "variant": variant, "model": c.model,
            "precision": c.precision, "max_batch": c.max_batch, "opset": c.opset, "keep_fp32": list(c.keep_fp32),
            "fp16_output": c.fp16_output, "int8": None if c.precision != "int8" else {
                "calib_images": None if c.calib_images is None else os.path.abspath(c.calib_images),
                "calib_boxes": None if c.calib_boxes is None else os.path.abspath(c.calib_boxes),
                "calib_count": c.calib_count, "calib_method": c.calib_method, "calib_synthetic": c.calib_synthetic,
                "int8_exclude": list(c.int8_exclude), "int8_scheme": c.int8_scheme}}


class Choice:
    """The record of one auto request on one processor: <engines>/auto/<key>.json."""

    def __init__(self, out: Path, config: BuildConfig, cands: list[Candidate], cpu: dict[str, Any]) -> None:
        self.cpu = cpu
        runnable = [(c.backend, c.precision, c.version) for c in cands if c.status == "pending"]
        rules = {"bf16_bound_mm": BF16_BOUND_MM, "int8_spread_mm": INT8_SPREAD_MM, "margin": SWITCH_MARGIN,
                 "batch": TIMING_BATCH, "package": __version__}  # a record made under other rules is not reused
        self.key = cache_key({"auto": request_fields(config), "candidates": runnable, "cpu": cpu, "rules": rules})
        self.path = out / FOLDER / f"{self.key[:32]}.json"

    def read(self) -> dict[str, Any] | None:
        """The recorded choice, or None (none yet, or unreadable: then it is measured again)."""
        try:
            rec = json.loads(self.path.read_bytes()[:1 << 20])
            if rec["key"] != self.key or not {"backend", "precision"} <= set(rec["choice"]):
                return None
            return rec
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            log.debug("auto record %s unreadable, measuring again: %s", self.path, exc)
            return None

    def write(self, rec: dict[str, Any]) -> None:
        try:
            self.path.parent.mkdir(exist_ok=True)
            write_json(self.path, rec)
        except OSError as exc:  # a read-only cache: the choice is measured again next time
            log.debug("cannot record the auto choice %s: %s", self.path, exc)


def _attach(result: Any, rec: dict[str, Any]) -> Any:
    """The chosen engine's sidecar with the auto record (the candidates' figures and the choice) added;
    outside the cache key, so the engine stays the cache hit it was."""
    side = sidecar_path(result.path)
    try:
        meta = read_sidecar(side)
        if meta.get("auto") != rec:
            meta["auto"] = rec
            write_json(side, meta)
    except (EngineError, OSError) as exc:  # a read-only cache still serves the engine
        log.debug("cannot record auto's figures in %s: %s", side, exc)
        meta = {**result.meta, "auto": rec}
    return dataclasses.replace(result, meta=meta)


def _build_candidates(config: BuildConfig, runnable: list[Candidate], build: Callable[[BuildConfig], Any],
                      say: Callable[[str], None]) -> dict[str, Any]:
    """Each candidate's engine, built or reused like a named backend's; a failed build or one over the
    accuracy bound marks its candidate."""
    built = {}
    for cand in runnable:
        say(f"auto: candidate {cand.label}")
        try:
            result = build(dataclasses.replace(config, backend=cand.backend, precision=cand.precision))
        except (ValueError, CheckpointError):  # the caller's request or weights: every candidate would fail
            raise
        except Exception as exc:  # this backend's failure (its library's own errors included): skip it
            cand.skip("failed", _failure(exc))
            say(f"      failed: {cand.reason}")
            continue
        cand.engine = result.path.name
        over = within_bound(cand, config.precision, result.meta)
        if over:
            cand.skip("over bound", over)
            say(f"      not a choice: {over}")
            continue
        built[cand.label] = result
    _gate_int8(config.precision, runnable, built, say)
    return built


def int8_over_spread(shifts: Mapping[str, float]) -> dict[str, str]:
    """Of INT8 candidates' mean decoded-joint shifts from FP32 (mm), those more than INT8_SPREAD_MM above the
    smallest, each with its reason."""
    if not shifts:
        return {}
    best = min(shifts.values())
    return {label: f"its joints move {mm:.2f} mm from FP32's on average, {mm - best:.2f} mm more than the most "
                   f"faithful INT8 engine's ({best:.2f} mm); INT8 candidates may differ by {INT8_SPREAD_MM} mm"
            for label, mm in shifts.items() if mm - best > INT8_SPREAD_MM}


def _gate_int8(precision: str, runnable: list[Candidate], built: dict[str, Any], say: Callable[[str], None]) -> None:
    """INT8 requests: drop the built candidates whose accuracy is over int8_over_spread's bound."""
    if precision != "int8":
        return
    shifts = {}
    for label, result in built.items():
        acc = result.meta.get("accuracy_vs_fp32")
        if isinstance(acc, Mapping) and isinstance(acc.get("mean_mm"), (int, float)):
            shifts[label] = float(acc["mean_mm"])
    for cand in runnable:
        reason = int8_over_spread(shifts).get(cand.label)
        if reason:
            cand.skip("over bound", reason)
            say(f"      not a choice: {reason}")
            del built[cand.label]


def _failure(exc: BaseException) -> str:
    """A candidate's failure, for its record: the exception's type and the first line of its message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _only_one_left(built: dict[str, Any], runnable: list[Candidate]) -> bool:
    """Fewer than two engines to compare: the one left (if any) is marked, untimed."""
    if len(built) >= 2:
        return False
    for cand in runnable:
        if cand.label in built:
            cand.status, cand.reason = "measured", "the only candidate left: not timed"
    return True


def _measure(built: dict[str, Any], runnable: list[Candidate], max_batch: int, say: Callable[[str], None]) -> None:
    """Median ms per batch of each built candidate, timed together (time_rounds). Each is loaded and run once
    first: one failing there is marked "failed" (and left out), not the end of auto."""
    from .verify import accuracy_inputs

    if _only_one_left(built, runnable):
        return
    x = accuracy_inputs(VariantSpec(**next(iter(built.values())).meta["spec"]), min(TIMING_BATCH, max_batch))
    loaded: list[Any] = []  # every engine opened, closed at the end whatever happens
    timed = {}
    try:
        for cand in runnable:
            if cand.label not in built:
                continue
            try:
                loaded.append(engine := load_engine(built[cand.label].path))
                engine.infer(x)
            except Exception as exc:
                cand.skip("failed", _failure(exc))
                del built[cand.label]
                continue
            timed[cand.label] = engine
        if _only_one_left(built, runnable):
            return
        say(f"auto: timing {len(timed)} engines on this processor, batch {len(x)}, interleaved rounds")
        times = time_rounds({label: (lambda e=e: e.infer(x)) for label, e in timed.items()}, say=say)
    finally:
        for engine in loaded:
            engine.close()
    for cand in runnable:
        if cand.label in times:
            cand.rounds_ms = [round(t * 1e3, 3) for t in times[cand.label]]
            cand.ms_per_batch = round(statistics.median(times[cand.label]) * 1e3, 3)
            cand.status = "measured"


def build_measured(config: BuildConfig, build: Callable[[BuildConfig], Any],
                   progress: Callable[[str], None] | None = None) -> Any:
    """build_engine for `auto` on the CPU (measures(config)): the recorded choice for this request on this
    processor, else every candidate built, the fastest within the accuracy bound chosen and recorded.
    build: build_engine with the progress callback bound (one concrete backend per call).

    Returns:
        The chosen engine's BuildResult; its meta["auto"] holds the candidates' figures and the choice.
    Raises:
        BuildError: no candidate can serve the request here (each one's reason named).
    """
    say = progress or (lambda _: None)
    cands = candidates(config.precision, config.model)
    runnable = [c for c in cands if c.status == "pending"]
    if not runnable:
        raise BuildError(f"auto found no CPU engine for a {config.precision} {config.model} engine here: "
                         + "; ".join(f"{c.label}: {c.reason}" for c in cands))
    if len(runnable) == 1:  # nothing to choose between
        return build(dataclasses.replace(config, backend=runnable[0].backend, precision=runnable[0].precision))
    out = engine_folder(Path(config.out_dir) if config.out_dir is not None else default_engine_dir())
    choice = Choice(out, config, cands, cpu_fingerprint())
    rec = None if config.force else choice.read()  # a cache hit needs no lock (a read-only cache serves too)
    if rec is not None:
        return _reuse(config, build, choice, rec, say)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(out / f".auto-{choice.key[:16]}.lock"))
        except OSError as exc:  # a read-only cache without a record for this processor: the fixed rule
            backend = backends.resolve("auto")
            say(f"auto: cannot measure into {out} ({exc.strerror or exc}): the fixed rule, {backend}")
            return build(dataclasses.replace(config, backend=backend))
        rec = None if config.force else choice.read()  # another process may have measured meanwhile
        if rec is not None:
            return _reuse(config, build, choice, rec, say)
        say(f"auto: measuring {', '.join(c.label for c in runnable)} on {choice.cpu['model']} "
            f"({' '.join(choice.cpu['flags']) or 'no vector flags read'}, {choice.cpu['cores']} cores)")
        built = _build_candidates(config, runnable, build, say)
        _measure(built, runnable, config.max_batch, say)
        best = choose(cands)
        rec = {"key": choice.key, "cpu": choice.cpu, "requested_precision": config.precision,
               "batch": min(TIMING_BATCH, config.max_batch),
               "rounds": max((len(c.rounds_ms) for c in cands), default=0),
               "bound": {"lower_precision_mean_joint_shift_mm": BF16_BOUND_MM},
               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "choice": {"backend": best.backend, "precision": best.precision, "engine": best.engine},
               "candidates": [c.to_dict() for c in cands]}
        if any(c.status == "failed" for c in cands):  # a passing failure must not stand as this processor's choice
            say("auto: a candidate failed, so this choice is not recorded: the next build measures again")
        else:
            choice.write(rec)
        say("auto: " + "; ".join(f"{c.label} {c.ms_per_batch:.1f} ms" for c in cands if c.ms_per_batch is not None)
            + f" -> {best.label}")
        _notice(config, best.precision, rec)
        return _attach(built[best.label], rec)


def _reuse(config: BuildConfig, build: Callable[[BuildConfig], Any], choice: Choice, rec: dict[str, Any],
           say: Callable[[str], None]) -> Any:
    """The engine of a recorded choice (built or found in the cache), with the record attached."""
    picked = rec["choice"]
    say(f"auto: {picked['backend']} {picked['precision']}, as measured on this processor before "
        f"({choice.cpu['model']}; --force measures again)")
    _notice(config, picked["precision"], rec)
    return _attach(build(dataclasses.replace(config, backend=picked["backend"], precision=picked["precision"])),
                   rec)


def _notice(config: BuildConfig, precision: str, rec: dict[str, Any]) -> None:
    """Say (a warning, shown without any logging set up) when auto serves a request at a lower precision."""
    if precision != config.precision:
        picked = rec["choice"]
        log.warning("auto serves this %s request with the %s %s engine (faster here, its joints within %s mm of "
                    "float32 on average); name a backend (--backend onnxruntime) to keep %s", config.precision,
                    picked["backend"], precision, BF16_BOUND_MM, config.precision)

"""`--backend auto` on the CPU (build/auto.py): the candidates, the accuracy bound, the choice by the
recorded figures, its reuse per processor fingerprint. Timings are injected (auto.time_rounds replaced):
no assertion depends on this machine's speed. Real XS engines (max batch 4) are built once per module."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import need_torch

from cnpose_trt import backends
from cnpose_trt.build import auto
from cnpose_trt.errors import EngineError

CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
flags\t\t: fpu sse2 avx2 fma {flags}

processor\t: 1
model name\t: {model}
flags\t\t: fpu sse2 avx2 fma {flags}
"""
_serial = itertools.count()


def fake_cpu(monkeypatch, model=None, flags="avx512f avx512_vnni avx512_bf16"):
    """A fingerprint reader showing a processor of this name (a fresh one unless named)."""
    model = model or f"Test CPU {next(_serial)}"
    monkeypatch.setattr(auto, "read_cpuinfo", lambda: CPUINFO.format(vendor="Test", model=model, flags=flags))
    return model


class FakeTimer:
    """auto.time_rounds with given ms per batch per candidate label: each label gets rounds whose median
    is its figure (spread around it), and every call and the labels it timed are counted."""

    def __init__(self, ms):
        self.ms, self.calls = dict(ms), []

    def __call__(self, runs, budget_s=auto.BUDGET_S, clock=None, say=lambda _: None):
        self.calls.append(sorted(runs))
        for run in runs.values():
            run()  # the engines really run once: the timer gets working callables
        return {label: [self.ms[label] * f / 1e3 for f in (1.3, 0.9, 1.0, 1.1, 0.95)] for label in runs}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    need_torch()
    return tmp_path_factory.mktemp("auto-engines")


@pytest.fixture
def measuring(monkeypatch):
    monkeypatch.setenv(auto.AUTO_ENV, "measure")


def _ov_available():
    try:
        return backends.get("openvino").available()
    except EngineError:
        return False


needs_ov = pytest.mark.skipif(not _ov_available(), reason="the openvino backend is not installed")
needs_bf16 = pytest.mark.skipif(not _ov_available() or bool(backends.get("openvino").precision_problem("bf16")),
                                reason="no OpenVINO or no bf16 instructions on this CPU")


def build(out, **kw):
    from cnpose_trt.build.builder import build_engine

    return build_engine("XS", out_dir=out, max_batch=4, **kw)


def chosen(result):
    return result.meta["backend"], result.meta["precision"]


@needs_ov
def test_choice_is_the_fastest_by_the_recorded_figures(out, measuring, monkeypatch):
    for fast, slow in (("openvino fp32", "onnxruntime fp32"), ("onnxruntime fp32", "openvino fp32")):
        fake_cpu(monkeypatch)
        monkeypatch.setattr(auto, "BF16_BOUND_MM", 0.0)  # bf16 stays out: this test is about the timings
        ms = {fast: 40.0, slow: 50.0, "openvino bf16": 1.0}
        monkeypatch.setattr(auto, "time_rounds", timer := FakeTimer(ms))
        result = build(out)
        assert len(timer.calls) == 1 and timer.calls[0] == sorted([fast, slow])
        rec = result.meta["auto"]
        figures = {f"{c['backend']} {c['precision']}": c.get("ms_per_batch") for c in rec["candidates"]}
        # The reference: the median of what the timer gave, computed here, and the smallest of them.
        for label in (fast, slow):
            assert figures[label] == pytest.approx(np.median([ms[label] * f for f in (1.3, 0.9, 1.0, 1.1, 0.95)]))
        best = min((label for label in (fast, slow)), key=lambda k: figures[k])
        assert " ".join(chosen(result)) == best == fast
        assert rec["choice"]["engine"] == result.path.name and rec["batch"] == 4 and rec["rounds"] == 5
        # The sidecar on disk holds the same record (inspect reads it there).
        from cnpose_trt.runtime.engine import read_sidecar

        assert read_sidecar(result.path)["auto"] == rec


@needs_bf16
def test_a_candidate_over_the_accuracy_bound_is_not_chosen_even_when_fastest(out, measuring, monkeypatch):
    ms = {"onnxruntime fp32": 50.0, "openvino fp32": 60.0, "openvino bf16": 10.0}
    bf16 = build(out, backend="openvino", precision="bf16").meta["accuracy_vs_torch"]["mean_mm"]
    assert bf16 > 0
    for bound, expected in ((bf16 * 0.5, ("onnxruntime", "fp32")), (bf16 * 2, ("openvino", "bf16"))):
        fake_cpu(monkeypatch)
        monkeypatch.setattr(auto, "BF16_BOUND_MM", bound)
        monkeypatch.setattr(auto, "time_rounds", timer := FakeTimer(ms))
        result = build(out)
        assert chosen(result) == expected
        cand = {c["precision"]: c for c in result.meta["auto"]["candidates"] if c["backend"] == "openvino"}["bf16"]
        if bound < bf16:
            assert cand["status"] == "over bound" and f"{bound} mm" in cand["reason"] and "ms_per_batch" not in cand
            assert "openvino bf16" not in timer.calls[0]
        else:
            assert cand["status"] == "measured" and cand["accuracy"]["mean_mm"] == pytest.approx(bf16)


@needs_ov
def test_the_choice_is_reused_and_measured_again_on_another_processor(out, measuring, monkeypatch):
    monkeypatch.setattr(auto, "BF16_BOUND_MM", 0.0)
    model = fake_cpu(monkeypatch)
    monkeypatch.setattr(auto, "time_rounds", timer := FakeTimer({"onnxruntime fp32": 30.0, "openvino fp32": 20.0}))
    first = build(out)
    again = build(out)
    assert len(timer.calls) == 1, "the second auto build on the same processor measured again"
    assert again.path == first.path and chosen(again) == ("openvino", "fp32") and again.cached
    assert again.meta["auto"] == first.meta["auto"]
    # The same name with other flags is another processor; so is another name with the same flags.
    timer.ms = {"onnxruntime fp32": 20.0, "openvino fp32": 30.0}
    fake_cpu(monkeypatch, model=model, flags="avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16")
    other = build(out)
    assert len(timer.calls) == 2 and chosen(other) == ("onnxruntime", "fp32")
    assert "amx_bf16" in other.meta["auto"]["cpu"]["flags"]
    fake_cpu(monkeypatch, model=model)  # back on the first processor: its record still holds
    assert chosen(build(out)) == ("openvino", "fp32") and len(timer.calls) == 2
    # force measures again
    timer.ms = {"onnxruntime fp32": 10.0, "openvino fp32": 30.0}
    monkeypatch.setattr(auto, "candidates", lambda p, m: [c for c in _real_candidates(p, m) if c.precision == p])
    assert chosen(build(out, force=True)) == ("onnxruntime", "fp32") and len(timer.calls) == 3


_real_candidates = auto.candidates


@pytest.mark.parametrize("how", ["unavailable", "not importable"])
def test_openvino_missing_leaves_onnxruntime_alone_without_error(out, measuring, monkeypatch, how):
    fake_cpu(monkeypatch)
    monkeypatch.setattr(auto, "time_rounds", timer := FakeTimer({}))
    if how == "unavailable":
        monkeypatch.setattr(backends.get("openvino"), "available", lambda: False)
    else:
        real = backends.get

        def get(name, what=""):
            if name == "openvino":
                raise EngineError("the openvino backend needs openvino, which is not installed")
            return real(name, what)

        monkeypatch.setattr(backends, "get", get)
    cands = auto.candidates("fp32")
    assert [c.label for c in cands if c.status == "pending"] == ["onnxruntime fp32"]
    ov = [c for c in cands if c.backend == "openvino"]
    assert ov and all(c.status == "skipped" and "openvino" in c.reason.lower() for c in ov)
    result = build(out)
    assert chosen(result) == ("onnxruntime", "fp32") and timer.calls == []


def test_a_precision_a_candidate_refuses_is_skipped_with_its_reason(monkeypatch):
    cands = {c.label: c for c in auto.candidates("bf16")}
    ort = cands["onnxruntime bf16"]
    assert ort.status == "skipped" and ort.reason == "builds fp32, fp16, int8, not bf16"
    assert cands["tensorrt bf16"].status == "skipped" and cands["torch bf16"].status == "skipped"
    if _ov_available():
        ov = cands["openvino bf16"]
        problem = backends.get("openvino").precision_problem("bf16")
        assert (ov.status, ov.reason) == (("skipped", problem) if problem else ("pending", ""))
        # A CPU without the bf16 flags: openvino is skipped with the backend's own reason, and auto says why.
        from cnpose_trt.backends.openvino import runtime

        monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
        ov = {c.label: c for c in auto.candidates("bf16")}["openvino bf16"]
        assert ov.status == "skipped" and "AVX512-BF16" in ov.reason
        from cnpose_trt.config import BuildConfig
        from cnpose_trt.errors import BuildError

        with pytest.raises(BuildError, match="onnxruntime bf16: builds fp32, fp16, int8, not bf16"):
            auto.build_measured(BuildConfig("XS", precision="bf16"), lambda c: pytest.fail("nothing to build"))
    # fp32: bf16 joins only where a backend builds it; int8 has no lower precision
    assert all(c.precision == "int8" for c in auto.candidates("int8"))


def test_only_cpu_engines_are_candidates_and_a_gpu_keeps_tensorrt(monkeypatch):
    cands = {c.label: c for c in auto.candidates("fp32")}
    assert cands["tensorrt fp32"].status == "skipped" and cands["tensorrt fp32"].reason == "a GPU engine"
    assert cands["torch fp32"].status == "skipped" and "reference" in cands["torch fp32"].reason
    from cnpose_trt.config import BuildConfig

    monkeypatch.setenv(auto.AUTO_ENV, "measure")
    assert auto.measures(BuildConfig("XS"))
    assert not auto.measures(BuildConfig("XS", backend="onnxruntime"))
    monkeypatch.setattr(backends, "resolve", lambda requested: "tensorrt")  # TensorRT and a GPU present
    assert not auto.measures(BuildConfig("XS"))
    monkeypatch.setenv(auto.AUTO_ENV, "first")
    monkeypatch.setattr(backends, "resolve", lambda requested: "onnxruntime")
    assert not auto.measures(BuildConfig("XS"))
    monkeypatch.setenv(auto.AUTO_ENV, "fastest")
    with pytest.raises(ValueError, match="CNPOSE_TRT_AUTO must be one of measure, first, got 'fastest'"):
        auto.measures(BuildConfig("XS"))


def test_choose_picks_the_smallest_median_and_names_every_reason_when_none_is_left():
    rng = np.random.default_rng(7)
    for _ in range(20):
        cands = [auto.Candidate("b", f"p{i}", status=s, ms_per_batch=float(v)) for i, (s, v) in
                 enumerate(zip(rng.choice(["measured", "over bound", "failed"], 6), rng.uniform(1, 100, 6), strict=True))]
        measured = [c for c in cands if c.status == "measured"]
        if measured:
            assert auto.choose(cands, margin=0.0).ms_per_batch == min(c.ms_per_batch for c in measured)
    # Another engine replaces the first (ONNX Runtime) only when faster by more than the margin.
    first, other = (auto.Candidate(b, "fp32", status="measured", ms_per_batch=v) for b, v in (("a", 100.0), ("b", 96.0)))
    assert auto.choose([first, other], margin=0.05).backend == "a"
    assert auto.choose([first, other], margin=0.03).backend == "b"
    other.ms_per_batch = 94.0
    assert auto.choose([first, other]).backend == "b" and auto.SWITCH_MARGIN == 0.05
    tie = [auto.Candidate("a", "fp32", status="measured", ms_per_batch=5.0),
           auto.Candidate("b", "fp32", status="measured", ms_per_batch=5.0)]
    assert auto.choose(tie).backend == "a"
    from cnpose_trt.errors import BuildError

    with pytest.raises(BuildError, match="a fp32: x; b bf16: y"):
        auto.choose([auto.Candidate("a", "fp32", "failed", "x"), auto.Candidate("b", "bf16", "over bound", "y")])


def test_time_rounds_interleaves_rotates_and_sizes_the_rounds():
    order, now = [], [0.0]
    cost = {"a": 0.5, "b": 0.25, "c": 0.1}

    def clock():
        return now[0]

    def run(label):
        def go():
            order.append(label)
            now[0] += cost[label]
        return go

    times = auto.time_rounds({k: run(k) for k in cost}, budget_s=2.0, clock=clock)
    # One warm-up call each, then budget / slowest warm-up = 4 rounds, each label once per round, rotated.
    assert order[:3] == ["a", "b", "c"]
    rounds = [order[3 + 3 * r: 6 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]] and len(order) == 15
    assert set(times) == set(cost)
    for k, v in cost.items():
        assert times[k] == pytest.approx([v] * 4)
    # Slow engines still get MIN_ROUNDS; fast ones at most MAX_ROUNDS.
    assert len(auto.time_rounds({"a": run("a")}, budget_s=0.1, clock=clock)["a"]) == auto.MIN_ROUNDS
    cost["a"] = 1e-9
    assert len(auto.time_rounds({"a": run("a")}, budget_s=10.0, clock=clock)["a"]) == auto.MAX_ROUNDS


def test_cpu_fingerprint_reads_the_model_the_flags_that_matter_and_the_cores(monkeypatch):
    fake_cpu(monkeypatch, model="Intel(R)  Xeon(R)   Platinum 8480+", flags="amx_bf16 sse4_2 avx512_bf16 amx_tile")
    fp = auto.cpu_fingerprint()
    assert fp["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert fp["flags"] == ["avx2", "fma", "avx512_bf16", "amx_tile", "amx_bf16"]  # FINGERPRINT_FLAGS' order
    assert isinstance(fp["cores"], int) and fp["cores"] >= 1
    monkeypatch.setattr(auto, "read_cpuinfo", lambda: "")
    assert auto.cpu_fingerprint()["model"] == "unknown" and auto.cpu_fingerprint()["flags"] == []


@needs_ov
def test_inspect_shows_the_candidates(out, measuring, monkeypatch, capsys):
    import argparse

    from cnpose_trt.cli.inspect import run_inspect

    monkeypatch.setattr(auto, "BF16_BOUND_MM", 0.0)
    model = fake_cpu(monkeypatch)
    monkeypatch.setattr(auto, "time_rounds", FakeTimer({"onnxruntime fp32": 12.5, "openvino fp32": 25.0}))
    path = build(out).path
    capsys.readouterr()
    run_inspect(argparse.Namespace(file=path))
    text = capsys.readouterr().out
    assert "chosen by auto:  onnxruntime fp32 for the fp32 request" in text and model in text
    assert "12.5 ms/batch (median) <- chosen" in text and "25.0 ms/batch (median)\n" in text
    if not backends.get("openvino").precision_problem("bf16"):
        assert "openvino     bf16  over bound: its joints move" in text


@needs_ov
def test_a_failing_candidate_is_skipped_and_the_choice_not_recorded(out, measuring, monkeypatch):
    """A backend failing in its own way (its library's RuntimeError at build, or at load) marks its candidate
    "failed"; auto goes on with the others, and does not record a choice made without it."""
    from cnpose_trt.build import builder

    real_run = builder._Build.run
    from cnpose_trt.runtime.engine import load_engine as real_load
    for where in ("build", "load"):
        fake_cpu(monkeypatch)
        monkeypatch.setattr(auto, "BF16_BOUND_MM", 0.0)
        monkeypatch.setattr(auto, "time_rounds", timer := FakeTimer({"onnxruntime fp32": 50.0, "openvino fp32": 40.0,
                                                                    "openvino bf16": 1.0}))
        if where == "build":
            def flaky_run(self, _real=real_run):
                if self.config.backend == "onnxruntime":
                    raise RuntimeError("no space left on device")
                return _real(self)
            monkeypatch.setattr(builder._Build, "run", flaky_run)
            monkeypatch.setattr(auto, "load_engine", real_load)
        else:
            monkeypatch.setattr(builder._Build, "run", real_run)

            def refuse_ort(path, **kw):
                if "onnxruntime" in str(path):
                    raise RuntimeError("the session would not start")
                return real_load(path, **kw)
            monkeypatch.setattr(auto, "load_engine", refuse_ort)
        result = build(out)
        rec = result.meta["auto"]
        status = {f"{c['backend']} {c['precision']}": (c["status"], c.get("reason", "")) for c in rec["candidates"]}
        assert status["onnxruntime fp32"][0] == "failed" and "RuntimeError" in status["onnxruntime fp32"][1], where
        assert chosen(result) == ("openvino", "fp32")
        choice = auto.Choice(result.path.parent, auto.BuildConfig("XS", out_dir=out, max_batch=4),
                             auto.candidates("fp32"), auto.cpu_fingerprint())
        assert choice.read() is None, where  # not recorded: the next build measures again
        assert timer.calls == []  # one engine left: nothing timed


@needs_ov
def test_read_only_cache_without_a_record_takes_the_fixed_rule(out, measuring, monkeypatch):
    fake_cpu(monkeypatch)

    def read_only(*_a, **_k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(auto, "file_lock", read_only)
    monkeypatch.setattr(auto, "time_rounds", timer := FakeTimer({}))
    said = []
    from cnpose_trt.build.builder import build_engine

    result = build_engine("XS", out_dir=out, max_batch=4, progress=said.append)
    assert chosen(result) == (backends.resolve("auto"), "fp32") and timer.calls == []
    assert any("cannot measure into" in m and "the fixed rule" in m for m in said), said


@needs_ov
def test_load_options_of_another_backend_are_left_out_under_auto(out, measuring, monkeypatch):
    """spinning is ONNX Runtime's: an auto request that got an OpenVINO engine still opens; a named backend keeps
    the strict check."""
    from cnpose_trt.config import BuildConfig, EngineRequest
    from cnpose_trt.runtime.open import open_engine

    fake_cpu(monkeypatch)
    monkeypatch.setattr(auto, "BF16_BOUND_MM", 0.0)
    monkeypatch.setattr(auto, "time_rounds", FakeTimer({"onnxruntime fp32": 50.0, "openvino fp32": 10.0,
                                                        "openvino bf16": 1.0}))
    engine = open_engine(EngineRequest(build=BuildConfig("XS", out_dir=out, max_batch=4),
                                       load={"spinning": False, "threads": 1}))
    assert engine.backend == "openvino"
    with pytest.raises(ValueError, match="spinning"):
        open_engine(EngineRequest(build=BuildConfig("XS", out_dir=out, max_batch=4, backend="openvino"),
                                  load={"spinning": False}))


def test_int8_candidates_differ_by_at_most_the_spread():
    """The INT8 rule written out: a candidate is kept where its mean shift from FP32 is within INT8_SPREAD_MM of
    the most faithful one's (boundary included), whatever the absolute figures."""
    spread = auto.INT8_SPREAD_MM
    assert auto.int8_over_spread({}) == {}
    assert auto.int8_over_spread({"a int8": 3.0}) == {}
    assert auto.int8_over_spread({"a int8": 0.2, "b int8": 0.2 + spread}) == {}
    over = auto.int8_over_spread({"a int8": 0.2, "b int8": 0.2 + spread + 0.01, "c int8": 0.9})
    assert set(over) == {"b int8"} and f"{spread} mm" in over["b int8"] and "0.20 mm" in over["b int8"]


def test_choice_key_holds_the_rules(monkeypatch, tmp_path):
    """A record made under another bound, margin or package version is not reused: the key changes."""
    from cnpose_trt.config import BuildConfig

    fake_cpu(monkeypatch, model="Rules CPU")
    config = BuildConfig("XS", out_dir=tmp_path, max_batch=4)
    cands, cpu = auto.candidates("fp32"), auto.cpu_fingerprint()
    key = auto.Choice(tmp_path, config, cands, cpu).key
    for name, value in (("BF16_BOUND_MM", 2.0), ("SWITCH_MARGIN", 0.2), ("INT8_SPREAD_MM", 0.5),
                        ("TIMING_BATCH", 4), ("__version__", "9.9.9")):
        with monkeypatch.context() as m:
            m.setattr(auto, name, value)
            assert auto.Choice(tmp_path, config, cands, cpu).key != key, name
    assert auto.Choice(tmp_path, config, cands, cpu).key == key


def test_int8_gate_drops_the_candidate_over_the_spread():
    from types import SimpleNamespace

    def built_with(a, b):
        return {"onnxruntime int8": SimpleNamespace(meta={"accuracy_vs_fp32": {"mean_mm": a}}),
                "openvino int8": SimpleNamespace(meta={"accuracy_vs_fp32": {"mean_mm": b}})}

    runnable = [auto.Candidate("onnxruntime", "int8"), auto.Candidate("openvino", "int8")]
    built, said = built_with(0.3, 1.5), []
    auto._gate_int8("int8", runnable, built, said.append)
    assert list(built) == ["onnxruntime int8"] and runnable[1].status == "over bound" and said
    assert runnable[0].status == "pending"
    built = built_with(0.3, 1.2)
    auto._gate_int8("int8", [auto.Candidate("onnxruntime", "int8"), auto.Candidate("openvino", "int8")], built,
                    said.append)
    assert len(built) == 2  # within the spread: both stay, speed decides

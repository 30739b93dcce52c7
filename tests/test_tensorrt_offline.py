"""The TensorRT backend's own logic, tested without TensorRT or a GPU.

Nothing here verifies TensorRT. Where a test needs a TensorRT or CUDA object it uses a small
stand-in that behaves as NVIDIA documents (a factory raising pybind11's
TypeError("factory function returned nullptr"), set_timing_cache returning False for a foreign
cache, a context whose execute_async_v3 returns False): these test OUR error handling, option
checks, compatibility rules, pool and stream discipline. The stand-ins' TensorRT attribute names
are themselves checked against the pairs from NVIDIA's binding sources (test_stand_ins_use_real_names).
Whether TensorRT behaves so is tested only where it runs: tests/test_tensorrt.py.
cuda-python, where installed, is the real one (it imports without a GPU).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import tomllib

import cnpose_trt.backends.tensorrt as backend
from cnpose_trt.backends import base, device
from cnpose_trt.backends.tensorrt import compiler, diagnostics, runtime
from cnpose_trt.backends.tensorrt import session as trt_session
from cnpose_trt.errors import BuildError, EngineError

ROOT = Path(__file__).resolve().parents[1]
NULLPTR = TypeError("factory function returned nullptr")


# ---------------------------------------------------------------------------------------------
# Options (item 14)


def test_load_options():
    assert runtime._load_options({}) == runtime.DEFAULT_MAX_CONTEXTS == 2
    assert runtime._load_options({"max_contexts": 5}) == 5
    assert runtime.TrtEngine.options == ("max_contexts",)
    with pytest.raises(ValueError, match=r"takes the option max_contexts, got threads \(threads is an option of "
                                         r"onnxruntime and torch and openvino\)"):
        runtime._load_options({"threads": 4})
    with pytest.raises(ValueError, match="got cuda_graphs, speed .*cuda_graphs is an option of torch"):
        runtime._load_options({"speed": 1, "cuda_graphs": True})
    for bad in (0, -1, 65, True, 1.5, "2", None):
        with pytest.raises(ValueError, match=r"max_contexts must be an integer in 1\.\.64"):
            runtime._load_options({"max_contexts": bad})


def _tensorrt_sidecar(tmp_path: Path) -> Path:
    from cnpose_trt.cache import ENGINE_FORMAT, file_sha256
    from cnpose_trt.spec import INPUT_CONVENTION, PIXEL_MEAN, PIXEL_STD, get_spec

    engine = tmp_path / "xs.engine"
    engine.write_bytes(b"not a real plan")
    spec = get_spec("XS")
    meta = {"engine_format": ENGINE_FORMAT, "engine_file": engine.name, "engine_sha256": file_sha256(engine),
            "backend": "tensorrt", "max_batch": 4, "spec": spec.to_dict(), "variant": "XS", "head": spec.head_tag,
            "precision": "fp32",
            "input": {"name": "input", "dtype": "float32", "shape": ["N", *spec.input_shape],
                      "convention": INPUT_CONVENTION, "mean": list(PIXEL_MEAN), "std": list(PIXEL_STD)},
            "output": {"name": "heatmaps", "dtype": "float32", "shape": ["N", *spec.heatmap_shape]},
            "weights": {}, "tensorrt_build": {"tensorrt": "10.16.1.11", "gpu": "X", "compute_capability": "9.0"}}
    (tmp_path / "xs.engine.json").write_text(json.dumps(meta))
    return engine


def test_load_engine_refuses_other_backends_options(tmp_path):
    """load_engine(path, threads=...) on a TensorRT engine: a ValueError naming the allowed option,
    before TensorRT is imported (was a TypeError from the constructor)."""
    from cnpose_trt import load_engine

    engine = _tensorrt_sidecar(tmp_path)
    with pytest.raises(ValueError, match="takes the option max_contexts, got threads"):
        load_engine(engine, threads=2)


# ---------------------------------------------------------------------------------------------
# Factories that return nullptr (item 3)


def test_nullptr_factory_becomes_project_error():
    def factory(*args):
        raise NULLPTR

    with pytest.raises(BuildError, match=r"could not create a builder \(factory function returned nullptr\): "):
        diagnostics.create(factory, "a builder", BuildError, "logger")
    with pytest.raises(EngineError, match="could not create a runtime"):
        diagnostics.create(factory, "a runtime", EngineError)


def test_other_type_errors_are_not_masked():
    def factory(*args):
        raise TypeError("__init__(): incompatible constructor arguments")

    with pytest.raises(TypeError, match="incompatible constructor"):
        diagnostics.create(factory, "a builder", BuildError)
    assert diagnostics.create(lambda a, b: (a, b), "x", BuildError, 1, 2) == (1, 2)


def test_runtime_nullptr_while_deserializing(monkeypatch):
    class Runtime:
        def __init__(self, logger):
            raise NULLPTR

    trt = types.SimpleNamespace(Runtime=Runtime)
    monkeypatch.setattr(runtime, "trt_logger", lambda trt: "logger")
    with pytest.raises(EngineError, match="could not create a runtime"):
        runtime.deserialize(trt, b"plan", False, "x.engine")


def test_version_compatible_plans_allow_host_code(monkeypatch):
    """engine_host_code_allowed is set for version-compatible plans only, before deserializing."""
    seen = []

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, plan):
            seen.append(self.engine_host_code_allowed)
            return None if plan == b"bad" else "engine"

    trt = types.SimpleNamespace(Runtime=Runtime)
    monkeypatch.setattr(runtime, "trt_logger", lambda trt: "logger")
    assert runtime.deserialize(trt, b"plan", True, "x")[1] == "engine"
    assert runtime.deserialize(trt, b"plan", False, "x")[1] == "engine"
    assert seen == [True, False]
    with pytest.raises(EngineError, match="could not deserialize x .*rebuild with --force"):
        runtime.deserialize(trt, b"bad", True, "x")


# ---------------------------------------------------------------------------------------------
# Compatibility rules (item 11)

BUILT = {"tensorrt": "10.16.1.11", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
H100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
A10 = {"gpu": "NVIDIA A10", "compute_capability": "8.6"}
T4 = {"gpu": "Tesla T4", "compute_capability": "7.5"}


@pytest.mark.parametrize("flags, runtime, here, refused", [
    ({}, "10.16.1.11", H100, None),
    ({}, "10.16.1.12", H100, "built with TensorRT 10.16.1.11, this is 10.16.1.12"),
    ({}, "10.16.1.11", A10, "built for NVIDIA H100 80GB HBM3 .*this is NVIDIA A10"),
    ({"version_compatible": True}, "10.16.1.11", H100, None),
    ({"version_compatible": True}, "10.17.0.5", H100, None),
    ({"version_compatible": True}, "10.9.0.34", H100, "runs on TensorRT 10.x at least as new as that, this is 10.9"),
    ({"version_compatible": True}, "11.1.0.106", H100, "runs on TensorRT 10.x .* this is 11.1.0.106"),
    ({"hardware_compatible": True}, "10.16.1.11", A10, None),
    ({"hardware_compatible": True}, "10.16.1.11", T4, "compute capability 8.0 or newer, this GPU, Tesla T4, is sm 7.5"),
    ({"hardware_compatible": True}, "10.16.1.12", A10, "built with TensorRT 10.16.1.11, this is 10.16.1.12"),
    ({"hardware_compatible": True, "version_compatible": True}, "10.17.1", A10, None),
])
def test_plan_compatibility(flags, runtime, here, refused):
    built = {**BUILT, **flags}
    if refused is None:
        diagnostics.check_plan_compatible(built, runtime, here, "e.engine")
    else:
        with pytest.raises(EngineError, match=refused):
            diagnostics.check_plan_compatible(built, runtime, here, "e.engine")


def test_plan_without_version_is_refused():
    with pytest.raises(EngineError, match="lacks the TensorRT version"):
        diagnostics.check_plan_compatible({"gpu": "X"}, "10.16.1.11", H100, "e.engine")


def test_hardware_compatible_build_needs_ampere():
    diagnostics.check_build_options(True, A10)
    diagnostics.check_build_options(True, {"gpu": "A100", "compute_capability": "8.0"})
    diagnostics.check_build_options(False, T4)
    with pytest.raises(BuildError, match="only be built on compute capability 8.0 or newer; this GPU, Tesla T4, "
                                         "is sm 7.5: build without --hardware-compatible"):
        diagnostics.check_build_options(True, T4)


# ---------------------------------------------------------------------------------------------
# The engine's own I/O against its sidecar (item 6)

IN, OUT = (3, 256, 256), (576, 32, 32)  # XS


def _found(**change):
    found = {"inputs": ["input"], "outputs": ["heatmaps"], "profiles": 1,
             "input": {"shape": (-1, *IN), "dtype": "float32", "linear": True, "on_device": True,
                       "profile": [(1, *IN), (2, *IN), (4, *IN)]},
             "output": {"shape": (-1, *OUT), "dtype": "float16", "linear": True, "on_device": True}}
    for key, value in change.items():
        role, _, field = key.partition("__")
        if field:
            found[role][field] = value
        else:
            found[role] = value
    return found


def _check_io(found):
    base.check_engine_io(found, "e.engine", input_name="input", output_name="heatmaps", input_shape=IN,
                     output_shape=OUT, max_batch=4, input_dtype="float32", output_dtype="float16")


@pytest.mark.parametrize("change, refused", [
    ({}, None),
    ({"output__shape": (-1, 1152, 64, 64)}, r"output heatmaps has shape \(-1, 1152, 64, 64\), the metadata says "
                                            r"\(-1, 576, 32, 32\)"),
    ({"output__shape": (4, *OUT)}, r"output heatmaps has shape \(4, 576, 32, 32\)"),
    ({"input__shape": (-1, 3, 192, 192)}, "input input has shape"),
    ({"output__dtype": "float32"}, "output heatmaps is float32, the metadata says float16"),
    ({"input__profile": [(1, *IN), (4, *IN), (8, *IN)]}, r"profile covers \(1, 3, 256, 256\) .. \(8, 3, 256, 256\), "
                                                         r"the metadata says batch 1 .. 4"),
    ({"input__profile": [(2, *IN), (2, *IN), (4, *IN)]}, "profile covers"),
    ({"outputs": ["out", "heatmaps"]}, r"outputs \['out', 'heatmaps'\]"),
    ({"inputs": ["images"]}, r"inputs \['images'\]"),
    ({"output__linear": False}, "not a linear device tensor"),
    ({"input__on_device": False}, "not a linear device tensor"),
    ({"profiles": 0}, "no optimization profile"),
])
def test_engine_io_against_sidecar(change, refused):
    if refused is None:
        _check_io(_found(**change))
    else:
        with pytest.raises(EngineError, match="does not match its metadata: .*" + refused + ".*; rebuild with --force"):
            _check_io(_found(**change))


# ---------------------------------------------------------------------------------------------
# Build-time run verdict (item 13)


def test_check_finite_summary_and_refusals():
    rng = np.random.default_rng(7)
    heat = (rng.standard_normal((8, 36, 4, 4)) * 30).astype(np.float16)
    summary = compiler.check_finite(heat)
    assert summary == {"inputs": 8, "finite": True, "min": float(heat.astype(np.float64).min()),
                       "max": float(heat.astype(np.float64).max())}
    bad = heat.copy()
    bad[3, 5, 1, 2] = np.nan
    with pytest.raises(BuildError, match=r"non-finite heatmaps on the 8 accuracy inputs \(1 NaN, 0 inf of 4608 "
                                         r"values\); the engine is not cached"):
        compiler.check_finite(bad)
    overflow = heat.copy()
    with np.errstate(over="ignore"):
        overflow[0, 0, 0, :2] = np.float16(60000) * np.float16(2)  # float16 overflow: inf
    with pytest.raises(BuildError, match=r"\(0 NaN, 2 inf"):
        compiler.check_finite(overflow)


# ---------------------------------------------------------------------------------------------
# Context pool and stream discipline (items 8, 9)


class FakeSlot:
    """Records what the pool and the session do with a slot (no CUDA)."""

    def __init__(self, events, name, fail_sync=False):
        self.events, self.name, self.fail_sync = events, name, fail_sync
        self.closed = False

    def synchronize(self):
        self.events.append(("sync", self.name))
        if self.fail_sync:
            raise EngineError("cudaStreamSynchronize failed: cudaErrorIllegalAddress")

    def close(self):
        self.closed = True
        self.events.append(("close", self.name))


def _pool(size, events, fail_sync=()):
    made = []

    def make():
        slot = FakeSlot(events, f"s{len(made)}", fail_sync=len(made) in fail_sync)
        made.append(slot)
        return slot

    return trt_session.SlotPool(make, size), made


def test_pool_is_bounded_under_many_threads():
    events, lock = [], threading.Lock()
    pool, made = _pool(2, events)
    busy, peak = [0], [0]

    def work():
        for _ in range(5):
            with pool.use():
                with lock:
                    busy[0] += 1
                    peak[0] = max(peak[0], busy[0])
                time.sleep(0.002)
                with lock:
                    busy[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 2 and peak[0] == 2 and pool.created == 2
    assert events == []  # successful calls synchronise themselves; the pool adds nothing


def test_failed_call_synchronises_before_reuse():
    events = []
    pool, made = _pool(1, events)
    with pytest.raises(EngineError, match="boom"), pool.use() as slot:
        events.append(("enqueued", slot.name))
        raise EngineError("boom")
    with pool.use() as slot:
        events.append(("reused", slot.name))
    assert events == [("enqueued", "s0"), ("sync", "s0"), ("reused", "s0")]
    with pytest.raises(KeyboardInterrupt), pool.use():
        raise KeyboardInterrupt
    assert events[-1] == ("sync", "s0") and len(made) == 1


def test_slot_whose_stream_cannot_synchronise_is_replaced(caplog):
    events = []
    pool, made = _pool(1, events, fail_sync={0})
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError), pool.use():
        raise ValueError("bad input")
    assert "discarding a TensorRT execution context" in caplog.text
    assert made[0].closed and pool.created == 0
    with pool.use() as slot:
        assert slot is made[1]
    assert pool.created == 1


def test_pool_recovers_from_a_failed_make():
    calls = []

    def make():
        calls.append(1)
        if len(calls) == 1:
            raise EngineError("cudaMalloc failed: out of memory")
        return FakeSlot([], "ok")

    pool = trt_session.SlotPool(make, 1)
    with pytest.raises(EngineError, match="out of memory"), pool.use():
        pass
    assert pool.created == 0
    with pool.use() as slot:
        assert slot.name == "ok"


def test_close_frees_idle_now_and_busy_on_release():
    events = []
    pool, made = _pool(2, events)
    entered, release = threading.Event(), threading.Event()

    def hold():
        with pool.use():
            entered.set()
            release.wait(60)

    with pool.use():
        pass  # s0 idle
    t = threading.Thread(target=hold)
    t.start()
    assert entered.wait(60)  # s0 busy in the thread
    with pool.use():
        pass  # s1 made and left idle
    pool.close()
    assert [s.closed for s in made] == [False, True]
    release.set()
    t.join()
    assert [s.closed for s in made] == [True, True] and pool.created == 0
    with pytest.raises(EngineError, match="was closed"), pool.use():
        pass
    pool.close()  # idempotent


class FakeContext:
    def __init__(self, events, shape_ok=True, execute_ok=True):
        self.events, self.shape_ok, self.execute_ok = events, shape_ok, execute_ok

    def set_input_shape(self, name, shape):
        self.events.append(("set_input_shape", name, shape))
        return self.shape_ok

    def execute_async_v3(self, stream_handle):
        self.events.append(("execute", stream_handle))
        return self.execute_ok


class SessionSlot(FakeSlot):
    """A slot with pinned-buffer stand-ins, for _Session.enqueue/run."""

    def __init__(self, events, context):
        super().__init__(events, "s0")
        self.context, self.stream_handle = context, 77
        self.h_in = types.SimpleNamespace(array=np.zeros((2, 3, 4, 4), np.float32), ptr=1)
        self.d_in = types.SimpleNamespace(ptr=2)
        self.h_out = types.SimpleNamespace(array=np.arange(2 * 5, dtype=np.float32).reshape(2, 5), ptr=3)
        self.d_out = types.SimpleNamespace(ptr=4)

    def copy(self, dst, src, nbytes, kind):
        self.events.append(("copy", kind, nbytes))


def _session(slot):
    session = trt_session.Session("runtime", "engine", input_name="input", output_name="heatmaps",
                               input_shape=(3, 4, 4), output_shape=(5,), max_batch=2,
                               input_dtype=np.float32, output_dtype=np.float32, max_contexts=1)
    session.pool = trt_session.SlotPool(lambda: slot, 1)
    return session


def test_session_rejected_shape_enqueues_nothing():
    events = []
    slot = SessionSlot(events, FakeContext(events, shape_ok=False))
    with pytest.raises(EngineError, match=r"rejected input shape \(2, 3, 4, 4\) \(profile: batch 1..2\)"):
        _session(slot).run(np.ones((2, 3, 4, 4), np.float32))
    assert [e[0] for e in events] == ["set_input_shape", "sync"]


def test_session_failed_execute_synchronises_before_buffers_are_reused():
    events = []
    slot = SessionSlot(events, FakeContext(events, execute_ok=False))
    session = _session(slot)
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    with pytest.raises(EngineError, match="execute_async_v3 failed"):
        session.run(x)
    assert events == [("set_input_shape", "input", (2, 3, 4, 4)), ("copy", "cudaMemcpyHostToDevice", x.nbytes),
                      ("execute", 77), ("sync", "s0")]
    np.testing.assert_array_equal(slot.h_in.array, x)  # staged in the slot's pinned buffer
    slot.context.execute_ok = True
    events.clear()
    out = session.run(x[:1])
    assert [e[0] for e in events] == ["set_input_shape", "copy", "execute", "copy", "sync"]
    np.testing.assert_array_equal(out, np.arange(5, dtype=np.float32)[None])
    with pytest.raises(ValueError, match=r"takes 1..2 images, got 3"):
        session.run(np.ones((3, 3, 4, 4), np.float32))


# ---------------------------------------------------------------------------------------------
# Timing cache (item 5)


class StandInTimingCache:
    def __init__(self, data):
        self.data = data

    def serialize(self):
        return b"cache:" + self.data


class StandInConfig:
    """IBuilderConfig's timing-cache calls as NVIDIA documents them: create_timing_cache returns
    None for data it cannot read; set_timing_cache(ignore_mismatch=False) returns False for a
    cache made by another device or version."""

    def __init__(self, accepts):
        self.accepts, self.calls = accepts, []

    def create_timing_cache(self, serialized_timing_cache):
        data = bytes(serialized_timing_cache)
        self.calls.append(("create", data))
        return None if data == b"garbage" else StandInTimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.calls.append(("set", cache.data, ignore_mismatch))
        return cache.data == b"" or cache.data in self.accepts


def test_timing_cache_created_reused_or_replaced(tmp_path, caplog):
    path = tmp_path / "tensorrt.timing-cache"
    config = StandInConfig(accepts={b"ours"})
    cache, status = compiler._attach_timing_cache(config, path)
    assert status == "created" and cache.data == b"" and config.calls == [("create", b""), ("set", b"", False)]

    path.write_bytes(b"ours")
    config = StandInConfig(accepts={b"ours"})
    cache, status = compiler._attach_timing_cache(config, path)
    assert status == "reused" and cache.data == b"ours" and config.calls == [("create", b"ours"), ("set", b"ours", False)]

    for foreign in (b"other gpu", b"garbage"):
        path.write_bytes(foreign)
        config = StandInConfig(accepts={b"ours"})
        with caplog.at_level(logging.WARNING):
            cache, status = compiler._attach_timing_cache(config, path)
        assert status == "replaced" and cache.data == b""  # this build's cache overwrites the file
        assert config.calls[-2:] == [("create", b""), ("set", b"", False)]
        assert "made by another GPU or TensorRT version" in caplog.text


# ---------------------------------------------------------------------------------------------
# build() with stand-ins: the calls our code makes (items 3, 4, 11, 13)


class StandInBuilderFlag:
    TF32, VERSION_COMPATIBLE = "TF32", "VERSION_COMPATIBLE"


class StandInNetworkFlag:
    STRONGLY_TYPED = 1


class StandInMemoryPool:
    WORKSPACE = "WORKSPACE"


class StandInHardwareLevel:
    AMPERE_PLUS = "AMPERE_PLUS"


class StandInProgressMonitor:
    def __init__(self):
        pass


class StandInProfile:
    def __init__(self, log):
        self._log = log

    def set_shape(self, input, min, opt, max):  # TensorRT's keyword names
        self._log.append(("set_shape", input, min, opt, max))


class StandInBuilderConfig(StandInConfig):
    def __init__(self, log):
        super().__init__(accepts=set())
        self._log = log
        self.builder_optimization_level = None
        self.hardware_compatibility_level = None
        self.progress_monitor = None

    def set_memory_pool_limit(self, pool, pool_size):
        self._log.append(("pool", pool, pool_size))

    def set_flag(self, flag):
        self._log.append(("set_flag", flag))

    def clear_flag(self, flag):
        self._log.append(("clear_flag", flag))

    def add_optimization_profile(self, profile):
        return 0

    def get_timing_cache(self):
        return StandInTimingCache(b"after build")


class StandInOnnxParser:
    def __init__(self, network, logger):
        self.num_errors = 0

    def parse_from_file(self, model):
        return True

    def get_error(self, index):
        raise AssertionError("no errors")


class StandInBuilder:
    instances = 0

    def __init__(self, logger):
        StandInBuilder.instances += 1
        self.log = []

    def create_network(self, flags):
        self.log.append(("create_network", flags))
        return "network"

    def create_builder_config(self):
        self.config = StandInBuilderConfig(self.log)
        return self.config

    def create_optimization_profile(self):
        return StandInProfile(self.log)

    def build_serialized_network(self, network, config):
        return b"PLAN"


STAND_INS = {"Builder": StandInBuilder, "IBuilderConfig": StandInBuilderConfig, "OnnxParser": StandInOnnxParser,
             "IOptimizationProfile": StandInProfile, "ITimingCache": StandInTimingCache,
             "BuilderFlag": StandInBuilderFlag, "NetworkDefinitionCreationFlag": StandInNetworkFlag,
             "MemoryPoolType": StandInMemoryPool, "HardwareCompatibilityLevel": StandInHardwareLevel,
             "IProgressMonitor": StandInProgressMonitor}


def test_stand_ins_use_real_names():
    """Every public name of the stand-ins (and their methods' keywords) is a real TensorRT pair."""
    import inspect

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_tensorrt_names import RELEASES, load_pairs
    finally:
        sys.path.pop(0)
    for release in RELEASES:
        pairs, _ = load_pairs(release)
        for cls, stand_in in STAND_INS.items():
            names = [n for n in vars(stand_in) if not n.startswith("_") and n not in ("instances", "log")]
            if cls == "IBuilderConfig":
                names += ["create_timing_cache", "set_timing_cache"]
                names += ["builder_optimization_level", "hardware_compatibility_level", "progress_monitor"]
            if cls == "OnnxParser":
                names.append("num_errors")
            for name in names:
                assert name in pairs[cls], (release, cls, name)
                fn = getattr(stand_in, name, None)  # None: an attribute set in __init__
                if callable(fn):
                    params = [p for p in inspect.signature(fn).parameters if p != "self"]
                    assert set(params) <= pairs[cls][name], (release, cls, name, params)


def _stand_in_trt(builder=StandInBuilder):
    return types.SimpleNamespace(__version__="10.16.1.11", Builder=builder, OnnxParser=StandInOnnxParser,
                                 **{k: v for k, v in STAND_INS.items() if k not in ("Builder", "OnnxParser")})


@pytest.fixture
def stand_in_build(monkeypatch, tmp_path):
    runs = []
    monkeypatch.setattr(compiler, "gpu_identity", lambda: dict(H100))
    monkeypatch.setattr(compiler, "trt_logger", lambda trt: "logger")

    def fake_run(trt, plan, version_compatible, input_name, input_shape, max_batch, inputs):
        runs.append((plan, version_compatible, input_name, input_shape, max_batch, inputs))
        return {"inputs": len(inputs), "finite": True}

    monkeypatch.setattr(compiler, "_run_built_plan", fake_run)
    inputs = np.zeros((8, 3, 256, 256), np.float32)

    def run(trt, **kw):
        monkeypatch.setattr(compiler, "import_trt", lambda: trt)
        args = dict(input_name="input", input_shape=(4, 3, 256, 256), max_batch=4, opt_batch=2, workspace_mb=64,
                    opt_level=3, timing_cache=tmp_path / "tensorrt.timing-cache", version_compatible=False,
                    hardware_compatible=False, check_inputs=inputs, show_progress=False)
        return compiler.build(tmp_path / "model.onnx", tmp_path / "engine.bin", **{**args, **kw})

    return run, runs, inputs, tmp_path


def test_build_clears_tf32_unless_asked(stand_in_build):
    run, runs, inputs, tmp = stand_in_build
    built = []

    class Builder(StandInBuilder):
        def __init__(self, logger):
            super().__init__(logger)
            built.append(self)

    record = run(_stand_in_trt(Builder))
    log = built[-1].log
    assert ("clear_flag", "TF32") in log and ("set_flag", "TF32") not in log
    assert ("create_network", 1 << 1) in log  # STRONGLY_TYPED
    assert ("set_shape", "input", (1, 3, 256, 256), (2, 3, 256, 256), (4, 3, 256, 256)) in log
    assert ("pool", "WORKSPACE", 64 << 20) in log
    assert record["tf32"] is False and record["timing_cache"] == "created"
    assert record["build_check"] == {"inputs": 8, "finite": True}
    assert runs[-1][0] == b"PLAN" and runs[-1][5] is inputs and runs[-1][2:5] == ("input", (3, 256, 256), 4)
    assert (tmp / "engine.bin").read_bytes() == b"PLAN"
    assert (tmp / "tensorrt.timing-cache").read_bytes() == b"cache:after build"

    record = run(_stand_in_trt(Builder), tf32=True, version_compatible=True, hardware_compatible=True)
    log = built[-1].log
    assert ("set_flag", "TF32") in log and ("clear_flag", "TF32") not in log
    assert ("set_flag", "VERSION_COMPATIBLE") in log
    assert built[-1].config.hardware_compatibility_level == "AMPERE_PLUS"
    assert record["tf32"] is True and runs[-1][1] is True


def test_build_refuses_before_touching_tensorrt(stand_in_build, monkeypatch):
    run, runs, _, _ = stand_in_build
    monkeypatch.setattr(compiler, "gpu_identity", lambda: dict(T4))
    before = StandInBuilder.instances
    with pytest.raises(BuildError, match="compute capability 8.0 or newer"):
        run(_stand_in_trt(), hardware_compatible=True)
    assert StandInBuilder.instances == before and not runs


def test_build_reports_a_builder_nullptr(stand_in_build):
    run, runs, _, _ = stand_in_build

    class Builder:
        def __init__(self, logger):
            raise NULLPTR

    with pytest.raises(BuildError, match=r"could not create a builder \(factory function returned nullptr\)"):
        run(_stand_in_trt(Builder))
    assert not runs


# ---------------------------------------------------------------------------------------------
# One logger (item 7)


def test_one_forwarding_logger_per_process(monkeypatch, caplog):
    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    trt = types.SimpleNamespace(ILogger=ILogger)
    monkeypatch.setattr(diagnostics, "_logger", None)
    first = diagnostics.trt_logger(trt)
    assert diagnostics.trt_logger(trt) is first and isinstance(first, ILogger)
    with caplog.at_level(logging.DEBUG, logger="cnpose_trt.backends.tensorrt.trt"):
        first.log(ILogger.WARNING, "timing cache mismatch")
        first.log(ILogger.VERBOSE, "tactic 7")
        first.log(ILogger.INTERNAL_ERROR, "boom")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "timing cache mismatch"), (logging.DEBUG, "tactic 7"), (logging.ERROR, "boom")]


# ---------------------------------------------------------------------------------------------
# cuda-python: handles, diagnostics (items 2, 10)


def test_native_handle_of_a_stream(monkeypatch):
    cudart = pytest.importorskip("cuda.bindings.runtime")
    stream = cudart.cudaStream_t(init_value=0xBEEF)
    monkeypatch.setattr(device, "_native_getter", None)
    assert device.native_handle(stream) == 0xBEEF
    # Bindings older than 12.9.1 have no cuda.bindings.utils.get_cuda_native_handle: int() is used.
    monkeypatch.setattr(device, "_native_getter", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", None)
    assert device.native_handle(stream) == 0xBEEF and device._native_getter is int


def test_owned_device_array_is_a_device_array_that_keeps_its_buffer():
    """infer_device's result (device.OwnedDeviceArray): the kernels read it as a DeviceArray, and it
    holds the memory it points to until it is collected."""
    from cnpose_trt.ops.arrays import DeviceArray

    buffer = types.SimpleNamespace(ptr=0x7F0000001000, nbytes=2 * 8 * 2)
    array = device.OwnedDeviceArray(buffer, (2, 8), "float16")
    assert isinstance(array, DeviceArray) and array._buffer is buffer
    assert (array.ptr, array.shape, array.dtype) == (buffer.ptr, (2, 8), "float16")
    assert array.__cuda_array_interface__ == {"shape": (2, 8), "typestr": "<f2", "data": (buffer.ptr, False),
                                              "strides": None, "version": 3}


def test_unusable_device_is_explained_once(monkeypatch, caplog):
    """TensorRT importable (a stand-in module) but no usable device: available() says why, with the
    real cuda-python's error string, once."""
    cudart = pytest.importorskip("cuda.bindings.runtime")
    if backend.cuda_problem() is None:
        pytest.skip("a CUDA device is usable here")
    err = cudart.cudaGetDeviceCount()[0]
    text = cudart.cudaGetErrorString(err)[1].decode()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.16.1.11"))
    monkeypatch.setattr(diagnostics, "_warned", set())
    ok, why = backend.availability()
    assert not ok and why.startswith("TensorRT 10.16.1.11 is installed but no CUDA device is usable: "
                                     "cudaGetDeviceCount failed with") and text in why
    with caplog.at_level(logging.WARNING, logger="cnpose_trt.backends.tensorrt"):
        assert backend.available() is False
        assert backend.available() is False
    assert [r.getMessage() for r in caplog.records] == [f"not using TensorRT: {why}"]
    # ... and `--backend auto` resolves to onnxruntime with that warning, not silently.
    from cnpose_trt.build.builder import resolve_backend

    monkeypatch.setattr(diagnostics, "_warned", set())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cnpose_trt.backends.tensorrt"):
        assert resolve_backend("auto") == "onnxruntime"
    assert text in caplog.text


def test_gpu_identity_names_the_cuda_error():
    pytest.importorskip("cuda.bindings.runtime")
    if backend.cuda_problem() is None:
        pytest.skip("a CUDA device is usable here")
    with pytest.raises(EngineError, match=r"cudaGetDevice(Properties)? failed: cudaError\w+: "):
        backend.gpu_identity()


def test_not_installed_is_silent(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with caplog.at_level(logging.WARNING):
        assert backend.availability() == (False, "TensorRT is not installed")
        assert backend.available() is False
    assert not caplog.records


def test_broken_install_is_explained(monkeypatch, caplog):
    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name == "tensorrt":
                raise ImportError("libnvinfer.so.10: cannot open shared object file")
            return None

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    monkeypatch.setattr(diagnostics, "_warned", set())
    with caplog.at_level(logging.WARNING):
        assert backend.available() is False
    assert "TensorRT is installed but cannot be imported: libnvinfer.so.10" in caplog.text


class StandInCudart:
    """cudaGetDeviceCount failing with a driver older than the bindings (values as cuda-python returns them)."""

    class cudaError_t:
        cudaSuccess, cudaErrorInsufficientDriver = 0, 35

    def __init__(self, driver, bindings):
        self.driver, self.bindings = driver, bindings

    def cudaGetDeviceCount(self):
        return self.cudaError_t.cudaErrorInsufficientDriver, None

    def cudaDriverGetVersion(self):
        return self.cudaError_t.cudaSuccess, self.driver

    def cudaRuntimeGetVersion(self):
        return self.cudaError_t.cudaSuccess, self.bindings

    def cudaGetErrorName(self, err):
        return self.cudaError_t.cudaSuccess, b"cudaErrorInsufficientDriver"

    def cudaGetErrorString(self, err):
        return self.cudaError_t.cudaSuccess, b"CUDA driver version is insufficient for CUDA runtime version"


@pytest.mark.parametrize("driver, bindings, says", [
    (12080, 13040, r"driver supports CUDA 12\.8, cuda-python is built for CUDA 13\.4; update the driver, or install "
                   r"the cuda-python of the driver's CUDA major: pip install 'cnpose_trt\[tensorrt-cu12\]'\)"),
    (11080, 12090, r"driver supports CUDA 11\.8, cuda-python is built for CUDA 12\.9; update the driver\)"),
    (0, 12090, r"driver supports CUDA none, .*is the NVIDIA driver installed\?\)"),
    (13000, 13040, r"cudaErrorInsufficientDriver: CUDA driver version is insufficient .*\(the driver supports CUDA "
                   r"13\.0, cuda-python is built for CUDA 13\.4\)$"),
])
def test_driver_too_old_for_the_bindings(monkeypatch, driver, bindings, says):
    stand_in = StandInCudart(driver, bindings)
    monkeypatch.setattr(diagnostics, "cuda_runtime", lambda: stand_in)
    monkeypatch.setattr(device, "cuda_runtime", lambda: stand_in)
    assert re.search(says, backend.cuda_problem())


# ---------------------------------------------------------------------------------------------
# Requirement bounds (items 2, 10)


def test_extras_pair_tensorrt_with_its_cuda_python():
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    reqs = {name: {Requirement(r).name: Requirement(r) for r in deps} for name, deps in extras.items()}
    # cuda.bindings.runtime exists from 12.6.1 (12.6.0 has only cuda.cudart); 13.x needs R580+ drivers.
    for extra, major in (("tensorrt-cu12", 12), ("tensorrt-cu13", 13)):
        assert f"tensorrt-cu{major}" in reqs[extra], extra
        cuda = reqs[extra]["cuda-python"].specifier
        ok = {12: ["12.6.2.post1", "12.9.4"], 13: ["13.0.0", "13.4.4"]}[major]
        bad = {12: ["12.6.0", "12.3.0", "13.0.0", "13.4.4"], 13: ["12.9.4", "14.0.0"]}[major]
        assert all(cuda.contains(v) for v in ok), (extra, cuda)
        assert not any(cuda.contains(v) for v in bad), (extra, cuda)
    assert extras["tensorrt"] == ["cnpose_trt[tensorrt-cu12]"]
    test_cuda = reqs["test"]["cuda-python"].specifier
    assert not test_cuda.contains("12.6.0") and test_cuda.contains("12.6.2.post1")
    for name, deps in reqs.items():  # no extra pairs a TensorRT with an unbounded cuda-python
        if any(n.startswith("tensorrt") for n in deps):
            assert any(s.operator == "<" for s in deps["cuda-python"].specifier), name

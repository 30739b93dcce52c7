"""Real TensorRT engines for every variant and precision, against ONNX Runtime.

Runs wherever TensorRT, cuda-python and a GPU are present (benchmarks/gpu_check.sh runs it);
skipped elsewhere. Nothing here fakes TensorRT: these are the checks of issue 9's fixes that
only real TensorRT can answer (version-compatible loading, TF32 off for fp32, the build-time run,
stale sidecars, the context pool, timing-cache replacement, the device path).
"""

import json
import shutil
import threading

import numpy as np
import pytest

from cnpose_trt import load_engine
from cnpose_trt.backends import tensorrt as tensorrt_backend
from cnpose_trt.build.builder import TrtOptions, build_engine
from cnpose_trt.build.verify import ACCURACY_SAMPLES, accuracy_inputs, joint_error
from cnpose_trt.cache import sidecar_path
from cnpose_trt.errors import BuildError, EngineError
from cnpose_trt.ops.decoding import decode
from cnpose_trt.spec import get_spec

pytestmark = pytest.mark.tensorrt
pytest.importorskip("tensorrt", reason="TensorRT is not installed")
pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")

if not tensorrt_backend.available():
    pytest.skip("no CUDA device for TensorRT", allow_module_level=True)

# Decoded-joint error budgets against the ONNX Runtime FP32 engine, in heatmap cells.
BUDGET = {"fp32": 0.02, "fp16": 0.1, "int8": 1.5}


@pytest.fixture(scope="module")
def engines_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trt")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("variant", ["XS", "S", "M", "L"])
def test_engine_matches_onnxruntime(engines_dir, variant, precision):
    kw = dict(out_dir=engines_dir, max_batch=8, precision=precision)
    if precision == "int8":
        kw.update(calib_synthetic=True, calib_count=32)
    trt_engine = load_engine(build_engine(variant, backend="tensorrt", **kw).path)
    ref = load_engine(build_engine(variant, backend="onnxruntime", out_dir=engines_dir, max_batch=8).path)
    assert trt_engine.backend == "tensorrt"
    x = accuracy_inputs(ref.spec, 6)
    err = joint_error(ref.infer(x), trt_engine.infer(x), ref.spec)
    assert err["mean_cells"] < BUDGET[precision], err
    # Fused decode on the engine's stream, straight from its output buffer.
    boxes = np.tile([[10.0, 20.0, 200.0, 200.0]], (len(x), 1))
    fused = trt_engine.infer_decode(x, boxes=boxes, root_depth=np.full(len(x), 4000.0))
    cpu = decode(trt_engine.infer(x), ref.spec.joints, ref.spec.depth_dim, boxes=boxes,
                 root_depth=np.full(len(x), 4000.0)).packed
    np.testing.assert_allclose(fused[..., :7], cpu[..., :7], rtol=1e-4, atol=1e-3)


def test_engine_cache_and_refusals(engines_dir):
    first = build_engine("XS", backend="tensorrt", out_dir=engines_dir, max_batch=4)
    assert build_engine("XS", backend="tensorrt", out_dir=engines_dir, max_batch=4).cached
    meta = first.meta["tensorrt_build"]
    assert meta["gpu"] and meta["compute_capability"] and meta["tensorrt"]
    assert (engines_dir / "tensorrt.timing-cache").stat().st_size > 0
    engine = load_engine(first.path)
    x = accuracy_inputs(engine.spec, 5)
    # More images than max_batch: infer_decode cuts them into engine calls (Engine.infer_decode);
    # the result equals the host decode of the whole batch.
    fused = engine.infer_decode(x)
    cpu = decode(engine.infer(x), engine.spec.joints, engine.spec.depth_dim).packed
    assert fused.shape == (5, engine.spec.joints, 10)
    np.testing.assert_allclose(fused[..., :7], cpu[..., :7], rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match=r"n must be an integer in 1\.\.4"):
        engine.enqueue_device(lambda *a: None, 5)


def _rel_l2(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.fixture(scope="module")
def xs_reference(engines_dir):
    return load_engine(build_engine("XS", backend="onnxruntime", out_dir=engines_dir, max_batch=4).path)


def test_fp32_runs_without_tf32_and_the_build_ran_the_engine(engines_dir, xs_reference):
    """TF32 is cleared unless asked: fp32 heatmaps agree with ONNX Runtime's to float32 accuracy
    (TF32 rounds inputs to 10-bit mantissas, about 1e-3 relative); the build deserialized the plan
    and ran it on the accuracy inputs."""
    built = build_engine("XS", backend="tensorrt", out_dir=engines_dir, max_batch=4)
    record = built.meta["tensorrt_build"]
    assert record["tf32"] is False
    assert record["build_check"]["finite"] is True and record["build_check"]["inputs"] == ACCURACY_SAMPLES
    assert record["timing_cache"] in ("created", "reused", "replaced")
    x = accuracy_inputs(xs_reference.spec, 4)
    with load_engine(built.path) as engine:
        assert _rel_l2(xs_reference.infer(x), engine.infer(x)) < 2e-4
    tf32 = build_engine("XS", backend="tensorrt", out_dir=engines_dir, max_batch=4, trt=TrtOptions(tf32=True))
    assert tf32.path != built.path and tf32.meta["tensorrt_build"]["tf32"] is True


def test_version_compatible_engine_loads(engines_dir, xs_reference):
    """Needs runtime.engine_host_code_allowed (the plan embeds a lean runtime)."""
    built = build_engine("XS", backend="tensorrt", out_dir=engines_dir, max_batch=4,
                         trt=TrtOptions(version_compatible=True))
    assert built.meta["tensorrt_build"]["version_compatible"] is True
    x = accuracy_inputs(xs_reference.spec, 4)
    with load_engine(built.path) as engine:
        err = joint_error(xs_reference.infer(x), engine.infer(x), xs_reference.spec)
    assert err["mean_cells"] < BUDGET["fp32"], err


def test_hardware_compatible_needs_ampere(engines_dir, xs_reference):
    here = tensorrt_backend.gpu_identity()
    major = int(here["compute_capability"].split(".")[0])
    opts = TrtOptions(hardware_compatible=True)
    if major < 8:
        with pytest.raises(BuildError, match="compute capability 8.0 or newer"):
            build_engine("XS", backend="tensorrt", out_dir=engines_dir, max_batch=4, trt=opts)
        return
    built = build_engine("XS", backend="tensorrt", out_dir=engines_dir, max_batch=4, trt=opts)
    x = accuracy_inputs(xs_reference.spec, 2)
    with load_engine(built.path) as engine:
        err = joint_error(xs_reference.infer(x), engine.infer(x), xs_reference.spec)
    assert err["mean_cells"] < BUDGET["fp32"], err


def test_stale_sidecar_is_refused(engines_dir, tmp_path):
    """The engine's own output shape and profile are compared with the sidecar before any buffer exists."""
    built = build_engine("XS", backend="tensorrt", out_dir=engines_dir, max_batch=4)
    side = sidecar_path(built.path)
    for change, says in (({"spec": get_spec("M").to_dict(), "variant": "M"}, "output .* has shape"),
                         ({"max_batch": 8}, "optimization profile covers")):
        folder = tmp_path / says.split()[0]
        folder.mkdir()
        shutil.copy(built.path, folder / built.path.name)
        meta = {**json.loads(side.read_text()), **change}
        (folder / side.name).write_text(json.dumps(meta))
        with pytest.raises(EngineError, match="does not match its metadata: .*" + says):
            load_engine(folder / built.path.name)


def test_bounded_contexts_threads_and_close(engines_dir, xs_reference):
    built = build_engine("XS", backend="tensorrt", out_dir=engines_dir, max_batch=4)
    with pytest.raises(ValueError, match="takes the option max_contexts, got threads"):
        load_engine(built.path, threads=2)
    x = accuracy_inputs(xs_reference.spec, 8)
    engine = load_engine(built.path, max_contexts=2)
    serial = [engine.infer(x[i:i + 2]) for i in range(0, 8, 2)]
    results = [None] * 12

    def work(k):
        results[k] = engine.infer(x[2 * (k % 4): 2 * (k % 4) + 2])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, r in enumerate(results):
        np.testing.assert_array_equal(r, serial[k % 4])
    assert engine._session.pool.created <= 2
    with engine:
        boxes = np.tile([[0.0, 0.0, 256.0, 256.0]], (2, 1))
        assert engine.infer_decode(x[:2], boxes=boxes).shape == (2, 18, 10)
    with pytest.raises(EngineError, match="was closed"):
        engine.infer(x[:2])


def test_foreign_timing_cache_is_replaced(tmp_path):
    out = tmp_path / "engines"
    out.mkdir()
    cache = out / "tensorrt.timing-cache"
    cache.write_bytes(b"not a timing cache of this GPU" * 100)
    first = build_engine("XS", backend="tensorrt", out_dir=out, max_batch=2)
    assert first.meta["tensorrt_build"]["timing_cache"] == "replaced"
    assert not cache.read_bytes().startswith(b"not a timing cache")
    again = build_engine("XS", backend="tensorrt", out_dir=out, max_batch=2, force=True)
    assert again.meta["tensorrt_build"]["timing_cache"] == "reused"

"""Real TensorRT engines for every variant and precision, against ONNX Runtime.

Runs wherever TensorRT, cuda-python and a GPU are present (benchmarks/gpu_check.sh runs it);
skipped elsewhere. Nothing here fakes TensorRT.
"""

import numpy as np
import pytest

from cnpose_trt import load_engine, tensorrt_backend
from cnpose_trt.build import accuracy_inputs, build_engine, joint_error
from cnpose_trt.decoding import decode

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
    with pytest.raises(ValueError, match="at most max_batch"):
        load_engine(first.path).infer_decode(np.zeros((5, 3, 256, 256), np.float32))

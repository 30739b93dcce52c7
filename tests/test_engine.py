import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cnpose_trt import EngineError, load_engine
from cnpose_trt.cache import sidecar_path


def test_infer_shapes_and_chunking(xs_engine, rng):
    assert xs_engine.max_batch == 4 and xs_engine.backend == "onnxruntime"
    x = rng.standard_normal((6, 3, 256, 256)).astype(np.float32)
    out = xs_engine.infer(x)  # 6 > max_batch: run as 4 + 2
    assert out.shape == (6, 576, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out[4:], xs_engine.infer(x[4:]), rtol=1e-5, atol=1e-5)
    assert "XS 2UP-128ch-D32" in repr(xs_engine)


@pytest.mark.parametrize("images, error, message", [
    (np.zeros((2, 3, 256, 256), np.float64), TypeError, "images must be float32, got float64"),
    (np.zeros((3, 256, 256), np.float32), ValueError, r"must have shape \(N, 3, 256, 256\), got \(3, 256, 256\)"),
    (np.zeros((1, 3, 224, 224), np.float32), ValueError, "got \\(1, 3, 224, 224\\)"),
    (np.zeros((1, 256, 256, 3), np.float32), ValueError, "must have shape"),
    (np.zeros((0, 3, 256, 256), np.float32), ValueError, "at least one image"),
    ([[1.0]], TypeError, "images must be a numpy array"),
])
def test_bad_input(xs_engine, images, error, message):
    with pytest.raises(error, match=message):
        xs_engine.infer(images)


def _copy(src, dst_dir):
    shutil.copy(src, dst_dir / src.name)
    shutil.copy(sidecar_path(src), dst_dir / sidecar_path(src).name)
    return dst_dir / src.name


def test_corrupted_engine(xs_engine_path, tmp_path):
    path = _copy(xs_engine_path, tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="damaged or was replaced"):
        load_engine(path)
    with pytest.raises(EngineError, match="onnxruntime cannot load engine"):
        path.write_bytes(b"not an onnx file")
        side = json.loads(sidecar_path(path).read_text())
        load_engine(path, verify=False)
    assert side["engine_file"] == path.name


def test_sidecar_problems(xs_engine_path, tmp_path):
    path = _copy(xs_engine_path, tmp_path)
    side = sidecar_path(path)
    meta = json.loads(side.read_text())
    side.write_text("{ not json")
    with pytest.raises(EngineError, match="unreadable"):
        load_engine(path)
    side.write_text(json.dumps({**meta, "engine_format": 99}))
    with pytest.raises(EngineError, match="unknown format"):
        load_engine(path)
    side.write_text(json.dumps({**meta, "backend": "tvm"}))
    with pytest.raises(EngineError, match="backend 'tvm'; this installation loads onnxruntime, tensorrt, torch, openvino"):
        load_engine(side)
    if importlib.util.find_spec("tensorrt") is None:
        side.write_text(json.dumps({**meta, "backend": "tensorrt"}))
        with pytest.raises(EngineError, match="is a TensorRT engine: TensorRT is not installed"):
            load_engine(side)
    if importlib.util.find_spec("torch") is not None:  # the torch backend would torch.load an ONNX file
        side.write_text(json.dumps({**meta, "backend": "torch"}))
        with pytest.raises(EngineError, match=r"is damaged \(backend 'torch' loads \.pt engine files, but "
                                              r"engine_file .*\.onnx is onnxruntime's\); rebuild with --force"):
            load_engine(side)
    # S has the same output shape as XS: its convolution weights tell them apart (issue 20, item 9; the
    # sidecar was trusted there before).
    wrong = dict(meta["spec"], head_channels=256, name="S")
    side.write_text(json.dumps({**meta, "spec": wrong, "variant": "S", "head": "2UP-256ch-D32"}))
    with pytest.raises(EngineError, match=r"spec says variant S \(2UP-256ch-D32\), its convolution weights are "
                                          r"another network's"):
        load_engine(path)
    deeper = dict(meta["spec"], head_upsample=[True] * 3, depth_dim=64)
    side.write_text(json.dumps({**meta, "spec": deeper, "head": "3UP-128ch-D64",
                                "output": dict(meta["output"], shape=["N", 1152, 64, 64])}))
    with pytest.raises(EngineError, match=r"output heatmaps has shape \(-1, 576, 32, 32\), "
                                          r"the metadata says \(-1, 1152, 64, 64\)"):
        load_engine(path)
    side.unlink()
    with pytest.raises(EngineError, match="unfinished build"):
        load_engine(path)


def test_runtime_does_not_need_torch(xs_engine_path):
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
        "import numpy as np, cnpose_trt\n"
        f"e = cnpose_trt.load_engine({str(xs_engine_path)!r})\n"
        "img = np.full((300, 200, 3), 128, np.uint8)\n"
        "r = cnpose_trt.estimate(e, img, [20, 30, 150, 250], flip=True)\n"
        "print(r.image.shape, 'torch' in sys.modules and sys.modules['torch'] is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(1, 18, 3) False"


def test_package_api_names_survive_submodule_imports():
    code = ("import cnpose_trt.ops.decoding, cnpose_trt.pipeline.estimator, cnpose_trt as cp, sys\n"
            "assert callable(cp.decode) and callable(cp.estimate) and callable(cp.load_engine)\n"
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules, 'import cnpose_trt is not light'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_engine_refuses_unexpected(xs_engine_path):
    meta = json.loads(sidecar_path(xs_engine_path).read_text())
    assert load_engine(xs_engine_path, variant="XS", precision="fp32", weights_sha256=meta["weights"]["sha256"])
    with pytest.raises(EngineError, match="built for variant 'XS', not 'M'"):
        load_engine(xs_engine_path, variant="M")
    with pytest.raises(EngineError, match="built for precision 'fp32', not 'int8'"):
        load_engine(xs_engine_path, precision="int8")
    with pytest.raises(EngineError, match="built for weights"):
        load_engine(xs_engine_path, weights_sha256="0" * 64)


@pytest.mark.parametrize("edit, message", [
    (lambda m: "[" * 100_000 + "]" * 100_000, "is damaged \\(JSON nested too deeply\\)"),
    (lambda m: '{"a":' * 100_000 + "1" + "}" * 100_000, "is damaged \\(JSON nested too deeply\\)"),
    (lambda m: " " * (2 << 20) + json.dumps(m), "is damaged \\(larger than 1048576 bytes\\)"),
    (lambda m: {**m, "max_batch": 0}, r"is damaged \(max_batch must be an integer in 1\.\.65536, got 0\)"),
    (lambda m: {**m, "max_batch": -3}, "max_batch must be an integer"),
    (lambda m: {**m, "max_batch": True}, "max_batch must be an integer"),
    (lambda m: {**m, "max_batch": "4"}, "max_batch must be an integer"),
    (lambda m: {**m, "max_batch": 10**12}, "max_batch must be an integer"),
    (lambda m: {**m, "engine_file": "../../etc/passwd"}, "engine_file must name a file in the sidecar's folder"),
    (lambda m: {**m, "engine_file": 7}, "engine_file must name a file"),
    (lambda m: {**m, "engine_sha256": "zz"}, "engine_sha256 must be 64 hex digits"),
    (lambda m: {**m, "backend": ["onnxruntime"]}, "backend must be a name"),
    (lambda m: {**m, "spec": [1, 2]}, "spec must be an object"),
    (lambda m: {**m, "weights": "x"}, "weights must be an object"),
    (lambda m: {**m, "input": dict(m["input"], dtype="int64")}, "input/output dtypes must be float32 or float16"),
    (lambda m: {**m, "input": dict(m["input"], name=None)}, "input and output names must be strings"),
    (lambda m: {**m, "spec": dict(m["spec"], depth_dim=0)}, "lacks or garbles depth_dim must be a positive"),
])
def test_hostile_sidecars_are_damaged_metadata(xs_engine_path, tmp_path, edit, message):
    """Issue 10, item 14: every malformed sidecar is one EngineError that says rebuild."""
    path = _copy(xs_engine_path, tmp_path)
    side = sidecar_path(path)
    new = edit(json.loads(side.read_text()))
    side.write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(EngineError, match=message) as info:
        load_engine(path)
    assert "rebuild" in str(info.value) and "\n" not in str(info.value)


def test_engine_refuses_damaged_metadata_given_directly(xs_engine_path):
    from cnpose_trt.backends.onnxruntime.runtime import OrtEngine
    from cnpose_trt.runtime.engine import read_sidecar

    meta = read_sidecar(xs_engine_path)
    with pytest.raises(EngineError, match="max_batch must be an integer in 1..65536, got 0"):
        OrtEngine(xs_engine_path, {**meta, "max_batch": 0})

import json
import os
import sys

import numpy as np
import pytest
from conftest import make_model, write_official

from cnpose_trt import BuildError, load_engine
from cnpose_trt.build.builder import TrtOptions, build_engine
from cnpose_trt.cache import sidecar_path
from cnpose_trt.cli.build import main as build_main


def test_build_writes_engine_and_sidecar(xs_engine_path):
    meta = json.loads(sidecar_path(xs_engine_path).read_text())
    assert meta["variant"] == "XS" and meta["head"] == "2UP-128ch-D32" and meta["precision"] == "fp32"
    assert meta["backend"] == "onnxruntime" and meta["opset"] >= 17 and meta["max_batch"] == 4
    assert meta["input"] == {"name": "image", "dtype": "float32", "shape": ["N", 3, 256, 256],
                             "convention": "rgb-0..255-minus-mean-over-std", "mean": [0.485, 0.456, 0.406],
                             "std": [0.229, 0.224, 0.225]}
    assert meta["engine_format"] == 2
    assert meta["output"] == {"name": "heatmaps", "dtype": "float32", "shape": ["N", 576, 32, 32]}
    assert len(meta["weights"]["sha256"]) == 64 and meta["weights"]["random"] is True
    assert {"torch", "onnx", "onnxruntime", "numpy", "python", "cnpose_trt"} <= set(meta["versions"])
    assert meta["parity_rel_l2_vs_torch"] < 1e-4 and meta["built_at"]
    assert xs_engine_path.name.startswith("XS-2UP-128ch-D32-fp32-onnxruntime-")


def test_cache_reuse_and_rebuild(tmp_path):
    first = build_engine("XS", out_dir=tmp_path, max_batch=2)
    again = build_engine("xs", out_dir=tmp_path, max_batch=2)
    assert again.cached and again.path == first.path and not first.cached
    mtime = os.stat(first.path).st_mtime_ns
    other_batch = build_engine("XS", out_dir=tmp_path, max_batch=3)
    other_weights = build_engine("XS", out_dir=tmp_path, max_batch=2, seed=1)
    assert len({first.path, other_batch.path, other_weights.path}) == 3
    assert not other_batch.cached and not other_weights.cached
    forced = build_engine("XS", out_dir=tmp_path, max_batch=2, force=True)
    assert not forced.cached and forced.path == first.path and os.stat(first.path).st_mtime_ns >= mtime
    # A damaged cached engine is rebuilt, not reused.
    first.path.write_bytes(first.path.read_bytes()[:100])
    assert not build_engine("XS", out_dir=tmp_path, max_batch=2).cached
    load_engine(first.path)


def test_a_cached_engine_with_one_changed_weight_byte_is_rebuilt(tmp_path):
    """The engine's contents still parse and match the sidecar (check_engine_file cannot tell), but its
    bytes are not the ones built: the recorded sha256 decides, and the engine is rebuilt."""
    first = build_engine("XS", out_dir=tmp_path, max_batch=2)
    data = bytearray(first.path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the weights: the graph still loads
    first.path.write_bytes(bytes(data))
    again = build_engine("XS", out_dir=tmp_path, max_batch=2)
    assert not again.cached and again.path.read_bytes() != bytes(data)


def test_checkpoint_decides_variant(tmp_path):
    ckpt = write_official(tmp_path / "ConvNeXtPose_L.tar", make_model("S", seed=9))
    result = build_engine(checkpoint=ckpt, out_dir=tmp_path)
    assert result.meta["variant"] == "S" and result.meta["weights"]["random"] is False
    with pytest.raises(Exception, match="holds weights of S, not of variant L"):
        build_engine("L", ckpt, out_dir=tmp_path)


@pytest.mark.parametrize("step", ["install_file", "write_json", "remove_replaced"])
def test_interrupted_rebuild_keeps_an_engine(tmp_path, monkeypatch, step):
    """Ctrl-C at each step of the commit: the previous engine (or, once committed, the new one) loads."""
    from cnpose_trt import cache

    good = build_engine("XS", out_dir=tmp_path, backend="torch")
    # torch and onnxruntime engines are reproducible (a rebuild writes the same file); TensorRT's
    # are not: give the previous engine another file name, as a TensorRT rebuild would find it.
    old = good.path.rename(good.path.with_name(good.path.name.replace(good.meta["engine_sha256"][:8], "0badf00d")))
    before = dict(good.meta, engine_file=old.name)
    cache.write_json(sidecar_path(good.path), before)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, step, boom)
    with pytest.raises(KeyboardInterrupt):
        build_engine("XS", out_dir=tmp_path, backend="torch", force=True)
    monkeypatch.undo()
    engine = load_engine(good.path)
    after = json.loads(sidecar_path(good.path).read_text())
    assert (after == before) == (step != "remove_replaced")  # committed only once the sidecar was replaced
    assert engine.meta == after and engine.path.name == after["engine_file"]
    assert old.is_file()  # the old engine file stays until a commit is complete ...
    build_engine("XS", out_dir=tmp_path, backend="torch")  # ... and the next build removes it once unused
    assert old.is_file() == (step != "remove_replaced")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_rebuild_deletes_only_its_own_engine_files(tmp_path):
    from cnpose_trt import cache

    good = build_engine("XS", out_dir=tmp_path, backend="torch")
    foreign = tmp_path / "precious.bin"
    foreign.write_bytes(good.path.read_bytes())
    cache.write_json(sidecar_path(good.path), dict(good.meta, engine_file=foreign.name))  # edited by hand
    assert load_engine(good.path).path == foreign
    rebuilt = build_engine("XS", out_dir=tmp_path, backend="torch", force=True)
    assert foreign.is_file() and load_engine(good.path).path == rebuilt.path == good.path


def test_tensorrt_backend_without_tensorrt(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorrt" else real(n, *a))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, installed or not
    with pytest.raises(BuildError, match="TensorRT is not installed.*pip install"):
        build_engine("XS", backend="tensorrt", out_dir=tmp_path)
    assert build_main(["--variant", "XS", "--backend", "tensorrt", "--out", str(tmp_path)]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_cli_prints_engine_path_last(tmp_path, capsys):
    assert build_main(["--variant", "XS", "--out", str(tmp_path), "--max-batch", "2"]) == 0
    first = capsys.readouterr()
    assert "[2/5] exporting ONNX" in first.err
    assert build_main(["--variant", "XS", "--out", str(tmp_path), "--max-batch", "2"]) == 0
    second = capsys.readouterr()
    assert "cached engine is up to date" in second.err
    assert first.out.strip().splitlines()[-1] == second.out.strip().splitlines()[-1]
    assert load_engine(second.out.strip().splitlines()[-1]).spec.name == "XS"


@pytest.mark.parametrize("kwargs, message", [
    ({"variant": "XL"}, "variant must be one of"),
    ({"variant": None}, "variant is required"),
    ({"variant": "XS", "max_batch": 0}, "max_batch must be an integer"),
    ({"variant": "XS", "precision": "fp8"}, "precision must be one of"),
    ({"variant": "XS", "precision": "int8"}, "int8 needs calibration images.*never calibrates on noise"),
    ({"variant": "XS", "precision": "int8", "calib_images": "/nonexistent"}, "calib_images must be a folder"),
    ({"variant": "XS", "precision": "int8", "calib_synthetic": True, "calib_method": "kl"}, "calib_method must be"),
    ({"variant": "XS", "precision": "int8", "calib_synthetic": True, "calib_count": 0}, "calib_count must be"),
    ({"variant": "XS", "max_batch": 4, "trt": TrtOptions(opt_batch=8)}, "opt_batch must be an integer in 1..4"),
    ({"variant": "XS", "backend": "cuda"}, "backend must be one of"),
    ({"variant": "XS", "opset": 11}, "opset must be 17 or newer"),
])
def test_bad_build_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_engine(out_dir=tmp_path, **kwargs)


def test_engine_output_matches_torch_model(xs_engine, rng):
    import torch

    x = rng.standard_normal((3, 3, 256, 256)).astype(np.float32)
    with torch.no_grad():
        ref = make_model("XS")(torch.from_numpy(x)).numpy()
    got = xs_engine.infer(x)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4

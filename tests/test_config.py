"""config.py (BuildConfig, EngineRequest: checked once, passed whole) and runtime/open.py (open_engine:
the one way every caller gets an engine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnpose_trt.config import BuildConfig, EngineRequest, TrtOptions

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fields, message", [
    ({"max_batch": 0}, r"max_batch must be an integer in 1\.\.4096, got 0"),
    ({"max_batch": True}, r"max_batch must be an integer in 1\.\.4096, got True"),
    ({"max_batch": 4.0}, r"max_batch must be an integer in 1\.\.4096"),
    ({"precision": "fp8"}, r"precision must be one of fp32, fp16, int8, bf16, got 'fp8'"),
    ({"opset": 11}, r"opset must be 17 or newer, got 11"),
    ({"opset": True}, r"opset must be 17 or newer"),
    ({"seed": -1}, r"seed must be a non-negative integer, got -1"),
    ({"force": 1}, r"force must be True or False, got 1"),
    ({"fp16_output": "yes"}, r"fp16_output must be True or False"),
    ({"keep_fp32": "/head/"}, r"keep_fp32 must be a list of node-name prefixes"),
    ({"int8_exclude": [1]}, r"int8_exclude must be a list of node-name prefixes"),
    ({"trt": {"opt_batch": 2}}, r"trt must be a TrtOptions"),
    ({"max_batch": 4, "trt": TrtOptions(opt_batch=8)}, r"opt_batch must be an integer in 1\.\.4, got 8"),
    ({"checkpoint": 3}, r"checkpoint must be a path"),
    ({"out_dir": ["e"]}, r"out_dir must be a path"),
    ({"backend": None}, r"backend must be a backend name"),
    ({"variant": 3}, r"variant must be a variant name"),
])
def test_build_config_refuses_bad_fields_when_made(fields, message):
    with pytest.raises(ValueError, match=message):
        BuildConfig(**{"variant": "XS", **fields})


def test_build_config_defaults_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = BuildConfig("XS", "w.pth", out_dir="engines", keep_fp32=["/a/"])
    assert c.keep_fp32 == ("/a/",) and c.trt == TrtOptions() and c.opt_batch == 16
    a = c.absolute()
    assert a.checkpoint == str(tmp_path / "w.pth") and a.out_dir == str(tmp_path / "engines")
    assert a.calib_images is None and a.variant == "XS" and c.checkpoint == "w.pth"
    assert BuildConfig("XS", max_batch=1).opt_batch == 1


def test_engine_request_names_exactly_one_source():
    with pytest.raises(ValueError, match="either engine .* or build .*exactly one"):
        EngineRequest()
    with pytest.raises(ValueError, match="exactly one"):
        EngineRequest(engine="a.onnx", build=BuildConfig("XS"))
    with pytest.raises(ValueError, match="build must be a BuildConfig"):
        EngineRequest(build={"variant": "XS"})
    with pytest.raises(ValueError, match="load must be a mapping"):
        EngineRequest(engine="a.onnx", load=[("threads", 1)])
    with pytest.raises(ValueError, match="engine must be a path"):
        EngineRequest(engine=5)
    load = {"threads": 1}
    r = EngineRequest(engine="a.onnx", load=load)
    load["threads"] = 2
    assert r.load == {"threads": 1}  # a copy: the request does not change behind its back


def test_open_engine_loads_and_builds_through_one_path(xs_engine_path, engine_dir):
    import cnpose_trt as cp
    from cnpose_trt.build.builder import build_engine

    loaded = cp.open_engine(cp.EngineRequest(engine=xs_engine_path, load={"threads": 1}))
    assert loaded.path == xs_engine_path
    config = BuildConfig("XS", out_dir=engine_dir, max_batch=4)
    said = []
    built = cp.open_engine(cp.EngineRequest(build=config), progress=said.append)
    assert built.path == xs_engine_path and any("cached engine is up to date" in s for s in said)
    assert build_engine(config).path == build_engine("XS", out_dir=engine_dir, max_batch=4).path == xs_engine_path
    with pytest.raises(ValueError, match="a BuildConfig alone"):
        build_engine(config, max_batch=2)
    x = np.zeros((1, 3, 256, 256), np.float32)
    np.testing.assert_array_equal(loaded.infer(x), built.infer(x))


def test_pose_estimator_takes_a_request(xs_engine_path):
    from cnpose_trt import PoseEstimator
    from cnpose_trt.io.draw import demo_image

    est = PoseEstimator(EngineRequest(engine=xs_engine_path, load={"threads": 1}))
    assert est.engine.path == xs_engine_path
    image, box = demo_image()
    assert est.predict([image], [[box]])[0].image.shape == (1, 18, 3)
    with pytest.raises(ValueError, match="go in the EngineRequest's load options"):
        PoseEstimator(EngineRequest(engine=xs_engine_path), threads=1)


def test_opening_a_built_engine_never_imports_the_build_layer(xs_engine_path):
    code = ("import sys, cnpose_trt as cp; e = cp.open_engine(cp.EngineRequest(engine=sys.argv[1])); "
            "print(sorted(m for m in sys.modules if m.startswith('cnpose_trt.build') or m == 'torch'))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, str(xs_engine_path)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

"""Upstream's input convention reaches every entry point, and engines made before it are not reused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnpose_trt.cache import sidecar_path
from cnpose_trt.cli.app import main as cli
from cnpose_trt.errors import EngineError
from cnpose_trt.io.draw import demo_image, save_image


def test_cli_crop_box_is_used_as_it_is(tmp_path, xs_engine_path, capsys):
    img, box = demo_image()
    path = save_image(tmp_path / "scene.png", img)
    x, y, w, h = box
    assert cli(["predict", str(path), "--engine", str(xs_engine_path), "--bbox", f"{x},{y},{w},{h}",
                "--output", str(tmp_path / "a.json")]) == 0
    person = json.loads((tmp_path / "a.json").read_text())["people"][0]
    crop = ",".join(str(v) for v in person["crop_box"])
    assert cli(["predict", str(path), "--engine", str(xs_engine_path), "--crop-box", crop,
                "--output", str(tmp_path / "b.json")]) == 0
    again = json.loads((tmp_path / "b.json").read_text())["people"][0]
    assert again["crop_box"] == person["crop_box"]
    for name, joint in person["joints"].items():
        np.testing.assert_allclose(again["joints"][name]["x_px"], joint["x_px"], rtol=1e-6)
    capsys.readouterr()
    assert cli(["predict", str(path), "--engine", str(xs_engine_path), "--crop-box", crop, "--bbox", crop]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli(["predict", str(path), "--engine", str(xs_engine_path)]) == 2
    assert "--bbox" in capsys.readouterr().err


def test_format_1_engines_are_refused_and_rebuilt(tmp_path):
    pytest.importorskip("torch")
    from cnpose_trt.build.builder import build_engine
    from cnpose_trt.runtime.engine import load_engine

    first = build_engine("XS", out_dir=tmp_path, max_batch=2)
    side = sidecar_path(first.path)
    meta = json.loads(side.read_text())
    assert meta["engine_format"] == 2 and meta["input"]["convention"] == "rgb-0..255-minus-mean-over-std"
    meta["engine_format"] = 1  # what cnpose_trt 0.1 wrote, with [0, 1]-scaled checks and INT8 ranges
    side.write_text(json.dumps(meta))
    with pytest.raises(EngineError, match="cnpose_trt 0.1 .*input normalisation.*--force"):
        load_engine(first.path)
    again = build_engine("XS", out_dir=tmp_path, max_batch=2)
    assert not again.cached
    load_engine(again.path)

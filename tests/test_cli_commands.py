"""`cnpose-trt eval` and `cnpose-trt batch` through the main command (their logic is tested in
test_evaluate.py and test_batch.py)."""

from __future__ import annotations

import json

import pytest

from cnpose_trt.cli import main as cli


def test_eval_command(tmp_path, xs_engine_path, capsys):
    out = tmp_path / "eval.json"
    assert cli(["eval", "--engine", str(xs_engine_path), "--count", "3", "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    metrics = report["engines"][0]["metrics"]
    assert metrics["people"] == 3 and metrics["mpjpe"] > 0 and metrics["pa_mpjpe"] > 0
    assert "MPJPE" in capsys.readouterr().out
    assert cli(["eval", "--engine", str(tmp_path / "missing.onnx"), "--count", "1", "--no-progress"]) == 2


def test_batch_command(tmp_path, xs_engine_path):
    pytest.importorskip("pyarrow")
    from cnpose_trt.draw import demo_image, save_image

    img, box = demo_image()
    save_image(tmp_path / "a.png", img)
    manifest = tmp_path / "frames.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "boxes": [list(box)]}) + "\n")
    out = tmp_path / "poses"
    assert cli(["batch", str(manifest), "--out", str(out), "--engine", str(xs_engine_path)]) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["images"] == 1 and summary["people"] == 1 and summary["errors"] == 0

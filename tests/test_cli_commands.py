"""`cnpose-trt eval` and `cnpose-trt batch` through the main command (their logic is tested in
test_evaluate.py and test_batch.py)."""

from __future__ import annotations

import json

import pytest

from cnpose_trt.cli.app import main as cli


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
    from cnpose_trt.io.draw import demo_image, save_image

    img, box = demo_image()
    save_image(tmp_path / "a.png", img)
    manifest = tmp_path / "frames.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "boxes": [list(box)]}) + "\n")
    out = tmp_path / "poses"
    assert cli(["batch", str(manifest), "--out", str(out), "--engine", str(xs_engine_path)]) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["images"] == 1 and summary["people"] == 1 and summary["errors"] == 0


def test_demo_uses_the_shipped_model(tmp_path, capsys):
    pytest.importorskip("torch")
    from cnpose_trt.nn.checkpoint import detect_variant, load_checkpoint
    from cnpose_trt.nn.model import build_model
    from cnpose_trt.shipped import SHIPPED_XS

    if not SHIPPED_XS.is_file():
        pytest.skip("no shipped XS model in this checkout")
    state, _ = load_checkpoint(SHIPPED_XS)  # the official-format loader, as for official files
    assert detect_variant(state) == "XS"
    model = build_model("XS", SHIPPED_XS)  # half-precision storage, float32 once loaded
    assert all(str(v.dtype) == "torch.float32" for v in model.state_dict().values() if v.is_floating_point())
    assert cli(["demo", "--out-dir", str(tmp_path / "out"), "--engines", str(tmp_path / "e")]) == 0
    err = capsys.readouterr().err
    assert "trained on synthetic people only" in err and "against the scene's ground truth: MPJPE" in err
    doc = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert doc["weights"].endswith(SHIPPED_XS.name) and len(doc["people"]) == 1
    assert (tmp_path / "out" / "demo_pose.png").stat().st_size > 1000


def test_version():
    from torchless import cli_without_torch

    from cnpose_trt import __version__

    done = cli_without_torch(["--version"])
    assert done.returncode == 0 and done.stdout.strip() == f"cnpose-trt {__version__}"


def test_inspect_describes_an_engine_without_torch(xs_engine_path, tmp_path):
    """Issue 21 item 7: `inspect ENGINE` describes the engine instead of a torch.load message, without torch."""
    import shutil

    from torchless import cli_without_torch

    from cnpose_trt.cache import sidecar_path
    from cnpose_trt.runtime.engine import read_sidecar

    meta = read_sidecar(xs_engine_path)
    side = sidecar_path(xs_engine_path)
    for path in (xs_engine_path, side, side.with_suffix("")):  # engine file, sidecar, handle
        done = cli_without_torch(["inspect", path])
        assert done.returncode == 0, done.stderr
        lines = dict(line.split(":", 1) for line in done.stdout.splitlines())
        assert lines["variant"].strip() == "XS (2UP-128ch-D32)"
        assert lines["precision"].strip().startswith("fp32, backend onnxruntime")
        assert lines["cache key"].strip() == meta["cache_key"]
        assert "present, sha256 as recorded" in lines["file"]
        assert "heatmaps float32 (N, 576, 32, 32)" in lines["output"]
    copy = tmp_path / "copy"
    shutil.copytree(xs_engine_path.parent, copy)
    damaged = copy / meta["engine_file"]
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"x")
    done = cli_without_torch(["inspect", copy / side.name])
    assert done.returncode == 0 and "damaged" in done.stdout


def test_help_shows_defaults():
    """Issue 21 item 7: every option with a default says it in --help."""
    import re

    from cnpose_trt.cli.app import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    missing = []
    for name, p in sub.items():
        for a in p._actions:
            if a.default in (None, [], "==SUPPRESS==") or isinstance(a.default, bool) or not a.option_strings:
                continue
            if not re.search(r"default", a.help or "", re.I):
                missing.append(f"{name} {a.option_strings[0]}")
    assert not missing, missing


def test_predict_imports_only_what_it_runs(xs_engine_path, tmp_path):
    """Issue 22 item 4: the command line imports per command; predict on an engine file loads neither the
    build layer nor batch, eval or torch (they cost 50-150 ms each under load, torch seconds)."""
    import subprocess
    import sys

    from cnpose_trt.io.draw import demo_image, save_image

    img, box = demo_image()
    image = save_image(tmp_path / "a.png", img)
    code = ("import sys; from cnpose_trt.cli.app import main\n"
            "assert main(sys.argv[1:]) == 0\n"
            "heavy = ['cnpose_trt.build.builder', 'cnpose_trt.cli.build', 'cnpose_trt.batch.job', 'cnpose_trt.eval.evaluate',\n"
            "         'cnpose_trt.build.precision', 'cnpose_trt.eval.bench', 'torch', 'onnx']\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code, "predict", str(image), "--bbox", ",".join(map(str, box)),
                           "--engine", str(xs_engine_path), "--output", str(tmp_path / "o.json")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

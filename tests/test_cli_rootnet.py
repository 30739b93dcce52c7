"""`predict --rootnet ENGINE_OR_CHECKPOINT` and `--root-depth prior` (issue 24): camera-space poses from an
image, a folder or a video without hand-given depths; the JSON says where the depths came from.

References: estimate_roots and PoseEstimator given the same depths by hand (tests/test_roots.py ties those to
upstream RootNet's golden output).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from cnpose_trt import PoseEstimator, estimate_roots  # noqa: E402
from cnpose_trt.cli.app import main as cli  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_rootnet_golden import GOLDEN  # noqa: E402

sys.path.pop(0)

IMAGE = GOLDEN / "image.png"


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN / "rootnet_golden.npz"))


def _camera_args(golden) -> list[str]:
    fx, fy, cx, cy = golden["intrinsics"]
    return ["--focal", f"{fx},{fy}", "--principal", f"{cx},{cy}"]


def _bbox_args(boxes) -> list[str]:
    return [a for b in boxes for a in ("--bbox", ",".join(repr(float(v)) for v in b))]


def _joints(person) -> np.ndarray:
    return np.array([j["camera_mm"] for j in person["joints"].values()])


def test_predict_image_with_rootnet_engine(golden, xs_engine_path, rootnet_engine_path, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert cli(["predict", str(IMAGE), *_bbox_args(golden["boxes"][:3]), *_camera_args(golden), "--engine",
                str(xs_engine_path), "--rootnet", str(rootnet_engine_path), "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["root_depth"] == "rootnet" and doc["rootnet"] == str(rootnet_engine_path)
    roots = estimate_roots(rootnet_engine_path, golden["image_rgb"], golden["boxes"][:3],
                           intrinsics=golden["intrinsics"])
    want = PoseEstimator(xs_engine_path).predict(golden["image_rgb"], golden["boxes"][:3], root_depth=roots[:, 2],
                                                 intrinsics=golden["intrinsics"])
    for p, person in enumerate(doc["people"]):
        assert person["root_source"] == "rootnet" and person["depth"] == "absolute"
        np.testing.assert_allclose([person["root"][k] for k in ("x_px", "y_px", "depth_mm")], roots[p], rtol=1e-6)
        np.testing.assert_allclose(_joints(person), want.camera[p], rtol=1e-6, atol=1e-3)
    capsys.readouterr()


def test_predict_folder_with_rootnet_checkpoint(golden, xs_engine_path, rootnet_snapshot, rootnet_engine_path,
                                                engine_dir, tmp_path, capsys):
    """A snapshot is built with the pose engine's backend and precision into --engines: the one the session
    fixture built is found there (cached), not built again."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(IMAGE, folder / "a.png")
    shutil.copy(IMAGE, folder / "b.png")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"a.png": golden["boxes"][:2].tolist(), "b.png": golden["boxes"][4].tolist()}))
    out = tmp_path / "p.json"
    assert cli(["predict", str(folder), "--boxes", str(boxes), *_camera_args(golden), "--engine", str(xs_engine_path),
                "--rootnet", str(rootnet_snapshot), "--engines", str(engine_dir), "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert Path(doc["rootnet"]) == Path(rootnet_engine_path)
    assert [len(i["people"]) for i in doc["images"]] == [2, 1]
    roots = estimate_roots(rootnet_engine_path, golden["image_rgb"], golden["boxes"][[0, 1, 4]],
                           intrinsics=golden["intrinsics"])
    got = [p["root"]["depth_mm"] for i in doc["images"] for p in i["people"]]
    np.testing.assert_allclose(got, roots[:, 2], rtol=1e-6)
    capsys.readouterr()


def test_root_depth_prior_marked(golden, xs_engine_path, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert cli(["predict", str(IMAGE), *_bbox_args(golden["boxes"][:1]), *_camera_args(golden), "--engine",
                str(xs_engine_path), "--root-depth", "prior", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["root_depth"] == "prior" and doc["rootnet"] is None
    (person,) = doc["people"]
    assert person["root_source"] == "prior"
    _, _, w, h = golden["process_bbox"][0]
    fx, fy = golden["intrinsics"][:2]
    assert person["root"]["depth_mm"] == pytest.approx(np.sqrt(2000.0 * 2000.0 * fx * fy / (w * h)), rel=1e-12)
    capsys.readouterr()


def test_predict_video_with_prior(xs_engine_path, tmp_path, capsys):
    from cnpose_trt.io.video import LOSSLESS_CODEC, make_synthetic_video

    path = tmp_path / "walk.mkv"
    scenes = make_synthetic_video(path, 3, seed=4, codec=LOSSLESS_CODEC, width=160, height=160)
    fx, fy, cx, cy = scenes[0].intrinsics
    out = tmp_path / "v.json"
    assert cli(["predict", str(path), "--bbox", ",".join(map(str, scenes[0].boxes[0])), "--engine",
                str(xs_engine_path), "--rootnet", "prior", "--focal", f"{fx},{fy}", "--principal", f"{cx},{cy}",
                "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["root_depth"] == "prior" and len(doc["rows"]) == 3
    assert all(p["root_source"] == "prior" and p["depth"] == "absolute" for r in doc["rows"] for p in r["people"])
    capsys.readouterr()


@pytest.mark.parametrize("extra, message", [
    (["--rootnet", "prior"], r"--rootnet needs the camera: --focal FX,FY and --principal CX,CY"),
    (["--root-depth", "prior"], r"--rootnet needs the camera"),
    (["--rootnet", "prior", "--root-depth", "3000", "--focal", "1,1", "--principal", "0,0"],
     r"give one of --root-depth 3000 \(a depth by hand\) and --rootnet"),
    (["--rootnet", "{tmp}/nothing.pth.tar", "--focal", "1,1", "--principal", "0,0"],
     r"--rootnet .*nothing.pth.tar: no such file"),
    (["--rootnet", "{xs}", "--focal", "1500,1500", "--principal", "320,240"],
     r"root depths needs a RootNet engine, but .* is a ConvNeXtPose \(pose\) engine"),
])
def test_rootnet_option_errors(golden, xs_engine_path, tmp_path, capsys, extra, message):
    args = ["predict", str(IMAGE), *_bbox_args(golden["boxes"][:1]), "--engine", str(xs_engine_path),
            *(a.format(tmp=tmp_path, xs=xs_engine_path) for a in extra)]
    assert cli(args) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(message, err), err


@pytest.mark.parametrize("value", ["abc", "nan", "inf"])
def test_root_depth_values_refused(golden, xs_engine_path, capsys, value):
    with pytest.raises(SystemExit) as exc:  # argparse's usage error
        cli(["predict", str(IMAGE), *_bbox_args(golden["boxes"][:1]), "--engine", str(xs_engine_path),
             "--root-depth", value])
    assert exc.value.code == 2
    assert "--root-depth must be a depth in mm (> 0) or 'prior'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-5", "0"])
def test_root_depth_not_positive_refused(golden, xs_engine_path, capsys, value):
    """Parsed (a signed number is a number), then refused by the pipeline in one line naming root_depth."""
    assert cli(["predict", str(IMAGE), *_bbox_args(golden["boxes"][:1]), "--engine", str(xs_engine_path),
                "--root-depth", value]) != 0
    err = capsys.readouterr().err
    assert "root_depth" in err and len(err.strip().splitlines()) == 1, err

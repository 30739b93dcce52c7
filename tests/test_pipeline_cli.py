import json

import numpy as np
import pytest

from cnpose_trt import JOINT_NAMES, estimate
from cnpose_trt.cli.app import main as cli
from cnpose_trt.io.draw import demo_image, save_image
from cnpose_trt.io.preprocess import load_image


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    img, box = demo_image()
    return save_image(tmp_path_factory.mktemp("img") / "demo.png", img), img, box


def test_estimate_several_people(xs_engine, demo):
    _, img, box = demo
    boxes = np.array([box, [10, 10, 100, 200]], float)
    r = estimate(xs_engine, img, boxes, root_depth=[4000, 6000], intrinsics=[1500, 1500, 320, 240])
    assert r.image.shape == (2, 18, 3) and r.camera.shape == (2, 18, 3) and r.confidence.shape == (2, 18)
    assert not r.root_relative and np.isfinite(r.image).all()
    assert ((r.confidence > 0) & (r.confidence <= 1)).all()
    # float32 outputs of the fused decode: compare at float32 precision.
    np.testing.assert_allclose(r.camera[1, :, 0], (r.image[1, :, 0] - 320) / 1500 * r.image[1, :, 2], rtol=1e-6)
    # Joints lie inside the crop box they were decoded in; depths within root +- 1000 mm.
    for p in range(2):
        x0, y0, s, _ = r.crop_boxes[p]
        assert (r.image[p, :, 0] >= x0).all() and (r.image[p, :, 0] <= x0 + s).all()
    assert (np.abs(r.image[:, :, 2] - [[4000], [6000]]) <= 1000).all()
    single = estimate(xs_engine, img, boxes[1])
    assert single.root_relative and single.camera is None
    np.testing.assert_allclose(single.image[0, :, :2], r.image[1, :, :2], rtol=1e-5)
    flipped = estimate(xs_engine, img, boxes, flip=True)
    assert np.isfinite(flipped.image).all() and not np.allclose(flipped.cells, r.cells)


def test_estimate_errors(xs_engine, demo):
    _, img, _ = demo
    with pytest.raises(ValueError, match="intrinsics need root_depth"):
        estimate(xs_engine, img, [10, 10, 50, 50], intrinsics=[1, 1, 0, 0])
    with pytest.raises(ValueError, match="lies outside"):
        estimate(xs_engine, img, [1000, 10, 50, 50])
    with pytest.raises(ValueError, match=r"root_depth must have shape \(2,?\)"):
        estimate(xs_engine, img, [[10, 10, 50, 50], [20, 20, 40, 40]], root_depth=[1.0, 2.0, 3.0])


def test_predict_cli(xs_engine_path, demo, tmp_path, capsys):
    path, img, box = demo
    out, draw = tmp_path / "out.json", tmp_path / "pose.png"
    code = cli(["predict", str(path), "--bbox", ",".join(map(str, box)), "--bbox", "5,5,100,150",
                "--root-depth", "4500", "--focal", "1500,1500", "--principal", "320,240",
                "--engine", str(xs_engine_path), "--flip", "--output", str(out), "--draw", str(draw)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["variant"] == "XS" and doc["flip_test"] and len(doc["people"]) == 2
    joints = doc["people"][0]["joints"]
    assert list(joints) == list(JOINT_NAMES)
    assert {"x_px", "y_px", "depth_mm", "camera_mm", "confidence"} == set(joints["Pelvis"])
    drawn = load_image(draw)  # the overlay, and beside it a square 3D view as tall as the image
    h, w = img.shape[:2]
    assert drawn.shape == (h, w + h, 3) and (drawn[:, :w] != img).any()


def test_predict_cli_builds_variant_and_prints(tmp_path, demo, capsys):
    path, _, box = demo
    code = cli(["predict", str(path), "--bbox", ",".join(map(str, box)), "--variant", "xs",
                "--engines", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0 and "random weights" in captured.err
    doc = json.loads(captured.out)
    assert doc["people"][0]["depth"] == "root-relative" and "camera_mm" not in doc["people"][0]["joints"]["Neck"]


@pytest.mark.parametrize("extra, message", [
    (["--focal", "1,1"], "--focal and --principal go together"),
    (["--bbox", "9000,0,10,10"], "lies outside"),
])
def test_predict_cli_errors(xs_engine_path, demo, capsys, extra, message):
    path, _, _ = demo
    assert cli(["predict", str(path), "--bbox", "10,10,50,50", "--engine", str(xs_engine_path), *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--crop-box", "-1e6,-1e6,10,10"], "error: --crop-box #2 = [-1000000.0, -1000000.0, 10.0, 10.0] lies outside "
                                        "the 640x480 image (no area in common with it)"),
    (["--crop-box", "0,0,1e12,1e12"], "error: --crop-box #2 = [0.0, 0.0, 1000000000000.0, 1000000000000.0] reaches"),
])
def test_predict_cli_crop_box_outside_the_image(xs_engine_path, demo, capsys, extra, message):
    path, _, _ = demo
    assert cli(["predict", str(path), "--crop-box", "10,10,50,50", "--engine", str(xs_engine_path), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1 and not captured.out


def test_predict_help_says_boxes_refer_to_the_exif_rotated_image(capsys):
    with pytest.raises(SystemExit):
        cli(["predict", "--help"])
    assert "EXIF orientation" in " ".join(capsys.readouterr().out.split())


def test_predict_cli_bad_files(xs_engine_path, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert cli(["predict", str(tmp_path / "notes.txt"), "--bbox", "1,1,5,5", "--engine", str(xs_engine_path)]) == 2
    assert "not an image file" in capsys.readouterr().err
    assert cli(["predict", str(tmp_path / "none.png"), "--bbox", "1,1,5,5", "--engine", str(xs_engine_path)]) == 2
    assert "image not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["predict", str(tmp_path / "none.png"), "--bbox", "1,2,3"])
    assert "--bbox must be 4 comma-separated numbers" in capsys.readouterr().err


def test_demo_command(tmp_path, capsys):
    assert cli(["demo", "--out-dir", str(tmp_path / "d"), "--engines", str(tmp_path / "e")]) == 0
    doc = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert len(doc["people"]) == 1 and "camera_mm" in doc["people"][0]["joints"]["Head"]
    assert (tmp_path / "d" / "demo_pose.png").stat().st_size > 1000


def test_predict_folder(xs_engine_path, tmp_path, capsys):
    """Issue 21 item 7: `predict FOLDER` runs every image in it with a boxes file, or says what it expects."""
    from cnpose_trt.io.synthetic import synthesize

    folder = tmp_path / "frames"
    folder.mkdir()
    table = {}
    for seed in (3, 4, 5):
        scene = synthesize(seed, width=320, height=240)
        save_image(folder / f"f{seed}.png", scene.image)
        if seed != 5:
            table[f"f{seed}.png"] = [float(v) for v in scene.boxes[0]]
    (folder / "notes.txt").write_text("not an image")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(table))
    out, draw = tmp_path / "out.json", tmp_path / "pictures"
    assert cli(["predict", str(folder), "--boxes", str(boxes), "--engine", str(xs_engine_path), "--output", str(out),
                "--draw", str(draw)]) == 0
    doc = json.loads(out.read_text())
    assert [d["image"] for d in doc["images"]] == ["f3.png", "f4.png", "f5.png"]
    assert [len(d["people"]) for d in doc["images"]] == [1, 1, 0]  # f5 is not in the boxes file: no people
    assert sorted(p.name for p in draw.iterdir()) == ["f3_pose.png", "f4_pose.png"]
    one = tmp_path / "one.json"
    assert cli(["predict", str(folder / "f4.png"), "--bbox", ",".join(map(str, table["f4.png"])), "--engine",
                str(xs_engine_path), "--output", str(one)]) == 0
    assert json.loads(one.read_text())["people"] == doc["images"][1]["people"]  # the same as one by one
    capsys.readouterr()
    assert cli(["predict", str(folder), "--engine", str(xs_engine_path)]) == 2
    assert "predict FOLDER needs the people's boxes: --boxes FILE" in capsys.readouterr().err
    boxes.write_text(json.dumps({**table, "missing.png": [1, 2, 3, 4]}))
    assert cli(["predict", str(folder), "--boxes", str(boxes), "--engine", str(xs_engine_path)]) == 2
    assert "names 1 file(s) that are not images of" in capsys.readouterr().err


@pytest.mark.parametrize("entry, message", [
    ("abc", r"--boxes .*, entry 'f1.png': must be a box \[x, y, w, h\] or a list of them \(finite numbers\), got abc"),
    ([1, 2, 3], r"entry 'f1.png': must be a box .* got \[1, 2, 3\]"),
    ([-1e6, -1e6, 10, 10], r"^error: f1.png \(--boxes\): boxes\[0\] = .* lies outside the 320x240 image"),
])
def test_predict_folder_names_the_file_of_a_bad_box(xs_engine_path, tmp_path, capsys, entry, message):
    """Review: a bad box in a folder run said neither the file nor the option."""
    import re

    from cnpose_trt.synthetic import synthesize

    folder = tmp_path / "frames"
    folder.mkdir()
    for seed in (0, 1):
        save_image(folder / f"f{seed}.png", synthesize(seed, width=320, height=240).image)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"f0.png": [10, 10, 80, 120], "f1.png": entry}))
    assert cli(["predict", str(folder), "--boxes", str(boxes), "--engine", str(xs_engine_path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err, re.M), err

"""The command line under hostile or careless input (issue 10, items 4, 10 and 13): one line on
stderr and a non-zero status, never a traceback, and never NaN in the JSON."""

import json
import os
import signal
import struct
import zlib

import numpy as np
import pytest

from cnpose_trt.cli import app as cli_mod
from cnpose_trt.cli import finite_json
from cnpose_trt.cli import predict as predict_mod
from cnpose_trt.cli.app import main as cli
from cnpose_trt.cli.common import join_signed_values
from cnpose_trt.io.draw import demo_image, save_image
from cnpose_trt.io.imageio_guard import check_image_file, image_size


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    img, box = demo_image()
    return save_image(tmp_path_factory.mktemp("img") / "scene.png", img), img, box


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("error: "), err
    return lines[-1]


def test_negative_box_coordinates_parse(xs_engine_path, scene, capsys):
    path, _, _ = scene
    args = cli_mod.build_parser().parse_args(join_signed_values(
        ["predict", str(path), "--bbox", "-50,-50,200,300", "--root-depth", "-3e3", "--principal", "-10,-2.5"]))
    assert args.bbox == [(-50, -50, 200, 300)] and args.root_depth == -3000 and args.principal == (-10, -2.5)
    assert cli(["predict", str(path), "--bbox", "-50,-50,200,300", "--bbox", "-1.5e1,20,100,150",
                "--engine", str(xs_engine_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["bbox"] for p in doc["people"]] == [[-50, -50, 200, 300], [-15, 20, 100, 150]]


def test_join_signed_values():
    assert join_signed_values(["predict", "a.png", "--bbox", "-5,-6,7,8", "--focal", "1,2", "--root-depth", "-1e3",
                               "--", "--bbox", "-1,2,3,4"]) == \
        ["predict", "a.png", "--bbox=-5,-6,7,8", "--focal", "1,2", "--root-depth=-1e3", "--", "--bbox", "-1,2,3,4"]
    assert join_signed_values(["--bbox", "--flip"]) == ["--bbox", "--flip"]  # not a value: argparse says so


@pytest.mark.parametrize("box", ["nan,1,2,3", "1,inf,2,3"])
def test_non_finite_box_is_refused_at_parsing(scene, capsys, box):
    with pytest.raises(SystemExit) as info:
        cli(["predict", str(scene[0]), "--bbox", box])
    assert info.value.code == 2 and "--bbox must be finite numbers" in capsys.readouterr().err


@pytest.mark.parametrize("option, name, message", [
    ("--draw", "out.xyz", "--draw 'OUT' must end in .png, .jpg"),
    ("--draw", "out", "got 'no suffix'"),
    ("--draw", "missing/out.png", "missing does not exist"),
    ("--draw", ".", "is a folder; give a file name"),
    ("--output", "missing/out.json", "missing does not exist"),
    ("--output", ".", "is a folder; give a file name"),
])
def test_unwritable_outputs_fail_before_any_work(xs_engine_path, scene, tmp_path, monkeypatch, capsys,
                                                 option, name, message):
    import re

    from cnpose_trt.runtime import engine as engine_mod

    monkeypatch.setattr(engine_mod, "load_engine", lambda *a, **k: pytest.fail("should fail before loading"))
    target = tmp_path / name
    args = ["predict", str(scene[0]), "--bbox", "10,10,100,100", "--engine", str(xs_engine_path), option, str(target)]
    assert cli(args) == 2
    assert re.search(message.replace("OUT", re.escape(str(target))), _one_error_line(capsys.readouterr().err))


def test_failing_output_write_is_one_line(xs_engine_path, scene, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli(["predict", str(scene[0]), "--bbox", "10,10,100,100", "--engine", str(xs_engine_path),
                "--output", str(tmp_path / "file" / "out.json")]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys.readouterr().err)
    if os.path.exists("/dev/full"):  # every write fails with ENOSPC: a full disk
        assert cli(["predict", str(scene[0]), "--bbox", "10,10,100,100", "--engine", str(xs_engine_path),
                    "--output", "/dev/full"]) == 2
        assert _one_error_line(capsys.readouterr().err) == "error: No space left on device: /dev/full"


def test_demo_out_dir_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli(["demo", "--out-dir", str(tmp_path / "file"), "--engines", str(tmp_path / "e")]) == 2
    assert "--out-dir" in _one_error_line(capsys.readouterr().err)
    assert cli(["demo", "--out-dir", str(tmp_path / "file" / "sub"), "--engines", str(tmp_path / "e")]) == 2
    assert "Not a directory" in _one_error_line(capsys.readouterr().err)


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_image_bomb_is_refused_before_decoding(xs_engine_path, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(100_000, 100_000))
    assert cli(["predict", str(bomb), "--bbox", "1,1,50,50", "--engine", str(xs_engine_path)]) == 2
    assert "claims 100000 x 100000 pixels" in _one_error_line(capsys.readouterr().err)


def _headers(width: int, height: int) -> dict[str, bytes]:
    """Minimal headers of each parsed format claiming width x height (not decodable images)."""
    jpeg = (b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
            + b"\xff\xff\xc2" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00")
    tiff = (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2)
            + struct.pack("<HHII", 256, 4, 1, width) + struct.pack("<HHII", 257, 4, 1, height))
    return {
        "png": _png(width, height), "jpg": jpeg, "tif": tiff,
        "bmp": b"BM" + b"\x00" * 12 + struct.pack("<Iii", 40, width, -height) + b"\x00" * 30,
        "gif": b"GIF89a" + struct.pack("<HH", min(width, 65535), min(height, 65535)) + b"\x00" * 10,
        "ppm": f"P6\n# a comment\n{width} {height}\n255\n".encode(),
    }


@pytest.mark.parametrize("fmt", ["png", "jpg", "tif", "bmp", "gif", "ppm"])
def test_image_size_from_headers(tmp_path, fmt):
    path = tmp_path / f"h.{fmt}"
    for w, h in ((640, 480), (1, 65535), (60000, 60000)):
        path.write_bytes(_headers(w, h)[fmt])
        assert image_size(path) == (w, h)
    with pytest.raises(ValueError, match="claims 60000 x 60000 pixels, more than the 268,435,456"):
        check_image_file(path)
    check_image_file(path, max_pixels=60000 * 60000)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tiff", ".ppm"])
def test_image_size_of_real_files(tmp_path, suffix):
    import cv2

    img = np.random.default_rng(0).integers(0, 255, (37, 53, 3), np.uint8)
    path = tmp_path / f"real{suffix}"
    assert cv2.imwrite(str(path), img)
    assert image_size(path) == (53, 37)
    (tmp_path / "short.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert image_size(tmp_path / "short.png") is None  # too short to say: left to the decoder
    (tmp_path / "text.txt").write_text("hello")
    assert image_size(tmp_path / "text.txt") is None


def test_json_output_never_holds_nan(xs_engine_path, scene, tmp_path, monkeypatch, capsys):
    """Issue 10, item 10: NaN joints (a NaN heatmap decodes to NaN) were written as NaN tokens."""
    from cnpose_trt.backends.onnxruntime.runtime import OrtEngine

    def nan_heatmaps(self, images):
        return np.full((len(images), *self.spec.heatmap_shape), np.nan, self.output_dtype)

    monkeypatch.setattr(OrtEngine, "_run", nan_heatmaps)
    out = tmp_path / "out.json"
    assert cli(["predict", str(scene[0]), "--bbox", "100,40,300,400", "--root-depth", "4000", "--focal",
                "1500,1500", "--principal", "320,240", "--engine", str(xs_engine_path), "--output", str(out)]) == 0

    def refuse(token):
        raise AssertionError(f"{token} is not JSON")

    doc = json.loads(out.read_text(), parse_constant=refuse)
    joint = doc["people"][0]["joints"]["Pelvis"]
    assert joint["x_px"] is None and joint["camera_mm"] == [None, None, None]
    assert finite_json({"a": [1.5, float("inf"), (float("-inf"), 2)], "b": "NaN"}) == json.dumps(
        {"a": [1.5, None, [None, 2]], "b": "NaN"}, indent=2)


@pytest.mark.parametrize("how, status, line", [
    ("keyboard", 130, "error: interrupted"),
    ("sigint", 130, "error: interrupted"),
    ("sigterm", 143, "error: terminated by SIGTERM"),
])
def test_interrupted_commands_end_with_one_line(scene, monkeypatch, capsys, sigint_default, how, status, line):
    def interrupted(args):
        if how == "keyboard":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT if how == "sigint" else signal.SIGTERM)
        raise AssertionError("the signal should have interrupted")

    monkeypatch.setattr(predict_mod, "run_predict", interrupted)
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    assert cli(["predict", str(scene[0]), "--bbox", "1,1,5,5"]) == status
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers  # restored afterwards


def test_empty_checkpoint_in_predict(tmp_path, scene, capsys):
    (tmp_path / "empty.pth").write_bytes(b"")
    assert cli(["predict", str(scene[0]), "--bbox", "1,1,50,50", "--checkpoint", str(tmp_path / "empty.pth"),
                "--engines", str(tmp_path / "e")]) == 2
    assert "is empty (0 bytes)" in _one_error_line(capsys.readouterr().err)

"""Video input (issue 24): io/video (sequential reading, wanted frames, the writer, synthetic videos),
batch/detections (boxes per frame) and `cnpose-trt predict VIDEO`.

The reference for decoded frames is the synthetic scenes the video was written from: exact through the
lossless codec (FFV1), within the measured loss of mp4v / MJPG otherwise."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest

from cnpose_trt.batch.detections import read_frame_boxes
from cnpose_trt.cli.app import main as cli
from cnpose_trt.errors import ManifestError, VideoError
from cnpose_trt.io.video import (
    LOSSLESS_CODEC,
    VideoWriter,
    make_synthetic_video,
    read_frames,
    video_info,
    wanted_frames,
)

SCENE = {"width": 192, "height": 160, "people": 2}
# mp4v and MJPG at their default quality on these scenes: mean |error| 4.2-4.6 grey levels per channel,
# measured over 30 frames (sensor noise and sharp edges, 4:2:0 chroma). 8 leaves room for other FFmpeg
# builds; a frame read out of place is off by ~40 (see the neighbour check).
LOSSY_MEAN_ERROR = 8.0


@pytest.fixture(scope="module")
def lossless(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mkv"
    return path, make_synthetic_video(path, 12, seed=7, **SCENE)


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_lossless_round_trip(lossless):
    path, scenes = lossless
    info = video_info(path)
    assert (info.width, info.height, info.fps, info.frame_count) == (192, 160, 25.0, 12)
    got = list(read_frames(path))
    assert [i for i, _ in got] == list(range(12))
    for (_, image), scene in zip(got, scenes, strict=True):
        assert image.dtype == np.uint8 and image.shape == (160, 192, 3)
        np.testing.assert_array_equal(image, scene.image)  # RGB order kept: an unconverted BGR frame fails


@pytest.mark.parametrize("suffix", [".mp4", ".avi"])
def test_lossy_round_trip(tmp_path, suffix):
    path = tmp_path / f"clip{suffix}"
    scenes = make_synthetic_video(path, 10, seed=3, fps=30.0, **SCENE)
    assert video_info(path).frame_count == 10 and video_info(path).fps == 30.0
    got = [image for _, image in read_frames(path)]
    assert len(got) == 10
    for i, image in enumerate(got):
        error = _mae(image, scenes[i].image)
        assert error < LOSSY_MEAN_ERROR, (i, error)
        assert error < 0.5 * _mae(image, scenes[(i + 1) % 10].image)  # the frame in its place, not a neighbour


def _spy_captures(monkeypatch) -> dict[str, int]:
    """Count the seeks (set) and the frames converted (retrieve) of every cv2.VideoCapture opened from now."""
    import cv2

    calls = {"set": 0, "retrieve": 0}
    real = cv2.VideoCapture

    class Spy:
        def __init__(self, *args):
            self.cap = real(*args)

        def set(self, *args):
            calls["set"] += 1
            return self.cap.set(*args)

        def retrieve(self, *args):
            calls["retrieve"] += 1
            return self.cap.retrieve(*args)

        def __getattr__(self, name):
            return getattr(self.cap, name)

    monkeypatch.setattr(cv2, "VideoCapture", Spy)
    return calls


def test_wanted_frames_are_the_full_read_at_those_indices(lossless, monkeypatch):
    """Any order, repeats once; decoded in one pass: never a seek, one retrieve() per wanted frame."""
    path, _ = lossless
    full = dict(read_frames(path))
    calls = _spy_captures(monkeypatch)
    rng = np.random.default_rng(5)
    wants = [rng.choice(12, size=rng.integers(1, 8), replace=True).tolist() for _ in range(3)]
    for want in wants:
        got = list(read_frames(path, want))
        assert [i for i, _ in got] == sorted(set(want))
        for i, image in got:
            np.testing.assert_array_equal(image, full[i])
    assert calls["set"] == 0 and calls["retrieve"] == sum(len(set(w)) for w in wants)
    got = list(read_frames(path, [11]))  # the last frame alone
    np.testing.assert_array_equal(got[0][1], full[11])
    assert list(read_frames(path, [])) == []


def test_wanted_frame_past_the_end(lossless):
    path, _ = lossless
    seen = []
    with pytest.raises(VideoError, match=r"clip.mkv: frame 12 is past the end of the video \(12 frames can be "
                       r"decoded, the file reports 12\)") as err:
        for i, _ in read_frames(path, [3, 12, 15]):
            seen.append(i)
    assert seen == [3] and err.value.frame == 12


@pytest.mark.parametrize("frames, message", [
    ([-1], r"frames\[0\] must be a non-negative integer .*got -1"),
    ([0, True], r"frames\[1\] must be a non-negative integer .*got True"),
    ([2.0], r"frames\[0\] must be .*got 2.0"),
    (["3"], r"frames\[0\] must be .*got '3'"),
])
def test_wanted_frames_refused(frames, message):
    with pytest.raises(ValueError, match=message):
        wanted_frames(frames)


def test_files_that_are_not_videos(tmp_path):
    from cnpose_trt.io.draw import save_image

    with pytest.raises(FileNotFoundError, match="video not found: .*nope.mp4"):
        video_info(tmp_path / "nope.mp4")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        next(read_frames(tmp_path))
    for name, data in (("text.mp4", b"hello\n" * 50), ("empty.avi", b""), ("noise.mkv", bytes(range(256)) * 40)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(VideoError, match=rf"{name} cannot be opened as a video"):
            video_info(tmp_path / name)
    save_image(tmp_path / "still.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(VideoError, match="still.png is an image, not a video"):
        next(read_frames(tmp_path / "still.png"))


def test_truncated_video(tmp_path, caplog):
    """A truncated avi still reports its full length: the frames that decode are read, the shortfall is
    logged, and a wanted frame beyond them is named."""
    path = tmp_path / "full.avi"
    make_synthetic_video(path, 20, seed=1, **SCENE)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert video_info(cut).frame_count == 20  # the container's claim
    with caplog.at_level(logging.WARNING, logger="cnpose_trt.io.video"):
        got = [i for i, _ in read_frames(cut)]
    assert 0 < len(got) < 20 and got == list(range(len(got)))
    assert f"decoding stopped after {len(got)} frames, the file reports 20" in caplog.text
    with pytest.raises(VideoError, match=rf"frame 19 is past the end of the video \({len(got)} frames can be decoded"):
        list(read_frames(cut, [0, 19]))


def test_writer_checks(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.mp4, \.avi, \.mkv, got '\.gif'"):
        VideoWriter(tmp_path / "x.gif")
    with pytest.raises(ValueError, match="codec must be a 4-character FourCC"):
        VideoWriter(tmp_path / "x.mp4", codec="h264x")
    with pytest.raises(ValueError, match="fps must be"):
        VideoWriter(tmp_path / "x.mp4", fps=0)
    with VideoWriter(tmp_path / "x.mkv", codec=LOSSLESS_CODEC) as w:
        w.write(np.zeros((40, 48, 3), np.uint8))
        with pytest.raises(ValueError, match="video frame 1 is 40x48, the video's frames are 48x40"):
            w.write(np.zeros((48, 40, 3), np.uint8))
        with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB array, got float32"):
            w.write(np.zeros((40, 48, 3), np.float32))
    assert w.frames_written == 1 and video_info(tmp_path / "x.mkv").frame_count == 1


# ---- detections per frame -------------------------------------------------------------------------


def _dets(tmp_path, doc, **kw):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(doc))
    return read_frame_boxes(path, **kw)


def _same(got, expected):
    assert sorted(got) == sorted(expected)
    for frame, boxes in expected.items():
        np.testing.assert_array_equal(got[frame], np.asarray(boxes, np.float64).reshape(-1, 4))


def test_detections_per_frame_form(tmp_path):
    got = _dets(tmp_path, {"3": [1, 2, 30, 40], "0": [[1.5, 2, 3, 4], [5, 6, 7, 8]], "7": []})
    _same(got, {0: [[1.5, 2, 3, 4], [5, 6, 7, 8]], 3: [[1, 2, 30, 40]], 7: []})
    assert list(got) == [0, 3, 7]


def test_detections_coco_video(tmp_path):
    rng = np.random.default_rng(0)
    boxes = rng.uniform(1, 100, (6, 4)).round(3).tolist()
    doc = {"categories": [{"id": 3, "name": "car"}, {"id": 9, "name": "person"}],
           "images": [{"id": 100, "video": "clips/a.mp4", "frame": 4}, {"id": 101, "video": "a.mp4", "frame": 0},
                      {"id": 200, "video": "b.mp4", "frame": 4}],
           "annotations": [
               {"id": 1, "image_id": 100, "category_id": 9, "bbox": boxes[0], "score": 0.9, "track_id": 5},
               {"id": 2, "image_id": 100, "category_id": 9, "bbox": boxes[1]},  # no score: kept
               {"id": 3, "image_id": 100, "category_id": 3, "bbox": boxes[2], "score": 0.99},  # a car
               {"id": 4, "image_id": 101, "category_id": 9, "bbox": boxes[3], "score": 0.2},  # below 0.5
               {"id": 5, "image_id": 200, "category_id": 9, "bbox": boxes[4], "score": 0.9}]}  # another video
    _same(_dets(tmp_path, doc, video="/data/a.mp4"), {4: [boxes[0], boxes[1]]})
    _same(_dets(tmp_path, doc, video="a.mp4", score_threshold=0.1), {4: [boxes[0], boxes[1]], 0: [boxes[3]]})
    _same(_dets(tmp_path, doc, video="b.mp4"), {4: [boxes[4]]})
    # images without 'frame' or 'video': the id is the frame; without 'images' image_id is
    plain = {"images": [{"id": 0}, {"id": 5}], "annotations": [{"image_id": 5, "bbox": boxes[5], "score": 1}]}
    _same(_dets(tmp_path, plain, video="x.mp4"), {5: [boxes[5]]})
    _same(_dets(tmp_path, {"annotations": plain["annotations"]}), {5: [boxes[5]]})
    listed = [{"video": "a.mp4", "frame": 2, "bbox": boxes[0], "score": 0.8},
              {"video": "b.mp4", "frame": 2, "bbox": boxes[1], "score": 0.8},
              {"image_id": 1, "bbox": boxes[2], "score": 0.8, "category_id": 1}]
    _same(_dets(tmp_path, listed, video="a.mp4"), {2: [boxes[0]], 1: [boxes[2]]})


@pytest.mark.parametrize("doc, message", [
    ("[1, 2", r"dets.json: not valid JSON"),
    ("42", r"dets.json: detections must be a JSON object .* got int"),
    ({"x": [1, 2, 3, 4]}, r"frame 'x': keys must be frame indices"),
    ({"-1": [1, 2, 3, 4]}, r"frame '-1': keys must be frame indices"),
    ({"2": [1, 2, 3, 4], "02": [1, 2, 3, 4]}, r"frame '02': frame 2 is listed again"),
    ({"2": "abc"}, r"frame '2': must be a box \[x, y, w, h\] or a list of them, got 'abc'"),
    ({"2": [[1, 2, 3, 4], [1, 2, 3]]}, r"frame '2', box 1: must be 4 numbers"),
    ({"2": [1, 2, 0, 4]}, r"frame '2', box 0: must be finite numbers \[x, y, w, h\] with w, h > 0"),
    ({"2": [1, 2, True, 4]}, r"frame '2', box 0: must be 4 numbers"),
    ([{"image_id": 1.5, "bbox": [1, 2, 3, 4]}], r"detection 0, field 'image_id': must be a frame index"),
    ([{"image_id": True, "bbox": [1, 2, 3, 4]}], r"detection 0, field 'image_id': must be a frame index"),
    ([{"bbox": [1, 2, 3, 4]}], r"detection 0, field 'image_id': missing"),
    ([{"image_id": 1}], r"detection 0, field 'bbox': missing"),
    ([{"image_id": 1, "bbox": [1, 2, 3, 4]}, "x"], r"detection 1: must be an object"),
    ([{"image_id": 1, "bbox": [1, 2, 3, 4], "score": "high"}], r"detection 0, field 'score': must be a number"),
    ([{"image_id": 1, "bbox": [1, 2, 3, 1e400]}], r"detection 0, field 'bbox': must be finite numbers"),
    ([{"video": 7, "frame": 1, "bbox": [1, 2, 3, 4]}], r"detection 0, field 'video': must be a video file name"),
    ({"annotations": {}}, r"field 'annotations': must be a list of detections"),
    ({"images": [{"id": 1}, {"id": 1}], "annotations": []}, r"images\[1\], field 'id': 1 is listed again"),
    ({"images": [{"id": 1, "frame": 0}, {"id": 2, "frame": 0}], "annotations": []},
     r"images\[1\], field 'frame': frame 0 is listed again \(first at images\[0\]\)"),
    ({"images": [{"id": "a"}], "annotations": []}, r"images\[0\], field 'id': must be a frame index"),
    ({"images": [{"frame": 1}], "annotations": []}, r"images\[0\]: needs an 'id'"),
    ({"images": [{"id": 1, "video": "b.mp4"}], "annotations": []}, r"no image is of video clip.mp4 .*b.mp4"),
    ({"images": [{"id": 1}], "annotations": [{"image_id": 2, "bbox": [1, 2, 3, 4]}]},
     r"annotations\[0\], field 'image_id': 2 matches no image"),
])
def test_detections_refused(tmp_path, doc, message):
    path = tmp_path / "dets.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(ManifestError, match=message):
        read_frame_boxes(path, video="clip.mp4")


def test_detections_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="detections file not found: .*none.json"):
        read_frame_boxes(tmp_path / "none.json")


# ---- predict VIDEO --------------------------------------------------------------------------------


def test_predict_video(xs_engine_path, lossless, tmp_path, capsys, monkeypatch):
    """Poses per frame equal PoseEstimator on the frames decoded separately (the scenes: the video is
    lossless); frames without boxes are counted, drawn as they are, and (without --draw) not decoded."""
    from cnpose_trt import PoseEstimator
    from cnpose_trt.io.draw import draw_poses

    path, scenes = lossless
    with_boxes = [0, 2, 3, 7, 11]
    images = [{"id": 50 + f, "video": path.name, "frame": f} for f in range(12)]
    anns = [{"image_id": 50 + f, "category_id": 1, "bbox": scenes[f].boxes[p].tolist(), "score": 0.9}
            for f in with_boxes for p in range(2)]
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps({"images": images, "annotations": anns}))
    out, drawn = tmp_path / "poses.json", tmp_path / "drawn.mkv"
    assert cli(["predict", str(path), "--boxes", str(dets), "--engine", str(xs_engine_path), "--output", str(out),
                "--draw", str(drawn)]) == 0
    doc = json.loads(out.read_text())
    assert (doc["frames"], doc["frames_with_people"], doc["frames_without_boxes"]) == (12, 5, 7)
    assert [(r["video"], r["frame"]) for r in doc["rows"]] == [("clip.mkv", f) for f in with_boxes]
    assert [r["time_s"] for r in doc["rows"]] == [f / 25 for f in with_boxes]
    est = PoseEstimator(xs_engine_path)
    expected = est.predict([scenes[f].image for f in with_boxes], [scenes[f].boxes for f in with_boxes])
    for row, ref in zip(doc["rows"], expected, strict=True):
        assert len(row["people"]) == 2
        got = np.array([[[j["x_px"], j["y_px"], j["depth_mm"]] for j in p["joints"].values()] for p in row["people"]])
        np.testing.assert_allclose(got, ref.image, rtol=0, atol=1e-3)
        np.testing.assert_allclose([p["bbox"] for p in row["people"]], ref.boxes)
    frames = [image for _, image in read_frames(drawn)]
    assert len(frames) == 12 and video_info(drawn).frame_count == 12
    refs = dict(zip(with_boxes, expected, strict=True))
    for f, image in enumerate(frames):
        want = draw_poses(scenes[f].image, refs[f].image, refs[f].boxes) if f in refs else scenes[f].image
        if f in refs:  # joints agree to 1e-3 px, so a rounded line end may move by a pixel
            assert _mae(image, want) < 0.05 and _mae(image, scenes[f].image) > 0.5
        else:
            np.testing.assert_array_equal(image, want)
    # without --draw: the same rows, the frames without boxes only grabbed past
    again = tmp_path / "again.json"
    calls = _spy_captures(monkeypatch)
    assert cli(["predict", str(path), "--boxes", str(dets), "--engine", str(xs_engine_path), "--output",
                str(again)]) == 0
    assert json.loads(again.read_text())["rows"] == doc["rows"]
    assert calls == {"set": 0, "retrieve": len(with_boxes)}
    capsys.readouterr()


def test_predict_video_same_box_every_frame_and_mp4_draw(xs_engine_path, tmp_path, capsys):
    path = tmp_path / "walk.avi"
    scenes = make_synthetic_video(path, 5, seed=2, codec=LOSSLESS_CODEC, width=160, height=160)
    box = ",".join(str(v) for v in scenes[0].boxes[0])
    out, drawn = tmp_path / "p.json", tmp_path / "drawn.mp4"
    assert cli(["predict", str(path), "--bbox", box, "--engine", str(xs_engine_path), "--output", str(out),
                "--draw", str(drawn)]) == 0
    doc = json.loads(out.read_text())
    assert [r["frame"] for r in doc["rows"]] == list(range(5)) and doc["frames_without_boxes"] == 0
    assert video_info(drawn).frame_count == 5 and len(list(read_frames(drawn))) == 5
    assert "predict [" in capsys.readouterr().err  # the progress line


@pytest.mark.parametrize("extra, dets, message", [
    ([], None, r"predict VIDEO needs the people's boxes: --boxes FILE"),
    (["--bbox", "1,2,3,4"], {"0": [1, 2, 3, 4]}, r"give one of --boxes FILE, --bbox or --crop-box"),
    (["--draw", "{tmp}/out.png"], {"0": [1, 2, 3, 4]}, r"--draw .*out.png: with a video, --draw names a video file "
     r"ending in .mp4, .avi, .mkv"),
    ([], {"12": [1, 2, 30, 40]}, r"--boxes .*dets.json: frame 12 is past the end of .*clip.mkv \(12 frames"),
    ([], {"1": [1, 2, 3]}, r"dets.json, frame '1', box 0: must be 4 numbers"),
    ([], {"1": [10, 10, 50, 60], "4": [-1e6, -1e6, 10, 10]},
     r"^error: clip.mkv frame 4 \(--boxes\): boxes\[0\] = .* lies outside the 192x160 image"),
])
def test_predict_video_errors(xs_engine_path, lossless, tmp_path, capsys, extra, dets, message):
    path, _ = lossless
    args = ["predict", str(path), "--engine", str(xs_engine_path), *(a.format(tmp=tmp_path) for a in extra)]
    if dets is not None:
        (tmp_path / "dets.json").write_text(json.dumps(dets))
        args += ["--boxes", str(tmp_path / "dets.json")]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err, re.M), err

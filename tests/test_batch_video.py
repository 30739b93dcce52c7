"""Video records in batch jobs (issue 24): manifest records naming a frame or a whole video with its
detections, frames decoded in one pass per video within the read-ahead window, `video`/`frame` columns,
a frame past the end as its error row, resume after SIGKILL with every frame once, mixed manifests.

The reference for every pose is PoseEstimator.predict_iter on the synthetic scenes the video was
written from (the lossless codec keeps them exact), not frames read back by the code under test."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from test_batch import _run_and_kill  # noqa: E402  (the image jobs' kill harness, reused as it is)

from cnpose_trt import batch  # noqa: E402
from cnpose_trt.batch import stream  # noqa: E402
from cnpose_trt.errors import ManifestError, VideoError  # noqa: E402
from cnpose_trt.io.draw import save_image  # noqa: E402
from cnpose_trt.io.video import LOSSLESS_CODEC, make_synthetic_video, read_frames  # noqa: E402
from cnpose_trt.pipeline.estimator import PoseEstimator  # noqa: E402

FRAMES = 14
K = [400.0, 410.0, 80.0, 64.0]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 14-frame lossless video of 0..2 people a frame, its detections (per-frame form, every third frame
    without people) and its scenes; plus two images."""
    folder = tmp_path_factory.mktemp("video_batch")
    scenes = make_synthetic_video(folder / "clip.mkv", FRAMES, seed=11, codec=LOSSLESS_CODEC, width=160, height=128,
                                  people=2)
    boxes = {i: s.boxes[: (i % 3)] for i, s in enumerate(scenes)}
    (folder / "dets.json").write_text(json.dumps({str(i): b.tolist() for i, b in boxes.items() if len(b)}))
    for n in range(2):
        save_image(folder / f"img{n}.png", scenes[n + 3].image[::-1].copy())
    return folder, scenes, boxes


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _reference(engine, items):
    """{(key, person): row} from predict_iter over (key, item) pairs: the rows a job must produce."""
    rows = {}
    results = PoseEstimator(engine).predict_iter([item for _, item in items])
    for (key, _), res in zip(items, results, strict=True):
        for p in range(len(res)):
            rows[(key, p)] = {"box": res.boxes[p], "joints": res.image[p], "confidence": res.confidence[p],
                              "crop_box": res.crop_boxes[p], "camera": None if res.camera is None else res.camera[p]}
    return rows


def _rows(out):
    keyed = {}
    for row in batch.read_results(out).to_pylist():
        key = (row["image"], row["person"])
        assert key not in keyed, f"row {key} appears twice"
        keyed[key] = row
    return keyed


def _listed(out):
    """Every key the committed parts' footers list (frames without people included)."""
    return sorted(sum((json.loads(pq.read_schema(p).metadata[batch.META_KEY])["images"]
                       for p in sorted(out.glob("part-*.parquet"))), []))


def _assert_poses(got, ref):
    assert set(got) == set(ref)
    for key, r in ref.items():
        g = got[key]
        assert g["error"] is None, (key, g["error"])
        np.testing.assert_array_equal(g["box"], r["box"])
        np.testing.assert_array_equal(g["crop_box"], r["crop_box"])
        np.testing.assert_allclose(np.asarray(g["joints"], np.float64), r["joints"], rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(np.asarray(g["confidence"], np.float64), r["confidence"], rtol=1e-6, atol=1e-7)
        if r["camera"] is None:
            assert g["camera"] is None
        else:
            np.testing.assert_allclose(np.asarray(g["camera"], np.float64), r["camera"], rtol=1e-6, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Manifests


def test_video_records_in_jsonl_csv_and_parquet(clip, tmp_path):
    folder, scenes, boxes = clip
    box = scenes[5].boxes.tolist()
    records = [{"image": "img0.png", "boxes": box},
               {"video": "clip.mkv", "frame": 5, "boxes": box, "root_depth": 4000.0, "intrinsics": K},
               {"video": "clip.mkv", "detections": "dets.json", "root_depth": 5000, "intrinsics": K}]
    got = list(batch.read_manifest(_jsonl(tmp_path / "m.jsonl", records), image_root=folder))
    assert [e.key for e in got] == ["img0.png", "clip.mkv#5"] + [f"clip.mkv#{i}" for i in range(FRAMES)]
    assert [(e.video, e.frame) for e in got] == [(None, None), ("clip.mkv", 5)] + [("clip.mkv", i)
                                                                                  for i in range(FRAMES)]
    assert got[1].path == str(folder / "clip.mkv") and got[1].where.endswith("m.jsonl, line 2")
    for e in got[2:]:  # every frame, its people from the detections file, or none
        np.testing.assert_array_equal(e.boxes, boxes[e.frame].reshape(-1, 4))
        assert float(e.root_depth) == 5000.0 and e.intrinsics.tolist() == K
    # The same records as CSV (numbers as JSON in the cells) and Parquet rows
    cell = json.dumps(box)
    (tmp_path / "m.csv").write_text(f'image,video,frame,boxes\nimg0.png,,,"{cell}"\n,clip.mkv,5,"{cell}"\n'
                                    ",clip.mkv,12,[]\n")
    csv = list(batch.read_manifest(tmp_path / "m.csv", image_root=folder))
    assert [(e.key, e.video, e.frame, e.people) for e in csv] == [("img0.png", None, None, 2),
                                                                  ("clip.mkv#5", "clip.mkv", 5, 2),
                                                                  ("clip.mkv#12", "clip.mkv", 12, 0)]
    pq.write_table(pa.table({"image": [None, "img0.png"], "video": ["clip.mkv", None], "frame": [7, None],
                             "boxes": [json.dumps(box), json.dumps(box)]}), tmp_path / "m.parquet")
    par = list(batch.read_manifest(tmp_path / "m.parquet", image_root=folder))
    assert [(e.key, e.frame) for e in par] == [("clip.mkv#7", 7), ("img0.png", None)]
    # A frame's record hash is its video and frame, not the key: an image named like a frame hashes apart
    assert got[1].record_hash() != batch.Entry("clip.mkv#5", "x", "w", boxes=got[1].boxes,
                                               root_depth=got[1].root_depth, intrinsics=got[1].intrinsics).record_hash()
    again = batch.Entry.from_json(got[1].to_json())
    assert (again.key, again.video, again.frame, again.record_hash()) == ("clip.mkv#5", "clip.mkv", 5,
                                                                          got[1].record_hash())


@pytest.mark.parametrize("record, field, message", [
    ({"image": "img0.png", "video": "clip.mkv", "frame": 1, "boxes": []}, "video", "not both"),
    ({"video": "clip.mkv", "frame": -1, "boxes": []}, "frame", "integer >= 0"),
    ({"video": "clip.mkv", "frame": 1.5, "boxes": []}, "frame", "integer >= 0"),
    ({"video": "clip.mkv", "frame": "3", "boxes": []}, "frame", "integer >= 0"),
    ({"video": "clip.mkv", "frame": True, "boxes": []}, "frame", "integer >= 0"),
    ({"video": "clip.mkv", "boxes": []}, "frame", "missing"),
    ({"image": "img0.png", "frame": 2, "boxes": []}, "frame", "give 'video'"),
    ({"video": "nope.mp4", "frame": 2, "boxes": []}, "video", "no such video file"),
    ({"video": 3, "frame": 2, "boxes": []}, "video", "must be a video path"),
    ({"video": "clip.mkv", "detections": "nope.json"}, "detections", "no such detections file"),
    ({"video": "nope.mp4", "detections": "dets.json"}, "video", "no such video file"),
    ({"image": "img0.png", "detections": "dets.json"}, "image", "not with 'detections'"),
    ({"video": "clip.mkv", "detections": "dets.json", "boxes": []}, "boxes", "not with 'detections'"),
    ({"video": "clip.mkv", "detections": "dets.json", "frame": 1}, "frame", "not with 'detections'"),
    ({"video": "clip.mkv", "detections": "dets.json", "root_depth": [1, 2]}, "root_depth", "one number"),
    ({"video": "clip.mkv", "detections": "dets.json", "root_depth": 9, "intrinsics": [[1, 2, 3, 4]]}, "intrinsics",
     "one \\[fx, fy, cx, cy\\]"),
    ({"video": "clip.mkv", "detections": "bad.json"}, "detections", r"bad\.json, frame '2', box 0: must be finite"),
    ({"video": "img0.png", "detections": "dets.json"}, "video", "is an image, not a video"),
])
def test_bad_video_records_name_file_line_and_field(clip, tmp_path, record, field, message):
    folder, _, _ = clip
    (folder / "bad.json").write_text(json.dumps({"1": [1, 2, 3, 4], "2": [1, 2, 0, 4]}))
    manifest = _jsonl(tmp_path / "m.jsonl", [{"image": "img1.png", "boxes": []}, record])
    with pytest.raises(ManifestError, match=rf"m\.jsonl, line 2, field '{field}': .*{message}"):
        list(batch.read_manifest(manifest, image_root=folder))


def test_bad_frame_in_csv_names_line_and_field(clip, tmp_path):
    folder, _, _ = clip
    (tmp_path / "m.csv").write_text("video,frame,boxes\nclip.mkv,1,[]\nclip.mkv,1.5,[]\n")
    with pytest.raises(ManifestError, match=r"m\.csv, line 3, field 'frame': must be a frame index"):
        list(batch.read_manifest(tmp_path / "m.csv", image_root=folder))


def test_a_frame_listed_twice_is_refused(clip, tmp_path, xs_engine_path):
    folder, _, _ = clip
    manifest = _jsonl(tmp_path / "m.jsonl", [{"video": "clip.mkv", "detections": "dets.json"},
                                             {"video": "clip.mkv", "frame": 4, "boxes": []}])
    with pytest.raises(ManifestError, match=r"line 2, field 'frame': 'clip\.mkv#4' is listed again \(first at "
                                            r".*line 1 \(frame 4\)\)"):
        batch.run(manifest, tmp_path / "out", engine=xs_engine_path, image_root=folder, progress=False)


# ---------------------------------------------------------------------------------------------
# Jobs


def test_mixed_job_equals_predict_iter(clip, tmp_path, xs_engine, xs_engine_path):
    folder, scenes, boxes = clip
    extra = scenes[6].boxes
    records = [{"image": "img0.png", "boxes": scenes[3].boxes.tolist()},
               {"video": "clip.mkv", "detections": "dets.json"},
               {"image": "img1.png", "crop_boxes": [[10, 12, 60, 60]], "root_depth": 4200.0, "intrinsics": K},
               # one frame on its own (named by its absolute path: another key), with camera coordinates
               {"video": str(folder / "clip.mkv"), "frame": 6, "boxes": extra.tolist(),
                "root_depth": [4100.0, 4700.0], "intrinsics": K}]
    manifest = _jsonl(tmp_path / "m.jsonl", records)
    out = tmp_path / "out"
    summary = batch.run(manifest, out, engine=xs_engine_path, image_root=folder, part_images=5, readers=2,
                        progress=False)
    images = [folder / "img0.png", folder / "img1.png"]
    items = [("img0.png", {"image": _png(images[0]), "boxes": scenes[3].boxes})]
    items += [(f"clip.mkv#{i}", {"image": scenes[i].image, "boxes": boxes[i].reshape(-1, 4)}) for i in range(FRAMES)]
    items += [("img1.png", {"image": _png(images[1]), "crop_boxes": np.array([[10.0, 12, 60, 60]]),
                            "root_depth": 4200.0, "intrinsics": K}),
              (f"{folder / 'clip.mkv'}#6", {"image": scenes[6].image, "boxes": extra,
                                            "root_depth": np.array([4100.0, 4700.0]), "intrinsics": K})]
    ref = _reference(xs_engine, items)
    got = _rows(out)
    _assert_poses(got, ref)
    assert summary.images == len(items) == len(_listed(out)) and summary.errors == 0
    for (key, _), row in got.items():
        if key.startswith("img"):
            assert row["video"] is None and row["frame"] is None
        else:
            assert row["video"] == key.rsplit("#", 1)[0] and row["frame"] == int(key.rsplit("#", 1)[1])
    assert sorted(_listed(out)) == sorted(k for k, _ in items)  # frames without people are done too
    assert {got[(f"clip.mkv#{i}", 0)]["frame"] for i in range(FRAMES) if len(boxes[i])} == \
        {i for i in range(FRAMES) if len(boxes[i])}


def _png(path):
    from cnpose_trt.io.preprocess import load_image

    return load_image(path)


def test_frame_past_the_end_is_its_error_row(clip, tmp_path, xs_engine, xs_engine_path):
    folder, scenes, _ = clip
    box = scenes[2].boxes.tolist()
    manifest = _jsonl(tmp_path / "m.jsonl", [{"video": "clip.mkv", "frame": f, "boxes": box}
                                             for f in (FRAMES + 5, 2, FRAMES, FRAMES - 1)])
    out = tmp_path / "out"
    summary = batch.run(manifest, out, engine=xs_engine_path, image_root=folder, progress=False)
    rows = _rows(out)
    for f in (FRAMES, FRAMES + 5):  # each past-the-end frame its own error, naming its frame; the job went on
        assert rows[(f"clip.mkv#{f}", None)]["error"] == (f"{folder / 'clip.mkv'}: frame {f} is past the end of "
                                                          f"the video ({FRAMES} frames can be decoded)")
        assert rows[(f"clip.mkv#{f}", None)]["frame"] == f
    ref = _reference(xs_engine, [(f"clip.mkv#{f}", {"image": scenes[f].image, "boxes": scenes[2].boxes})
                                 for f in (2, FRAMES - 1)])
    _assert_poses({k: v for k, v in rows.items() if v["error"] is None}, ref)
    assert summary.errors == 2 and summary.images == 4
    with pytest.raises(VideoError) as info:  # the reader's own report of where the video ends
        list(read_frames(folder / "clip.mkv", [3, FRAMES + 2]))
    assert (info.value.frame, info.value.end) == (FRAMES + 2, FRAMES)


class _Counting:
    """read_frames as the stream calls it, recording each pass's frames and the frames decoded."""

    def __init__(self, fail_at=None):
        self.passes, self.decoded, self.fail_at = [], 0, fail_at
        self.lock = threading.Lock()

    def __call__(self, path, frames):
        frames = list(frames)
        self.passes.append(frames)
        for index, image in read_frames(path, frames):
            if index == self.fail_at:
                self.fail_at = None
                raise VideoError(f"{path}: frame {index} cannot be decoded", frame=index)
            with self.lock:
                self.decoded += 1
            yield index, image


def test_one_sequential_pass_per_video_within_the_window(clip, tmp_path, monkeypatch):
    folder, scenes, _ = clip
    counting = _Counting()
    monkeypatch.setattr(stream, "read_frames", counting)
    order = [9, 1, 4, 12, 0, 7, 3, 10, 2, 13, 5]  # consecutive records of one video, out of order
    entries = [batch.Entry(f"clip.mkv#{f}", str(folder / "clip.mkv"), "t", boxes=np.zeros((0, 4)),
                           video="clip.mkv", frame=f) for f in order]
    window = 3
    from concurrent.futures import ThreadPoolExecutor

    got = []
    with ThreadPoolExecutor(3) as pool:
        for loaded in stream.read_ahead(pool, entries, window):
            # frames decoded and not yet consumed (this one included): never more than the window
            assert counting.decoded - len(got) <= window
            got.append(loaded)
    assert counting.passes == [sorted(order)]  # one pass, the wanted frames sorted
    assert [g.entry.frame for g in got] == sorted(order)
    for g in got:
        np.testing.assert_array_equal(g.image, scenes[g.entry.frame].image)


def test_a_frame_that_cannot_be_decoded_is_its_error_and_the_rest_are_read(clip, monkeypatch):
    folder, scenes, _ = clip
    counting = _Counting(fail_at=4)
    monkeypatch.setattr(stream, "read_frames", counting)
    entries = [batch.Entry(f"clip.mkv#{f}", str(folder / "clip.mkv"), "t", boxes=np.zeros((0, 4)),
                           video="clip.mkv", frame=f) for f in (1, 4, 6, 8)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        got = list(stream.read_ahead(pool, entries, 4))
    assert [g.error for g in got] == [None, f"{folder / 'clip.mkv'}: frame 4 cannot be decoded", None, None]
    assert counting.passes == [[1, 4, 6, 8], [6, 8]]  # the pass starts again after the failed frame
    for g in (got[0], got[2], got[3]):
        np.testing.assert_array_equal(g.image, scenes[g.entry.frame].image)


def test_killed_video_job_resumes_with_every_frame_once(clip, tmp_path, xs_engine_path):
    folder, _, _ = clip
    manifest = _jsonl(folder / "kill.jsonl", [{"video": "clip.mkv", "detections": "dets.json"}])
    ref_out = tmp_path / "ref"
    batch.run(manifest, ref_out, engine=xs_engine_path, progress=False)
    out = tmp_path / "out"
    temp = _run_and_kill(tmp_path, "during", 2, manifest, out, xs_engine_path)
    assert temp.exists() and len(list(out.glob("part-*.parquet"))) == 1
    _run_and_kill(tmp_path, "after", 3, manifest, out, xs_engine_path)
    assert not temp.exists() and len(list(out.glob("part-*.parquet"))) == 4
    summary = batch.run(manifest, out, engine=xs_engine_path, progress=False)
    assert summary.skipped == 4 and summary.images == FRAMES
    assert _listed(out) == sorted(f"clip.mkv#{i}" for i in range(FRAMES))  # every frame exactly once
    got, ref = _rows(out), _rows(ref_out)
    assert set(got) == set(ref) and len(ref) == sum(i % 3 for i in range(FRAMES))
    for key in ref:
        assert got[key] == ref[key], key


def test_parts_written_before_video_columns_read_back_with_nulls(clip, tmp_path, xs_engine_path):
    folder, scenes, _ = clip
    manifest = _jsonl(tmp_path / "m.jsonl", [{"image": str(folder / "img0.png"), "boxes": scenes[3].boxes.tolist()},
                                             {"video": str(folder / "clip.mkv"), "frame": 1,
                                              "boxes": scenes[1].boxes.tolist()}])
    out = tmp_path / "out"
    batch.run(manifest, out, engine=xs_engine_path, part_images=1, progress=False)
    first = sorted(out.glob("part-*.parquet"))[0]
    table = pq.read_table(first)
    old = table.drop_columns(["video", "frame"]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(old, first)
    rows = batch.read_results(out).to_pylist()
    assert [(r["image"].rsplit("/", 1)[-1], r["video"] is None, r["frame"]) for r in rows] == [
        ("img0.png", True, None), ("img0.png", True, None), ("clip.mkv#1", False, 1), ("clip.mkv#1", False, 1)]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_video_records_on_ray_equal_the_local_run(clip, tmp_path, xs_engine_path):
    pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    folder, scenes, _ = clip
    manifest = _jsonl(tmp_path / "m.jsonl", [{"video": str(folder / "clip.mkv"), "detections": str(folder / "dets.json")},
                                             {"image": str(folder / "img1.png"), "boxes": scenes[4].boxes.tolist()},
                                             {"video": str(folder / "clip.mkv"), "frame": FRAMES + 1, "boxes": []}])
    local = batch.run(manifest, tmp_path / "local", engine=xs_engine_path, progress=False)
    # a Ray session of its own (started and shut down by the job); batches of 4 split the video's frames
    remote = batch.run(manifest, tmp_path / "ray", engine=xs_engine_path, ray=True, ray_actors=1, ray_batch_size=4,
                       progress=False)
    assert remote.mode.startswith("ray") and (remote.images, remote.people, remote.errors) == \
        (local.images, local.people, local.errors) == (FRAMES + 2, sum(i % 3 for i in range(FRAMES)) + 2, 1)
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")


def test_one_video_named_two_ways_gives_each_record_its_frame(clip, tmp_path, xs_engine_path):
    """Consecutive records naming one video as a relative and as an absolute path are two keys of one file: the
    frame both want is decoded once and given to each (it was a spurious 'reader ended early' error row)."""
    folder, scenes, _ = clip
    records = [{"video": "clip.mkv", "frame": 3, "boxes": scenes[3].boxes.tolist()},
               {"video": str(folder / "clip.mkv"), "frame": 3, "boxes": scenes[3].boxes.tolist()},
               {"video": "clip.mkv", "frame": 5, "boxes": scenes[5].boxes.tolist()}]
    manifest = _jsonl(folder / "twice.jsonl", records)
    out = tmp_path / "out"
    summary = batch.run(manifest, out, engine=xs_engine_path, progress=False)
    assert summary.errors == 0, [r["error"] for r in batch.read_results(out).to_pylist()]
    rows = _rows(out)
    want = _reference(xs_engine_path, [("f3", {"image": scenes[3].image, "boxes": scenes[3].boxes}),
                                        ("f5", {"image": scenes[5].image, "boxes": scenes[5].boxes})])
    for key, ref in (("clip.mkv#3", "f3"), (f"{folder / 'clip.mkv'}#3", "f3"), ("clip.mkv#5", "f5")):
        for p in range(len(scenes[int(key[-1])].boxes)):
            np.testing.assert_allclose(rows[(key, p)]["joints"], want[(ref, p)]["joints"], rtol=0, atol=1e-3)

"""Batch jobs (cnpose_trt.batch; its command line, cnpose_trt.cli.batch): manifests, results equal to
PoseEstimator's, error rows, resume after SIGKILL (between and during part writes), the folder lock,
and the same job on a local Ray cluster."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import signal_swallowed

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from cnpose_trt import batch  # noqa: E402
from cnpose_trt.batch import job as batch_job  # noqa: E402
from cnpose_trt.cli import batch as batch_cli  # noqa: E402
from cnpose_trt.io.draw import demo_image, save_image  # noqa: E402
from cnpose_trt.io.preprocess import load_image  # noqa: E402
from cnpose_trt.pipeline.estimator import PoseEstimator  # noqa: E402

K = [900.0, 910.0, 320.0, 240.0]


def _scene_records(folder: Path, n: int = 6, seed: int = 0) -> list[dict]:
    """n generated images (PNG and JPEG) with 0..3 people each; some with root depth and
    intrinsics, some with crop boxes; records in the manifest's JSON form."""
    rng = np.random.default_rng(seed)
    base, box = demo_image()
    records = []
    for i in range(n):
        h, w = int(rng.integers(240, 480)), int(rng.integers(320, 640))
        img = np.ascontiguousarray(np.roll(base, int(rng.integers(-150, 150)), axis=1)[:h, :w])
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        save_image(folder / name, img)
        people = i % 4
        boxes = np.column_stack([rng.uniform(0, w * 0.5, people), rng.uniform(0, h * 0.5, people),
                                 rng.uniform(40, w * 0.5, people), rng.uniform(40, h * 0.5, people)]).tolist()
        rec: dict = {"image": name}
        if i == 3:
            rec["crop_boxes"] = [[b[0], b[1], b[2], b[2]] for b in boxes]
        else:
            rec["boxes"] = boxes
        if i in (1, 3):
            rec["root_depth"] = [float(v) for v in rng.uniform(3000, 6000, people)]
            rec["intrinsics"] = K
        if i == 5:
            rec["root_depth"] = 4500.0
        records.append(rec)
    return records


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _reference(engine, folder: Path, records: list[dict], flip: bool) -> dict[tuple[str, int], dict]:
    """PoseEstimator.predict on each image on its own: the rows the batch job must produce."""
    est = PoseEstimator(engine)
    rows = {}
    for rec in records:
        key = "crop_boxes" if "crop_boxes" in rec else "boxes"
        image = load_image(folder / rec["image"])
        res = est.predict(image, **{key: np.asarray(rec[key], np.float64).reshape(-1, 4)},
                          root_depth=rec.get("root_depth"), intrinsics=rec.get("intrinsics"), flip=flip)
        for p in range(len(res)):
            rows[(rec["image"], p)] = {"box": res.boxes[p], "crop_box": res.crop_boxes[p], "joints": res.image[p],
                                       "confidence": res.confidence[p],
                                       "camera": None if res.camera is None else res.camera[p]}
    return rows


def _rows(out: Path) -> dict[tuple[str, int | None], dict]:
    table = batch.read_results(out).to_pylist()
    keyed = {}
    for row in table:
        key = (row["image"], row["person"])
        assert key not in keyed, f"row {key} appears twice"
        keyed[key] = row
    return keyed


def _assert_rows_equal(got: dict, ref: dict) -> None:
    assert set(got) == set(ref)
    for key, r in ref.items():
        g = got[key]
        assert g["error"] is None
        np.testing.assert_array_equal(g["box"], r["box"])
        np.testing.assert_array_equal(g["crop_box"], r["crop_box"])
        # The batch stores the decode's float32 output; the reference holds the same values as float64.
        np.testing.assert_allclose(np.asarray(g["joints"], np.float64), r["joints"], rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(np.asarray(g["confidence"], np.float64), r["confidence"], rtol=1e-6, atol=1e-7)
        if r["camera"] is None:
            assert g["camera"] is None
        else:
            np.testing.assert_allclose(np.asarray(g["camera"], np.float64), r["camera"], rtol=1e-6, atol=1e-3)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch_scenes")
    records = _scene_records(folder)
    return folder, records, _write_jsonl(folder / "manifest.jsonl", records)


@pytest.mark.parametrize("flip", [False, True])
def test_local_run_equals_pose_estimator(scenes, xs_engine, xs_engine_path, tmp_path, flip):
    folder, records, manifest = scenes
    out = tmp_path / "out"
    summary = batch.run(manifest, out, engine=xs_engine_path, flip=flip, part_images=2, readers=2, progress=False)
    ref = _reference(xs_engine, folder, records, flip)
    got = _rows(out)
    _assert_rows_equal(got, ref)
    people = sum(len(r.get("boxes", r.get("crop_boxes"))) for r in records)
    assert summary.this_run_images == summary.images == len(records) and summary.people == people == len(ref)
    assert summary.errors == 0 and summary.skipped == 0 and summary.parts == 3  # 6 images, 2 per part
    assert json.loads((out / batch.SUMMARY_FILE).read_text())["people"] == people
    engine_name = Path(xs_engine.path).name
    assert {r["engine"] for r in got.values()} == {engine_name}
    # root_depth and camera columns follow the manifest: absolute depth only where it was given
    for (image, person), row in got.items():
        rec = next(r for r in records if r["image"] == image)
        want = rec.get("root_depth")
        want = want[person] if isinstance(want, list) else want
        assert row["root_depth"] == want
        assert (row["camera"] is not None) == ("intrinsics" in rec)
    # an image without people is done (listed in its part) but has no rows
    assert "img0.jpg" not in {k[0] for k in got}
    listed = [json.loads(pq.read_schema(p).metadata[batch.META_KEY])["images"] for p in sorted(out.glob("part-*"))]
    assert sorted(sum(listed, [])) == sorted(r["image"] for r in records)


def test_rerun_skips_done_images(scenes, xs_engine_path, tmp_path):
    _, records, manifest = scenes
    out = tmp_path / "out"
    batch.run(manifest, out, engine=xs_engine_path, part_images=4, progress=False)
    before = batch.read_results(out)
    again = batch.run(manifest, out, engine=xs_engine_path, part_images=4, progress=False)
    assert again.this_run_images == 0 and again.skipped == len(records) and again.images == len(records)
    assert batch.read_results(out).equals(before)
    # another engine or the flip test would mix two jobs' results in one folder: refused
    with pytest.raises(batch.BatchError, match="another job"):
        batch.run(manifest, out, engine=xs_engine_path, flip=True, progress=False)


def _listed(out: Path) -> list[str]:
    """The images the committed parts list (each part's footer), all parts together."""
    return sum((json.loads(pq.read_schema(p).metadata[batch.META_KEY])["images"] for p in sorted(out.glob("part-*"))),
               [])


def test_changed_records_are_refused_then_redone(scenes, xs_engine, xs_engine_path, tmp_path, monkeypatch):
    folder, records, _ = scenes
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{**r, "image": str(folder / r["image"])} for r in records])
    out = tmp_path / "out"
    batch.run(manifest, out, engine=xs_engine_path, part_images=2, progress=False)
    edited = [dict(r, image=str(folder / r["image"])) for r in records]
    edited[1]["boxes"] = [[b[0] + 7, b[1], b[2], b[3]] for b in edited[1]["boxes"]]
    edited[5]["root_depth"] = 5200.0
    _write_jsonl(manifest, edited)
    with pytest.raises(batch.BatchError, match=r"line 2: the record of '.*img1\.png' changed since its poses were "
                       r"computed .*2 images in all\): rerun with --redo-changed"):
        batch.run(manifest, out, engine=xs_engine_path, part_images=2, progress=False)
    # --redo-changed, killed (in effect) after the new parts were committed, before the old rows were dropped:
    # read_results already shows each image once, with its new rows
    monkeypatch.setattr(batch_job, "drop_superseded", lambda out: 0)
    summary = batch.run(manifest, out, engine=xs_engine_path, part_images=2, redo_changed=True, progress=False)
    assert summary.this_run_images == summary.redone == 2 and summary.skipped == 4 and summary.images == 6
    assert sorted(_listed(out)) != sorted(r["image"] for r in edited)  # the old parts still list them
    ref = _reference(xs_engine, folder, [dict(r, image=Path(r["image"]).name) for r in edited], False)
    ref = {(str(folder / k[0]), k[1]): v for k, v in ref.items()}
    _assert_rows_equal(_rows(out), ref)
    monkeypatch.undo()
    again = batch.run(manifest, out, engine=xs_engine_path, progress=False)  # finishes the clean-up, nothing to do
    assert again.this_run_images == 0 and again.skipped == 6 and again.redone == 0
    assert sorted(_listed(out)) == sorted(r["image"] for r in edited)  # every image in exactly one part
    assert again.people == len(ref) and again.images == 6
    _assert_rows_equal(_rows(out), ref)
    table = pq.read_table(out)  # what pandas.read_parquet(out) sees: no stale row left
    assert table.num_rows == batch.read_results(out).num_rows


def test_parts_without_record_hashes_still_resume(scenes, xs_engine_path, tmp_path):
    """Folders written before records were hashed resume; their images are kept unchecked (said)."""
    _, records, manifest = scenes
    out = tmp_path / "out"
    batch.run(manifest, out, engine=xs_engine_path, part_images=4, progress=False)
    first = sorted(out.glob("part-*"))[0]
    table = pq.read_table(first)
    doc = json.loads(table.schema.metadata[batch.META_KEY])
    del doc["records"]
    pq.write_table(table.replace_schema_metadata({batch.META_KEY: json.dumps(doc).encode()}), first)
    said = []
    summary = batch.run(manifest, out, engine=xs_engine_path, progress=False, say=said.append)
    assert summary.this_run_images == 0 and summary.skipped == len(records)
    assert any(m.startswith("4 done images are in parts written before records were hashed") for m in said)


def test_retry_errors_redoes_failed_images(tmp_path, xs_engine, xs_engine_path, capsys):
    base, box = demo_image()
    save_image(tmp_path / "good.png", base)
    records = [{"image": "good.png", "boxes": [list(box)]}, {"image": "late.png", "boxes": [list(box), [5, 5, 90, 80]]},
               {"image": "bad.png", "boxes": [[1, 1, 0, 0]]}]  # bad: its one row is an error (an empty box)
    save_image(tmp_path / "bad.png", base)
    manifest = _write_jsonl(tmp_path / "m.jsonl", records)
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    batch_cli.add_batch_arguments(parser)
    argv = [str(manifest), "--out", str(out), "--engine", str(xs_engine_path), "--no-progress", "--part-images", "2"]
    assert batch_cli.run_batch(parser.parse_args(argv)) == 0
    assert "rerun with --retry-errors to redo the images whose rows are all errors" in capsys.readouterr().out
    save_image(tmp_path / "late.png", base)  # the missing file is there now
    assert batch.run(manifest, out, engine=xs_engine_path, progress=False).this_run_images == 0  # not without it
    assert batch_cli.run_batch(parser.parse_args(argv + ["--retry-errors"])) == 0
    summary = json.loads((out / batch.SUMMARY_FILE).read_text())
    assert summary["this_run_images"] == summary["redone"] == 2 and summary["skipped"] == 1  # late.png, bad.png
    rows = _rows(out)
    assert set(rows) == {("good.png", 0), ("late.png", 0), ("late.png", 1), ("bad.png", 0)}
    assert rows[("late.png", 0)]["error"] is None and rows[("bad.png", 0)]["error"] is not None
    ref = PoseEstimator(xs_engine).predict(base, np.asarray([box, [5, 5, 90, 80]], np.float64))
    for p in (0, 1):
        np.testing.assert_allclose(np.asarray(rows[("late.png", p)]["joints"], np.float64), ref.image[p], rtol=1e-6,
                                   atol=1e-4)
    assert sorted(_listed(out)) == ["bad.png", "good.png", "late.png"]
    assert summary["images"] == 3 and summary["people"] == 3 and summary["errors"] == 1
    again = batch.run(manifest, out, engine=xs_engine_path, retry_errors=True, progress=False)
    assert again.this_run_images == again.redone == 1  # bad.png's box is still empty: redone, still an error
    assert sorted(_listed(out)) == ["bad.png", "good.png", "late.png"] and again.errors == 1


def test_parts_are_committed_by_time_too(scenes, xs_engine_path, tmp_path):
    _, records, manifest = scenes
    out = tmp_path / "out"
    assert batch.read_results(tmp_path).num_rows == 0  # no parts yet: an empty table of the output schema
    summary = batch.run(manifest, out, engine=xs_engine_path, part_images=1000, part_seconds=1e-6, progress=False)
    assert summary.parts == len(records) == len(list(out.glob("part-*.parquet")))


def test_error_rows_and_the_job_goes_on(tmp_path, xs_engine, xs_engine_path):
    base, box = demo_image()
    save_image(tmp_path / "good.png", base)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))  # a PNG signature, then noise
    good = tmp_path / "good.png"
    (tmp_path / "truncated.jpg").write_bytes(save_image(tmp_path / "t.jpg", base).read_bytes()[:300])
    records = [
        {"image": "corrupt.png", "boxes": [list(box)]},
        {"image": "good.png", "boxes": [list(box), [10, 10, 0, 50], [100, 80, 120, 200], [700, 10, 50, 50]]},
        {"image": "missing.png", "boxes": [list(box)]},
        {"image": "truncated.jpg", "boxes": [list(box)]},
        {"image": "neg.png", "boxes": [list(box), [20, 20, 100, 100]], "root_depth": [-5.0, 4000.0]},
        {"image": "nan.png", "crop_boxes": [[float("nan"), 0, 100, 100], [0, 0, 100, -3]]},
    ]
    for name in ("neg.png", "nan.png"):
        (tmp_path / name).write_bytes(good.read_bytes())
    manifest = _write_jsonl(tmp_path / "m.jsonl", records)
    summary = batch.run(manifest, tmp_path / "out", engine=xs_engine_path, part_images=2, progress=False)
    rows = _rows(tmp_path / "out")
    errors = {k: r["error"] for k, r in rows.items() if r["error"] is not None}
    assert set(errors) == {("corrupt.png", None), ("good.png", 1), ("good.png", 3), ("missing.png", None),
                           ("truncated.jpg", None), ("neg.png", 0), ("nan.png", 0), ("nan.png", 1)}
    assert "not an image file OpenCV can decode" in errors[("corrupt.png", None)]
    assert "image not found" in errors[("missing.png", None)]
    assert "boxes[1] is empty" in errors[("good.png", 1)]
    assert "boxes[3]" in errors[("good.png", 3)] and "outside" in errors[("good.png", 3)]
    assert "root_depth" in errors[("neg.png", 0)]
    assert "finite" in errors[("nan.png", 0)] and "crop_boxes[1]" in errors[("nan.png", 1)]
    # an error row keeps the person's box as given; the whole-image ones have none
    assert rows[("good.png", 1)]["box"] == [10, 10, 0, 50] and rows[("corrupt.png", None)]["box"] is None
    assert all(rows[k]["joints"] is None and rows[k]["engine"] is None for k in errors)
    # the good people of the same images are there, equal to PoseEstimator's on those boxes
    est = PoseEstimator(xs_engine)
    ref = est.predict(base, np.asarray([box, [100, 80, 120, 200]], np.float64))
    for n, person in enumerate((0, 2)):
        np.testing.assert_allclose(np.asarray(rows[("good.png", person)]["joints"], np.float64), ref.image[n],
                                   rtol=1e-6, atol=1e-4)
    ref = est.predict(base, np.asarray([[20, 20, 100, 100]], np.float64), root_depth=[4000.0])
    np.testing.assert_allclose(np.asarray(rows[("neg.png", 1)]["joints"], np.float64), ref.image[0], rtol=1e-6,
                               atol=1e-3)
    assert summary.images == 6 and summary.errors == len(errors) and summary.people == 3


def test_a_bad_box_is_that_persons_error_row_only(tmp_path, xs_engine, xs_engine_path):
    """A crop box too large for any image, one 1e-300 px wide, boxes wholly outside the image (crop
    and person boxes): an error row for that person, naming the right field and index; the
    image's other people are estimated, each with its own root depth (not the one of the person
    before or after it) and intrinsics."""
    base, box = demo_image()
    save_image(tmp_path / "a.png", base)
    good = [150.0, 0.0, 170.0, 170.0]
    records = [
        {"image": "a.png", "crop_boxes": [good, [0, 0, 1e12, 1e12], [140, 10, 180, 200]]},
        {"image": "a.png", "crop_boxes": [[0, 0, 1e-300, 100], good], "root_depth": [3000.0, 5000.0],
         "intrinsics": K},
        {"image": "a.png", "crop_boxes": [[-1e6, -1e6, 10, 10], good, [640, 0, 50, 50], [100, 50, 150, 150]],
         "root_depth": [2000.0, 3500.0, 4000.0, 6000.0], "intrinsics": [K, K, K, [800.0, 820.0, 300.0, 250.0]]},
        {"image": "a.png", "boxes": [[-1e6, -1e6, 10, 10], list(box)], "root_depth": [3000.0, 4500.0]},
    ]
    for i, rec in enumerate(records):  # each record its own image file (an image is listed once)
        rec["image"] = f"{i}.png"
        (tmp_path / rec["image"]).write_bytes((tmp_path / "a.png").read_bytes())
    manifest = _write_jsonl(tmp_path / "m.jsonl", records)
    summary = batch.run(manifest, tmp_path / "out", engine=xs_engine_path, progress=False)
    rows = _rows(tmp_path / "out")
    errors = {k: r["error"] for k, r in rows.items() if r["error"] is not None}
    assert set(errors) == {("0.png", 1), ("1.png", 0), ("2.png", 0), ("2.png", 2), ("3.png", 0)}, errors
    assert errors[("0.png", 1)].startswith("crop_boxes[1] = [0.0, 0.0, 1000000000000.0, 1000000000000.0] reaches")
    assert errors[("1.png", 0)].startswith("crop_boxes[0] = [0.0, 0.0, 1e-300, 100.0] is too small")
    assert errors[("2.png", 0)].startswith("crop_boxes[0] = [-1000000.0, -1000000.0, 10.0, 10.0] lies outside "
                                           "the 640x480 image (no area in common with it)")
    assert errors[("2.png", 2)].startswith("crop_boxes[2] = [640.0, 0.0, 50.0, 50.0] lies outside the 640x480 image (no area")
    assert errors[("3.png", 0)].startswith("boxes[0] = [-1000000.0, -1000000.0, 10.0, 10.0] lies outside the 640x480 image (no")
    assert summary.people == 6 and summary.errors == 5
    est = PoseEstimator(xs_engine)
    for image, person, kw in [
            ("0.png", 0, {"crop_boxes": [good]}), ("0.png", 2, {"crop_boxes": [[140, 10, 180, 200]]}),
            ("1.png", 1, {"crop_boxes": [good], "root_depth": 5000.0, "intrinsics": K}),
            ("2.png", 1, {"crop_boxes": [good], "root_depth": 3500.0, "intrinsics": K}),
            ("2.png", 3, {"crop_boxes": [[100, 50, 150, 150]], "root_depth": 6000.0,
                          "intrinsics": [800.0, 820.0, 300.0, 250.0]}),
            ("3.png", 1, {"boxes": [box], "root_depth": 4500.0})]:
        row, ref = rows[(image, person)], est.predict(base, **kw)
        assert row["root_depth"] == kw.get("root_depth"), (image, person)
        np.testing.assert_allclose(np.asarray(row["joints"], np.float64), ref.image[0], rtol=1e-6, atol=1e-3)
        if ref.camera is not None:
            np.testing.assert_allclose(np.asarray(row["camera"], np.float64), ref.camera[0], rtol=1e-6, atol=1e-2)


class _FastEngine:
    """The XS engine's metadata with a network that returns flat heatmaps at once: a job of
    thousands of people costs only their crops. Records every call's batch size."""

    def __new__(cls, real):
        from cnpose_trt.runtime.engine import Engine

        class Fast(Engine):
            backend = real.backend

            def _run(self, images):
                self.calls.append(len(images))
                return np.zeros((len(images), *self.spec.heatmap_shape), np.float32)

            def infer(self, images):
                self.calls.append(len(images))
                return super().infer(images)

        engine = Fast(real.path, real.meta)
        engine.calls = []
        return engine


def test_an_image_with_thousands_of_boxes_completes(tmp_path, xs_engine):
    """3,000 people in one image: the job completes (engine calls of at most max_batch crops,
    not one call of 3,000), one row per person."""
    base, box = demo_image()
    save_image(tmp_path / "crowd.png", base)
    save_image(tmp_path / "one.png", base)
    rng = np.random.default_rng(6)
    boxes = np.column_stack([rng.uniform(0, 500, 3000), rng.uniform(0, 380, 3000), rng.uniform(20, 140, 3000),
                             rng.uniform(20, 100, 3000)]).tolist()
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"image": "crowd.png", "boxes": boxes},
                                                   {"image": "one.png", "boxes": [list(box)]}])
    engine = _FastEngine(xs_engine)
    summary = batch.run(manifest, tmp_path / "out", engine=engine, progress=False)
    assert summary.people == 3001 and summary.errors == 0
    assert engine.calls and max(engine.calls) <= xs_engine.max_batch, max(engine.calls)
    table = batch.read_results(tmp_path / "out")
    assert table.num_rows == 3001
    crowd = table.filter(pa.compute.equal(table["image"], "crowd.png"))
    assert sorted(crowd["person"].to_pylist()) == list(range(3000))


@pytest.mark.parametrize("flip", [False, True])
def test_many_people_of_one_image_equal_small_groups(tmp_path, xs_engine, xs_engine_path, flip):
    """An image with more people than an engine call takes: its rows equal the poses of those
    people estimated three at a time."""
    base, _ = demo_image()
    save_image(tmp_path / "many.png", base)
    rng = np.random.default_rng(7)
    n = 3 * xs_engine.max_batch + 2
    boxes = np.column_stack([rng.uniform(0, 400, n), rng.uniform(0, 300, n), rng.uniform(40, 200, n),
                             rng.uniform(40, 200, n)])
    roots = rng.uniform(3000, 6000, n)
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"image": "many.png", "boxes": boxes.tolist(),
                                                    "root_depth": roots.tolist(), "intrinsics": K}])
    batch.run(manifest, tmp_path / "out", engine=xs_engine_path, flip=flip, progress=False)
    rows = _rows(tmp_path / "out")
    est = PoseEstimator(xs_engine)
    for i in range(0, n, 3):
        ref = est.predict(base, boxes[i:i + 3], root_depth=roots[i:i + 3], intrinsics=K, flip=flip)
        for q in range(len(ref)):
            row = rows[("many.png", i + q)]
            assert row["error"] is None and row["root_depth"] == roots[i + q]
            np.testing.assert_allclose(np.asarray(row["joints"], np.float64), ref.image[q], rtol=1e-6, atol=1e-3)
            np.testing.assert_allclose(np.asarray(row["camera"], np.float64), ref.camera[q], rtol=1e-6, atol=1e-2)


class _BadItemEstimator:
    """PoseEstimator that refuses one image the way it refuses bad items (ValueError after the
    results before it), to check that the stream goes on after it."""

    def __init__(self, estimator, bad_key):
        self.estimator, self.bad_key = estimator, bad_key

    def predict_iter(self, items, flip=False):
        def guarded():
            for item in items:
                if item["image"].shape == self.bad_key:
                    raise ValueError("refused by the estimator")
                yield item
        return self.estimator.predict_iter(guarded(), flip=flip)


def test_estimator_errors_become_error_rows(tmp_path, xs_engine):
    base, box = demo_image()
    entries = []
    for i, size in enumerate([(480, 640), (300, 400), (480, 640), (200, 300)]):
        save_image(tmp_path / f"{i}.png", np.ascontiguousarray(base[:size[0], :size[1]]))
        entries.append(batch.Entry(f"{i}.png", str(tmp_path / f"{i}.png"), "test", boxes=np.asarray([[5, 5, 90, 150]],
                                                                                                    np.float64)))
    est = _BadItemEstimator(PoseEstimator(xs_engine), (300, 400, 3))
    out = list(batch.estimate_stream(est, (batch.load_entry(e) for e in entries)))
    assert [o[0].entry.key for o in out] == ["0.png", "1.png", "2.png", "3.png"]
    assert out[1][1] is None and out[1][0].error == "refused by the estimator"
    assert all(o[1] is not None and len(o[1]) == 1 for i, o in enumerate(out) if i != 1)


class _RefusingEstimator:
    """A real PoseEstimator whose item for one image carries a NaN box: refused on its prep
    threads, after it pulled a full prefetch window of the items behind it."""

    def __init__(self, estimator, bad_shape):
        self.estimator, self.bad_shape, self.pulled_past_bad = estimator, bad_shape, 0
        self.max_batch = estimator.max_batch

    def predict_iter(self, items, flip=False):
        def spoil():
            seen_bad = False
            for item in items:
                if item["image"].shape == self.bad_shape:
                    item, seen_bad = {**item, "boxes": np.asarray([[np.nan, 0, 50, 50]])}, True
                elif seen_bad:
                    self.pulled_past_bad += 1
                yield item
        return self.estimator.predict_iter(spoil(), flip=flip)


def test_refusal_in_a_full_prefetch_window_loses_no_image(tmp_path, xs_engine):
    """The images the estimator had already taken behind a refused one are run again: every image
    has its rows exactly once, equal to PoseEstimator's, in order."""
    base, box = demo_image()
    est = PoseEstimator(xs_engine)  # max_batch 4, prefetch 2: 8 images pulled ahead
    entries, ref = [], {}
    for i in range(20):
        h, w = 300 + i, 400 + i  # the shape tells the images apart
        save_image(tmp_path / f"{i}.png", np.ascontiguousarray(base[:h, :w]))
        entries.append(batch.Entry(f"{i}.png", str(tmp_path / f"{i}.png"), "test",
                                   boxes=np.asarray([[5, 5, 90, 150]], np.float64)))
        ref[f"{i}.png"] = est.predict(load_image(tmp_path / f"{i}.png"), entries[-1].boxes).image
    bad = 9
    refusing = _RefusingEstimator(est, (300 + bad, 400 + bad, 3))
    with ThreadPoolExecutor(2) as pool:
        out = list(batch.estimate_stream(refusing, batch.read_ahead(pool, entries, 6)))
    assert refusing.pulled_past_bad >= est.max_batch  # the refusal came with images queued behind it
    assert [o[0].entry.key for o in out] == [e.key for e in entries]
    assert out[bad][1] is None and "finite" in out[bad][0].error
    for i, (loaded, result) in enumerate(out):
        if i != bad:
            assert loaded.error is None and result is not None, loaded.entry.key
            np.testing.assert_allclose(result.image, ref[loaded.entry.key], rtol=1e-6, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Refused before any work: the manifest, the arguments, the output folder (the manifests' own
# problems: tests/test_batch_manifest.py)


def test_manifest_problems_stop_the_job_before_any_work(tmp_path, xs_engine_path):
    base, box = demo_image()
    save_image(tmp_path / "a.png", base)
    _write_jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "boxes": [list(box)]}, {"image": "a.png", "boxes": []}])
    with pytest.raises(batch.ManifestError, match=r"line 2, field 'image': 'a.png' is listed again \(first at "):
        batch.run(tmp_path / "m.jsonl", tmp_path / "out", engine=xs_engine_path, progress=False)
    assert not list((tmp_path / "out").glob("part-*"))
    with pytest.raises(ValueError, match="readers must be an integer > 0"):
        batch.run(tmp_path / "m.jsonl", tmp_path / "out", engine=xs_engine_path, readers=0)
    with pytest.raises(ValueError, match="precision must be fp32, fp16 or bf16"):
        batch.run(tmp_path / "m.jsonl", tmp_path / "out", precision="int8")
    (tmp_path / "file").write_text("")
    with pytest.raises(batch.BatchError, match="is a file, not a folder"):
        batch.run(tmp_path / "m.jsonl", tmp_path / "file", engine=xs_engine_path)


def test_output_folder_is_locked(scenes, tmp_path, xs_engine_path):
    from cnpose_trt.cache import file_lock

    _, _, manifest = scenes
    (tmp_path / "out").mkdir()
    with file_lock(tmp_path / "out" / batch.LOCK_FILE), pytest.raises(batch.BatchError,
                                                                      match="another batch job is writing"):
        batch.run(manifest, tmp_path / "out", engine=xs_engine_path, progress=False)


def test_damaged_part_is_named(scenes, tmp_path, xs_engine_path):
    _, _, manifest = scenes
    out = tmp_path / "out"
    batch.run(manifest, out, engine=xs_engine_path, part_images=3, progress=False)
    (out / "part-000001.parquet").write_bytes(b"damaged")
    with pytest.raises(batch.BatchError, match=r"part-000001\.parquet is unreadable"):
        batch.run(manifest, out, engine=xs_engine_path, progress=False)


# ---------------------------------------------------------------------------------------------
# Killed and resumed

_KILLABLE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import cnpose_trt.cache as cache

    mode, marker, nth = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    real, calls = cache.install_file, [0]

    def mark(text):  # atomically: the parent kills as soon as the marker exists
        marker.with_name(marker.name + ".tmp").write_text(text)
        os.replace(marker.with_name(marker.name + ".tmp"), marker)

    def install_then_stop(src, dst):
        # The part commit (rename) is the point to kill around: 'during' stops with the part written
        # to its temporary name but not renamed, 'after' right after the rename.
        calls[0] += 1
        if calls[0] == nth and mode == "during":
            mark(str(src))
            time.sleep(120)
        result = real(src, dst)
        if calls[0] == nth and mode == "after":
            mark(str(dst))
            time.sleep(120)
        return result

    cache.install_file = install_then_stop
    from cnpose_trt.cli.batch import main
    sys.exit(main(sys.argv[4:]))
""")


def _run_and_kill(tmp_path, mode, nth, manifest, out, engine_path):
    marker = tmp_path / f"marker-{mode}"
    marker.unlink(missing_ok=True)
    script = tmp_path / "killable.py"
    script.write_text(_KILLABLE)
    proc = subprocess.Popen([sys.executable, str(script), mode, str(marker), str(nth), str(manifest), "--out",
                             str(out), "--engine", str(engine_path), "--part-images", "1", "--no-progress",
                             "--readers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the job ended before the kill point: {proc.communicate()}")
            if time.monotonic() > deadline:
                raise AssertionError("the job did not reach the kill point in 120 s")
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return Path(marker.read_text())


def test_killed_job_resumes_without_loss_or_duplicates(scenes, tmp_path, xs_engine_path):
    folder, records, manifest = scenes
    ref_out = tmp_path / "ref"
    batch.run(manifest, ref_out, engine=xs_engine_path, progress=False)
    out = tmp_path / "out"
    # 1: killed while the second part is written, before its rename: one part committed, a temporary left
    temp = _run_and_kill(tmp_path, "during", 2, manifest, out, xs_engine_path)
    assert temp.exists() and temp.name.startswith(".part-") and len(list(out.glob("part-*.parquet"))) == 1
    # 2: resumed, and killed right after its second commit: three parts in all
    _run_and_kill(tmp_path, "after", 2, manifest, out, xs_engine_path)
    assert not temp.exists() and len(list(out.glob("part-*.parquet"))) == 3
    # 3: resumed to the end
    summary = batch.run(manifest, out, engine=xs_engine_path, progress=False)
    assert summary.skipped == 3 and summary.this_run_images == len(records) - 3 and summary.images == len(records)
    assert not list(out.glob(".part-*"))
    listed = [json.loads(pq.read_schema(p).metadata[batch.META_KEY])["images"] for p in sorted(out.glob("part-*"))]
    assert sorted(sum(listed, [])) == sorted(r["image"] for r in records)  # every image exactly once
    got, ref = _rows(out), _rows(ref_out)  # _rows refuses duplicate (image, person) rows
    assert set(got) == set(ref)
    for key in ref:
        assert got[key] == ref[key], key


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_runs_and_reports(scenes, tmp_path, xs_engine_path, capsys):
    _, records, manifest = scenes
    parser = argparse.ArgumentParser()
    batch_cli.add_batch_arguments(parser)
    args = parser.parse_args([str(manifest), "--out", str(tmp_path / "out"), "--engine", str(xs_engine_path),
                              "--no-progress", "--part-images", "4"])
    assert batch_cli.run_batch(args) == 0
    printed = capsys.readouterr().out
    assert f"{len(records)} images" in printed and json.loads(printed[printed.index("{"):])["parts"] == 2
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "boxes": [[1, 2]]}\n')
    args = parser.parse_args([str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "out2"), "--engine",
                              str(xs_engine_path)])
    from cnpose_trt.cli.errors import reported

    assert reported(batch_cli.run_batch, args) == 2  # the command's errors go to the cli's one boundary
    err = capsys.readouterr().err
    assert "error: " in err and "bad.jsonl, line 1, field 'boxes'" in err


def test_progress_bar_reports_images_per_second():
    import io

    stream = io.StringIO()
    bar = batch.Progress(10, enabled=True, stream=stream)
    bar._last -= 100  # due now (not a terminal: every 30 s)
    bar.update(4, people=6, errors=1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "4/10 images" in lines[0] and "img/s" in lines[0] and "6 people  1 errors" in lines[0]


# ---------------------------------------------------------------------------------------------
# Ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from cnpose_trt.interrupts import keep_handlers

    # keep_handlers: ray.init's SIGTERM handler (an exit) would otherwise outlive the cluster in this process
    keep_handlers(ray.init, num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
    assert not ray.is_initialized()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_run_equals_local_run(scenes, tmp_path, xs_engine_path, ray_cluster):
    folder, records, manifest = scenes
    # error rows too: a corrupt image and an empty box travel the same way
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    base, box = demo_image()
    save_image(folder / "extra.png", base)
    more = records + [{"image": "corrupt.jpg", "boxes": [list(box)]},
                      {"image": "extra.png", "boxes": [list(box), [3, 3, 0, 0]]}]
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{**r, "image": str(folder / r["image"])} for r in more])
    local = batch.run(manifest, tmp_path / "local", engine=xs_engine_path, part_images=3, progress=False)
    remote = batch.run(manifest, tmp_path / "ray", engine=xs_engine_path, ray=True, ray_actors=2, ray_batch_size=3,
                       part_images=3, progress=False)
    assert remote.mode.startswith("ray, 2 actors") and ray_cluster.is_initialized()  # its cluster left running
    for field in ("images", "people", "errors"):
        assert getattr(remote, field) == getattr(local, field)
    assert local.errors == 2 and local.images == len(more)
    got, ref = _rows(tmp_path / "ray"), _rows(tmp_path / "local")
    assert set(got) == set(ref)
    for key in ref:
        assert got[key] == ref[key], key
    # resumed from the local run's folder: nothing left to do
    again = batch.run(manifest, tmp_path / "local", engine=xs_engine_path, ray=True, progress=False)
    assert again.this_run_images == 0 and again.skipped == len(more)


def test_swallowed_ctrl_c_stops_the_job_which_resumes(scenes, tmp_path, xs_engine_path, monkeypatch, capsys,
                                                       sigint_default):
    """A Ctrl-C that library code swallows (a bare except) still stops the job at the next image."""
    _, records, manifest = scenes
    real, calls = batch.PartWriter.add, [0]

    def add(self, loaded, result):
        calls[0] += 1
        if calls[0] == 3:
            signal_swallowed(signal.SIGINT)
        return real(self, loaded, result)

    monkeypatch.setattr(batch.PartWriter, "add", add)
    out = tmp_path / "out"
    argv = [str(manifest), "--out", str(out), "--engine", str(xs_engine_path), "--part-images", "1",
            "--no-progress", "--readers", "1"]
    assert batch_cli.main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted"
    assert calls[0] == 3 and len(list(out.glob("part-*.parquet"))) == 3  # stopped before the fourth image
    monkeypatch.setattr(batch.PartWriter, "add", real)
    summary = batch.run(manifest, out, engine=xs_engine_path, progress=False)
    assert summary.skipped == 3 and summary.images == len(records) > 4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_with_a_relative_manifest_from_another_folder(scenes, tmp_path, xs_engine_path, ray_cluster,
                                                          monkeypatch):
    """The workers' working folder is the one the cluster started in, not this process's: paths are
    made absolute here, and a worker that cannot read an image this process reads fails the job."""
    folder, records, manifest = scenes
    cwd = ray_cluster.get(ray_cluster.remote(lambda: os.getcwd()).remote())  # a builtin cannot be a task
    assert Path(cwd).resolve() != folder.resolve()
    monkeypatch.chdir(folder)
    local = batch.run(manifest, tmp_path / "local", engine=xs_engine_path, progress=False)
    remote = batch.run(manifest.name, tmp_path / "ray", engine=xs_engine_path, ray=True, ray_actors=1,
                       progress=False)
    assert remote.errors == local.errors == 0 and remote.images == len(records)
    got, ref = _rows(tmp_path / "ray"), _rows(tmp_path / "local")
    assert set(got) == set(ref) and all(got[k]["joints"] == ref[k]["joints"] for k in ref)
    # /proc/self/cwd/...: one path, another file in each process, as on a node without the shared folder
    if not Path("/proc/self/cwd").is_dir():
        pytest.skip("needs /proc/self/cwd")
    _write_jsonl(tmp_path / "proc.jsonl", [{**r, "image": f"/proc/self/cwd/{r['image']}"} for r in records])
    with pytest.raises(batch.BatchError, match=r"^a Ray worker on .* cannot read /proc/self/cwd/img\d\.(png|jpg), "
                       r"which this process reads: every node must see the images"):
        batch.run(tmp_path / "proc.jsonl", tmp_path / "proc", engine=xs_engine_path, ray=True, ray_actors=1,
                  progress=False)
    assert not list((tmp_path / "proc").glob("part-*"))  # no part of error rows committed


_RAY_STARTUP = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under a background harness
    import ray

    marker, real = Path(sys.argv[1]), ray.init

    def mark(text):
        marker.with_name(marker.name + ".tmp").write_text(text)
        os.replace(marker.with_name(marker.name + ".tmp"), marker)

    def init(*args, **kwargs):
        mark("init")
        result = real(*args, **kwargs)
        mark("started")
        return result

    ray.init = init
    import ray._private.node as node  # in ray.init: the local cluster's processes are running

    start = node.Node.start_ray_processes

    def start_ray_processes(self, *args, **kwargs):
        result = start(self, *args, **kwargs)
        mark("processes")
        return result

    node.Node.start_ray_processes = start_ray_processes
    from cnpose_trt.cli.batch import main
    mark("main")
    sys.exit(main(sys.argv[2:]))
""")


def _tagged(tag: str) -> list[int]:
    """Processes whose environment holds tag: the command and every process it started."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if tag.encode() in Path(f"/proc/{name}/environ").read_bytes():
                    found.append(int(name))
            except OSError:
                pass
    return found


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("moment", ["main", "init", "processes", "started"])
def test_ctrl_c_during_ray_start_up(scenes, tmp_path, xs_engine_path, moment):
    """Ctrl-C in the command's start, in ray.init (as it begins, and once the local cluster's processes
    run) and right after it: exit 130 with one line
    and no Ray process of the command left (an interrupted ray.init left agents running, and the
    process sometimes died of a segfault at exit)."""
    pytest.importorskip("ray.data")
    if not Path("/proc/self/environ").is_file():
        pytest.skip("needs /proc")
    _, _, manifest = scenes
    script, marker, tag = tmp_path / "startup.py", tmp_path / "marker", f"cnpose-test-{os.getpid()}-{moment}"
    script.write_text(_RAY_STARTUP)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(CNPOSE_TEST_TAG=tag, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(batch.__file__).parents[1]),
                                                                              env.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, str(script), str(marker), str(manifest), "--out", str(tmp_path / "out"),
                             "--engine", str(xs_engine_path), "--ray", "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (marker.exists() and marker.read_text() in (moment, "started")):
            assert proc.poll() is None and time.monotonic() < deadline, "never reached the moment"
            time.sleep(0.02)
        time.sleep(0.2 if moment == "main" else 0.05)  # main: in the command's own start (imports, manifest)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = _tagged(tag)
        deadline = time.monotonic() + 2  # as the issue measured: none 2 s after the exit
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = _tagged(tag)
        for pid in left:  # leave none behind for the next tests, whatever the verdict
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    lines = err.strip().splitlines()
    assert lines[-1] == "error: interrupted" and [ln for ln in lines if ln.startswith("error")] == lines[-1:]
    assert "Traceback" not in err
    assert not left, f"Ray processes left: {[Path(f'/proc/{p}/cmdline').read_bytes()[:60] for p in left]}"
    assert not list((tmp_path / "out").glob("part-*"))


def test_kill_9_of_a_ray_job_leaves_no_ray_process(scenes, tmp_path, xs_engine_path):
    """Issue 20 item 8: `kill -9` of the driver left 12 Ray processes. A watchdog in a session of its own
    (cnpose_trt/batch/watchdog.py) ends the local cluster's processes once the driver is gone."""
    pytest.importorskip("ray.data")
    if not Path("/proc/self/environ").is_file():
        pytest.skip("needs /proc")
    folder, records, _ = scenes
    manifest = _write_jsonl(tmp_path / "many.jsonl", records * 40)  # long enough to be killed mid-job
    many = [json.loads(line) for line in manifest.read_text().splitlines()]
    for i, rec in enumerate(many):  # every image listed once: copies under other names
        src = folder / rec["image"]
        dst = tmp_path / f"{i:04d}{src.suffix}"
        dst.write_bytes(src.read_bytes())
        rec["image"] = str(dst)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in many))
    tag = f"cnpose-test-kill9-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(CNPOSE_TEST_TAG=tag, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(batch.__file__).parents[1]),
                                                                              env.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "cnpose_trt.batch", str(manifest), "--out", str(tmp_path / "out"),
                             "--engine", str(xs_engine_path), "--ray", "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    left: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(_tagged(tag)) < 5:  # the driver, its watchdog and the local cluster's processes
            assert proc.poll() is None and time.monotonic() < deadline, "the job never started its cluster"
            time.sleep(0.2)
        time.sleep(2.0)
        assert proc.poll() is None, "the job ended before it could be killed"
        proc.kill()
        proc.wait()
        # The watchdog polls, then SIGTERM, SIGKILL after 3 s; 60 s leaves room for a loaded machine (it
        # failed once at 30 s under load 10 on 2 cores, a RuntimeEnvAgent still exiting), while a
        # watchdog that never acts still fails.
        deadline = time.monotonic() + 60
        left = _tagged(tag)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = _tagged(tag)
    finally:
        for pid in _tagged(tag):  # leave none behind for the next tests, whatever the verdict
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"left after kill -9: {[Path(f'/proc/{p}/cmdline').read_bytes()[:60] for p in left]}"

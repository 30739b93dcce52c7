"""`batch --rootnet` (issue 24): root depths for manifest records that give none, from RootNet or the prior,
locally and on Ray; rows carry the estimated root_depth and root_source; the RootNet is part of the job.

References: PoseEstimator(rootnet=) on the same images (tests/test_roots.py ties it to upstream RootNet's
golden output and to hand-given depths).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pq = pytest.importorskip("pyarrow.parquet")

from cnpose_trt import PoseEstimator, batch  # noqa: E402
from cnpose_trt.errors import BatchError  # noqa: E402
from cnpose_trt.pipeline.items import NEEDS_CAMERA  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_rootnet_golden import GOLDEN  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN / "rootnet_golden.npz"))


@pytest.fixture
def manifest(golden, tmp_path):
    """Three records of the golden image: depths to estimate, a depth given, and no camera (an error row)."""
    image = tmp_path / "scene.png"
    shutil.copy(GOLDEN / "image.png", image)
    cam = golden["intrinsics"].tolist()
    records = [{"image": str(image), "boxes": golden["boxes"][:3].tolist(), "intrinsics": cam},
               {"image": str(tmp_path / "b.png"), "boxes": golden["boxes"][3:].tolist(), "intrinsics": cam,
                "root_depth": 5000.0},
               {"image": str(tmp_path / "c.png"), "boxes": golden["boxes"][:1].tolist()}]
    for name in ("b.png", "c.png"):
        shutil.copy(GOLDEN / "image.png", tmp_path / name)
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _rows(out: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for r in batch.read_results(out).to_pylist():
        rows.setdefault(Path(r["image"]).name, []).append(r)
    return rows


def test_job_with_rootnet_equals_the_estimator(golden, manifest, tmp_path, xs_engine_path, rootnet_engine_path):
    out = tmp_path / "out"
    summary = batch.run(manifest, out, engine=xs_engine_path, rootnet=rootnet_engine_path, progress=False)
    assert (summary.images, summary.people, summary.errors) == (3, 5, 1)
    rows = _rows(out)
    est = PoseEstimator(xs_engine_path, rootnet=rootnet_engine_path)
    want = est.predict(golden["image_rgb"], golden["boxes"][:3], intrinsics=golden["intrinsics"])
    assert [r["root_source"] for r in rows["scene.png"]] == ["rootnet"] * 3
    np.testing.assert_allclose([r["root_depth"] for r in rows["scene.png"]], want.roots[:, 2], rtol=1e-9)
    np.testing.assert_allclose(np.array([r["camera"] for r in rows["scene.png"]]), want.camera, rtol=1e-6, atol=0.01)
    assert [(r["root_source"], r["root_depth"]) for r in rows["b.png"]] == [("given", 5000.0)] * 2
    (error,) = rows["c.png"]
    assert error["error"] == NEEDS_CAMERA and error["root_source"] is None
    part = sorted(out.glob("part-*.parquet"))[0]
    job = json.loads(pq.read_schema(part).metadata[b"cnpose_trt.batch"])["job"]
    assert job["rootnet"] == Path(rootnet_engine_path).name


def test_prior_job_resume_and_identity(golden, manifest, tmp_path, xs_engine_path, rootnet_engine_path):
    """The prior marks its rows; a rerun resumes (nothing redone); another RootNet is another job."""
    out = tmp_path / "out"
    batch.run(manifest, out, engine=xs_engine_path, rootnet="prior", progress=False)
    rows = _rows(out)
    _, _, w, h = golden["process_bbox"][0]
    fx, fy = golden["intrinsics"][:2]
    assert rows["scene.png"][0]["root_source"] == "prior"
    assert rows["scene.png"][0]["root_depth"] == pytest.approx(np.sqrt(2000.0 * 2000.0 * fx * fy / (w * h)), rel=1e-12)
    again = batch.run(manifest, out, engine=xs_engine_path, rootnet="prior", progress=False)
    assert again.this_run_images == 0 and again.images == 3
    with pytest.raises(BatchError, match="holds the results of another job"):
        batch.run(manifest, out, engine=xs_engine_path, rootnet=rootnet_engine_path, progress=False)
    with pytest.raises(BatchError, match="holds the results of another job"):
        batch.run(manifest, out, engine=xs_engine_path, progress=False)


def test_rootnet_checkpoint_built_once_for_the_job(manifest, tmp_path, xs_engine_path, rootnet_snapshot,
                                                   rootnet_engine_path, engine_dir):
    out = tmp_path / "out"
    batch.run(manifest, out, engine=xs_engine_path, rootnet=rootnet_snapshot, engine_dir=engine_dir, progress=False)
    part = sorted(out.glob("part-*.parquet"))[0]
    job = json.loads(pq.read_schema(part).metadata[b"cnpose_trt.batch"])["job"]
    assert job["rootnet"] == Path(rootnet_engine_path).name  # the session's cached engine, not a new build


def test_cli_batch_rootnet(manifest, tmp_path, xs_engine_path, capsys):
    from cnpose_trt.cli.app import main as cli

    out = tmp_path / "out"
    assert cli(["batch", str(manifest), "--out", str(out), "--engine", str(xs_engine_path), "--rootnet", "prior",
                "--no-progress"]) == 0
    assert {r["root_source"] for r in batch.read_results(out).to_pylist()} == {"prior", "given", None}
    capsys.readouterr()


@pytest.mark.parametrize("value, message", [
    (3, r"rootnet must be a RootNet engine file, a RootNet checkpoint or 'prior', got 3"),
    ("Prior", r"rootnet must be .* got 'Prior' \(no such file\)"),
    ("{tmp}/none.pth.tar", r"got '.*none.pth.tar' \(no such file\)"),
])
def test_bad_rootnet_refused_before_work(manifest, tmp_path, xs_engine_path, value, message):
    value = value.format(tmp=tmp_path) if isinstance(value, str) else value
    with pytest.raises(ValueError, match=message):
        batch.run(manifest, tmp_path / "out", engine=xs_engine_path, rootnet=value, progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("part-*"))


def test_pose_engine_as_rootnet_refused(manifest, tmp_path, xs_engine_path):
    with pytest.raises(ValueError, match=r"rootnet: .* is a ConvNeXtPose \(pose\) engine, not a RootNet engine"):
        batch.run(manifest, tmp_path / "out", engine=xs_engine_path, rootnet=xs_engine_path, progress=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_rootnet_on_ray_equals_local(manifest, tmp_path, xs_engine_path, rootnet_engine_path):
    pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    local = tmp_path / "local"
    batch.run(manifest, local, engine=xs_engine_path, rootnet=rootnet_engine_path, progress=False)
    remote = tmp_path / "ray"
    batch.run(manifest, remote, engine=xs_engine_path, rootnet=rootnet_engine_path, progress=False, ray=True,
              ray_actors=1, ray_batch_size=2)
    a, b = _rows(local), _rows(remote)
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            assert (x["root_source"], x["error"]) == (y["root_source"], y["error"])
            if x["root_depth"] is not None:
                assert x["root_depth"] == pytest.approx(y["root_depth"], rel=1e-6)


def test_parts_written_before_root_source_read_back(manifest, tmp_path, xs_engine_path):
    """A part without the root_source column reads back with "given" where it holds a root_depth (then the
    manifest gave it), null elsewhere."""
    out = tmp_path / "out"
    lines = manifest.read_text().splitlines()[1:2]  # the record with root_depth and intrinsics
    (tmp_path / "given.jsonl").write_text(lines[0] + "\n" + json.dumps({"image": str(tmp_path / "c.png"),
                                                                        "boxes": [[10, 10, 50, 90]]}) + "\n")
    batch.run(tmp_path / "given.jsonl", out, engine=xs_engine_path, progress=False)
    part = sorted(out.glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    pq.write_table(table.drop_columns(["root_source"]).replace_schema_metadata(table.schema.metadata), part)
    rows = _rows(out)
    assert [r["root_source"] for r in rows["b.png"]] == ["given", "given"]
    assert [r["root_source"] for r in rows["c.png"]] == [None]


def test_coco_manifest_with_rootnet_refused(tmp_path, xs_engine_path):
    coco = tmp_path / "dets.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": []}))
    with pytest.raises(ValueError, match="rootnet: COCO detections carry no camera intrinsics"):
        batch.run(coco, tmp_path / "out", engine=xs_engine_path, rootnet="prior", progress=False)


def test_records_without_camera_are_announced(manifest, tmp_path, xs_engine_path):
    said: list[str] = []
    batch.run(manifest, tmp_path / "out", engine=xs_engine_path, rootnet="prior", progress=False, say=said.append)
    assert any("warning: images to do that give neither root_depth nor intrinsics: 1;" in m for m in said), said

"""The shipped XS model's record and the one flip-test rule (issue 21, item 2)."""

from __future__ import annotations

import pytest

from cnpose_trt import shipped


def test_record_hashes_are_the_files_own():
    """The record lets the model be recognised without torch: its hashes must be the file's real ones."""
    from cnpose_trt.cache import file_sha256

    assert shipped.record()["file_sha256"] == file_sha256(shipped.SHIPPED_XS)
    assert shipped.record()["bytes"] == shipped.SHIPPED_XS.stat().st_size
    pytest.importorskip("torch")
    from cnpose_trt.build.builder import weights_fingerprint

    assert shipped.record()["weights_sha256"] == weights_fingerprint(shipped.SHIPPED_XS)


def test_recognised_from_file_and_from_engine_metadata(tmp_path):
    assert shipped.is_shipped_checkpoint(shipped.SHIPPED_XS)
    other = tmp_path / "other.pth.tar"
    data = bytearray(shipped.SHIPPED_XS.read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    assert not shipped.is_shipped_checkpoint(other) and not shipped.is_shipped_checkpoint(None)
    meta = {"weights": {"sha256": shipped.record()["weights_sha256"]}}
    assert shipped.is_shipped_engine(meta)
    assert not shipped.is_shipped_engine({"weights": {"sha256": "0" * 64}}) and not shipped.is_shipped_engine(None)
    assert shipped.flip_for(meta, True) == (False, shipped.FLIP_NOTICE)
    assert shipped.flip_for(meta, False) == (False, None)
    assert shipped.flip_for({"weights": {"sha256": "0" * 64}}, True) == (True, None)


@pytest.fixture(scope="module")
def shipped_engines(tmp_path_factory):
    """An engine folder holding the shipped model's XS engine and a random-weights XS engine."""
    pytest.importorskip("torch")
    from cnpose_trt import build_engine

    folder = tmp_path_factory.mktemp("shipped_engines")
    built = build_engine(checkpoint=shipped.SHIPPED_XS, out_dir=folder, max_batch=4)
    random = build_engine("XS", out_dir=folder, max_batch=4)
    build_engine(checkpoint=shipped.SHIPPED_XS, out_dir=folder)  # the demo's (default max_batch)
    return folder, built.path, random.path


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory):
    from cnpose_trt.io.draw import save_image
    from cnpose_trt.io.synthetic import synthesize

    scene = synthesize(7, width=320, height=240)
    path = save_image(tmp_path_factory.mktemp("scene") / "scene.png", scene.image)
    return path, [float(v) for v in scene.boxes[0]]


def test_estimator_turns_the_flip_test_off_for_the_shipped_model_once(shipped_engines, scene_file):
    import warnings

    import numpy as np

    from cnpose_trt import PoseEstimator, load_engine
    from cnpose_trt.io.preprocess import load_image

    _, built, random = shipped_engines
    image = load_image(scene_file[0])
    est = PoseEstimator(load_engine(built))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flipped = est.predict(image, [scene_file[1]], flip=True)
        est.predict(image, [scene_file[1]], flip=True)
    assert [str(w.message) for w in caught] == [shipped.FLIP_NOTICE]  # said once per estimator
    np.testing.assert_array_equal(flipped.image, est.predict(image, [scene_file[1]], flip=False).image)
    other = PoseEstimator(load_engine(random))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice for other weights: the flip test runs
        a = other.predict(image, [scene_file[1]], flip=True)
    assert not np.array_equal(a.image, other.predict(image, [scene_file[1]], flip=False).image)


def test_commands_apply_the_rule_without_torch(shipped_engines, scene_file, tmp_path):
    """Issue 21 items 1, 2: predict, eval, batch and demo on cached engines, where torch cannot be imported,
    recognise the shipped model from the sidecar and say the same one line."""
    import json

    from torchless import cli_without_torch

    folder, built, random = shipped_engines
    image, box = scene_file
    bbox = ",".join(map(str, box))
    done = cli_without_torch(["predict", image, "--bbox", bbox, "--engine", built, "--flip"])
    assert done.returncode == 0, done.stderr
    assert shipped.FLIP_NOTICE in done.stderr and json.loads(done.stdout)["flip_test"] is False
    done = cli_without_torch(["predict", image, "--bbox", bbox, "--engine", random, "--flip"])
    assert done.returncode == 0 and shipped.FLIP_NOTICE not in done.stderr and json.loads(done.stdout)["flip_test"]
    report = tmp_path / "eval.json"
    done = cli_without_torch(["eval", "--engine", built, "--engine", random, "--count", "2", "--no-progress",
                              "--json", report])
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(shipped.FLIP_NOTICE) == 1
    entries = json.loads(report.read_text())["engines"]
    assert [e["flip_test"] for e in entries] == [False, True]
    assert "flip test on for " in done.stdout and "off for the others" in done.stdout
    done = cli_without_torch(["demo", "--engines", folder, "--out-dir", tmp_path / "demo"], cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert shipped.FLIP_NOTICE in done.stderr and "building" not in done.stderr
    mpjpe = float(done.stderr.split("MPJPE ")[1].split(" mm")[0])
    assert mpjpe < 150  # 107 mm without the flip test; 215 mm with it (issue 21, item 2)
    pytest.importorskip("pyarrow")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": str(image), "boxes": [box]}) + "\n")
    done = cli_without_torch(["batch", manifest, "--out", tmp_path / "poses", "--engine", built, "--flip"])
    assert done.returncode == 0, done.stderr
    assert shipped.FLIP_NOTICE in done.stderr


def test_cache_hits_need_no_torch_and_misses_say_so(shipped_engines, scene_file, tmp_path):
    """Issue 21 items 1, 3: a cached engine is found by the checkpoint file's own hash without torch;
    what truly needs torch says so in one line with the install command, exit 2."""
    from torchless import cli_without_torch

    folder, built, _ = shipped_engines
    image, box = scene_file
    for variant in ([], ["--variant", "XS"]):  # the checkpoint decides the variant: both find the engine
        done = cli_without_torch(["predict", image, "--bbox", ",".join(map(str, box)), "--checkpoint",
                                  shipped.SHIPPED_XS, "--engines", folder, "--output", tmp_path / "p.json", *variant])
        assert done.returncode == 0, done.stderr
    done = cli_without_torch(["build", "--checkpoint", shipped.SHIPPED_XS, "--max-batch", "4", "--out", folder])
    assert done.returncode == 0, done.stderr
    assert "cached engine is up to date" in done.stderr and done.stdout.strip() == str(built)
    for args in (["build", "--variant", "S", "--out", folder], ["inspect", shipped.SHIPPED_XS],
                 ["predict", image, "--bbox", "1,1,50,50", "--variant", "M", "--engines", folder]):
        done = cli_without_torch(args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert "needs PyTorch, which is not installed here: pip install torch==2.13.0" in lines[0]


def test_engines_of_a_cache_without_request_records_are_found_without_torch(shipped_engines, scene_file, tmp_path):
    """A cache filled by an older version, or copied without engines/requests/: the sidecars are searched
    by the checkpoint file's hash (recorded in weights.checkpoint_sha256; the shipped model's weights hash
    for older sidecars), so torch is still not needed (a review found this case exit 2)."""
    import json
    import shutil

    from conftest import make_model, write_official
    from torchless import cli_without_torch

    from cnpose_trt import build_engine
    from cnpose_trt.cache import file_sha256

    folder, _, _ = shipped_engines
    image, box = scene_file
    copy = tmp_path / "copied"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("requests"))
    for side in copy.glob("*.json"):  # as an older version wrote them: no checkpoint_sha256
        meta = json.loads(side.read_text())
        if "weights" in meta:
            meta["weights"].pop("checkpoint_sha256", None)
            side.write_text(json.dumps(meta))
    args = ["predict", image, "--bbox", ",".join(map(str, box)), "--checkpoint", shipped.SHIPPED_XS, "--engines",
            copy, "--output", tmp_path / "p.json"]
    done = cli_without_torch(args)
    assert done.returncode == 0, done.stderr
    assert list((copy / "requests").iterdir())  # found once, recorded for the next time
    ckpt = write_official(tmp_path / "mine.pth.tar", make_model("XS", seed=3))
    built = build_engine(checkpoint=ckpt, out_dir=tmp_path / "mine", max_batch=2)
    assert built.meta["weights"]["checkpoint_sha256"] == file_sha256(ckpt)
    shutil.rmtree(tmp_path / "mine" / "requests")
    done = cli_without_torch(["build", "--checkpoint", ckpt, "--max-batch", "2", "--out", tmp_path / "mine"])
    assert done.returncode == 0 and "cached engine is up to date" in done.stderr, done.stderr
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")  # other bytes: not that engine, and reading it needs torch
    done = cli_without_torch(["build", "--checkpoint", ckpt, "--max-batch", "2", "--out", tmp_path / "mine"])
    assert done.returncode == 2 and "needs PyTorch" in done.stderr


"""batch.job: BatchConfig (checked once, passed whole), run's keyword and config forms, the job's identity
as parts record it (its form is what resuming compares), and how a run settles its engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from cnpose_trt import batch  # noqa: E402
from cnpose_trt.batch import job  # noqa: E402
from cnpose_trt.batch.engine import EngineOptions  # noqa: E402
from cnpose_trt.io.draw import demo_image, save_image  # noqa: E402
from cnpose_trt.runtime.engine import read_sidecar  # noqa: E402


@pytest.mark.parametrize(("options", "message"), [
    ({"readers": 0}, "readers must be an integer > 0, got 0"),
    ({"readers": True}, "readers must be an integer > 0, got True"),
    ({"part_images": 2.5}, "part_images must be an integer > 0, got 2.5"),
    ({"part_seconds": 0}, "part_seconds must be a number > 0, got 0"),
    ({"part_seconds": float("inf")}, "part_seconds must be a number > 0, got inf"),
    ({"ray_batch_size": -1}, "ray_batch_size must be an integer > 0, got -1"),
    ({"ray_actors": 0}, "ray_actors must be an integer > 0, got 0"),
    ({"ray_engine": "copy"}, "ray_engine must be one of auto, ship, build, got 'copy'"),
    ({"precision": "int8"}, "precision must be fp32, fp16 or bf16 .build an int8 engine"),
    ({"threads": -1}, "threads must be a non-negative integer"),
    ({"spinning": "yes"}, "spinning must be on or off"),
])
def test_batch_config_is_checked_when_made(options, message):
    with pytest.raises(ValueError, match=message):
        batch.BatchConfig(**options)


def test_batch_config_normalises_its_fields():
    config = batch.BatchConfig(readers=np.int64(3), part_seconds=2, redo_changed=1, spinning="off", ray=True)
    assert (config.readers, config.part_seconds, config.redo_changed) == (3, 2.0, True)
    assert type(config.readers) is int and config.load_options == {"spinning": False}
    assert config.use_ray and config.ray_address == ""
    assert not batch.BatchConfig(ray=False).use_ray and batch.BatchConfig(ray="auto").ray_address == "auto"
    assert callable(batch.BatchConfig().say)


def test_run_takes_a_config_or_keywords(tmp_path, xs_engine_path):
    base, box = demo_image()
    save_image(tmp_path / "a.png", base)
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "boxes": [list(map(float, box))]}) + "\n")
    said: list[str] = []
    config = batch.BatchConfig(engine=xs_engine_path, progress=False, say=said.append)
    by_config = batch.run(tmp_path / "m.jsonl", tmp_path / "a", config)
    by_keywords = batch.run(tmp_path / "m.jsonl", tmp_path / "b", engine=xs_engine_path, progress=False)
    assert by_config.people == by_keywords.people == 1 and by_config.engine == by_keywords.engine
    assert any("1 images in the manifest" in m for m in said)
    flipped = batch.run(tmp_path / "m.jsonl", tmp_path / "c", config, flip=True)  # keywords replace fields
    assert flipped.people == 1
    with pytest.raises(TypeError, match="config must be a BatchConfig"):
        batch.run(tmp_path / "m.jsonl", tmp_path / "d", {"engine": xs_engine_path})
    with pytest.raises(TypeError, match="unexpected keyword argument 'enigne'"):
        batch.run(tmp_path / "m.jsonl", tmp_path / "d", enigne=xs_engine_path)


def test_the_job_identity_keeps_its_form():
    """Parts record the job; a rerun compares it as it is, so its form never changes (old folders resume)."""
    opts = EngineOptions(None, "M", None, "fp16", "tensorrt", 16, None)
    assert job._identity(None, None, None, opts, True) == {
        "engine": "build:variant=M,checkpoint=None,precision=fp16,backend=tensorrt,max_batch=16", "flip": True}
    opts = EngineOptions(None, "XS", "w.pth", "fp32", "auto", 32, None)
    kw = opts.build_kwargs()
    assert job._identity(None, None, None, opts, False)["engine"] == \
        f"build:variant=XS,checkpoint={kw['checkpoint']},precision=fp32,backend=auto,max_batch=32"
    meta = {"engine_file": "XS-abc.onnx"}
    assert job._identity(meta, Path("/e/XS-abc.json"), None, opts, 0) == {"engine": "XS-abc.onnx", "flip": False}


def test_a_loaded_engine_is_shipped_to_ray_workers(tmp_path, xs_engine, xs_engine_path):
    """An Engine passed in loaded is shipped as its file (ray_engine auto), never rebuilt from the default
    variant options; 'build' is refused for it as for an engine file."""
    settled = job._settle(tmp_path, batch.BatchConfig(engine=xs_engine, ray=True))
    assert settled.ray_engine == "ship" and settled.path == Path(xs_engine.path)
    assert settled.identity == {"engine": read_sidecar(xs_engine.path)["engine_file"], "flip": False}
    with pytest.raises(ValueError, match="ray_engine='build' builds from the variant options"):
        job._settle(tmp_path, batch.BatchConfig(engine=xs_engine, ray=True, ray_engine="build"))
    with pytest.raises(ValueError, match="ray_engine='build' builds from the variant options"):
        job._settle(tmp_path, batch.BatchConfig(engine=xs_engine_path, ray=True, ray_engine="build"))
    local = job._settle(tmp_path, batch.BatchConfig(engine=xs_engine))
    assert local.engine is xs_engine and local.path is None

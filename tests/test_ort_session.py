"""Issue 22, item 3: ONNX Runtime's intra-op threads and spinning, from load_engine to every command
that loads an engine (predict, eval, batch locally and in Ray actors, bench) and PoseEstimator."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cnpose_trt.batch.job as batch_job
import cnpose_trt.batch.ray as batch_ray
import cnpose_trt.cli.eval as cli_eval
import cnpose_trt.eval.evaluate as evaluate_module
import cnpose_trt.runtime.engine as engine_module
import cnpose_trt.runtime.open as open_module
from cnpose_trt import load_engine
from cnpose_trt.backends import ORT_DEFAULT_SPINNING, ORT_DEFAULT_THREADS, session_options
from cnpose_trt.pipeline.estimator import PoseEstimator

SPIN_KEY = "session.intra_op.allow_spinning"


def _session(engine) -> tuple[int, str]:
    opts = engine.session.get_session_options()
    return opts.intra_op_num_threads, opts.get_session_config_entry(SPIN_KEY)


def test_load_engine_sets_threads_and_spinning(xs_engine_path):
    e = load_engine(xs_engine_path, threads=1, spinning=False)
    assert _session(e) == (1, "0") and (e.threads, e.spinning) == (1, False)
    e = load_engine(xs_engine_path, threads=2, spinning=True)
    assert _session(e) == (2, "1")
    default = load_engine(xs_engine_path)
    assert _session(default)[1] == ("1" if ORT_DEFAULT_SPINNING else "0")
    assert (default.threads, default.spinning) == (ORT_DEFAULT_THREADS, ORT_DEFAULT_SPINNING)


@pytest.mark.parametrize("options, message", [
    ({"threads": -1}, "threads must be a non-negative integer"),
    ({"threads": 1.5}, "threads must be a non-negative integer"),
    ({"spinning": "yes"}, "spinning must be True or False"),
    ({"spinning": 1}, "spinning must be True or False"),
])
def test_bad_session_options_are_refused_in_one_line(xs_engine_path, options, message):
    with pytest.raises(ValueError, match=message) as info:
        load_engine(xs_engine_path, **options)
    assert "\n" not in str(info.value)


def test_session_options_of_the_commands():
    assert session_options() == {}
    assert session_options(0, "off") == {"threads": 0, "spinning": False}
    assert session_options(None, "on") == {"spinning": True}
    with pytest.raises(ValueError, match="spinning must be on or off"):
        session_options(None, "maybe")
    with pytest.raises(ValueError, match="threads must be a non-negative integer"):
        session_options(-2)


def test_pose_estimator_loads_with_the_options(xs_engine_path, engine_dir, xs_engine):
    est = PoseEstimator(xs_engine_path, threads=1, spinning=False)
    assert _session(est.engine) == (1, "0")
    built = PoseEstimator("XS", engine_dir=engine_dir, max_batch=4, threads=1, spinning=False)
    assert _session(built.engine) == (1, "0")
    with pytest.raises(ValueError, match="threads and spinning apply where PoseEstimator loads the engine"):
        PoseEstimator(xs_engine, threads=1, spinning=False)


@pytest.fixture
def loads(monkeypatch):
    """Every load_engine call's options, and the engine it returned."""
    seen = []
    real = engine_module.load_engine

    def spy(path, **options):
        engine = real(path, **options)
        seen.append((options, engine))
        return engine

    monkeypatch.setattr(engine_module, "load_engine", spy)
    # The callers' own bindings (each imports load_engine at module level): open_engine's, the eval command's,
    # evaluate's, batch's and its Ray actor's.
    for module in (open_module, cli_eval, evaluate_module, batch_job, batch_ray):
        monkeypatch.setattr(module, "load_engine", spy)
    return seen


def test_predict_and_eval_commands_pass_threads_and_spinning(xs_engine_path, tmp_path, loads, capsys):
    from cnpose_trt.cli.app import main as cli
    from cnpose_trt.io.draw import demo_image, save_image

    img, box = demo_image()
    save_image(tmp_path / "a.png", img)
    assert cli(["predict", str(tmp_path / "a.png"), "--bbox", ",".join(map(str, box)), "--engine",
                str(xs_engine_path), "--threads", "1", "--spinning", "off"]) == 0
    assert loads[-1][0] == {"threads": 1, "spinning": False} and _session(loads[-1][1]) == (1, "0")
    assert cli(["eval", "--engine", str(xs_engine_path), "--count", "2", "--no-progress", "--threads", "2",
                "--spinning", "on"]) == 0
    assert loads[-1][0] == {"threads": 2, "spinning": True} and _session(loads[-1][1]) == (2, "1")
    with pytest.raises(SystemExit) as info:
        cli(["predict", str(tmp_path / "a.png"), "--engine", str(xs_engine_path), "--spinning", "sometimes"])
    assert info.value.code == 2
    assert cli(["predict", str(tmp_path / "a.png"), "--bbox", ",".join(map(str, box)), "--engine",
                str(xs_engine_path), "--threads", "-1"]) == 2
    assert "threads must be a non-negative integer" in capsys.readouterr().err


def test_batch_and_bench_pass_threads_and_spinning(xs_engine_path, tmp_path, loads):
    pytest.importorskip("pyarrow")
    from cnpose_trt import batch
    from cnpose_trt.eval import bench
    from cnpose_trt.io.draw import demo_image, save_image

    img, box = demo_image()
    save_image(tmp_path / "a.png", img)
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "boxes": [list(map(float, box))]}) + "\n")
    batch.run(tmp_path / "m.jsonl", tmp_path / "out", engine=xs_engine_path, threads=1, spinning=False,
                        progress=False)
    assert loads[-1][0] == {"threads": 1, "spinning": False} and _session(loads[-1][1]) == (1, "0")
    with pytest.raises(ValueError, match="threads apply where batch loads the engine"):
        batch.run(tmp_path / "m.jsonl", tmp_path / "out2", engine=load_engine(xs_engine_path), threads=1)
    rows = bench.run_bench(["XS"], ["onnxruntime"], ["fp32"], [1], iterations=1, warmup=0,
                           engine_dir=xs_engine_path.parent, threads=1, spinning="off")
    assert "skipped" not in rows[0]
    assert loads[-1][0] == {"threads": 1, "spinning": False} and _session(loads[-1][1]) == (1, "0")


def test_ray_actor_loads_with_threads_and_spinning(xs_engine_path):
    from cnpose_trt.batch.ray import RayPredictor

    spec = {"mode": "build", "build": {"variant": "XS", "checkpoint": None, "backend": "onnxruntime",
                                       "out_dir": str(xs_engine_path.parent), "max_batch": 4}}
    actor = RayPredictor(spec, False, 1, 1, "cpu", spinning=False)
    try:
        assert _session(actor.engine) == (1, "0")
        np.testing.assert_equal(actor.engine.max_batch, 4)
    finally:
        actor.pool.shutdown()

"""tools/train_xs.py: its target is what the package's decode inverts, its soft-argmax and loss are upstream's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_xs.py"


@pytest.fixture(scope="module")
def train():
    import sys

    spec = importlib.util.spec_from_file_location("train_xs", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_xs"] = module  # its classes pickle by module name (data workers)
    spec.loader.exec_module(module)
    return module


def test_target_decodes_back_to_the_joints(train):
    from cnpose_trt.io.preprocess import prepare
    from cnpose_trt.io.synthetic import synthesize
    from cnpose_trt.ops.geometry import cells_to_image

    for i in range(5):
        s = synthesize((3, i), width=200, height=160)
        _, crop_boxes = prepare(s.image, s.boxes)
        t, vis = train.targets(s.joints_img[0], float(s.root_depth[0]), crop_boxes[0])
        back = cells_to_image(t[None].astype(np.float64), crop_boxes, (32, 32), 32, s.root_depth)
        np.testing.assert_allclose(back[0], s.joints_img[0], rtol=0, atol=2e-3)  # float32 target
        assert vis.all()  # the whole person is inside its own crop and the 2 m depth box


def test_target_visibility_drops_joints_outside_the_crop_or_depth_box(train):
    joints = np.zeros((18, 3))
    joints[:, :2] = 50.0
    joints[:, 2] = 5000.0
    joints[1, 0] = 99.0    # crop [0, 100): x = 99 px -> cell 31.68, inside
    joints[2, 0] = 100.0   # x = 100 px -> cell 32, outside
    joints[3, 1] = -0.5    # above the crop
    joints[4, 2] = 6000.0  # root + 1000 mm: z = 1 of the box, outside (upstream keeps z in [0, 1))
    joints[5, 2] = 4000.0  # root - 1000 mm: z = 0, inside
    t, vis = train.targets(joints, 5000.0, np.array([0.0, 0.0, 100.0, 100.0]))
    assert vis.tolist() == [1, 1, 0, 0, 0, 1] + [1] * 12
    np.testing.assert_allclose(t[0], [16.0, 16.0, 16.0])  # centre of the crop, at the root depth: z = D / 2
    np.testing.assert_allclose(t[5, 2], 0.0)


def test_soft_argmax_equals_the_package_reference(train, rng):
    from cnpose_trt import soft_argmax_reference

    heat = rng.normal(0, 3, (2, 18 * 4, 5, 6)).astype(np.float32)
    heat[0, 7, 2, 3] = 40.0  # one hot voxel: joint 1 (channels 4..7), depth 3
    got = train.soft_argmax(torch.from_numpy(heat), 18, 4).double().numpy()
    ref, _ = soft_argmax_reference(heat.astype(np.float64), 18, 4)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(got[0, 1], [3.0, 2.0, 3.0], atol=1e-4)


def test_loss_is_upstreams_masked_l1(train):
    coords = torch.zeros(1, 2, 3)
    target = torch.tensor([[[3.0, 0.0, 6.0], [100.0, 100.0, 100.0]]])
    vis = torch.tensor([[1.0, 0.0]])
    # Joint 0: (3 + 0 + 6) / 3 = 3; joint 1 masked: 0; mean over 2 joints = 1.5.
    assert float(train.coord_loss(coords, target, vis)) == pytest.approx(1.5)


def test_learning_rate_schedule(train):
    lr = [train.learning_rate(s, 100, 10, 1e-3, 1e-6) for s in range(100)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:], strict=False))
    assert lr[-1] == pytest.approx(1e-6, abs=1e-6)


def test_shipped_state_is_half_precision_except_batchnorm_and_loads_as_float32(train, tmp_path):
    from cnpose_trt.nn.model import build_model

    model = build_model("XS", warn_random=False)
    train.init_for_training(model, 0)
    state = train.official_state(model, half=True)
    assert all(k.startswith("module.") for k in state)
    assert state["module.head.final_layer.weight"].dtype == torch.float16
    assert state["module.backbone.norm.running_var"].dtype == torch.float32
    path = tmp_path / "x.pth.tar"
    torch.save({"epoch": 1, "network": state, "optimizer": {}}, path)
    loaded = build_model("XS", path)
    w = loaded.state_dict()["head.final_layer.weight"]
    assert w.dtype == torch.float32 and torch.equal(w, state["module.head.final_layer.weight"].float())


def test_learning_rate_follows_a_time_budget(train):
    lr = train.learning_rate
    # Time further along than steps: the cosine follows the time; at the budget it reaches min_lr.
    assert lr(100, 10_000, 10, 1e-3, 1e-6, elapsed=50.0, budget=100.0) == pytest.approx(lr(5005, 10_000, 10, 1e-3, 1e-6),
                                                                                     rel=1e-3)
    assert lr(100, 10_000, 10, 1e-3, 1e-6, elapsed=100.0, budget=100.0) == pytest.approx(1e-6)
    assert lr(100, 10_000, 10, 1e-3, 1e-6, elapsed=1.0, budget=None) == lr(100, 10_000, 10, 1e-3, 1e-6)


def test_time_budget_stops_and_spans_resumed_runs(train, tmp_path):
    import json

    args = ["--out", str(tmp_path), "--steps", "1000", "--batch", "2", "--time-budget", "3", "--warmup", "1",
            "--log-every", "1", "--save-every", "1", "--eval-count", "2", "--threads", "2"]
    assert train.main(args) == 0
    record = json.loads((tmp_path / "convnextpose_xs_synthetic.json").read_text())
    steps = record["steps"]
    assert 1 <= steps < 1000 and record["time_budget_s"] == 3.0
    ck = torch.load(tmp_path / "last.pth.tar", map_location="cpu", weights_only=True)
    assert ck["budget_seconds_used"] >= 3.0
    # Run again: the budget was spent, so nothing more is trained (the schedule does not restart).
    assert train.main(args) == 0
    assert json.loads((tmp_path / "convnextpose_xs_synthetic.json").read_text())["steps"] == steps
    assert "spent by earlier runs" in (tmp_path / "train_log.txt").read_text()
    with pytest.raises(SystemExit, match="--time-budget must be > 0"):
        train.parse_args(["--time-budget", "0"])

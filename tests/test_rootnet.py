"""RootNet's pieces on their own: the layer table and parameter count (spec.ROOTNET), the official
checkpoint layout and what the loader refuses, and the host math (ops/rootnet.py) against formulas
written out here. The comparison with upstream's output is tests/test_rootnet_golden.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnpose_trt.errors import CheckpointError
from cnpose_trt.ops.geometry import crop_matrices
from cnpose_trt.ops.rootnet import k_values, roots_to_camera, roots_to_image
from cnpose_trt.spec import ROOTNET

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def state():
    from cnpose_trt.nn.rootnet import RootNet

    return RootNet().state_dict()


def test_parameters_and_keys(state):
    from cnpose_trt.nn.model import count_parameters
    from cnpose_trt.nn.rootnet import RootNet

    with torch.device("meta"):
        model = RootNet()
    assert count_parameters(model) == ROOTNET.parameters == 33_997_634
    assert (count_parameters(model.backbone), count_parameters(model.root)) == (23_508_032, 10_489_602)
    keys = list(state)
    assert len(keys) == 340 and keys[0] == "backbone.conv1.weight"
    assert keys[-4:] == ["root.xy_layer.weight", "root.xy_layer.bias", "root.depth_layer.weight", "root.depth_layer.bias"]
    assert "backbone.layer1.0.downsample.1.running_var" in state and "backbone.layer1.1.downsample.0.weight" not in state
    assert tuple(state["root.deconv_layers.0.weight"].shape) == (2048, 256, 4, 4)  # (in, out, kh, kw)
    assert not any(k.startswith(("fc.", "backbone.fc")) for k in keys)


def test_layer_table():
    from cnpose_trt.nn.rootnet import RootNet

    with torch.device("meta"):
        model = RootNet()
        shapes = {}
        names = ["backbone.relu", "backbone.maxpool", *[f"backbone.layer{i}" for i in range(1, 5)],
                 *[f"root.deconv_layers.{i}" for i in (2, 5, 8)], "root.xy_layer"]

        def keep(name):
            def hook(module, inputs, output):
                shapes.setdefault(name, tuple(output.shape[1:]))
            return hook

        for name in names:
            model.get_submodule(name).register_forward_hook(keep(name))
        out = model(torch.empty(2, 3, 256, 256))
    assert shapes == {"backbone.relu": (64, 128, 128), "backbone.maxpool": (64, 64, 64),
                      "backbone.layer1": (256, 64, 64), "backbone.layer2": (512, 32, 32),
                      "backbone.layer3": (1024, 16, 16), "backbone.layer4": (2048, 8, 8),
                      "root.deconv_layers.2": (256, 16, 16), "root.deconv_layers.5": (256, 32, 32),
                      "root.deconv_layers.8": (256, 64, 64), "root.xy_layer": (1, 64, 64)}
    assert tuple(out.shape) == (2, 3)


def test_head_soft_argmax_and_gamma():
    """A single hot logit puts x, y on its cell; a constant map its centre 31.5; the xy bias does nothing;
    gamma is depth_layer of the pooled features."""
    from cnpose_trt.nn.rootnet import RootHead

    head = RootHead().eval().double()
    logits = torch.zeros(3, 1, 64, 64, dtype=torch.float64)
    logits[0, 0, 40, 7] = 1e4
    logits[1, 0, 0, 63] = 1e4

    class Given(torch.nn.Module):  # the logits as given, plus a bias
        def forward(self, fm):
            return logits + 123.0

    head.deconv_layers, head.xy_layer = torch.nn.Identity(), Given()
    fm = torch.randn(3, 2048, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out = head(fm)
        gamma = head.depth_layer(fm.mean(dim=(2, 3), keepdim=True)).flatten()
    np.testing.assert_allclose(out[:, :2].numpy(), [[7, 40], [63, 0], [31.5, 31.5]], atol=1e-9)
    np.testing.assert_allclose(out[:, 2].numpy(), gamma.numpy(), rtol=1e-12)


def _official(state, **changes):
    net = {f"module.{k}": v for k, v in state.items()}
    net.update(changes)
    return {"epoch": 3, "network": {k: v for k, v in net.items() if v is not None}, "optimizer": {}}


def test_official_snapshot_loads(state, tmp_path):
    from cnpose_trt.nn.rootnet import build_rootnet

    small = {k: v.clone() for k, v in state.items()}
    small["root.depth_layer.bias"].fill_(0.25)
    model = build_rootnet(_official(small))
    assert not model.training and float(model.root.depth_layer.bias.detach()) == 0.25


@pytest.mark.parametrize(("change", "message"), [
    ({"module.root.xy_layer.bias": None}, r"does not fit RootNet .*missing keys: root\.xy_layer\.bias"),
    ({"module.fc.weight": torch.zeros(1000, 2048)}, r"does not fit RootNet .*unexpected keys: fc\.weight"),
    ({"module.root.xy_layer.weight": torch.zeros(17, 256, 1, 1)},
     r"tensors of other shapes: root\.xy_layer\.weight expected \(1, 256, 1, 1\), found \(17, 256, 1, 1\)"),
    ({"module.root.depth_layer.bias": torch.tensor([float("nan")])}, r"non-finite weights .*root\.depth_layer\.bias"),
    ({"module.root.depth_layer.bias": torch.tensor([1])}, r"weights must be floating point"),
])
def test_loader_refuses_in_one_line(state, change, message):
    from cnpose_trt.nn.rootnet import RootNet, load_rootnet_into

    with pytest.raises(CheckpointError, match=message) as info:
        load_rootnet_into(RootNet(), _official(state, **change))
    assert "\n" not in str(info.value)


def test_convnextpose_and_rootnet_files_are_told_apart(state, tmp_path):
    from cnpose_trt.nn.checkpoint import detect_spec, network_of
    from cnpose_trt.nn.model import build_model
    from cnpose_trt.nn.rootnet import RootNet, load_rootnet_into

    xs = build_model("XS", warn_random=False).state_dict()
    assert (network_of(xs), network_of(_official(state)["network"])) == ("ConvNeXtPose", "RootNet")
    with pytest.raises(CheckpointError, match=r"holds ConvNeXtPose weights, not RootNet's") as info:
        load_rootnet_into(RootNet(), {"network": xs})
    assert "\n" not in str(info.value)
    path = tmp_path / "snapshot_rootnet.pth.tar"
    torch.save(_official(state), path)
    with pytest.raises(CheckpointError, match=r"snapshot_rootnet\.pth\.tar holds RootNet weights .*not ConvNeXtPose"):
        build_model("XS", path)
    with pytest.raises(CheckpointError, match=r"not a ConvNeXtPose state_dict: it holds RootNet weights"):
        detect_spec(state)


def test_random_weights_are_deterministic_and_sane():
    from cnpose_trt.nn.rootnet import build_rootnet

    with pytest.warns(UserWarning, match="no RootNet checkpoint"):
        a = build_rootnet(seed=3)
    b = build_rootnet(seed=3, warn_random=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    from cnpose_trt.io.draw import demo_image
    from cnpose_trt.io.preprocess import prepare

    image, box = demo_image()
    x = torch.from_numpy(prepare(image, [box, (0, 0, 100, 100)])[0])
    with torch.no_grad():
        out = a(x).numpy()
    assert np.isfinite(out).all() and ((0 <= out[:, :2]) & (out[:, :2] <= 63)).all()
    assert ((0.1 < out[:, 2]) & (out[:, 2] < 2)).all()  # gamma positive, of order one: depth near k


def test_k_values_formula_and_broadcasting():
    boxes = np.array([[10.0, 20.0, 300.0, 300.0], [-50.5, 3.25, 120.0, 80.0]])
    cams = np.array([[1500.0, 1400.0, 320.0, 240.0], [1000.0, 1000.0, 0.0, 0.0]])
    want = [math.sqrt(2000.0 * 2000.0 * fx * fy / (w * h)) for (_, _, w, h), (fx, fy, _, _) in zip(boxes, cams, strict=True)]
    np.testing.assert_allclose(k_values(boxes, cams), want, rtol=1e-15)
    one = k_values(boxes, cams[0])  # one camera for every person
    np.testing.assert_allclose(one[1], math.sqrt(4e6 * 1500 * 1400 / 9600), rtol=1e-15)
    assert k_values(np.zeros((0, 4)), cams[0]).shape == (0,)


@pytest.mark.parametrize(("boxes", "cam", "message"), [
    ([[0, 0, 0, 10.0]], [1500, 1500, 0, 0], r"crop_boxes\[0\] .* is empty"),
    ([[0, 0, 10, 10.0]], [0, 1500, 0, 0], r"intrinsics must be fx, fy, cx, cy"),
    ([[0, 0, 10, np.nan]], [1500, 1500, 0, 0], r"crop_boxes must be finite"),
    ([[0, 0, 10, 10.0]] * 2, [[1500, 1500, 0, 0]] * 3, r"intrinsics must have shape \(2, 4\)"),
])
def test_k_values_refuses(boxes, cam, message):
    with pytest.raises(ValueError, match=message):
        k_values(boxes, cam)


def test_roots_to_image_is_the_inverse_crop_map():
    """x / 64 * w + x0 equals the crop pixel x * 4 taken back through the crop's affine map."""
    rng = np.random.default_rng(5)
    boxes = np.c_[rng.uniform(-100, 500, (6, 2)), np.repeat(rng.uniform(20, 600, (6, 1)), 2, 1)]
    raw = np.c_[rng.uniform(0, 63, (6, 2)), rng.uniform(0.2, 0.8, 6)]
    k = rng.uniform(5000, 30000, 6)
    image = roots_to_image(raw, boxes, k)
    m = np.concatenate([crop_matrices(boxes, 256), np.tile([[[0, 0, 1.0]]], (6, 1, 1))], axis=1)
    back = np.einsum("pij,pj->pi", np.linalg.inv(m), np.c_[raw[:, :2] * 4, np.ones(6)])[:, :2]
    # the crop map's centre is rounded to float32 as upstream's is: up to half a float32 ulp of ~600 px
    np.testing.assert_allclose(image[:, :2], back, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(image[:, 2], raw[:, 2] * k)
    cam = np.array([1200.0, 1100.0, 300.0, 200.0])
    camera = roots_to_camera(image, cam)
    np.testing.assert_allclose(camera[:, 0], (image[:, 0] - 300) / 1200 * image[:, 2], rtol=1e-15)
    np.testing.assert_allclose(camera[:, 1], (image[:, 1] - 200) / 1100 * image[:, 2], rtol=1e-15)
    np.testing.assert_array_equal(camera[:, 2], image[:, 2])
    with pytest.raises(ValueError, match=r"k must have shape \(6\)"):
        roots_to_image(raw, boxes, k[:5])

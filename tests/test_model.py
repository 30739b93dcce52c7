import pytest

torch = pytest.importorskip("torch", reason="needs PyTorch (the export extra)")
from conftest import make_model

from cnpose_trt import VARIANTS, custom_spec
from cnpose_trt.nn.model import build_model, count_parameters

PARAMS = {"XS": 3_528_008, "S": 7_438_976, "M": 7_587_008, "L": 8_380_352}
WITH_STATS = {"XS": 3_534_120, "S": 7_448_928, "M": 7_596_960, "L": 8_391_328}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_counts_and_output(name):
    model = make_model(name)
    assert count_parameters(model) == PARAMS[name]
    state = model.state_dict()
    assert sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked")) == WITH_STATS[name]
    assert not model.training
    with torch.no_grad():
        out = model(torch.randn(2, 3, 256, 256))
    assert tuple(out.shape) == (2, *VARIANTS[name].heatmap_shape)
    assert torch.isfinite(out).all() and out.std() > 1e-3


def test_official_parameter_names():
    names = set(make_model("M").state_dict())
    for key in ["backbone.downsample_layers.0.0.weight", "backbone.downsample_layers.0.1.running_var",
                "backbone.downsample_layers.3.0.weight", "backbone.downsample_layers.3.1.weight",
                "backbone.stages.2.5.pwconv1.weight", "backbone.stages.3.2.dwconv.bias",
                "backbone.stages.0.0.norm.running_mean", "backbone.norm.weight",
                "head.deconv_layers_1.dwconv.weight", "head.deconv_layers_3.pwconv.bias",
                "head.deconv_layers_2.norm.num_batches_tracked", "head.final_layer.weight",
                "head.final_layer.bias"]:
        assert key in names, key
    assert not any(k.startswith("module.") for k in names)


def test_xs_third_head_layer_exists_but_does_not_upsample():
    model = make_model("XS")
    assert isinstance(model.head.deconv_layers_3.upsample, torch.nn.Identity)
    assert isinstance(model.head.deconv_layers_2.upsample, torch.nn.UpsamplingBilinear2d)
    assert "head.deconv_layers_3.pwconv.weight" in model.state_dict()


def test_random_weights_warn_and_are_deterministic():
    with pytest.warns(UserWarning, match="meaningless"):
        a = build_model("XS")
    b = make_model("XS")
    c = make_model("XS", seed=1)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.head.final_layer.weight, c.head.final_layer.weight)


def test_custom_spec_model():
    spec = custom_spec("XS", name="XS-3UP", head_upsample=(True, True, True), depth_dim=64)
    model = make_model(spec)
    with torch.no_grad():
        assert tuple(model(torch.zeros(1, 3, 256, 256)).shape) == (1, 1152, 64, 64)


@pytest.mark.parametrize("name, gmacs", [("XS", 0.82), ("S", 1.74), ("M", 2.79), ("L", 4.26)])
def test_multiply_accumulates_per_image(name, gmacs):
    """The README's MAC column: torch's flop counter, one 256x256 image (2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model(name)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 256, 256))
    assert abs(counter.get_total_flops() / 2e9 - gmacs) < 0.01

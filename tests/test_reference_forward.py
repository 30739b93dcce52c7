"""Heatmap values against a float64 reference forward written from the architecture card alone.

`reference_forward` below is written from /work/shared/reference/convnextpose.md ("Layers"), not
from cnpose_trt/model.py: plain torch.nn.functional ops on the state_dict tensors, BatchNorm in its
eval form written out by hand, in float64. The package's torch model and the ONNX Runtime engine
built from the same weights must reproduce its heatmap values. This catches bugs that shape,
parameter and MAC counts cannot see (a dropped residual, a wrong upsample, a BatchNorm folded
wrongly in export) and that an export test comparing ONNX with the same torch model cannot see
either.

Tolerances come from the arithmetic: the float64 model differs from the float64 reference only by
float64 rounding, the float32 paths by float32 rounding accumulated through ~30 layers (measured:
about 6 float32 epsilons of the output's peak, bound 64; float64: about 8, bound 256).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs PyTorch (the export extra)")
F = torch.nn.functional

from cnpose_trt import load_engine, save_checkpoint
from cnpose_trt.build.builder import build_engine
from cnpose_trt.nn.model import build_model
from cnpose_trt.spec import custom_spec

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which the upstream model uses
EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)
F32_BOUND = 64 * EPS32  # max |error| / max |reference| for a float32 forward
F64_BOUND = 256 * EPS64  # measured: ~8

# The card's facts, written here on purpose instead of read from cnpose_trt.spec.
XS_CARD = {"depths": (2, 2, 6, 2), "upsample": (True, True, False), "heatmap": (576, 32, 32)}
# A small 3UP configuration (every head layer upsamples) to keep the float64 forward cheap: a
# 128x128 input, so the heatmap is 4 * 2**3 = 32 cells wide.
SMALL_3UP = {"depths": (1, 1, 2, 1), "dims": (16, 32, 48, 64), "head_channels": 32, "depth_dim": 16,
             "input_size": 128, "upsample": (True, True, True), "heatmap": (18 * 16, 32, 32)}


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
    """float64 convolutions take torch's slow generic path, whose threads spin badly on a busy
    2-core machine (seconds instead of ~0.1 s): run this module on one thread; it times nothing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Weights:
    """The state_dict in float64, remembering which tensors the reference read."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.detach().to(torch.float64) for k, v in state.items() if not k.endswith("num_batches_tracked")}
        self.used: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self.state[key]


def _batchnorm(x: torch.Tensor, w: _Weights, prefix: str) -> torch.Tensor:
    """Eval-mode BatchNorm2d: (x - running_mean) / sqrt(running_var + eps) * weight + bias, per channel."""
    def per_channel(name: str) -> torch.Tensor:
        return w[prefix + name].view(1, -1, 1, 1)

    return (x - per_channel("running_mean")) / torch.sqrt(per_channel("running_var") + BN_EPS) \
        * per_channel("weight") + per_channel("bias")


def _conv(x: torch.Tensor, w: _Weights, prefix: str, **kwargs: int) -> torch.Tensor:
    return F.conv2d(x, w[prefix + "weight"], w[prefix + "bias"], **kwargs)


def reference_forward(x: torch.Tensor, w: _Weights, depths: tuple[int, ...], upsample: tuple[bool, ...]
                      ) -> torch.Tensor:
    """(N, 3, S, S) float64 -> (N, 18*D, H, W) float64, following the card layer by layer."""
    # Stem: conv 4x4 stride 4, then BatchNorm.
    x = _batchnorm(_conv(x, w, "backbone.downsample_layers.0.0.", stride=4), w, "backbone.downsample_layers.0.1.")
    for stage, blocks in enumerate(depths):
        if stage:  # BatchNorm, then conv 2x2 stride 2
            x = _batchnorm(x, w, f"backbone.downsample_layers.{stage}.0.")
            x = _conv(x, w, f"backbone.downsample_layers.{stage}.1.", stride=2)
        for block in range(blocks):
            p = f"backbone.stages.{stage}.{block}."
            y = _conv(x, w, p + "dwconv.", padding=3, groups=x.shape[1])  # 7x7 depthwise
            y = _batchnorm(y, w, p + "norm.")
            y = torch.relu(_conv(y, w, p + "pwconv1."))
            x = x + _conv(y, w, p + "pwconv2.")  # residual
    x = _batchnorm(x, w, "backbone.norm.")
    for layer, up in enumerate(upsample, start=1):
        p = f"head.deconv_layers_{layer}."
        x = _conv(x, w, p + "dwconv.", padding=1, groups=x.shape[1])  # 3x3 depthwise
        x = torch.relu(_conv(_batchnorm(x, w, p + "norm."), w, p + "pwconv."))
        if up:  # UpsamplingBilinear2d(scale_factor=2) is bilinear with align_corners=True
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    return _conv(x, w, "head.final_layer.")


def _adversarial_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Running variances spread over 1e-4 .. 1 (weights scaled so activations stay O(1)).

    With variances near 1 the BatchNorm eps is invisible at float32 precision; near 1e-4 it
    changes the scale by ~5 %, so an export that folds BatchNorm without eps is caught.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                var = 10.0 ** (-4 * torch.rand(c, generator=gen))
                m.running_var.copy_(var)
                m.weight.copy_(torch.sqrt(var + BN_EPS) * (1 + 0.2 * torch.randn(c, generator=gen)))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=gen))


CASES = {
    "XS": ("XS", XS_CARD),
    "small-3UP": (custom_spec("XS", name="small-3UP", depths=SMALL_3UP["depths"], dims=SMALL_3UP["dims"],
                              head_channels=SMALL_3UP["head_channels"], head_upsample=SMALL_3UP["upsample"],
                              depth_dim=SMALL_3UP["depth_dim"], input_size=SMALL_3UP["input_size"]), SMALL_3UP),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(model, card facts, input (2, 3, S, S) float32, float64 reference heatmaps, engine)."""
    variant, card = CASES[request.param]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(variant, seed=11)
    _adversarial_batchnorm(model, seed=12)
    size = card.get("input_size", 256)
    x = np.random.default_rng(13).standard_normal((2, 3, size, size)).astype(np.float32)
    weights = _Weights(model.state_dict())
    with torch.no_grad():
        ref = reference_forward(torch.from_numpy(x).double(), weights, card["depths"], card["upsample"]).numpy()
    assert weights.used == set(weights.state), f"tensors the card does not use: {set(weights.state) - weights.used}"
    assert ref.shape == (2, *card["heatmap"])
    out = tmp_path_factory.mktemp(f"ref-{request.param}")
    ckpt = save_checkpoint(model, out / "weights.pth")
    engine = load_engine(build_engine(variant, ckpt, out_dir=out, max_batch=2).path)
    return model, card, x, ref, engine


def _scaled_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| in units of max |ref|."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def test_reference_is_not_degenerate(case):
    """Heatmaps that vary, and BatchNorm statistics where eps matters: otherwise the checks below prove little."""
    model, _, _, ref, _ = case
    assert np.isfinite(ref).all() and ref.std() > 0.05
    assert ref.std(axis=(2, 3)).min() > 1e-3  # every channel varies in space
    var = torch.cat([m.running_var for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert var.min() < 1e-3 and var.max() > 0.1


def test_torch_model_float64_matches_reference(case):
    model, _, x, ref, _ = case
    with torch.no_grad():
        got = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    assert _scaled_error(got, ref) < F64_BOUND


def test_torch_model_float32_matches_reference(case):
    model, _, x, ref, _ = case
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    assert got.dtype == np.float32
    assert _scaled_error(got, ref) < F32_BOUND


def test_onnx_engine_matches_reference(case):
    """The exported graph (BatchNorm folded, dynamic batch) run by ONNX Runtime."""
    _, _, x, ref, engine = case
    assert _scaled_error(engine.infer(x), ref) < F32_BOUND
    assert _scaled_error(engine.infer(x[1:]), ref[1:]) < F32_BOUND  # another batch size, same values

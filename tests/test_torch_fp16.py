"""The torch fp16 engine keeps the stem in float32 (backends/torch/runtime.py, _half_body_fp32_stem).

PyTorch's CPU float16 math stands in for the GPU's here: the failure it guards against is
float16 rounding of the stem BatchNorm's running means (about 1020 under upstream's 0..255
input scale), which is the same on any device.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cnpose_trt.backends.torch.runtime import _half_body_fp32_stem  # noqa: E402
from cnpose_trt.build.verify import accuracy_inputs, joint_error  # noqa: E402
from cnpose_trt.nn.model import build_model  # noqa: E402
from cnpose_trt.spec import get_spec  # noqa: E402


def test_fp16_body_with_a_float32_stem_keeps_joints():
    spec = get_spec("XS")
    model = build_model(spec, warn_random=False).eval()
    x = torch.from_numpy(accuracy_inputs(spec, 4))
    mixed = copy.deepcopy(model)
    _half_body_fp32_stem(mixed)
    stem = mixed.backbone.downsample_layers[0]
    assert all(p.dtype == torch.float32 for p in stem.state_dict().values() if p.is_floating_point())
    assert mixed.backbone.stages[0][0].dwconv.weight.dtype == torch.float16
    torch.testing.assert_close(stem.state_dict(), model.backbone.downsample_layers[0].state_dict(), rtol=0, atol=0)
    naive = copy.deepcopy(model).half()
    with torch.no_grad():
        ref = model(x).numpy()
        got = mixed(x)
        bad = naive(x.half()).float().numpy()
    assert got.dtype == torch.float16
    good = joint_error(ref, got.float().numpy(), spec)
    worse = joint_error(ref, bad, spec)
    assert np.isfinite(got.float().numpy()).all()
    assert good["mean_cells"] < 0.01, good  # measured 0.0026
    assert worse["mean_cells"] > 0.1, worse  # all-float16: 0.62 cells (the rounding this prevents)

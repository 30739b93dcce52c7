import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="needs PyTorch (the export extra)")
from conftest import make_model

from cnpose_trt import VARIANTS
from cnpose_trt.build.export import export_onnx, fuse_batchnorm


def _rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_onnx_matches_pytorch(tmp_path, name, rng):
    model = make_model(name, seed=7)  # init_random gives non-trivial BatchNorm statistics
    bn = model.backbone.stages[2][0].norm
    assert bn.running_mean.abs().max() > 0.1 and (bn.running_var - 1).abs().max() > 0.1
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["BatchNormalization"] == 0
    assert ops["Resize"] == VARIANTS[name].num_upsample
    for node in (n for n in proto.graph.node if n.op_type == "Resize"):
        attrs = {a.name: a for a in node.attribute}
        assert attrs["coordinate_transformation_mode"].s == b"align_corners"
        assert attrs["mode"].s == b"linear"
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "image" and out.name == "heatmaps"
    assert inp.type.tensor_type.shape.dim[0].dim_param and out.type.tensor_type.shape.dim[0].dim_param
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = rng.standard_normal((batch, 3, 256, 256)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x).double().float()).double().numpy()
        got = sess.run(None, {"image": x})[0]
        assert got.shape == (batch, *VARIANTS[name].heatmap_shape)
        assert _rel(got, ref) < 1e-4


def test_fusion_is_exact_in_float64(rng):
    model = make_model("XS", seed=2).double()
    fused = fuse_batchnorm(model)
    x = torch.from_numpy(rng.standard_normal((2, 3, 256, 256)))
    with torch.no_grad():
        assert _rel(fused(x).numpy(), model(x).numpy()) < 1e-6
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())


def test_opset_below_17_refused(tmp_path):
    with pytest.raises(ValueError, match="opset must be 17 or newer"):
        export_onnx(make_model("XS"), tmp_path / "x.onnx", opset=13)

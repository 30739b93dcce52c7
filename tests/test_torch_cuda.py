"""The torch CUDA path (fp16, channels-last, CUDA graphs) with the fused decode on the device.
Runs where torch sees a GPU (benchmarks/gpu_check.sh); skipped elsewhere."""

import numpy as np
import pytest

from cnpose_trt import build_engine, load_engine
from cnpose_trt.draw import demo_image
from cnpose_trt.pipeline import PoseEstimator
from cnpose_trt.verify import accuracy_inputs, joint_error

pytestmark = pytest.mark.cuda
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)


@pytest.mark.parametrize("variant", ["XS", "M"])
def test_torch_cuda_fp16_matches_cpu_fp32(tmp_path, variant, monkeypatch):
    ref = load_engine(build_engine(variant, backend="onnxruntime", out_dir=tmp_path, max_batch=8).path)
    fp16 = build_engine(variant, backend="torch", precision="fp16", out_dir=tmp_path, max_batch=8)
    eager = load_engine(fp16.path, device="cuda")
    graphs = load_engine(fp16.path, device="cuda", cuda_graphs=True)
    assert eager.on_device and eager.device.startswith("cuda") and eager.output_dtype == np.float16
    x = accuracy_inputs(ref.spec, 6)
    heat_ref = ref.infer(x)
    for eng in (eager, graphs):
        err = joint_error(heat_ref, eng.infer(x), ref.spec)
        assert err["mean_cells"] < 0.1, err
    np.testing.assert_array_equal(graphs.infer(x), graphs.infer(x))  # replay is deterministic
    img, box = demo_image()
    items = [(img, np.array([box, [10, 10, 200, 300]]), 4000.0, [1500, 1500, 320, 240])] * 5
    x_host = graphs.infer(x)  # before the host path is closed below
    assert x_host.shape[0] == 6

    def no_host_copy(images):
        raise AssertionError("PoseEstimator copied heatmaps of a GPU engine to the host")

    monkeypatch.setattr(graphs, "_run", no_host_copy)  # infer()'s device -> host copy
    on_gpu = list(PoseEstimator(graphs).predict_iter(items, flip=True))
    on_cpu = list(PoseEstimator(ref).predict_iter(items, flip=True))
    for a, b in zip(on_gpu, on_cpu, strict=True):
        assert np.abs(a.image[..., :2] - b.image[..., :2]).max() < 5.0  # px, fp16 vs fp32
        assert a.camera is not None and np.isfinite(a.camera).all()

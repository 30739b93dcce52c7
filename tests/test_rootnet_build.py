"""RootNet engines through build_engine (model="rootnet"): FP32 / FP16 / INT8 ONNX Runtime engines of the
golden weights against PyTorch and upstream's golden output, the cache, the key, loading, and refusals.

One build per precision (module fixtures, about 30 s each on 2 cores): the golden weights as an official
snapshot file ({'network': 'module.*'}), max_batch 2, INT8 calibrated on 16 synthetic crops.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from cnpose_trt.build import build_engine  # noqa: E402
from cnpose_trt.build.lookup import recorded_key_fields  # noqa: E402
from cnpose_trt.build.verify import ROOT_LIMITS, root_error  # noqa: E402
from cnpose_trt.cache import cache_key  # noqa: E402
from cnpose_trt.config import ROOTNET_INT8_EXCLUDE, BuildConfig  # noqa: E402
from cnpose_trt.errors import CheckpointError, EngineError  # noqa: E402
from cnpose_trt.ops.rootnet import k_values  # noqa: E402
from cnpose_trt.runtime.engine import load_engine  # noqa: E402
from cnpose_trt.spec import ROOTNET, rootnet_weight_shapes  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_rootnet_golden import DEPTH_RTOL, F32_CELLS_TOL, GOLDEN, golden_state_dict  # noqa: E402

sys.path.pop(0)

# Measured bounds (2-core EPYC, ONNX Runtime CPU) of the golden-weight engines on the 5 golden crops: fp16
# 0.51 cells, gamma 8e-3 relative; int8 (16 synthetic calibration crops) 3.2 cells, gamma 4.5e-2. About twice.
FP16_CELLS, FP16_GAMMA = 1.0, 2e-2
INT8_CELLS, INT8_GAMMA = 6.5, 0.1


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN / "rootnet_golden.npz"))


@pytest.fixture(scope="module")
def snapshot(golden, tmp_path_factory):
    """The golden weights saved as upstream saves them (DataParallel 'module.' keys under 'network')."""
    path = tmp_path_factory.mktemp("ckpt") / "snapshot_0.pth.tar"
    state = golden_state_dict(golden)
    torch.save({"epoch": 0, "network": OrderedDict((f"module.{k}", v) for k, v in state.items()),
                "optimizer": {}}, path)
    return path


@pytest.fixture(scope="module")
def reference(golden, snapshot):
    from cnpose_trt.nn.rootnet import build_rootnet

    with torch.no_grad():
        return build_rootnet(snapshot)(torch.from_numpy(golden["network_input"])).numpy().astype(np.float64)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


def _build(snapshot, out, precision, **extra):
    options = dict(calib_synthetic=True, calib_count=16) if precision == "int8" else {}
    return build_engine(model="rootnet", checkpoint=snapshot, precision=precision, backend="onnxruntime",
                        max_batch=2, out_dir=out, **options, **extra)


@pytest.fixture(scope="module")
def fp32(snapshot, out):
    return _build(snapshot, out, "fp32")


def test_fp32_engine_is_torch_and_upstream(fp32, golden, reference):
    engine = load_engine(fp32.path)
    assert engine.network == "rootnet" and engine.spec == ROOTNET and engine.output_shape == (3,)
    x = golden["network_input"].astype(np.float32)
    raw = engine.infer(x)  # 5 crops through max_batch 2: chunks of 2, 2, 1
    assert raw.shape == (5, 3) and raw.dtype == np.float32
    np.testing.assert_allclose(raw[:, :2], reference[:, :2], rtol=0, atol=F32_CELLS_TOL)
    np.testing.assert_allclose(raw[:, 2], reference[:, 2], rtol=DEPTH_RTOL, atol=0)
    truth = golden["output_f64"]  # upstream's float64 run: x, y cells, depth mm (its float32 k)
    k = k_values(golden["process_bbox"], golden["intrinsics"])
    np.testing.assert_allclose(raw[:, :2], truth[:, :2], rtol=0, atol=F32_CELLS_TOL)
    np.testing.assert_allclose(raw[:, 2] * k, truth[:, 2], rtol=DEPTH_RTOL, atol=0)


def test_sidecar_records_rootnet(fp32, snapshot):
    meta = fp32.meta
    assert meta["model"] == "rootnet" and meta["variant"] == "rootnet" and meta["head"] == ROOTNET.head_tag
    assert meta["spec"] == ROOTNET.to_dict() and meta["spec"]["bbox_real_mm"] == [2000.0, 2000.0]
    assert meta["input"]["shape"] == ["N", 3, 256, 256] and meta["input"]["name"] == "image"
    assert meta["output"] == {"name": "roots", "dtype": "float32", "shape": ["N", 3]}
    assert meta["roots"]["fields"] == ["x_cells", "y_cells", "gamma"]
    assert meta["weights"]["random"] is False and meta["weights"]["source"] == str(snapshot)
    limits = ROOT_LIMITS["fp32"]
    assert 0 < meta["roots_vs_torch"]["max_cells"] <= limits["max_cells"]


def test_engine_file_holds_rootnet_weights(fp32):
    from cnpose_trt.backends.graph_facts import read_graph_facts

    facts = read_graph_facts(fp32.path)
    assert dict(facts.conv_weight_shapes()) == rootnet_weight_shapes(ROOTNET)


def test_second_build_is_a_cache_hit(fp32, snapshot, out):
    again = _build(snapshot, out, "fp32")
    assert again.cached and again.path == fp32.path


def test_key_holds_the_model(fp32):
    from cnpose_trt import backends

    fields = {**recorded_key_fields(fp32.meta), "backend_version": backends.get("onnxruntime").version()}
    assert fields["model"] == "rootnet" and cache_key(fields) == fp32.meta["cache_key"]
    without = {k: v for k, v in fields.items() if k != "model"}
    assert cache_key(without) != fp32.meta["cache_key"]


def test_key_separates_the_models(tmp_path):
    """A ConvNeXtPose request and a RootNet request with every other option equal are two requests."""
    from cnpose_trt.build.builder import _Build

    pose = _Build(BuildConfig("XS", backend="onnxruntime", out_dir=tmp_path), None)
    root = _Build(BuildConfig(model="rootnet", backend="onnxruntime", out_dir=tmp_path), None)
    assert "model" not in pose._fields() and root._fields()["model"] == "rootnet"
    assert pose.request.path != root.request.path


def test_fp16_engine_within_measured_bound(snapshot, out, golden, reference):
    result = _build(snapshot, out, "fp16")
    kept = result.meta["fp16"]["kept_fp32_nodes"]
    assert any(n.startswith("/root/Softmax") for n in kept) and any(n.startswith("/root/ReduceSum") for n in kept)
    assert result.meta["output"]["dtype"] == "float32"
    engine = load_engine(result.path)
    assert engine.precision == "fp16"
    err = root_error(reference, engine.infer(golden["network_input"].astype(np.float32)))
    assert err["max_cells"] <= FP16_CELLS and err["max_gamma_rel"] <= FP16_GAMMA, err
    assert err["max_cells"] > 0  # really float16 in the backbone


def test_int8_engine_builds_within_measured_bound(snapshot, out, golden, reference):
    result = _build(snapshot, out, "int8")
    assert result.meta["int8"]["int8_excluded_nodes"] == ["/root/xy_layer/Conv", "/root/depth_layer/Conv"]
    assert result.meta["precision_options"]["int8_exclude"] == list(ROOTNET_INT8_EXCLUDE)
    assert result.meta["int8_convs"] > 0
    engine = load_engine(result.path)
    err = root_error(reference, engine.infer(golden["network_input"].astype(np.float32)))
    assert err["max_cells"] <= INT8_CELLS and err["max_gamma_rel"] <= INT8_GAMMA, err


# ------------------------------------------------------------------------------------------ refusals

def test_config_refuses_bad_models():
    with pytest.raises(ValueError, match="model must be one of convnextpose, rootnet"):
        BuildConfig(model="posenet")
    with pytest.raises(ValueError, match="RootNet has one configuration"):
        BuildConfig("XS", model="rootnet")


def test_torch_backend_refuses_rootnet(tmp_path):
    with pytest.raises(ValueError, match="torch backend builds convnextpose engines, not rootnet"):
        build_engine(model="rootnet", backend="torch", out_dir=tmp_path)


def test_rootnet_checkpoint_without_model_is_refused(snapshot, tmp_path):
    with pytest.raises(CheckpointError, match="holds RootNet weights.*--model rootnet") as info:
        build_engine(checkpoint=snapshot, backend="onnxruntime", out_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_convnextpose_checkpoint_with_model_rootnet_is_refused(tmp_path):
    from cnpose_trt.nn.checkpoint import save_checkpoint
    from cnpose_trt.nn.model import build_model

    with pytest.warns(UserWarning, match="no checkpoint given"):  # random weights are enough to be refused
        path = save_checkpoint(build_model("XS", seed=0), tmp_path / "xs.pth")
    with pytest.raises(CheckpointError, match="holds ConvNeXtPose weights.*without --model rootnet"):
        build_engine(model="rootnet", checkpoint=path, backend="onnxruntime", out_dir=tmp_path / "e")


def test_decode_paths_refuse_a_rootnet_engine(fp32, golden):
    from cnpose_trt.pipeline.estimator import PoseEstimator

    engine = load_engine(fp32.path)
    x = golden["network_input"][:2].astype(np.float32)
    with pytest.raises(EngineError, match="infer_decode .* needs a ConvNeXtPose .* is a RootNet engine"):
        engine.infer_decode(x)
    with pytest.raises(EngineError, match="PoseEstimator needs a ConvNeXtPose"):
        PoseEstimator(engine)


def test_load_checks_the_model(fp32, tmp_path):
    with pytest.raises(EngineError, match="built for model 'rootnet', not 'convnextpose'"):
        load_engine(fp32.path, model="convnextpose")
    assert load_engine(fp32.path, model="rootnet").network == "rootnet"


def _edited(fp32, tmp_path, edit):
    from cnpose_trt.cache import sidecar_path

    side = sidecar_path(fp32.path)
    meta = json.loads(side.read_text())
    edit(meta)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / meta["engine_file"]).write_bytes((side.parent / meta["engine_file"]).read_bytes())
    (tmp_path / side.name).write_text(json.dumps(meta))
    return tmp_path / side.name


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(model="posenet"), "model must be one of"),
    (lambda m: m.update(model="convnextpose"), "damaged|lacks or garbles|unknown"),
    (lambda m: m["output"].update(shape=["N", 2]), "output.shape"),
    (lambda m: m["output"].update(name="heatmaps"), "RootNet engine's I/O"),
    (lambda m: m["spec"].update(output_size=32), "not this version's RootNet"),
])
def test_edited_sidecars_are_refused(fp32, tmp_path, edit, message):
    assert load_engine(_edited(fp32, tmp_path / "same", lambda m: None)).network == "rootnet"
    with pytest.raises(EngineError, match=message):
        load_engine(_edited(fp32, tmp_path, edit))


def test_cli_build_and_inspect(fp32, snapshot, out):
    run = [sys.executable, "-m", "cnpose_trt.build", "--model", "rootnet", "--checkpoint", str(snapshot),
           "--backend", "onnxruntime", "--max-batch", "2", "--out", str(out)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(fp32.path) and "reusing" in done.stderr
    bad = subprocess.run([*run[:5], "--variant", "XS"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--model rootnet builds RootNet's one configuration" in bad.stderr
    shown = subprocess.run([sys.executable, "-m", "cnpose_trt", "inspect", str(fp32.path)], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "RootNet (R50-XY64)" in shown.stdout and "roots float32 (N, 3)" in shown.stdout
    ckpt = subprocess.run([sys.executable, "-m", "cnpose_trt", "inspect", str(snapshot)], capture_output=True,
                          text=True, timeout=120)
    assert ckpt.returncode == 0, ckpt.stderr
    assert "RootNet (R50-XY64)" in ckpt.stdout and f"{ROOTNET.parameters:,} learnable" in ckpt.stdout

"""cnpose_trt's RootNet against the upstream RootNet code's own output (tests/data/rootnet_golden, README
there): processed boxes, k, crops, the network's x, y, gamma, the root in image px and camera mm, on
torch and on ONNX Runtime.

The expected values were produced by mks0601/3DMPPE_ROOTNET_RELEASE on weights that the rule below
rebuilds bit for bit (seed 1234 + the fitted BatchNorm statistics stored in the npz); nothing here
derives them from cnpose_trt. Tolerances are the README's: one float32 implementation against another
differs by about 2.5e-4 cells (upstream's 1 against 2 threads) and 1e-5 relative depth.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from cnpose_trt.io.preprocess import load_image, prepare
from cnpose_trt.ops.arrays import compiled
from cnpose_trt.ops.geometry import crop_matrices, process_boxes
from cnpose_trt.ops.rootnet import k_values, roots_to_camera, roots_to_image
from cnpose_trt.spec import PIXEL_STD, ROOTNET

torch = pytest.importorskip("torch")

GOLDEN = Path(__file__).parent / "data" / "rootnet_golden"
CELLS_TOL = 2.5e-4  # x, y cells: upstream's own thread-count spread
PX_TOL = 0.005      # image px (README: a faithful float32 implementation)
DEPTH_RTOL = 1e-4   # depth, relative (README)
GREY = 1.0 / min(PIXEL_STD)  # one grey level after normalisation (about 4.4)
# A float32 graph with BatchNorm folded (torch or ONNX Runtime) rounds differently from upstream's float32
# run: both are compared with upstream's float64 run instead. Measured (2 threads): 5.8e-4 cells, 8.6e-6
# relative gamma (upstream's own float32 run: 2.7e-4 cells, 1.0e-5).
F32_CELLS_TOL = 1e-3
F32_PX_TOL = 0.01


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN / "rootnet_golden.npz"))


def golden_state_dict(golden: dict) -> OrderedDict:
    """The golden weights by the README's rule, written here: RandomState(seed) draws in state_dict order
    (float64, cast to float32), He-scaled convs (xy_layer x 2, depth_layer x 0.1), deconvs with fan-in
    in * 16 / 4, conv biases c + 0.05 N (c = 0.5 for depth_layer), BatchNorm weight 1 + 0.1 N and bias
    0.1 N; running statistics from the npz. The BN draws must equal the npz copies: that proves the
    stream (and so our key order) is upstream's."""
    from torch import nn

    from cnpose_trt.nn.rootnet import RootNet

    with torch.device("meta"):
        model = RootNet()
    modules = dict(model.named_modules())
    rs = np.random.RandomState(int(golden["weights_seed"]))
    out: OrderedDict = OrderedDict()
    for key, tensor in model.state_dict().items():
        path, leaf = key.rsplit(".", 1)
        module, shape = modules[path], tuple(tensor.shape)
        if isinstance(module, nn.BatchNorm2d) and leaf not in ("weight", "bias"):
            out[key] = torch.from_numpy(np.array(golden[f"bn/module.{key}"]))
            continue
        if isinstance(module, nn.BatchNorm2d):
            a = (1.0 if leaf == "weight" else 0.0) + 0.1 * rs.standard_normal(shape)
            assert np.array_equal(a.astype(np.float32), golden[f"bn/module.{key}"]), key
        elif leaf == "bias":
            a = (0.5 if path.endswith("depth_layer") else 0.0) + 0.05 * rs.standard_normal(shape)
        elif isinstance(module, nn.ConvTranspose2d):
            a = rs.standard_normal(shape) * math.sqrt(2.0 / (shape[0] * shape[2] * shape[3] / 4.0))
        else:
            gain = 2.0 if path.endswith("xy_layer") else 0.1 if path.endswith("depth_layer") else 1.0
            a = rs.standard_normal(shape) * math.sqrt(2.0 / (shape[1] * shape[2] * shape[3])) * gain
        out[key] = torch.from_numpy(a.astype(np.float32))
    return out


@pytest.fixture(scope="module")
def model(golden):
    from cnpose_trt.nn.rootnet import build_rootnet

    state = golden_state_dict(golden)
    # the official snapshot layout, as demo.py loads it (DataParallel's 'module.' prefix)
    snapshot = {"epoch": 0, "network": OrderedDict((f"module.{k}", v) for k, v in state.items()), "optimizer": {}}
    return build_rootnet(snapshot)


@pytest.fixture(scope="module")
def ours(golden, model):
    """Our torch float32 forward on the golden crops, with the backbone's pooled features and xy logits."""
    seen = {}
    hooks = [model.backbone.register_forward_hook(lambda m, i, o: seen.update(gap=o.flatten(2).mean(2))),
             model.root.xy_layer.register_forward_hook(lambda m, i, o: seen.update(logits=o[:, 0]))]
    with torch.no_grad():
        out = model(torch.from_numpy(golden["network_input"])).numpy()
    for h in hooks:
        h.remove()
    return {"raw": out, "gap": seen["gap"].numpy(), "logits": seen["logits"].numpy()}


def _size(golden) -> tuple[int, int]:
    return tuple(int(v) for v in golden["image_size"])


def test_processed_boxes_and_affines(golden):
    boxes = process_boxes(golden["boxes"], _size(golden))
    np.testing.assert_allclose(boxes, golden["process_bbox"], rtol=0, atol=1e-9)
    # upstream's affine comes from cv2.getAffineTransform on float32 points: float32-close, not exact
    np.testing.assert_allclose(crop_matrices(boxes, ROOTNET.input_size), golden["img2bb_trans"], rtol=1e-6, atol=1e-4)


def test_k_within_one_float32_ulp(golden):
    k = k_values(process_boxes(golden["boxes"], _size(golden)), golden["intrinsics"])
    assert k.dtype == np.float64
    np.testing.assert_array_max_ulp(k.astype(np.float32), golden["k_value"], maxulp=1)
    # and k scales with sqrt(fx * fy): double both focal lengths, double k
    cam = golden["intrinsics"] * [2, 2, 1, 1]
    np.testing.assert_allclose(k_values(golden["process_bbox"], cam), 2 * k, rtol=1e-15)


def test_image_file_is_the_scene(golden):
    np.testing.assert_array_equal(load_image(GOLDEN / "image.png"), golden["image_rgb"])


def test_crops_exact_with_opencv(golden):
    x, boxes = prepare(golden["image_rgb"], golden["boxes"], method="opencv")
    np.testing.assert_array_equal(boxes, golden["process_bbox"])
    np.testing.assert_array_equal(x, golden["network_input"])


@pytest.mark.skipif(compiled() is None, reason="the compiled extension (cnpose_trt._C) is not built")
def test_crops_fused_within_one_grey_level(golden):
    x, _ = prepare(golden["image_rgb"], golden["boxes"], method="fused")
    assert np.abs(x - golden["network_input"]).max() <= GREY * (1 + 1e-5)


def test_network_intermediates(golden, ours):
    gap = golden["backbone_gap"]
    np.testing.assert_allclose(ours["gap"], gap, rtol=0, atol=1e-4 * np.abs(gap).max())
    logits = golden["xy_logits"]
    np.testing.assert_allclose(ours["logits"], logits, rtol=0, atol=1e-4 * np.abs(logits).max())


def test_network_output(golden, ours):
    raw = ours["raw"]
    assert raw.shape == (5, 3) and raw.dtype == np.float32
    np.testing.assert_allclose(raw[:, :2], golden["output"][:, :2], rtol=0, atol=CELLS_TOL)
    np.testing.assert_allclose(raw[:, 2], golden["gamma"], rtol=DEPTH_RTOL, atol=0)


def test_roots_in_image_and_camera(golden, ours):
    boxes = process_boxes(golden["boxes"], _size(golden))
    cam = golden["intrinsics"]
    image = roots_to_image(ours["raw"], boxes, k_values(boxes, cam))
    _check_roots(golden, image, roots_to_camera(image, cam))


def test_host_math_on_upstream_outputs(golden):
    """The host math alone, fed upstream's own gamma and cells: agrees to float32 rounding."""
    raw = np.c_[golden["output"][:, :2], golden["gamma"]]
    image = roots_to_image(raw, golden["process_bbox"], golden["k_value"].astype(np.float64))
    np.testing.assert_allclose(image, golden["root_img"], rtol=2e-7, atol=1e-4)
    np.testing.assert_allclose(roots_to_camera(golden["root_img"], golden["intrinsics"]), golden["root_cam"],
                               rtol=2e-7, atol=1e-3)
    # upstream's demo draws x * 4 in the crop; through the inverse crop affine it is the same image point
    inverse = np.linalg.inv(np.concatenate([crop_matrices(golden["process_bbox"], 256),
                                            np.tile([[[0, 0, 1.0]]], (5, 1, 1))], axis=1))
    crop_px = np.c_[golden["root_crop_px"], np.ones(5)]
    np.testing.assert_allclose(np.einsum("pij,pj->pi", inverse, crop_px)[:, :2], image[:, :2], rtol=0, atol=1e-4)


def _check_roots(golden: dict, image: np.ndarray, camera: np.ndarray) -> None:
    np.testing.assert_allclose(image[:, :2], golden["root_img"][:, :2], rtol=0, atol=PX_TOL)
    np.testing.assert_allclose(image[:, 2], golden["root_img"][:, 2], rtol=DEPTH_RTOL, atol=0)
    z, f = golden["root_cam"][:, 2], golden["intrinsics"][:2]
    # X = (x - cx) / fx * Z: a PX_TOL error in x and a DEPTH_RTOL one in Z
    tol_xy = PX_TOL / f * z[:, None] + DEPTH_RTOL * np.abs(golden["root_cam"][:, :2])
    assert (np.abs(camera[:, :2] - golden["root_cam"][:, :2]) <= tol_xy).all()
    np.testing.assert_allclose(camera[:, 2], z, rtol=DEPTH_RTOL, atol=0)


def _check_float32_graph(golden: dict, raw: np.ndarray) -> None:
    """A float32 graph's (N, 3) x, y, gamma against upstream's float64 run of the same network."""
    truth = golden["output_f64"]
    k = k_values(golden["process_bbox"], golden["intrinsics"])
    np.testing.assert_allclose(raw[:, :2], truth[:, :2], rtol=0, atol=F32_CELLS_TOL)
    np.testing.assert_allclose(raw[:, 2] * k, truth[:, 2], rtol=DEPTH_RTOL, atol=0)
    image = roots_to_image(raw, golden["process_bbox"], k)
    np.testing.assert_allclose(image[:, :2], golden["root_img_f64"][:, :2], rtol=0, atol=F32_PX_TOL)
    np.testing.assert_allclose(image[:, 2], golden["root_img_f64"][:, 2], rtol=DEPTH_RTOL, atol=0)


def test_folded_batchnorm_is_the_same_function(golden, model):
    from cnpose_trt.build.export import fuse_rootnet_batchnorm

    fused = fuse_rootnet_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        _check_float32_graph(golden, fused(torch.from_numpy(golden["network_input"])).numpy())


def test_onnxruntime_matches_upstream(golden, model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from cnpose_trt.build.export import export_onnx
    from cnpose_trt.spec import DEFAULT_OPSET, INPUT_NAME

    path = export_onnx(model, tmp_path / "rootnet.onnx")
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == DEFAULT_OPSET
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == (INPUT_NAME, ROOTNET.output_name)
    assert inp.shape[1:] == [3, 256, 256] and isinstance(inp.shape[0], str)  # dynamic batch
    raw = np.concatenate([session.run(None, {INPUT_NAME: golden["network_input"][i:i + n]})[0]
                          for i, n in ((0, 3), (3, 2))])  # two batch sizes through one graph
    assert raw.shape == (5, 3) and raw.dtype == np.float32
    _check_float32_graph(golden, raw)
    image = roots_to_image(raw, golden["process_bbox"], k_values(golden["process_bbox"], golden["intrinsics"]))
    camera = roots_to_camera(image, golden["intrinsics"])
    z = golden["root_cam"][:, 2]
    tol_xy = F32_PX_TOL / golden["intrinsics"][:2] * z[:, None] + DEPTH_RTOL * np.abs(golden["root_cam"][:, :2])
    assert (np.abs(camera[:, :2] - golden["root_cam"][:, :2]) <= tol_xy).all()


def test_our_float64_network_is_upstreams(golden, model):
    """In float64 the network is upstream's to rounding (measured 7e-13 cells): the float32 tolerances
    above are float32's, not a difference in the function."""
    import copy

    double = copy.deepcopy(model).double()
    with torch.no_grad():
        raw = double(torch.from_numpy(golden["network_input"][:2]).double()).numpy()
    k = golden["k_value"][:2].astype(np.float64)  # upstream's float64 run still multiplied by the float32 k
    np.testing.assert_allclose(raw[:, :2], golden["output_f64"][:2, :2], rtol=0, atol=1e-9)
    np.testing.assert_allclose(raw[:, 2] * k, golden["output_f64"][:2, 2], rtol=1e-12, atol=0)

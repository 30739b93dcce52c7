"""Each build option changes what it should: the engine cache key, the quantizer's arguments, the graph.

The cache key is read where build_engine computes it (the engine file's stem), so a field missing
from the key shows up as two option values sharing one engine: an FP16 engine with float32 output
served for a float16-output request, or an INT8 engine calibrated with another method. The INT8
checks look at what the quantizer was called with and at the method onnxruntime recorded beside
the ranges it computed, not at what the build was asked for.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch", reason="needs PyTorch (the export extra)")
from conftest import make_model
from onnx import numpy_helper

import cnpose_trt.build.builder as build_mod
from cnpose_trt import BuildError, load_engine, save_checkpoint
from cnpose_trt.build.builder import build_engine
from cnpose_trt.build.precision import DEFAULT_INT8_EXCLUDE

INT8 = {"precision": "int8", "calib_synthetic": True, "calib_count": 2}


class _Stop(Exception):
    """Raised by a spy to end a build once it has shown what it was going to do."""

    def __init__(self, **seen):
        super().__init__("stopped by the test")
        self.seen = seen


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
    """torch's CPU threads spin against each other on a busy 2-core machine (a model build takes 3 s
    instead of 0.3 s): one thread is faster here, and these tests time nothing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Two checkpoints of XS differing in one value of one tensor, by one float32 ulp."""
    folder = tmp_path_factory.mktemp("weights")
    model = make_model("XS", seed=3)
    a = save_checkpoint(model, folder / "a.pth")
    with torch.no_grad():
        w = model.head.final_layer.bias
        w[5] = torch.nextafter(w[5], torch.tensor(np.inf, dtype=w.dtype))
    return a, save_checkpoint(model, folder / "b.pth")


@pytest.fixture(scope="module")
def key_of(tmp_path_factory, weights):
    """The cache key build_engine computes for some options (the build stops right there).

    Memoised per options; key_of(..., fresh=True) computes it again.
    """
    out = tmp_path_factory.mktemp("keys")
    seen: dict[str, str] = {}

    def stem(name, head_tag, precision, backend, key):
        raise _Stop(key=key)

    def key(fresh=False, **options):
        options = {"variant": "XS", "checkpoint": weights[0], "out_dir": out, "max_batch": 2, **options}
        memo = repr(sorted(options.items()))
        if fresh or memo not in seen:
            with pytest.MonkeyPatch.context() as m:
                m.setattr(build_mod, "engine_stem", stem)
                with pytest.raises(_Stop) as info:
                    build_engine(**options)
            seen[memo] = info.value.seen["key"]
        return seen[memo]
    return key


# (what changes, base options, the same with one option changed)
KEY_CHANGES = [
    ("fp16_output", {"precision": "fp16"}, {"precision": "fp16", "fp16_output": False}),
    ("keep_fp32", {"precision": "fp16"}, {"precision": "fp16", "keep_fp32": ["/head/final_layer/"]}),
    ("calib_method entropy/minmax", INT8, {**INT8, "calib_method": "minmax"}),
    ("calib_method entropy/percentile", INT8, {**INT8, "calib_method": "percentile"}),
    ("calib_method minmax/percentile", {**INT8, "calib_method": "minmax"}, {**INT8, "calib_method": "percentile"}),
    ("int8_exclude", INT8, {**INT8, "int8_exclude": []}),
    ("int8_exclude prefixes", INT8, {**INT8, "int8_exclude": [DEFAULT_INT8_EXCLUDE[0]]}),
    ("calib_count", INT8, {**INT8, "calib_count": 3}),
    ("max_batch", {}, {"max_batch": 3}),
    ("opset", {}, {"opset": 18}),
    ("precision fp32/fp16", {}, {"precision": "fp16"}),
    ("precision fp16/int8", {"precision": "fp16"}, INT8),
]


@pytest.mark.parametrize("what, base, changed", KEY_CHANGES, ids=[c[0] for c in KEY_CHANGES])
def test_cache_key_covers_option(key_of, what, base, changed):
    assert key_of(**base) != key_of(**changed), f"{what} does not change the engine cache key"


@pytest.mark.parametrize("options", [{}, {"precision": "fp16"}, INT8], ids=["fp32", "fp16", "int8"])
def test_cache_key_is_deterministic(key_of, options):
    assert key_of(**options) == key_of(fresh=True, **options)


def test_cache_key_covers_weights(key_of, weights):
    assert key_of(checkpoint=weights[0]) != key_of(checkpoint=weights[1]), "one ulp of one weight"
    assert key_of(checkpoint=weights[0], precision="fp16") != key_of(checkpoint=weights[1], precision="fp16")


def test_options_of_other_precisions_do_not_split_the_cache(key_of):
    """An FP32 engine does not depend on FP16 or INT8 settings: one cached engine serves them all."""
    assert key_of() == key_of(fp16_output=False, calib_method="minmax", keep_fp32=["/head/"], int8_exclude=[])


def test_fp16_output_dtype_follows_option_and_cache(tmp_path, key_of):
    """fp16_output picks the engine's output dtype; each choice gets its own cached engine."""
    x = np.random.default_rng(0).standard_normal((1, 3, 256, 256)).astype(np.float32)
    for fp16_output, dtype in ((True, "float16"), (False, "float32"), (True, "float16")):
        result = build_engine("XS", out_dir=tmp_path, max_batch=2, precision="fp16", fp16_output=fp16_output)
        assert result.meta["output"]["dtype"] == dtype and result.meta["fp16"]["output_dtype"] == dtype
        assert load_engine(result.path).infer(x).dtype == np.dtype(dtype)
        out = onnx.load(str(result.path)).graph.output[0]
        assert onnx.helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type).name == dtype
    assert result.cached  # the third build reuses the first engine, not the float32-output one


def test_spied_key_is_the_cache_key(tmp_path, weights, key_of):
    built = build_engine("XS", weights[0], out_dir=tmp_path, max_batch=2, precision="fp16", fp16_output=False)
    assert built.meta["cache_key"] == key_of(precision="fp16", fp16_output=False)


@pytest.fixture
def quantizer_spy(monkeypatch):
    """Records the keyword arguments onnxruntime's quantize_static is called with, then stops the build."""
    import onnxruntime.quantization as q

    def spy(model_input, model_output, reader=None, **kwargs):
        raise _Stop(**kwargs)

    monkeypatch.setattr(q, "quantize_static", spy)
    return spy


@pytest.mark.parametrize("method, expected", [("entropy", "Entropy"), ("minmax", "MinMax"), ("percentile", "Percentile")])
def test_int8_quantizer_receives_requested_method(tmp_path, quantizer_spy, method, expected):
    from onnxruntime.quantization import CalibrationMethod

    with pytest.raises(_Stop) as info:
        build_engine("XS", out_dir=tmp_path, max_batch=2, calib_method=method, **INT8)
    assert info.value.seen.get("calibrate_method") is CalibrationMethod[expected]


def test_int8_quantizer_receives_exclusions(tmp_path, quantizer_spy):
    with pytest.raises(_Stop) as info:
        build_engine("XS", out_dir=tmp_path, max_batch=2, **INT8)
    excluded = info.value.seen["nodes_to_exclude"]
    assert "/head/final_layer/Conv" in excluded and "/head/deconv_layers_3/pwconv/Conv" in excluded
    assert not any(n.startswith("/backbone/") for n in excluded)
    with pytest.raises(_Stop) as info:
        build_engine("XS", out_dir=tmp_path, max_batch=2, int8_exclude=[], **INT8)
    assert list(info.value.seen["nodes_to_exclude"]) == []


def _stored_method(ranges_file):
    """The calibration method onnxruntime recorded with the ranges it computed."""
    stored = json.loads(ranges_file.read_text())["calibration_method"]
    return (stored["value"] if isinstance(stored, dict) else str(stored)).rsplit(".", 1)[-1].lower()


def test_int8_sidecar_records_method_that_ran(tmp_path):
    """Percentile (not onnxruntime's default, MinMax): the ranges on disk and the sidecar both say so."""
    result = build_engine("XS", out_dir=tmp_path, max_batch=2, calib_method="percentile", **INT8)
    ranges = tmp_path / result.meta["int8"]["ranges_file"]
    assert _stored_method(ranges) == "percentile"
    assert result.meta["int8"]["calib_method"] == "percentile"
    assert result.meta["precision_options"]["calib_method"] == "percentile"


def test_int8_quantizer_ignoring_the_method_is_refused(tmp_path, monkeypatch):
    """A quantizer that calibrates with its own default whatever it is asked: the build says so, and
    the ranges it left are not kept under the asked method's name."""
    import onnxruntime.quantization as q

    real = q.quantize_static

    def stubborn(model_input, model_output, calibration_data_reader=None, *, calibration_cache_path=None, **kwargs):
        kwargs["calibrate_method"] = q.CalibrationMethod.MinMax
        return real(model_input, model_output, calibration_data_reader, calibration_cache_path=calibration_cache_path,
                    **kwargs)

    monkeypatch.setattr(q, "quantize_static", stubborn)
    with pytest.raises(BuildError, match="ran with the minmax method, but entropy was asked for"):
        build_engine("XS", out_dir=tmp_path, max_batch=2, calib_method="entropy", **INT8)
    assert not list(tmp_path.glob("calib-*.json"))


def test_keep_fp32_keeps_those_convolutions_in_float32(tmp_path):
    from cnpose_trt.build.export import export_onnx
    from cnpose_trt.build.precision import convert_fp16

    src = export_onnx(make_model("XS"), tmp_path / "xs.onnx")
    info = convert_fp16(src, tmp_path / "kept.onnx", keep_fp32=["/head/final_layer/"], fp16_output=False)
    g = onnx.load(str(tmp_path / "kept.onnx")).graph
    init = {t.name: numpy_helper.to_array(t).dtype for t in g.initializer}
    conv_weight = {n.name: init.get(n.input[1]) for n in g.node if n.op_type == "Conv"}
    assert conv_weight["/head/final_layer/Conv"] == np.float32
    assert {v for k, v in conv_weight.items() if k != "/head/final_layer/Conv"} == {np.dtype(np.float16)}
    assert info["kept_fp32_nodes"] == ["/head/final_layer/Conv"] and info["output_dtype"] == "float32"


def test_opset_reaches_the_engine_file(tmp_path):
    result = build_engine("XS", out_dir=tmp_path, max_batch=2, opset=18)
    model = onnx.load(str(result.path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    assert result.meta["opset"] == 18

"""eval's row labels: engines of several backends side by side are told apart by backend (an openvino and an
ONNX Runtime FP32 engine were 'XS fp32' and 'XS fp32 #2')."""

from __future__ import annotations

from types import SimpleNamespace

from cnpose_trt.eval.evaluate import _labels
from cnpose_trt.spec import get_spec


def _engine(backend: str, precision: str = "fp32", method: str | None = None) -> SimpleNamespace:
    meta = {"variant": "XS", "precision": precision, "backend": backend,
            "precision_options": {"calib_method": method} if method else {}}
    return SimpleNamespace(meta=meta, spec=get_spec("XS"))


def test_labels_name_the_backend_only_where_backends_differ():
    same = [_engine("onnxruntime"), _engine("onnxruntime", "int8", "entropy"), _engine("onnxruntime")]
    assert _labels(same, None) == ["XS fp32", "XS int8 entropy", "XS fp32 #2"]
    mixed = [_engine("onnxruntime"), _engine("openvino"), _engine("openvino", "bf16"), _engine("openvino")]
    assert _labels(mixed, None) == ["XS fp32 onnxruntime", "XS fp32 openvino", "XS bf16 openvino",
                                    "XS fp32 openvino #2"]
    assert _labels(mixed, ["a", "b", "c", "d"]) == ["a", "b", "c", "d"]  # given labels are kept as they are

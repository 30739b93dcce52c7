"""FP32 ONNX graph -> FP16 graph or INT8 Q/DQ graph, the precision living in the graph itself.

TensorRT 11 networks are strongly typed (no BuilderFlag.FP16/INT8, no IInt8 calibrators), so the
graph that reaches TensorRT must already say what runs in FP16 or INT8. The same graphs run in
ONNX Runtime on the CPU, which is how they are checked here.

FP16: onnxconverter-common's float16 conversion; the input stays float32 (the preprocessing
writes float32), the output is float16 by default (the decode reads it natively and it halves
the bytes it reads), nodes listed in keep_fp32 stay float32.

INT8: onnxruntime.quantization.quantize_static in QDQ format, in one of two schemes chosen by the
backend that runs the graph (INT8_SCHEMES), both from the same calibration (one ranges file:
Conv and Add tensors are calibrated once, symmetric ranges, whichever scheme builds first):
- "trt-symmetric" (TensorRT): symmetric int8 activations (zero point 0), per-channel symmetric
  int8 weights, float bias, Q/DQ only on Conv inputs (none around ReLU, Resize, Reshape, which
  TensorRT fuses).
- "ort-u8s8" (ONNX Runtime CPU): uint8 activations with a zero point, per-channel symmetric int8
  weights, Q/DQ on Conv inputs and outputs and around Add, the shape ONNX Runtime's CPU kernels
  fuse into QLinearConv and QLinearAdd (the TensorRT graph leaves most convolutions in float there).
In both the final heatmap conv and the last head layer stay float by default.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import checks
from ..config import DEFAULT_INT8_EXCLUDE, PRECISIONS
from ..errors import BuildError
from ..io.preprocess import load_image, prepare
from ..io.synthetic import synthesize
from ..progress import Bar
from ..spec import INPUT_SIZE

log = logging.getLogger(__name__)

INT8_SCHEMES = ("trt-symmetric", "ort-u8s8")
# Op types whose tensors one calibration covers: the union of what the schemes quantize, so that
# either scheme builds from ranges stored by the other.
CALIBRATED_OPS = ("Conv", "Add")
CALIB_METHODS = ("entropy", "minmax", "percentile")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class PrecisionOptions:
    """What the precision pass does; everything here is part of the engine cache key."""

    precision: str = "fp32"
    fp16_output: bool = True                      # fp16: emit float16 heatmaps
    keep_fp32: tuple[str, ...] = ()                # fp16: node-name prefixes kept in float32
    calib_method: str = "entropy"                  # int8
    int8_exclude: tuple[str, ...] = DEFAULT_INT8_EXCLUDE
    calib_images: str | None = None
    calib_boxes: str | None = None
    calib_count: int = 64
    calib_synthetic: bool = False
    calib_batch: int = 8
    int8_scheme: str = "trt-symmetric"             # int8: INT8_SCHEMES, chosen by the backend

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.int8_scheme not in INT8_SCHEMES:
            raise ValueError(f"int8_scheme must be one of {', '.join(INT8_SCHEMES)}, got {self.int8_scheme!r}")
        if self.calib_method not in CALIB_METHODS:
            raise ValueError(f"calib_method must be one of {', '.join(CALIB_METHODS)}, got {self.calib_method!r}")
        checks.integer("calib_count", self.calib_count, 1)
        if self.precision == "int8" and not self.calib_images and not self.calib_synthetic:
            raise ValueError("int8 needs calibration images: pass --calib-images DIR (boxes from --calib-boxes "
                             "FILE.json, else the whole image), or --calib-synthetic for benchmarking only; "
                             "cnpose_trt never calibrates on noise silently")
        if self.calib_images and self.calib_synthetic:
            raise ValueError("give either calib_images or calib_synthetic, not both")

    def key_fields(self, calib_hash: str | None) -> dict[str, Any]:
        if self.precision in ("fp32", "bf16"):  # bf16: the FP32 graph, compiled for bf16 by the backend
            return {}
        if self.precision == "fp16":
            return {"fp16_output": self.fp16_output, "keep_fp32": list(self.keep_fp32)}
        return {"calib_method": self.calib_method, "int8_exclude": list(self.int8_exclude),
                "calib_hash": calib_hash, "calib_synthetic": self.calib_synthetic, "int8_scheme": self.int8_scheme}

    def calibration_fields(self, calib_hash: str | None) -> dict[str, Any]:
        """What the stored calibration ranges depend on: the INT8 key without the scheme (both schemes
        share one calibration), with the op types calibrated."""
        fields = {k: v for k, v in self.key_fields(calib_hash).items() if k != "int8_scheme"}
        return {**fields, "calibrated_ops": list(CALIBRATED_OPS)}


# ------------------------------------------------------------------------------------------ FP16

def _matching(option: str, model: Any, prefixes: Sequence[str]) -> list[str]:
    """Names of the graph's nodes that start with one of `prefixes`; a prefix matching none is an
    error (a misspelt prefix, or exporter names that changed, would silently select nothing)."""
    names = [n.name for n in model.graph.node]
    unmatched = [p for p in prefixes if not any(name.startswith(p) for name in names)]
    if unmatched:
        convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
        raise BuildError(f"{option} prefixes {unmatched} match no node of the graph; its Conv nodes are named "
                         f"like {convs[:2] + convs[-1:]}")
    return [name for name in names if any(name.startswith(p) for p in prefixes)]


def convert_fp16(src: Path, dst: Path, keep_fp32: Sequence[str] = (), fp16_output: bool = True) -> dict[str, Any]:
    """Write an FP16 copy of an FP32 graph; returns what was kept in float32.

    The input stays float32 (a Cast follows it); the output is float16 unless fp16_output is
    False. Nodes whose names start with a keep_fp32 prefix stay float32.
    """
    import warnings

    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    kept = _matching("keep_fp32", model, keep_fp32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=kept or None)
    clipped = sum("truncated" in str(w.message) for w in caught)
    _set_output_dtype(converted, kept, fp16_output)
    onnx.checker.check_model(converted)
    onnx.save(converted, str(dst))
    # What the written graph emits, read back from it (the sidecar records what was built, not what was asked).
    out_dtype = onnx.helper.tensor_dtype_to_np_dtype(converted.graph.output[0].type.tensor_type.elem_type).name
    return {"kept_fp32_nodes": kept, "output_dtype": out_dtype, "weights_clipped_to_fp16_range": clipped}


def _set_output_dtype(model: Any, kept: Sequence[str], fp16_output: bool) -> None:
    """Make the graph output float16 or float32 with at most one Cast.

    The converter ends the graph with a Cast (to float32 for keep_io_types, or back to float16
    after a node kept in float32); drop it, then add one only if the producer's own dtype
    (float32 when it was kept, else float16) is not the one wanted.
    """
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    out = graph.output[0]
    cast = next((n for n in graph.node if n.op_type == "Cast" and n.output[0] == out.name), None)
    if cast is not None:
        for node in graph.node:
            node.output[:] = [out.name if o == cast.input[0] else o for o in node.output]
        graph.node.remove(cast)
    producer = next(n for n in graph.node if out.name in n.output)
    have = TensorProto.FLOAT if producer.name in kept else TensorProto.FLOAT16
    want = TensorProto.FLOAT16 if fp16_output else TensorProto.FLOAT
    if have != want:
        raw = out.name + "_before_output_cast"
        producer.output[:] = [raw if o == out.name else o for o in producer.output]
        graph.node.append(helper.make_node("Cast", [raw], [out.name], to=want, name="output_cast"))
    out.type.tensor_type.elem_type = want
    onnx.checker.check_model(model)


# ---------------------------------------------------------------------------- calibration data

# Seeds of synthetic calibration scenes live in their own namespace: training uses (0, i) and the
# held-out evaluation set (1, i) (tools/train_xs.py, evaluate.synthetic_set).
CALIB_SEED_NAMESPACE = 3


def _synthetic_scene(rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A synthetic person (cnpose_trt.synthetic) at a random place, size and pose, and its box."""
    width, height = int(rng.integers(320, 800)), int(rng.integers(320, 800))
    scene = synthesize((CALIB_SEED_NAMESPACE, int(rng.integers(2**31))), width=width, height=height,
                       occluder_prob=0.3)
    return scene.image, tuple(float(v) for v in scene.boxes[0])


def calibration_set(opts: PrecisionOptions, seed: int = 0) -> tuple[list[tuple[Any, Any]], str]:
    """[(image source, boxes)] to calibrate on, and a hash of exactly that data.

    Raises:
        ValueError: no folder, an empty folder, unreadable boxes file, count larger than available.
    """
    h = hashlib.sha256()
    items: list[tuple[Any, Any]] = []
    if opts.calib_synthetic:
        h.update(f"synthetic:{seed}:{opts.calib_count}".encode())
        rng = np.random.default_rng(seed)
        items = [("synthetic", rng) for _ in range(opts.calib_count)]
        return items, h.hexdigest()
    folder = Path(str(opts.calib_images))
    if not folder.is_dir():
        raise ValueError(f"calib_images must be a folder of images, got {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"calib_images folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    boxes: dict[str, Any] = {}
    if opts.calib_boxes:
        try:
            boxes = json.loads(Path(opts.calib_boxes).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"calib_boxes {opts.calib_boxes} is not a readable JSON file: {exc}") from None
        if not isinstance(boxes, dict):
            raise ValueError("calib_boxes must map image file names to [x, y, w, h] or a list of such boxes")
    for p in files:
        b = boxes.get(p.name)
        items.append((p, b))
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
        h.update(json.dumps(b).encode())
    h.update(f"count:{opts.calib_count}".encode())
    return items, h.hexdigest()


def distinct_crops(items: list[tuple[Any, Any]]) -> int:
    """How many different crops calibration_batches can make from items before it cycles: one per box
    (the whole image where an image has no boxes), one per generated scene."""
    total = 0
    for _src, boxes in items:
        try:
            total += max(1, len(np.asarray(boxes, np.float64).reshape(-1, 4))) if isinstance(boxes, list) else 1
        except ValueError:  # a malformed entry is refused when its crop is made
            total += 1
    return total


@contextlib.contextmanager
def quantizer_log(path: Path) -> Iterator[list[int]]:
    """Keep onnxruntime's quantizer output (histogram prints, logging records, warnings) in `path` instead
    of the console; yields [lines written] once the block is done."""
    import logging
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    written = [0]
    with open(path, "w") as f:
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.handlers = [handler]
        root.setLevel(min(level, logging.INFO) if level else logging.INFO)
        try:
            with contextlib.redirect_stdout(f), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield written
        finally:
            root.handlers, root.level = handlers, level
            for w in caught:
                f.write(f"warning: {w.message}\n")
    with open(path) as f:
        written[0] = sum(1 for _ in f)


def calibration_batches(items: list[tuple[Any, Any]], count: int, batch: int, size: int = INPUT_SIZE
                        ) -> Iterator[np.ndarray]:
    """Normalised crops (B, 3, S, S) float32, `count` in all, cycling through items."""
    pending: list[np.ndarray] = []
    made = 0
    i = 0
    while made < count:
        src, boxes = items[i % len(items)]
        i += 1
        if src == "synthetic":
            image, box = _synthetic_scene(boxes)
            boxes = [box]
        else:
            image = load_image(src)
            if boxes is None:
                boxes = [[0, 0, image.shape[1], image.shape[0]]]
        crops, _ = prepare(image, np.asarray(boxes, np.float64).reshape(-1, 4), size)
        for crop in crops[: count - made]:
            pending.append(crop)
            made += 1
            if len(pending) == batch:
                yield np.stack(pending)
                pending = []
    if pending:
        yield np.stack(pending)


class _Reader:
    """onnxruntime CalibrationDataReader over calibration_batches, with a progress bar."""

    def __init__(self, input_name: str, batches: Iterator[np.ndarray], total: int, show: bool) -> None:
        self.input_name, self.batches, self.total, self.done = input_name, batches, total, 0
        self.show = Bar(total, "      calibrating", unit="crops", interval=0.0) if show else None

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        self.done += len(batch)
        if self.show:
            self.show.update(len(batch))
            if self.done >= self.total:
                self.show.close()
        return {self.input_name: batch}


# ------------------------------------------------------------------------------------------ INT8

def quantize_int8(src: Path, dst: Path, opts: PrecisionOptions, ranges_path: Path, *, show_progress: bool = True,
                  seed: int = 0, items: list[tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """Write an INT8 Q/DQ graph of an FP32 graph in opts.int8_scheme, calibrating (or reusing ranges_path).

    items: the calibration_set(opts, seed) the caller already listed, if any.

    Returns what was done: the scheme, the calibration method that ran (read back from the ranges onnxruntime
    stored, else the one the quantizer was called with), excluded nodes, whether the stored ranges
    were reused.

    Raises:
        BuildError: the calibration ran with another method than opts.calib_method, or an
            int8_exclude prefix matches no node.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, quantize_static

    model = onnx.load(str(src))
    input_name = model.graph.input[0].name
    excluded = _matching("int8_exclude", model, opts.int8_exclude)
    method = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
              "percentile": CalibrationMethod.Percentile}[opts.calib_method]
    kwargs: dict[str, Any] = {}
    supports_cache = "calibration_cache_path" in inspect.signature(quantize_static).parameters
    reused = supports_cache and ranges_path.is_file()
    if supports_cache:
        kwargs["calibration_cache_path"] = str(ranges_path)
    else:
        log.warning("this onnxruntime cannot store calibration ranges; every INT8 build recalibrates")
    reader = None
    if not reused:
        if items is None:
            items, _ = calibration_set(opts, seed)
        batches = calibration_batches(items, opts.calib_count, opts.calib_batch)
        reader = _Reader(input_name, batches, opts.calib_count, show_progress)
    # onnxruntime's quantizer prints histograms and logs warnings by the hundred: kept in a log beside the
    # ranges (stdout of the build is reserved for engine paths), and said in one line.
    log_path = ranges_path.parent / "logs" / f"{ranges_path.stem}-{opts.int8_scheme}.log"
    with quantizer_log(log_path) as lines:
        called = _quantize(quantize_static, src, dst, reader, excluded, method, kwargs, opts.int8_scheme,
                           [n.name for n in model.graph.node if n.op_type != "Conv"])
    if show_progress and lines[0]:
        print(f"      quantizer output: {lines[0]} lines in {log_path}", file=sys.stderr)
    ran = _method_that_ran(called, ranges_path if supports_cache else None)
    if ran != opts.calib_method:
        if supports_cache and not reused:  # filed under the asked method's name: never reuse these ranges
            ranges_path.unlink(missing_ok=True)
        raise BuildError(f"INT8 calibration ran with the {ran} method, but {opts.calib_method} was asked for: "
                         f"the quantizer did not receive or did not use calib_method (ranges: {ranges_path})")
    return {"int8_scheme": opts.int8_scheme, "calib_method": ran, "int8_excluded_nodes": excluded,
            "ranges_reused": reused, "ranges_file": ranges_path.name if supports_cache else None}


def _quantize(quantize_static: Any, src: Path, dst: Path, reader: Any, excluded: list[str], method: Any,
              kwargs: dict[str, Any], scheme: str = "trt-symmetric", non_conv: Sequence[str] = ()) -> Any:
    """Run the quantizer; returns the calibration method it was called with (its default if none was passed).

    The calibrator covers the tensors of CALIBRATED_OPS in both schemes (the stored ranges serve
    both); non_conv: the graph's other nodes, which the TensorRT scheme leaves unquantized.
    """
    from onnxruntime.quantization import QuantFormat, QuantType

    if scheme == "trt-symmetric":
        # Q/DQ only where a Conv reads: no pair on Conv outputs, so none lands around ReLU or
        # Resize (TensorRT fuses Conv+ReLU and quantizes at the next Conv's input); Add is
        # calibrated (for the other scheme) but not quantized.
        activation = QuantType.QInt8
        exclude = [*excluded, *non_conv]
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                 "CalibTensorRangeSymmetric": True, "OpTypesToExcludeOutputQuantization": ["Conv"]}
    else:
        # uint8 activations with a zero point, Conv outputs and Add quantized: ONNX Runtime's CPU
        # provider fuses DQ -> Conv -> Q into QLinearConv and DQ -> Add -> Q into QLinearAdd.
        activation = QuantType.QUInt8
        exclude = list(excluded)
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True, "CalibTensorRangeSymmetric": True}
    call: dict[str, Any] = dict(
        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(CALIBRATED_OPS),
        per_channel=True, reduce_range=False, activation_type=activation, weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude, calibrate_method=method, extra_options=extra, **kwargs)
    quantize_static(str(src), str(dst), reader, **call)
    if "calibrate_method" in call:
        return call["calibrate_method"]
    return inspect.signature(quantize_static).parameters["calibrate_method"].default


def _method_name(method: Any) -> str:
    """CalibrationMethod.Entropy (or its stored form 'CalibrationMethod.Entropy') -> 'entropy'."""
    name = getattr(method, "name", None) or str(method).rsplit(".", 1)[-1]
    return name.lower()


def _method_that_ran(called: Any, ranges_path: Path | None) -> str:
    """The calibration method behind the Q/DQ graph: the one the stored ranges were computed with.

    onnxruntime records it in the ranges file (and refuses to reuse ranges of another method);
    without a ranges file, the method the quantizer was called with.
    """
    if ranges_path is None or not ranges_path.is_file():
        return _method_name(called)
    try:
        stored = json.loads(ranges_path.read_text())["calibration_method"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BuildError(f"INT8 calibration ranges {ranges_path} are unreadable ({exc}); delete the file") from None
    return _method_name(stored.get("value") if isinstance(stored, dict) else stored)


@dataclass
class GraphReport:
    """Structure of a precision graph, for tests and the sidecar."""

    ops: dict[str, int] = field(default_factory=dict)
    input_dtype: str = ""
    output_dtype: str = ""
    quantized_convs: int = 0
    float_convs: int = 0


def inspect_graph(path: Path) -> GraphReport:
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    g = model.graph
    rep = GraphReport()
    for n in g.node:
        rep.ops[n.op_type] = rep.ops.get(n.op_type, 0) + 1
    rep.input_dtype = helper.tensor_dtype_to_np_dtype(g.input[0].type.tensor_type.elem_type).name
    rep.output_dtype = helper.tensor_dtype_to_np_dtype(g.output[0].type.tensor_type.elem_type).name
    produced_by_dq = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    for n in g.node:
        if n.op_type == "Conv":
            if n.input[0] in produced_by_dq:
                rep.quantized_convs += 1
            else:
                rep.float_convs += 1
    return rep

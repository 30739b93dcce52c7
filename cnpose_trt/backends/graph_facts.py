"""What an ONNX engine file says about itself, read without the onnx package (the runtime has none).

Loading checks an engine against its sidecar with these facts (onnxruntime.runtime.check_engine_file):
the convolution weights' shapes give the variant, float16 tensors and quantize/dequantize nodes give
the precision. They are read from the protobuf wire format of the ModelProto directly, walking the
graph's nodes and initializers and skipping every tensor payload, so a load pays about a millisecond
for it, not a full parse (onnx.load of an XS engine costs about as much as a third of its session).

Field numbers are those of onnx/onnx.proto (stable since the format's first release):
ModelProto.graph = 7; GraphProto.node = 1, .initializer = 5; NodeProto.op_type = 4, .attribute = 5;
AttributeProto.name = 1, .i = 3; TensorProto.dims = 1, .data_type = 2.
"""

from __future__ import annotations

import collections
import dataclasses
import mmap
from collections.abc import Iterator
from pathlib import Path

# TensorProto.DataType values the checks ask about.
FLOAT16 = 10
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                           "QLinearAdd", "QLinearMatMul", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
                           "QLinearAveragePool", "QLinearGlobalAveragePool", "ConvInteger", "MatMulInteger"})
_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_INITIALIZER = 7, 1, 5
_NODE_OP_TYPE, _NODE_ATTRIBUTE = 4, 5
_ATTR_NAME, _ATTR_INT = 1, 3
_TENSOR_DIMS, _TENSOR_DATA_TYPE = 1, 2
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


@dataclasses.dataclass(frozen=True)
class GraphFacts:
    """ops: op_type -> node count; cast_to: element types Cast nodes convert to; initializers:
    (dims, data_type) of every initializer, in file order."""

    ops: dict[str, int]
    cast_to: frozenset[int]
    initializers: tuple[tuple[tuple[int, ...], int], ...]

    @property
    def precision(self) -> str:
        """'int8' (quantize/dequantize nodes), 'fp16' (float16 weights or a Cast to float16), else 'fp32'."""
        if any(op in QUANTIZED_OPS for op in self.ops):
            return "int8"
        if FLOAT16 in self.cast_to or any(dtype == FLOAT16 for _, dtype in self.initializers):
            return "fp16"
        return "fp32"

    def conv_weight_shapes(self) -> collections.Counter[tuple[int, ...]]:
        """How many 4-D initializers (the convolution weights) the graph holds, by shape."""
        return collections.Counter(dims for dims, _ in self.initializers if len(dims) == 4)


def read_graph_facts(path: str | Path) -> GraphFacts:
    """The facts of the ONNX file at path (see the module docstring).

    Raises:
        OSError: the file cannot be read. ValueError: it is empty or not an ONNX model.
    """
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise ValueError("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graphs = [(a, b) for num, kind, a, b in _fields(buf, 0, len(buf)) if num == _MODEL_GRAPH and kind == _BYTES]
            if len(graphs) != 1:
                raise ValueError(f"not an ONNX model (it holds {len(graphs)} graphs)")
            ops: collections.Counter[str] = collections.Counter()
            cast_to: set[int] = set()
            initializers = []
            for num, kind, a, b in _fields(buf, *graphs[0]):
                if kind != _BYTES:
                    continue
                if num == _GRAPH_NODE:
                    op = _node(buf, a, b, cast_to)
                    ops[op] += 1
                elif num == _GRAPH_INITIALIZER:
                    initializers.append(_tensor(buf, a, b))
    return GraphFacts(dict(ops), frozenset(cast_to), tuple(initializers))


def _node(buf: mmap.mmap, start: int, end: int, cast_to: set[int]) -> str:
    op, attributes = "", []
    for num, kind, a, b in _fields(buf, start, end):
        if num == _NODE_OP_TYPE and kind == _BYTES:
            op = bytes(buf[a:b]).decode("utf-8", "replace")
            if op != "Cast":
                return op  # only a Cast's attributes matter
        elif num == _NODE_ATTRIBUTE and kind == _BYTES:
            attributes.append((a, b))
    if op == "Cast":
        for a, b in attributes:
            name, value = b"", None
            for num, kind, x, y in _fields(buf, a, b):
                if num == _ATTR_NAME and kind == _BYTES:
                    name = bytes(buf[x:y])
                elif num == _ATTR_INT and kind == _VARINT:
                    value = x
            if name == b"to" and value is not None:
                cast_to.add(value)
    return op


def _tensor(buf: mmap.mmap, start: int, end: int) -> tuple[tuple[int, ...], int]:
    dims: list[int] = []
    dtype = 0
    for num, kind, a, b in _fields(buf, start, end):
        if num == _TENSOR_DIMS and kind == _VARINT:
            dims.append(a)
        elif num == _TENSOR_DIMS and kind == _BYTES:  # packed
            i = a
            while i < b:
                value, i = _varint(buf, i, b)
                dims.append(value)
        elif num == _TENSOR_DATA_TYPE and kind == _VARINT:
            dtype = a
    return tuple(dims), dtype


def _varint(buf: mmap.mmap, i: int, end: int) -> tuple[int, int]:
    if i < end and buf[i] < 0x80:  # the common one-byte case, first
        return buf[i], i + 1
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise ValueError("not an ONNX model (a truncated or overlong varint)")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, a, b) of each field in buf[start:end]: a varint's value in a, a
    length-delimited field's payload as buf[a:b]; fixed-width fields are skipped (a = b = 0)."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        num, kind = key >> 3, key & 7
        if kind == _VARINT:
            value, i = _varint(buf, i, end)
            yield num, kind, value, 0
            continue
        if kind == _BYTES:
            size, i = _varint(buf, i, end)
            a, i = i, i + size
        elif kind in (_FIXED64, _FIXED32):
            a, i = 0, i + (8 if kind == _FIXED64 else 4)
        else:
            raise ValueError(f"not an ONNX model (wire type {kind})")
        if i > end:
            raise ValueError("not an ONNX model (a field runs past its message)")
        yield num, kind, a, (i if kind == _BYTES else 0)

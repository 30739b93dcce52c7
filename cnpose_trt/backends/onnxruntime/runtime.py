"""ONNX Runtime at run time: OrtEngine loads an engine file (the precision graph with EXTENDED
fusions applied) into a CPU session, the CPU-specific layout transforms (NCHWc) running at load
time, after checking the file against its sidecar. Never imports torch, nor the build half.

INT8 here is the "ort-u8s8" graph (precision.py), the one whose Q/DQ pairs the CPU provider fuses
into QLinearConv / QLinearAdd. Its int8 convolutions pay on processors with VNNI dot products
(AVX512-VNNI, AVX-VNNI); loading an int8 engine elsewhere warns once that INT8 may be slower than FP32.

Load options: threads (intra_op_num_threads; 0 or None: ONNX Runtime's default, one per core) and
spinning (session.intra_op.allow_spinning). Defaults: DEFAULT_THREADS, DEFAULT_SPINNING, chosen from
benchmarks/results/ort-threads-*.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ...checks import flag, integer
from ...errors import EngineError
from ..base import (
    ORT_DEFAULT_SPINNING,
    ORT_DEFAULT_THREADS,
    Engine,
    check_engine_contents,
    check_engine_io,
    cpu_flags,
    engine_mismatch,
    importable,
    library_version,
)
from ..graph_facts import read_graph_facts

log = logging.getLogger(__name__)

NAME = "onnxruntime"
ENGINE_SUFFIX = ".onnx"
LOAD_OPTIONS = ("threads", "spinning")
INT8_SCHEME = "ort-u8s8"  # the int8 graph whose Q/DQ pairs this runtime's CPU provider fuses
DEFAULT_THREADS = ORT_DEFAULT_THREADS
DEFAULT_SPINNING = ORT_DEFAULT_SPINNING
NO_VNNI_NOTICE = ("this CPU has no VNNI (avx512_vnni / avx_vnni): ONNX Runtime's INT8 convolutions may run "
                  "slower than FP32 here; measure before choosing int8")
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def available() -> bool:
    return importable("onnxruntime")


def version() -> str:
    return library_version("onnxruntime")


def session_threads(threads: int | None, spinning: bool | None) -> tuple[int, bool]:
    """The (intra_op_num_threads, allow_spinning) a session gets: None picks the default.

    Raises:
        ValueError: threads not an integer >= 0, spinning not a bool.
    """
    if threads is None:
        threads = DEFAULT_THREADS
    threads = integer("threads", threads, 0, hint="0: ONNX Runtime's default, one per core")
    if spinning is None:
        spinning = DEFAULT_SPINNING
    return threads, flag("spinning", spinning)  # ONNX Runtime's session.intra_op.allow_spinning


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def cpu_has_vnni() -> bool:
    """True when the processor has 8-bit dot-product instructions (AVX512-VNNI or AVX-VNNI), which
    ONNX Runtime's quantized convolutions need to beat FP32."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


def load(path: Path, meta: dict[str, Any], **options: Any) -> Engine:
    return OrtEngine(path, meta, **options)


def check_engine_file(path: Path, meta: dict[str, Any]) -> None:
    """The graph against its sidecar: its convolution weights are the spec's variant's, its tensors and
    nodes its precision's (graph_facts reads them in about a millisecond, payloads skipped).

    Raises:
        EngineError: a file that is not an ONNX model, or one whose contents contradict the sidecar.
    """
    try:
        facts = read_graph_facts(path)
    except (OSError, ValueError) as exc:
        raise EngineError(f"engine {path} cannot be read as an ONNX graph ({exc}); rebuild with --force") from None
    check_engine_contents(path, meta, precision=facts.precision, conv_shapes=facts.conv_weight_shapes())
    # An int8 graph's fused quantized kernels, as the build counted them in this file: another scheme's
    # graph (or another int8 engine's) holds other counts.
    built = (meta.get("int8_kernels") or {}).get("engine_file")
    if isinstance(built, dict):
        found = {op: facts.ops.get(op, 0) for op in built}
        if found != built:
            scheme = (meta.get("precision_options") or {}).get("int8_scheme")
            raise engine_mismatch(path, f"int8_kernels.engine_file says {_ops_text(built)} (int8_scheme {scheme!r}), "
                                        f"its graph holds {_ops_text(found)}")


def _ops_text(ops: dict[str, Any]) -> str:
    return ", ".join(f"{n} {op}" for op, n in ops.items())


class OrtEngine(Engine):
    """ONNX Runtime on the CPU: the embedded default backend."""

    backend = NAME
    options = LOAD_OPTIONS

    def __init__(self, path: Path, meta: dict[str, Any], threads: int | None = None,
                 spinning: bool | None = None) -> None:
        super().__init__(path, meta)
        import onnxruntime as ort

        threads, spinning = session_threads(threads, spinning)
        if self.precision == "int8" and not cpu_has_vnni():  # a cached INT8 engine brought to such a CPU too
            _warn_once(f"{path}: {NO_VNNI_NOTICE}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.threads, self.spinning = threads, spinning
        try:
            self.session: Any = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for bad models
            raise EngineError(f"onnxruntime cannot load engine {path}: {str(exc)[:300]}; rebuild with --force"
                              ) from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        found: dict[str, Any] = {"inputs": [i.name for i in inputs], "outputs": [o.name for o in outputs]}
        for role, group in (("input", inputs), ("output", outputs)):
            if len(group) == 1:
                found[role] = {"shape": group[0].shape, "dtype": _ORT_TYPES.get(group[0].type, group[0].type)}
        check_engine_io(found, path, input_name=self.input_name, output_name=self.output_name,
                        input_shape=self.spec.input_shape, output_shape=self.output_shape,
                        max_batch=self.max_batch, input_dtype=self.input_dtype.name,
                        output_dtype=self.output_dtype.name)
        check_engine_file(path, meta)

    def _run(self, images: np.ndarray) -> np.ndarray:
        session = self.session
        if session is None:
            raise EngineError(f"engine {self.path} is closed")
        return session.run([self.output_name], {self.input_name: images})[0]

    def close(self) -> None:
        self.session = None

"""OpenVINO at run time: OvEngine reads an engine file (an ONNX precision graph) and compiles it for
OpenVINO's CPU plugin at load, after checking the file against its sidecar. Never imports torch, nor
the build half; imports openvino only when an engine is loaded or its version asked.

The engine file is the ONNX graph, not OpenVINO IR: IR is two files (.xml and .bin) where the
sidecar names one file with one sha256, the graph's facts (variant, precision) are read from an ONNX
file in a millisecond (graph_facts, the check ONNX Runtime's engines get), and OpenVINO reads ONNX
directly. Reading and compiling it took 0.15-0.65 s for XS and M on the 2-core EPYC (f32, bf16, int8),
so OpenVINO's model cache (CACHE_DIR), which saved 0.1-0.2 s of that, is not used: its blobs would be
files beside the engine that no sidecar hash covers, in a folder that may be read-only.

Precisions: fp32 and int8 compile with INFERENCE_PRECISION_HINT f32 (OpenVINO's default on a CPU
with bf16 instructions is bf16, which would make an "fp32" engine a bf16 one, and run an int8
graph's float layers in bf16); bf16 is the FP32 graph compiled with INFERENCE_PRECISION_HINT bf16.
bf16 is allowed where /proc/cpuinfo shows amx_bf16 or avx512_bf16: the instructions that make bf16
pay. OpenVINO's OPTIMIZATION_CAPABILITIES is not asked, since it is OpenVINO's own claim (it may list
BF16 where bf16 is emulated) and the flags are what a test can set.

Load options: threads (INFERENCE_NUM_THREADS; 0 or None: OpenVINO's default, one per core).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ...checks import integer
from ...errors import EngineError
from ..base import (
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

NAME = "openvino"
ENGINE_SUFFIX = ".onnx"
LOAD_OPTIONS = ("threads",)
# The CPU flags that make bf16 pay (either one): AMX tiles' bf16, or AVX-512's bf16 dot products.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
INSTALL_HINT = "OpenVINO is not installed: pip install 'cnpose_trt[openvino]'"
DEVICE = "CPU"
# The OpenVINO inference precision each engine precision compiles with (the graph says the rest).
INFERENCE_PRECISION = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}


def available() -> bool:
    return importable("openvino")


def version() -> str:
    return library_version("openvino")


def import_openvino() -> Any:
    """The openvino module, or EngineError with the install hint (one line)."""
    try:
        import openvino
    except ImportError:
        raise EngineError(INSTALL_HINT) from None
    return openvino


def bf16_problem() -> str | None:
    """Why bf16 engines cannot run on this CPU, or None where they can (BF16_FLAGS)."""
    if cpu_flags() & set(BF16_FLAGS):
        return None
    return ("bf16 needs a CPU with AMX-BF16 or AVX512-BF16 (/proc/cpuinfo flags amx_bf16 or avx512_bf16); this CPU "
            "has neither, so bf16 would be emulated, slower than fp32: build fp32 or int8 instead")


def graph_precision(meta_precision: Any, found: str) -> str:
    """The engine precision a graph of precision `found` (graph_facts) stands for: a bf16 engine's
    graph is the FP32 one."""
    return "bf16" if found == "fp32" and meta_precision == "bf16" else found


def load(path: Path, meta: dict[str, Any], **options: Any) -> Engine:
    return OvEngine(path, meta, **options)


def check_engine_file(path: Path, meta: dict[str, Any]) -> None:
    """The graph against its sidecar: its convolution weights are the spec's variant's, its tensors and
    nodes its precision's (a bf16 engine's graph is an FP32 graph).

    Raises:
        EngineError: a file that is not an ONNX model, or one whose contents contradict the sidecar.
    """
    try:
        facts = read_graph_facts(path)
    except (OSError, ValueError) as exc:
        raise EngineError(f"engine {path} cannot be read as an ONNX graph ({exc}); rebuild with --force") from None
    precision = graph_precision(meta.get("precision"), facts.precision)
    check_engine_contents(path, meta, precision=precision, conv_shapes=facts.conv_weight_shapes())
    if precision not in INFERENCE_PRECISION:
        raise engine_mismatch(path, f"the openvino backend runs {', '.join(INFERENCE_PRECISION)} engines, its graph "
                                    f"is {precision}")


def compile_config(precision: str, threads: int) -> dict[str, str]:
    """The CPU plugin's properties for an engine of this precision (threads 0: OpenVINO's default)."""
    config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


def _io(port: Any) -> dict[str, Any]:
    shape = [-1 if d.is_dynamic else d.get_length() for d in port.get_partial_shape()]
    return {"shape": shape, "dtype": np.dtype(port.get_element_type().to_dtype()).name}


class OvEngine(Engine):
    """OpenVINO on the CPU: fp32, bf16 (AMX-BF16 / AVX512-BF16 CPUs) and int8 (Q/DQ graph) engines."""

    backend = NAME
    options = LOAD_OPTIONS

    def __init__(self, path: Path, meta: dict[str, Any], threads: int | None = None) -> None:
        super().__init__(path, meta)
        ov = import_openvino()
        self.threads = integer("threads", 0 if threads is None else threads, 0, hint="0: one per core")
        if self.precision not in INFERENCE_PRECISION:
            raise EngineError(f"the openvino backend runs {', '.join(INFERENCE_PRECISION)} engines, {path} is "
                              f"{self.precision}; rebuild it with --backend openvino")
        if self.precision == "bf16" and (problem := bf16_problem()):
            raise EngineError(f"cannot load the bf16 engine {path}: {problem}")
        check_engine_file(path, meta)
        try:
            core = ov.Core()
            self.compiled: Any = core.compile_model(core.read_model(str(path)), DEVICE,
                                                    compile_config(self.precision, self.threads))
        except Exception as exc:  # OpenVINO raises RuntimeError (and its own types) for bad models
            raise EngineError(f"openvino cannot load engine {path}: {str(exc)[:300]}; rebuild with --force"
                              ) from None
        inputs, outputs = self.compiled.inputs, self.compiled.outputs
        found: dict[str, Any] = {"inputs": [i.get_any_name() for i in inputs],
                                 "outputs": [o.get_any_name() for o in outputs]}
        if len(inputs) == 1 and len(outputs) == 1:
            found.update(input=_io(inputs[0]), output=_io(outputs[0]))
        check_engine_io(found, path, input_name=self.input_name, output_name=self.output_name,
                        input_shape=self.spec.input_shape, output_shape=self.output_shape,
                        max_batch=self.max_batch, input_dtype=self.input_dtype.name,
                        output_dtype=self.output_dtype.name)
        # One infer request, used by one caller at a time (an InferRequest is not reentrant).
        self.request: Any = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def _run(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            request = self.request
            if request is None:
                raise EngineError(f"engine {self.path} is closed")
            # share_outputs False: the result is a copy, not a view of the request's buffer that the
            # next call overwrites.
            result = request.infer({0: images}, share_inputs=False, share_outputs=False)
            return np.asarray(result[0])

    def close(self) -> None:
        with self._lock:
            self.request = None
            self.compiled = None

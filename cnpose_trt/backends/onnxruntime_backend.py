"""ONNX Runtime on the CPU: the embedded default backend (availability, version, compile, load).

The engine file is the precision graph with ONNX Runtime's layout-neutral (EXTENDED) fusions
applied; the CPU-specific layout transforms (NCHWc) run at load time.

INT8 here is the "ort-u8s8" graph (precision.py), the one whose Q/DQ pairs the CPU provider fuses
into QLinearConv / QLinearAdd; kernel_counts reads what the loaded session really runs. Its int8
convolutions pay on processors with VNNI dot products (AVX512-VNNI, AVX-VNNI); elsewhere the
build warns that INT8 may be slower than FP32.

Load options: threads (intra_op_num_threads; 0 or None: ONNX Runtime's default, one per core) and
spinning (session.intra_op.allow_spinning). Defaults: DEFAULT_THREADS, DEFAULT_SPINNING, chosen from
benchmarks/results/ort-threads-*.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BuildError, EngineError
from .base import (
    ORT_DEFAULT_SPINNING,
    ORT_DEFAULT_THREADS,
    Engine,
    check_engine_contents,
    check_engine_io,
    engine_mismatch,
    importable,
    library_version,
)

if TYPE_CHECKING:
    from ..build.builder import BuildJob

log = logging.getLogger(__name__)

NAME = "onnxruntime"
ENGINE_SUFFIX = ".onnx"
LOAD_OPTIONS = ("threads", "spinning")
PRECISIONS = ("fp32", "fp16", "int8")
INT8_SCHEME = "ort-u8s8"
DEFAULT_THREADS = ORT_DEFAULT_THREADS
DEFAULT_SPINNING = ORT_DEFAULT_SPINNING
# Below this share of convolutions running as quantized kernels, an int8 build says so.
MIN_QUANTIZED_CONV_SHARE = 0.9
NO_VNNI_NOTICE = ("this CPU has no VNNI (avx512_vnni / avx_vnni): ONNX Runtime's INT8 convolutions may run "
                  "slower than FP32 here; measure before choosing int8")
# Fused quantized nodes the engine file itself holds (EXTENDED fusions): recorded at build, checked at load.
ENGINE_FILE_FUSED_OPS = ("QLinearConv", "QLinearAdd")
_QUANTIZED_CONV_OPS = ("QLinearConv", "ConvInteger", "NhwcQLinearConv")
_FLOAT_CONV_OPS = ("Conv", "FusedConv")
NEEDS_GRAPH = True
# Capabilities callers ask instead of comparing names: no GPU; an engine file runs on any machine with
# this ONNX Runtime; a real engine on the CPU.
GPU = "never"
PORTABLE_ENGINE = True
CPU_IS_REFERENCE = False
# Rel. L2 error between an FP32 engine and PyTorch above which the build is refused: FP32
# graphs agree to ~1e-6, so 1e-3 only trips on a broken export.
PARITY_LIMIT = 1e-3
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def available() -> bool:
    return importable("onnxruntime")


def version() -> str:
    return library_version("onnxruntime")


def key_fields(job: BuildJob) -> dict[str, Any]:
    return {"backend_version": version()}


def compile(job: BuildJob, built: Path) -> dict[str, Any]:
    """Optimise the precision graph into the engine file and check it: FP32 against PyTorch, FP16
    and INT8 against the FP32 graph on real crops. Returns what the sidecar records."""
    from ..build.verify import accuracy_inputs, joint_error, ort_runner, parity

    job.say("[4/5] optimising the graph for onnxruntime")
    optimise(job.graph, built)
    job.say("[5/5] checking the engine")
    if job.precision == "fp32":
        err = parity(job.model, built)
        if not err <= PARITY_LIMIT:
            raise BuildError(f"built engine disagrees with PyTorch: rel. L2 error {err:.2e} > {PARITY_LIMIT}")
        job.say(f"      rel. L2 error vs PyTorch: {err:.1e}")
        return {"parity_rel_l2_vs_torch": err}
    x = accuracy_inputs(job.spec)
    heat = ort_runner(built)(x)
    if not np.isfinite(heat.astype(np.float32)).all():
        raise BuildError(f"the {job.precision} engine produces non-finite heatmaps")
    acc = joint_error(ort_runner(job.fp32_graph)(x), heat, job.spec)
    job.say(f"      decoded joints vs FP32: mean {acc['mean_cells']:.3f} cells ({acc['mean_mm']:.1f} mm), "
            f"max {acc['max_cells']:.3f} cells on {acc['samples']} synthetic crops")
    extra: dict[str, Any] = {"accuracy_vs_fp32": acc}
    if job.precision == "int8":
        kernels = kernel_counts(built)
        vnni = cpu_has_vnni()
        from .graph_facts import read_graph_facts

        ops = read_graph_facts(built).ops
        extra["int8_kernels"] = {**kernels, "cpu_vnni": vnni,
                                 "engine_file": {op: ops.get(op, 0) for op in ENGINE_FILE_FUSED_OPS}}
        job.say(f"      ONNX Runtime runs {kernels['quantized_convs']} of "
                f"{kernels['quantized_convs'] + kernels['float_convs']} convolutions quantized, "
                f"{kernels['QLinearAdd']} QLinearAdd")
        if kernels["quantized_conv_share"] < MIN_QUANTIZED_CONV_SHARE:
            log.warning("only %d of %d convolutions of this int8 graph run quantized in ONNX Runtime: INT8 will not "
                        "pay here (the int8_scheme for ONNX Runtime is %s)", kernels["quantized_convs"],
                        kernels["quantized_convs"] + kernels["float_convs"], INT8_SCHEME)
        if not vnni:
            log.warning(NO_VNNI_NOTICE)
    return extra


def session_threads(threads: int | None, spinning: bool | None) -> tuple[int, bool]:
    """The (intra_op_num_threads, allow_spinning) a session gets: None picks the default.

    Raises:
        ValueError: threads not an integer >= 0, spinning not a bool.
    """
    if threads is None:
        threads = DEFAULT_THREADS
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an integer >= 0 (0: ONNX Runtime's default, one per core), got {threads!r}")
    if spinning is None:
        spinning = DEFAULT_SPINNING
    if not isinstance(spinning, bool):
        raise ValueError(f"spinning must be True or False (ONNX Runtime's session.intra_op.allow_spinning), "
                         f"got {spinning!r}")
    return threads, spinning


def cpu_flags() -> frozenset[str]:
    """The processor's feature flags (/proc/cpuinfo); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def cpu_has_vnni() -> bool:
    """True when the processor has 8-bit dot-product instructions (AVX512-VNNI or AVX-VNNI), which
    ONNX Runtime's quantized convolutions need to beat FP32."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


def kernel_counts(path: Path) -> dict[str, Any]:
    """What ONNX Runtime's CPU provider runs for the graph at path, from the model it optimises at
    load (ORT_ENABLE_ALL, as OrtEngine loads it): quantized convolutions (QLinearConv, ConvInteger),
    float ones (Conv, FusedConv, NCHWc Conv), QLinearAdd, and the Q/DQ nodes left unfused."""
    import tempfile

    import onnxruntime as ort

    from .graph_facts import read_graph_facts

    with tempfile.TemporaryDirectory(prefix="cnpose-ort-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        opts.log_severity_level = 3  # its warning that the NCHWc model is hardware specific: known
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ops = read_graph_facts(opts.optimized_model_filepath).ops
    quantized = sum(ops.get(op, 0) for op in _QUANTIZED_CONV_OPS)
    floating = sum(ops.get(op, 0) for op in _FLOAT_CONV_OPS)
    counts: dict[str, Any] = {op: ops.get(op, 0) for op in (*_QUANTIZED_CONV_OPS, *_FLOAT_CONV_OPS, "QLinearAdd",
                                                            "QuantizeLinear", "DequantizeLinear")}
    counts.update(quantized_convs=quantized, float_convs=floating,
                  quantized_conv_share=round(quantized / max(1, quantized + floating), 4))
    return counts


def optimise(src: Path, dst: Path) -> None:
    """Write src with ONNX Runtime's layout-neutral (EXTENDED) fusions applied to dst."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def load(path: Path, meta: dict[str, Any], **options: Any) -> Engine:
    return OrtEngine(path, meta, **options)


def check_engine_file(path: Path, meta: dict[str, Any]) -> None:
    """The graph against its sidecar: its convolution weights are the spec's variant's, its tensors and
    nodes its precision's (graph_facts reads them in about a millisecond, payloads skipped).

    Raises:
        EngineError: a file that is not an ONNX model, or one whose contents contradict the sidecar.
    """
    from .graph_facts import read_graph_facts

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
                        input_shape=self.spec.input_shape, output_shape=self.spec.heatmap_shape,
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

"""ONNX Runtime on the CPU: the embedded default backend (availability, version, compile, load).

The engine file is the precision graph with ONNX Runtime's layout-neutral (EXTENDED) fusions
applied; the CPU-specific layout transforms (NCHWc) run at load time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .backends import importable, library_version
from .engine import Engine, check_engine_contents, check_engine_io
from .errors import BuildError, EngineError

if TYPE_CHECKING:
    from .build import BuildJob

NAME = "onnxruntime"
ENGINE_SUFFIX = ".onnx"
LOAD_OPTIONS = ("threads",)
PRECISIONS = ("fp32", "fp16", "int8")
NEEDS_GRAPH = True
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
    from .verify import accuracy_inputs, joint_error, ort_runner, parity

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
    return {"accuracy_vs_fp32": acc}


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


class OrtEngine(Engine):
    """ONNX Runtime on the CPU: the embedded default backend."""

    backend = NAME
    options = LOAD_OPTIONS

    def __init__(self, path: Path, meta: dict[str, Any], threads: int | None = None) -> None:
        super().__init__(path, meta)
        import onnxruntime as ort

        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise ValueError(f"threads must be an integer >= 0 (0: ONNX Runtime's default), got {threads!r}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
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

"""Runtime: load a built engine (file + JSON sidecar) and run it. No torch needed."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .cache import ENGINE_FORMAT, file_sha256, sidecar_path
from .errors import EngineError
from .spec import VariantSpec

log = logging.getLogger(__name__)


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The metadata of an engine, from <engine>.json (path may name either file)."""
    side = sidecar_path(path)
    if not side.is_file():
        raise EngineError(f"no engine metadata at {side}: build the engine with `python -m cnpose_trt.build`"
                          " (an engine without its sidecar is an unfinished build)")
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"engine metadata {side} is unreadable ({exc}); rebuild with --force") from None
    if isinstance(meta, dict) and meta.get("engine_format") == 1:
        raise EngineError(f"engine {side} was built by cnpose_trt 0.1 (engine format 1), whose input normalisation "
                          "was not upstream's (INT8 ranges and build checks used [0, 1]-scaled crops); rebuild it "
                          "with `python -m cnpose_trt.build ... --force`")
    if not isinstance(meta, dict) or meta.get("engine_format") != ENGINE_FORMAT:
        raise EngineError(f"engine metadata {side} is of an unknown format "
                          f"(engine_format {meta.get('engine_format') if isinstance(meta, dict) else '?'}, "
                          f"this version reads {ENGINE_FORMAT}); rebuild with --force")
    return meta


class Engine:
    """A compiled ConvNeXtPose network: (N, 3, S, S) float32 images -> (N, J*D, H, W) heatmaps."""

    backend = "?"

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        try:
            self.spec = VariantSpec.from_dict(meta["spec"])
            self.input_name = meta["input"]["name"]
            self.output_name = meta["output"]["name"]
            self.input_dtype = np.dtype(meta["input"]["dtype"])
            self.output_dtype = np.dtype(meta["output"]["dtype"])
            self.max_batch = int(meta["max_batch"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"engine metadata of {path} lacks or garbles {exc}; rebuild with --force") from None

    @property
    def precision(self) -> str:
        return str(self.meta.get("precision", "fp32"))

    def check_input(self, images: object) -> np.ndarray:
        """Validate against the sidecar: (N, 3, S, S) of the engine's input dtype, C-contiguous."""
        if not isinstance(images, np.ndarray):
            raise TypeError(f"images must be a numpy array (N, 3, {self.spec.input_size}, "
                            f"{self.spec.input_size}), got {type(images).__name__}")
        want = self.spec.input_shape
        if images.ndim != 4 or images.shape[1:] != want:
            raise ValueError(f"images must have shape (N, {', '.join(map(str, want))}), got {images.shape}")
        if images.dtype != self.input_dtype:
            raise TypeError(f"images must be {self.input_dtype}, got {images.dtype} "
                            f"(normalise with cnpose_trt.preprocess.prepare)")
        if images.shape[0] == 0:
            raise ValueError("images must hold at least one image, got N = 0")
        return np.ascontiguousarray(images)

    def infer(self, images: np.ndarray) -> np.ndarray:
        """Run the network; batches above max_batch are run in chunks.

        Args:
            images: (N, 3, S, S) float32, normalised.
        Returns:
            heatmaps (N, J*D, H, W) of the engine's output dtype.
        """
        images = self.check_input(images)
        if len(images) <= self.max_batch:
            return self._run(images)
        return np.concatenate([self._run(images[i:i + self.max_batch])
                               for i in range(0, len(images), self.max_batch)])

    def _run(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.spec.name} {self.spec.head_tag}, {self.precision}, "
                f"max_batch={self.max_batch}, path='{self.path}')")


class OrtEngine(Engine):
    """ONNX Runtime on the CPU: the embedded default backend."""

    backend = "onnxruntime"

    def __init__(self, path: Path, meta: dict[str, Any], threads: int | None = None) -> None:
        super().__init__(path, meta)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for bad models
            raise EngineError(f"onnxruntime cannot load engine {path}: {str(exc)[:300]}; rebuild with --force"
                              ) from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        names = ([i.name for i in inputs], [o.name for o in outputs])
        if names != ([self.input_name], [self.output_name]):
            raise EngineError(f"engine {path} has inputs/outputs {names}, its metadata says "
                              f"[{self.input_name}] -> [{self.output_name}]; rebuild with --force")
        got = outputs[0].shape[1:]
        if list(got) != list(self.spec.heatmap_shape):
            raise EngineError(f"engine {path} outputs (N, {got}), its metadata's variant needs "
                              f"(N, {self.spec.heatmap_shape}); rebuild with --force")
        ort_types = {"tensor(float)": "float32", "tensor(float16)": "float16"}
        found = (ort_types.get(inputs[0].type), ort_types.get(outputs[0].type))
        if found != (self.input_dtype.name, self.output_dtype.name):
            raise EngineError(f"engine {path} reads/writes {found}, its metadata says "
                              f"({self.input_dtype.name}, {self.output_dtype.name}); rebuild with --force")

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: images})[0]


def _tensorrt_engine(path: Path, meta: dict[str, Any], **options: Any) -> Engine:
    from .tensorrt_backend import TrtEngine

    return TrtEngine(path, meta, **options)


def _torch_engine(path: Path, meta: dict[str, Any], **options: Any) -> Engine:
    try:
        from .torch_backend import TorchEngine
    except ImportError:
        raise EngineError(f"{path} is a torch engine: install PyTorch to load it") from None
    return TorchEngine(path, meta, **options)


_BACKENDS = {"onnxruntime": OrtEngine, "tensorrt": _tensorrt_engine, "torch": _torch_engine}


def load_engine(path: str | Path, *, verify: bool = True, variant: str | None = None,
                precision: str | None = None, weights_sha256: str | None = None, **options: Any) -> Engine:
    """Load an engine built by `python -m cnpose_trt.build`.

    Args:
        path: the engine file or its .json sidecar.
        verify: check the engine file's sha256 against the sidecar (catches damaged files).
        variant, precision, weights_sha256: what the caller expects; a mismatch is refused.
        options: backend options (onnxruntime: threads).
    Raises:
        EngineError: missing/garbled sidecar, damaged or replaced engine file, unknown backend,
            an engine of another variant, precision or weights than expected, or (TensorRT) one
            built for another GPU or TensorRT version.
    """
    path = Path(path)
    meta = read_sidecar(path)
    for what, want, have in (("variant", variant, meta.get("variant")), ("precision", precision, meta.get("precision")),
                             ("weights", weights_sha256, meta.get("weights", {}).get("sha256"))):
        if want is not None and want != have:
            raise EngineError(f"engine {path} was built for {what} {have!r}, not {want!r}; build the one you "
                              "need with python -m cnpose_trt.build")
    engine_file = sidecar_path(path).with_name(str(meta.get("engine_file", "")))
    if not meta.get("engine_file") or not engine_file.is_file():
        raise EngineError(f"engine file {engine_file} named by {sidecar_path(path)} is missing; rebuild with --force")
    if verify and file_sha256(engine_file) != meta.get("engine_sha256"):
        raise EngineError(f"engine file {engine_file} does not match its metadata (sha256 differs): the file is "
                          "damaged or was replaced; rebuild with `python -m cnpose_trt.build ... --force`")
    backend = meta.get("backend")
    cls = _BACKENDS.get(str(backend))
    if cls is None:
        raise EngineError(f"engine {engine_file} is for backend {backend!r}; this installation loads "
                          f"{', '.join(_BACKENDS)}")
    log.debug("loading %s engine %s (pid %d)", backend, engine_file, os.getpid())
    return cls(engine_file, meta, **options)

"""Runtime: load a built engine (file + JSON sidecar) and run it. No torch needed."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .cache import ENGINE_FORMAT, file_sha256, is_plain_name, sidecar_path
from .errors import CnposeError, EngineError
from .spec import VariantSpec

log = logging.getLogger(__name__)

MAX_SIDECAR_BYTES = 1 << 20  # a sidecar holds a few KB; a file far larger is not one
MAX_ENGINE_BATCH = 1 << 16
IO_DTYPES = ("float32", "float16")
_LOAD_ATTEMPTS = 5


def _damaged(side: Path, what: str) -> EngineError:
    return EngineError(f"engine metadata {side} is damaged ({what}); rebuild with --force")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The metadata of an engine, from its sidecar (path: the engine handle, an engine file or the .json).

    Raises:
        EngineError: missing, unreadable, oversized, too deeply nested or malformed metadata.
    """
    side = sidecar_path(path)
    if side.is_dir():
        raise EngineError(f"engine metadata {side} is a folder, not a file; remove it and rebuild")
    if not side.is_file():
        raise EngineError(f"no engine metadata at {side}: build the engine with `python -m cnpose_trt.build`"
                          " (an engine without its sidecar is an unfinished build)")
    try:
        with open(side, "rb") as f:
            raw = f.read(MAX_SIDECAR_BYTES + 1)
        if len(raw) > MAX_SIDECAR_BYTES:
            raise _damaged(side, f"larger than {MAX_SIDECAR_BYTES} bytes")
        meta = json.loads(raw)
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise EngineError(f"engine metadata {side} is unreadable ({exc}); rebuild with --force") from None
    except RecursionError:
        raise _damaged(side, "JSON nested too deeply") from None
    if isinstance(meta, dict) and meta.get("engine_format") == 1:
        raise EngineError(f"engine {side} was built by cnpose_trt 0.1 (engine format 1), whose input normalisation "
                          "was not upstream's (INT8 ranges and build checks used [0, 1]-scaled crops); rebuild it "
                          "with `python -m cnpose_trt.build ... --force`")
    if not isinstance(meta, dict) or meta.get("engine_format") != ENGINE_FORMAT:
        raise EngineError(f"engine metadata {side} is of an unknown format "
                          f"(engine_format {meta.get('engine_format') if isinstance(meta, dict) else '?'}, "
                          f"this version reads {ENGINE_FORMAT}); rebuild with --force")
    _check_meta(meta, side)
    return meta


def _check_meta(meta: dict[str, Any], side: Path) -> None:
    """The fields load_engine and Engine rely on, checked for type and range (hostile or damaged files)."""
    if not is_plain_name(meta.get("engine_file")):
        raise _damaged(side, f"engine_file must name a file in the sidecar's folder, got {meta.get('engine_file')!r}")
    sha = meta.get("engine_sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise _damaged(side, "engine_sha256 must be 64 hex digits")
    if not isinstance(meta.get("backend"), str):
        raise _damaged(side, f"backend must be a name, got {meta.get('backend')!r}")
    _max_batch(meta.get("max_batch"), side)
    for key in ("spec", "input", "output"):
        if not isinstance(meta.get(key), dict):
            raise _damaged(side, f"{key} must be an object, got {type(meta.get(key)).__name__}")
    if not isinstance(meta.get("weights", {}), dict):
        raise _damaged(side, "weights must be an object")


def _max_batch(value: Any, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ENGINE_BATCH:
        raise _damaged(where, f"max_batch must be an integer in 1..{MAX_ENGINE_BATCH}, got {value!r}")
    return value


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
            dtypes = (meta["input"]["dtype"], meta["output"]["dtype"])
            max_batch = meta["max_batch"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EngineError(f"engine metadata of {path} lacks or garbles {exc}; rebuild with --force") from None
        if not (isinstance(self.input_name, str) and isinstance(self.output_name, str)):
            raise _damaged(sidecar_path(path), "input and output names must be strings")
        if not all(isinstance(d, str) and d in IO_DTYPES for d in dtypes):
            raise _damaged(sidecar_path(path), f"input/output dtypes must be {' or '.join(IO_DTYPES)}, got {dtypes!r}")
        self.input_dtype, self.output_dtype = np.dtype(dtypes[0]), np.dtype(dtypes[1])
        self.max_batch = _max_batch(max_batch, sidecar_path(path))

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

    Needs no lock and no write access: engines in a read-only folder load. A rebuild running at
    the same time is harmless: the sidecar names the engine file, is replaced atomically, and an
    engine file never changes once written; if the file the sidecar named is deleted by a
    rebuild before it was loaded, the new sidecar is read and its engine loaded.

    Args:
        path: the engine handle (<stem><ext>), an engine file or the .json sidecar; the sidecar
            decides which engine file is loaded (Engine.path).
        verify: check the engine file's sha256 against the sidecar (catches damaged files).
        variant, precision, weights_sha256: what the caller expects; a mismatch is refused.
        options: backend options (onnxruntime: threads).
    Raises:
        EngineError: missing/garbled sidecar, damaged or replaced engine file, unknown backend,
            an engine of another variant, precision or weights than expected, or (TensorRT) one
            built for another GPU or TensorRT version.
    """
    path = Path(path)
    side = sidecar_path(path)
    for attempt in range(_LOAD_ATTEMPTS):
        before = _identity(side)
        meta = read_sidecar(side)
        try:
            return _load(side, meta, verify, (variant, precision, weights_sha256), options)
        except (CnposeError, OSError):
            if attempt + 1 == _LOAD_ATTEMPTS or _identity(side) == before:
                raise
            log.debug("engine metadata %s was replaced while loading (a rebuild committed); reading it again", side)
    raise AssertionError("unreachable")


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _load(side: Path, meta: dict[str, Any], verify: bool, expected: tuple[str | None, str | None, str | None],
          options: dict[str, Any]) -> Engine:
    weights = meta.get("weights", {})
    for what, want, have in zip(("variant", "precision", "weights"), expected,
                                (meta.get("variant"), meta.get("precision"), weights.get("sha256")), strict=True):
        if want is not None and want != have:
            raise EngineError(f"engine {side} was built for {what} {have!r}, not {want!r}; build the one you "
                              "need with python -m cnpose_trt.build")
    engine_file = side.with_name(meta["engine_file"])
    if not engine_file.is_file():
        raise EngineError(f"engine file {engine_file} named by {side} is missing; rebuild with --force")
    if verify:
        try:
            sha = file_sha256(engine_file)
        except OSError as exc:
            raise EngineError(f"engine file {engine_file} is unreadable ({exc.strerror})") from None
        if sha != meta["engine_sha256"]:
            raise EngineError(f"engine file {engine_file} does not match its metadata (sha256 differs): the file is "
                              "damaged or was replaced; rebuild with `python -m cnpose_trt.build ... --force`")
    backend = meta["backend"]
    cls = _BACKENDS.get(backend)
    if cls is None:
        raise EngineError(f"engine {engine_file} is for backend {backend!r}; this installation loads "
                          f"{', '.join(_BACKENDS)}")
    log.debug("loading %s engine %s (pid %d)", backend, engine_file, os.getpid())
    return cls(engine_file, meta, **options)

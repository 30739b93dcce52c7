"""TensorRT 10.x / 11.x: build a strongly typed engine from a precision graph, and run it.

Written to the documented Python API of both major versions (one code path): the network is
created with the STRONGLY_TYPED flag, so FP16 and INT8 come from the ONNX graph (precision.py),
never from builder flags that TensorRT 11 removed. Device memory, pinned staging buffers and
streams go through cuda-python (cuda.bindings.runtime), as NVIDIA's current samples do.

Every TensorRT object lives in a variable named after its role (builder, network, parser,
config, profile, engine, context, runtime, cache, ...): tests/test_tensorrt_names.py checks each
attribute used on them against the names in real TensorRT 10.16 and 11.4 bindings wheels.
This module is imported only when TensorRT is used; it needs an NVIDIA GPU to do anything.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .engine import Engine
from .errors import BuildError, EngineError

log = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT is not installed. On a machine with an NVIDIA GPU and driver: "
                "pip install 'cnpose_trt[tensorrt]' (tensorrt-cu12 or tensorrt-cu13, and cuda-python)")


def import_trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildError(INSTALL_HINT) from None
    return trt


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise EngineError("cuda-python is not installed: pip install 'cnpose_trt[tensorrt]'") from None
    return cudart


def _check(result: Any, what: str) -> Any:
    """cuda-python calls return (err, *values): raise on an error, return the values."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineError(f"{what} failed: {cudart.cudaGetErrorString(err)[1].decode(errors='replace')}")
    return values[0] if len(values) == 1 else values


def gpu_identity() -> dict[str, Any]:
    """Name and compute capability of the current GPU (part of a TensorRT engine's cache key)."""
    cudart = _cudart()
    device = _check(cudart.cudaGetDevice(), "cudaGetDevice")
    props = _check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}"}


def available() -> bool:
    """TensorRT importable and a CUDA device visible."""
    try:
        import tensorrt  # noqa: F401
        cudart = _cudart()
        count = cudart.cudaGetDeviceCount()
        return count[0] == cudart.cudaError_t.cudaSuccess and count[1] > 0
    except (ImportError, EngineError):
        return False


def _logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.WARNING)


def _progress_monitor(trt: Any) -> Any:
    class Monitor(trt.IProgressMonitor):
        """Prints TensorRT's build phases to stderr (called from TensorRT's threads)."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                self._steps[phase_name] = num_steps
                if parent_phase is None:
                    print(f"      TensorRT: {phase_name} ({num_steps} steps)", file=sys.stderr, flush=True)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                self._steps.pop(phase_name, None)

    return Monitor()


def build(onnx_path: Path, engine_path_tmp: Path, *, input_name: str, input_shape: tuple[int, ...],
          max_batch: int, opt_batch: int, workspace_mb: int, opt_level: int, timing_cache: Path,
          version_compatible: bool, hardware_compatible: bool, show_progress: bool = True) -> dict[str, Any]:
    """Parse the graph into a strongly typed network and serialize an engine to engine_path_tmp.

    Raises:
        BuildError: TensorRT missing, parser errors (all listed), or a build that returned None.
    """
    from .cache import atomic_write, file_lock

    trt = import_trt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise BuildError("trt.Builder could not be created (is a CUDA device visible?)")
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    if network is None:
        raise BuildError("TensorRT could not create a strongly typed network")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError("TensorRT's ONNX parser rejected the graph:\n  " + "\n  ".join(errors or ["(no detail)"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.builder_optimization_level = opt_level
    profile = builder.create_optimization_profile()
    tail = tuple(input_shape[1:])
    profile.set_shape(input_name, (1, *tail), (opt_batch, *tail), (max_batch, *tail))
    if config.add_optimization_profile(profile) < 0:
        raise BuildError(f"invalid optimization profile: batch 1..{max_batch}, opt {opt_batch}")
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    # The monitor must outlive every TensorRT object that uses it: this local lives to the return.
    monitor = _progress_monitor(trt) if show_progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    with file_lock(timing_cache.with_name(timing_cache.name + ".lock")):
        cached = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(cached)
        if cache is None or not config.set_timing_cache(cache, False):
            log.warning("timing cache %s was not accepted; building without it", timing_cache)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BuildError("TensorRT failed to build the engine (see the TensorRT log above)")
        cache = config.get_timing_cache()
        if cache is not None:
            atomic_write(timing_cache, bytes(cache.serialize()))
    atomic_write(engine_path_tmp, bytes(plan))
    return {"tensorrt": trt.__version__, **gpu_identity(), "opt_batch": opt_batch, "workspace_mb": workspace_mb,
            "builder_optimization_level": opt_level, "version_compatible": version_compatible,
            "hardware_compatible": hardware_compatible}


class _DeviceBuffer:
    """cudaMalloc'd memory, freed with its owner; never handed out as a temporary."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.ptr = int(_check(_cudart().cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def __del__(self) -> None:
        if getattr(self, "ptr", 0):
            _cudart().cudaFree(self.ptr)
            self.ptr = 0


class _HostBuffer:
    """Pinned host memory viewed as a numpy array (async copies need page-locked memory)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.ptr = int(_check(_cudart().cudaMallocHost(max(nbytes, 1)), "cudaMallocHost"))
        import ctypes

        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def __del__(self) -> None:
        if getattr(self, "ptr", 0):
            self.array = None
            _cudart().cudaFreeHost(self.ptr)
            self.ptr = 0


class _Slot:
    """One execution context with its stream and buffers sized for max_batch (one per thread).

    Every buffer handed to TensorRT or the decode lives here, so it outlives the stream's work.
    """

    def __init__(self, engine: Any, spec: Any, max_batch: int, in_dtype: np.dtype, out_dtype: np.dtype) -> None:
        from .decoding import OUT_FIELDS

        cudart = _cudart()
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        in_shape, out_shape = (max_batch, *spec.input_shape), (max_batch, *spec.heatmap_shape)
        dec_shape = (max_batch, spec.joints, OUT_FIELDS)
        self.h_in = _HostBuffer(in_shape, in_dtype)
        self.d_in = _DeviceBuffer(int(np.prod(in_shape)) * in_dtype.itemsize)
        self.h_out = _HostBuffer(out_shape, out_dtype)
        self.d_out = _DeviceBuffer(int(np.prod(out_shape)) * out_dtype.itemsize)
        self.h_dec = _HostBuffer(dec_shape, np.dtype(np.float32))
        self.d_dec = _DeviceBuffer(int(np.prod(dec_shape)) * 4)
        # boxes (4), root depth (1), intrinsics (4) per image, for the fused post-processing
        self.h_post, self.d_post = _HostBuffer((9, max_batch), np.dtype(np.float32)), _DeviceBuffer(9 * max_batch * 4)

    def __del__(self) -> None:
        if getattr(self, "stream", None) is not None:
            _cudart().cudaStreamDestroy(self.stream)
            self.stream = None


class TrtEngine(Engine):
    """A deserialized TensorRT engine. Safe to use from several threads: each thread gets its
    own execution context, stream and buffer set."""

    backend = "tensorrt"

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        super().__init__(path, meta)
        try:
            trt = import_trt()
        except BuildError as exc:
            raise EngineError(f"{path} is a TensorRT engine: {exc}") from None
        self._check_compatible(trt, meta)
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {path}: damaged, or built by another TensorRT "
                              "version or for another GPU; rebuild with --force")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [self.input_name] or outputs != [self.output_name]:
            raise EngineError(f"engine {path} has inputs {inputs} and outputs {outputs}; its metadata says "
                              f"[{self.input_name}] -> [{self.output_name}]; rebuild with --force")
        # Dtypes are read from the engine, never assumed.
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.output_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self._local = threading.local()

    @staticmethod
    def _check_compatible(trt: Any, meta: dict[str, Any]) -> None:
        built = meta.get("tensorrt_build", {})
        if built.get("tensorrt") != trt.__version__ and not built.get("version_compatible"):
            raise EngineError(f"engine built with TensorRT {built.get('tensorrt')}, this is {trt.__version__}: "
                              "rebuild (or build with --version-compatible)")
        here = gpu_identity()
        if not built.get("hardware_compatible") and (
                here["gpu"] != built.get("gpu") or here["compute_capability"] != built.get("compute_capability")):
            raise EngineError(f"engine built for {built.get('gpu')} (sm {built.get('compute_capability')}), this is "
                              f"{here['gpu']} (sm {here['compute_capability']}): rebuild on this GPU "
                              "(or build with --hardware-compatible)")

    def _slot(self) -> _Slot:
        slot = getattr(self._local, "slot", None)
        if slot is None:
            slot = _Slot(self.engine, self.spec, self.max_batch, self.input_dtype, self.output_dtype)
            self._local.slot = slot
        return slot

    def _copy(self, dst: int, src: int, nbytes: int, kind: str, slot: _Slot) -> None:
        cudart = _cudart()
        direction = getattr(cudart.cudaMemcpyKind, kind)
        _check(cudart.cudaMemcpyAsync(dst, src, nbytes, direction, slot.stream), kind)

    def _enqueue(self, slot: _Slot, images: np.ndarray) -> int:
        """Copy images in and run the engine on the slot's stream; returns the batch size."""
        n = len(images)
        slot.h_in.array[:n] = images
        self._copy(slot.d_in.ptr, slot.h_in.ptr, images.nbytes, "cudaMemcpyHostToDevice", slot)
        context = slot.context
        if not context.set_input_shape(self.input_name, tuple(images.shape)):
            raise EngineError(f"TensorRT rejected input shape {images.shape} (profile: batch 1..{self.max_batch})")
        context.set_tensor_address(self.input_name, slot.d_in.ptr)
        context.set_tensor_address(self.output_name, slot.d_out.ptr)
        if not context.execute_async_v3(int(slot.stream)):
            raise EngineError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return n

    def _run(self, images: np.ndarray) -> np.ndarray:
        slot = self._slot()
        n = self._enqueue(slot, images)
        out = slot.h_out.array[:n]
        self._copy(slot.h_out.ptr, slot.d_out.ptr, out.nbytes, "cudaMemcpyDeviceToHost", slot)
        _check(_cudart().cudaStreamSynchronize(slot.stream), "cudaStreamSynchronize")
        return out.copy()

    def infer_decode(self, images: np.ndarray, boxes: np.ndarray | None = None, root_depth: np.ndarray | None = None,
                     intrinsics: np.ndarray | None = None) -> np.ndarray:
        """Engine, then the fused decode on the same stream straight from the output buffer;
        only the (N, J, 10) result comes back. N <= max_batch."""
        from .decoding import OUT_FIELDS, DeviceArray, decode

        images = self.check_input(images)
        if len(images) > self.max_batch:
            raise ValueError(f"infer_decode takes at most max_batch = {self.max_batch} images, got {len(images)}")
        slot = self._slot()
        n = self._enqueue(slot, images)
        post: dict[str, Any] = {}
        # h_post/d_post rows: 0-3 boxes, 4 root depth, 5-8 intrinsics (each row max_batch floats).
        for name, value, first, width in (("boxes", boxes, 0, 4), ("root_depth", root_depth, 4, 1),
                                          ("intrinsics", intrinsics, 5, 4)):
            if value is None:
                continue
            shape = (n, width) if width > 1 else (n,)
            arr = np.ascontiguousarray(np.broadcast_to(np.asarray(value, np.float32), shape))
            offset = first * self.max_batch * 4
            slot.h_post.array.reshape(-1)[offset // 4: offset // 4 + arr.size] = arr.reshape(-1)
            self._copy(slot.d_post.ptr + offset, slot.h_post.ptr + offset, arr.nbytes, "cudaMemcpyHostToDevice", slot)
            post[name] = DeviceArray(slot.d_post.ptr + offset, shape, "float32")
        j = self.spec.joints
        heat = DeviceArray(slot.d_out.ptr, (n, *self.spec.heatmap_shape), self.output_dtype.name)
        decode(heat, j, self.spec.depth_dim, out=DeviceArray(slot.d_dec.ptr, (n, j, OUT_FIELDS)),
               stream=int(slot.stream), **post)
        result = slot.h_dec.array[:n]
        self._copy(slot.h_dec.ptr, slot.d_dec.ptr, result.nbytes, "cudaMemcpyDeviceToHost", slot)
        _check(_cudart().cudaStreamSynchronize(slot.stream), "cudaStreamSynchronize")
        return result.copy()

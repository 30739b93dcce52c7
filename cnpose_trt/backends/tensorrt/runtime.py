"""TensorRT at run time: a plan file checked against its sidecar, deserialized, and served by
TrtEngine through a pool of execution contexts (session.py). Never imports torch, nor the build half.

`engine_host_code_allowed` is set only for plans whose verified sidecar says they are version
compatible: such a plan embeds a lean runtime (host code) that TensorRT executes. A plan's
contents are only known once deserialized on a GPU, where its I/O (names, shapes, dtypes,
profile: the variant's head) is compared with the sidecar before any buffer exists.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from ...checks import integer
from ...errors import BuildError, EngineError
from ...ops.arrays import OUT_FIELDS, DeviceArray
from ...ops.decoding import decode
from ..base import Engine, check_engine_io, check_options
from ..device import DeviceBuffer, OwnedDeviceArray
from .diagnostics import check_plan_compatible, create, gpu_identity, import_trt, trt_logger
from .session import Session

NAME = "tensorrt"
ENGINE_SUFFIX = ".engine"
# Options TrtEngine takes (load_engine(path, **options)); backends.check_options refuses the rest.
DEFAULT_MAX_CONTEXTS = 2
MAX_CONTEXTS_LIMIT = 64
LOAD_OPTIONS = ("max_contexts",)


def _dims(dims: Any) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _np_dtype(trt: Any, dtype: Any) -> str:
    try:
        return np.dtype(trt.nptype(dtype)).name
    except (TypeError, KeyError, ValueError):
        return str(dtype)


def read_io(trt: Any, engine: Any) -> dict[str, Any]:
    """What a deserialized engine says about its I/O (the `found` of base.check_engine_io)."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    found: dict[str, Any] = {
        "inputs": [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT],
        "outputs": [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT],
        "profiles": engine.num_optimization_profiles}
    for role, group in (("input", found["inputs"]), ("output", found["outputs"])):
        if len(group) != 1:
            continue
        name = group[0]
        found[role] = {"name": name, "shape": _dims(engine.get_tensor_shape(name)),
                       "dtype": _np_dtype(trt, engine.get_tensor_dtype(name)),
                       "linear": engine.get_tensor_format(name) == trt.TensorFormat.LINEAR,
                       "on_device": engine.get_tensor_location(name) == trt.TensorLocation.DEVICE}
    if len(found["inputs"]) == 1 and found["profiles"] >= 1:
        found["input"]["profile"] = [_dims(s) for s in engine.get_tensor_profile_shape(found["inputs"][0], 0)]
    return found


def deserialize(trt: Any, plan: bytes, version_compatible: bool, what: str) -> tuple[Any, Any]:
    """(runtime, engine) of a serialized plan; the runtime is kept with the engine."""
    runtime = create(trt.Runtime, "a runtime", EngineError, trt_logger(trt))
    if version_compatible:
        # A version-compatible plan embeds a lean runtime (host code): TensorRT refuses it unless allowed.
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineError(f"TensorRT could not deserialize {what} (see the TensorRT log above): damaged, or built by "
                          "another TensorRT version or for another GPU; rebuild with --force")
    return runtime, engine


class TrtEngine(Engine):
    """A deserialized TensorRT engine, safe to share between threads: calls take one of at most
    `max_contexts` execution contexts (each with its stream and buffers) and wait for a free one.

    Use `with load_engine(path) as engine:` or call close() to free GPU memory deterministically.
    """

    backend = NAME
    options = LOAD_OPTIONS
    device = "cuda"

    def __init__(self, path: Path, meta: dict[str, Any], **options: Any) -> None:
        max_contexts = _load_options(options)
        super().__init__(path, meta)
        try:
            trt = import_trt()
        except BuildError as exc:
            raise EngineError(f"{path} is a TensorRT engine: {exc}") from None
        built = meta.get("tensorrt_build")
        if not isinstance(built, dict):
            raise EngineError(f"engine metadata of {path} lacks its tensorrt_build record; rebuild with --force")
        check_plan_compatible(built, trt.__version__, gpu_identity(), path)
        runtime, engine = deserialize(trt, path.read_bytes(), bool(built.get("version_compatible")), str(path))
        check_engine_io(read_io(trt, engine), path, input_name=self.input_name, output_name=self.output_name,
                        input_shape=self.spec.input_shape, output_shape=self.output_shape,
                        max_batch=self.max_batch, input_dtype=self.input_dtype.name,
                        output_dtype=self.output_dtype.name)
        self._session = Session(runtime, engine, input_name=self.input_name, output_name=self.output_name,
                                 input_shape=self.spec.input_shape, output_shape=self.output_shape,
                                max_batch=self.max_batch, input_dtype=self.input_dtype,
                                output_dtype=self.output_dtype, max_contexts=max_contexts)
        self.max_contexts = max_contexts

    def close(self) -> None:
        """Free execution contexts, streams and buffers (calls in flight finish first); idempotent."""
        self._session.close()

    def __enter__(self) -> TrtEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self._session.run(images)

    def infer_device(self, images: np.ndarray) -> Any:
        """Heatmaps left on the GPU: a DeviceArray over device memory owned by the returned object
        (freed when it is garbage collected), filled on the engine's stream and synchronised."""
        self.require_model("convnextpose", "infer_device")
        images = self.check_input(images)
        per_image = int(np.prod(self.spec.heatmap_shape)) * self.output_dtype.itemsize
        owned = DeviceBuffer(len(images) * per_image)
        for i in range(0, len(images), self.max_batch):
            chunk = images[i:i + self.max_batch]
            with self._session.pool.use() as slot:
                self._session.enqueue(slot, chunk)
                slot.copy(owned.ptr + i * per_image, slot.d_out.ptr, len(chunk) * per_image,
                          "cudaMemcpyDeviceToDevice")
                slot.synchronize()
        return OwnedDeviceArray(owned, (len(images), *self.spec.heatmap_shape), self.output_dtype.name)

    def _infer_decode(self, images: np.ndarray, post: dict[str, np.ndarray | None], flip: bool) -> np.ndarray:
        """Engine, then the fused decode on the same stream straight from the output buffer (the
        flip test's mirrored half included); only the (P, J, 10) result comes back."""
        return self._decode_call(len(images), post, flip, images=images)

    def enqueue_device(self, fill: Any, n: int, *, flip: bool = False, boxes: Any = None, root_depth: Any = None,
                       intrinsics: Any = None) -> Any:
        """Engine.enqueue_device: fill writes the input binding on the slot's stream, then the engine
        and the fused decode run as in infer_decode. The call waits for its result before it returns
        the slot (overlap across calls comes from max_contexts slots used by several threads)."""
        _, post = self._device_call(n, flip, boxes, root_depth, intrinsics)
        return _Done(self._decode_call(int(n), post, flip, fill=fill))

    def _decode_call(self, n: int, post: dict[str, np.ndarray | None], flip: bool, *,
                     images: np.ndarray | None = None, fill: Any = None) -> np.ndarray:
        session, j = self._session, self.spec.joints
        p = n // 2 if flip else n
        per_image = int(np.prod(self.spec.heatmap_shape)) * self.output_dtype.itemsize
        rows = [(name, np.ascontiguousarray(arr, np.float32), first)
                for name, first in (("boxes", 0), ("root_depth", 4), ("intrinsics", 5))
                if (arr := post.get(name)) is not None]
        with session.pool.use() as slot:
            h_dec, d_dec, h_post, d_post = slot.decode(self.max_batch, j, OUT_FIELDS)
            session.enqueue(slot, images, n=n, fill=fill)
            args: dict[str, Any] = {}
            for name, arr, first in rows:
                offset = first * self.max_batch  # in floats: each row holds max_batch floats
                h_post.array.reshape(-1)[offset:offset + arr.size] = arr.reshape(-1)
                slot.copy(d_post.ptr + 4 * offset, h_post.ptr + 4 * offset, arr.nbytes, "cudaMemcpyHostToDevice")
                args[name] = DeviceArray(d_post.ptr + 4 * offset, arr.shape, "float32")
            shape = (p, *self.spec.heatmap_shape)
            heat = DeviceArray(slot.d_out.ptr, shape, self.output_dtype.name)
            mirrored = DeviceArray(slot.d_out.ptr + p * per_image, shape, self.output_dtype.name) if flip else None
            decode(heat, j, self.spec.depth_dim, flipped=mirrored, out=DeviceArray(d_dec.ptr, (p, j, OUT_FIELDS)),
                   stream=slot.stream_handle, **args)
            result = h_dec.array[:p]
            slot.copy(h_dec.ptr, d_dec.ptr, result.nbytes, "cudaMemcpyDeviceToHost")
            slot.synchronize()
            return result.copy()


class _Done:
    """A finished enqueue_device call's handle."""

    def __init__(self, value: np.ndarray) -> None:
        self._value = value

    def result(self) -> np.ndarray:
        return self._value


def check_engine_file(path: Path, meta: dict[str, Any]) -> None:
    """Nothing to read cheaply: a plan's contents are only known once deserialized on a GPU, where
    TrtEngine compares its I/O (names, shapes, dtypes, profile: the variant's head) with the sidecar.
    Its sha256 and the sidecar's own consistency are checked before (engine.load_engine)."""


def load(path: Path, meta: dict[str, Any], **options: Any) -> Engine:
    return TrtEngine(path, meta, **options)


def _load_options(options: dict[str, Any]) -> int:
    """max_contexts from load_engine's options; anything else is refused naming what is allowed."""
    check_options(sys.modules[__name__], options)
    return integer("max_contexts", options.get("max_contexts", DEFAULT_MAX_CONTEXTS), 1, MAX_CONTEXTS_LIMIT)

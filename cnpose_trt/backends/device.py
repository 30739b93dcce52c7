"""The device layer over cuda-python: a CUDA stream, device memory, pinned host memory and an
owning device array, each freed by close() (or with its owner), never handed out as a temporary.

The TensorRT runtime keeps its execution contexts' buffers and streams here; anything else that
needs raw CUDA memory without torch uses the same objects. cuda-python (cuda.bindings.runtime) is
imported on first use, so importing this module needs neither it nor a GPU. Non-owning views of
device memory are ops.arrays.DeviceArray (what the compiled kernels read); torch's own tensors and
streams stay torch's (the torch backend and the pipeline's staging ring use them).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import EngineError
from ..ops.arrays import DeviceArray

CUDA_PYTHON_HINT = ("cuda-python (cuda.bindings.runtime, 12.6.1 or newer) is not installed: "
                    "pip install 'cnpose_trt[tensorrt-cu12]' or 'cnpose_trt[tensorrt-cu13]'")


def cuda_runtime() -> Any:
    """cuda.bindings.runtime, or EngineError with the install hint."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise EngineError(CUDA_PYTHON_HINT) from None
    return cudart


def error_text(err: Any) -> str:
    """'cudaErrorName: description' of a cudaError_t."""
    cudart = cuda_runtime()
    name = cudart.cudaGetErrorName(err)[1]
    text = cudart.cudaGetErrorString(err)[1]
    decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else str(b)
    return f"{decode(name)}: {decode(text)}"


def check(result: Any, what: str) -> Any:
    """cuda-python calls return (err, *values): raise on an error, return the values."""
    cudart = cuda_runtime()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineError(f"{what} failed: {error_text(err)}")
    return values[0] if len(values) == 1 else values


_native_getter: Callable[[Any], int] | None = None


def native_handle(obj: Any) -> int:
    """The integer handle of a cuda-python object (cudaStream_t, ...).

    cuda-bindings 12.9.1 / 13.0 deprecate int(obj) for cuda.bindings.utils.get_cuda_native_handle;
    older bindings have only int(obj).
    """
    global _native_getter
    if _native_getter is None:
        try:
            from cuda.bindings.utils import get_cuda_native_handle as getter
        except ImportError:
            getter = int
        _native_getter = getter
    return int(_native_getter(obj))


class Stream:
    """A plain cudaStreamCreate stream: asynchronous copies on it, synchronize(), close()."""

    def __init__(self) -> None:
        self.stream: Any = check(cuda_runtime().cudaStreamCreate(), "cudaStreamCreate")
        self.handle = native_handle(self.stream)  # what kernels and TensorRT take

    def copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        """cudaMemcpyAsync of nbytes; kind names a cudaMemcpyKind ("cudaMemcpyHostToDevice", ...)."""
        cudart = cuda_runtime()
        check(cudart.cudaMemcpyAsync(dst, src, nbytes, getattr(cudart.cudaMemcpyKind, kind), self.stream), kind)

    def synchronize(self) -> None:
        check(cuda_runtime().cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if getattr(self, "stream", None) is not None:
            stream, self.stream = self.stream, None
            with contextlib.suppress(Exception):
                cuda_runtime().cudaStreamDestroy(stream)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class DeviceBuffer:
    """cudaMalloc'd memory, freed by close() (or with its owner); never handed out as a temporary."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.ptr = int(check(cuda_runtime().cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def close(self) -> None:
        if getattr(self, "ptr", 0):
            ptr, self.ptr = self.ptr, 0
            cuda_runtime().cudaFree(ptr)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class HostBuffer:
    """Pinned host memory viewed as a numpy array (async copies need page-locked memory)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        count = int(np.prod(shape))
        nbytes = count * np.dtype(dtype).itemsize
        self.ptr = int(check(cuda_runtime().cudaMallocHost(max(nbytes, 1)), "cudaMallocHost"))
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(self.ptr)
        self.array: np.ndarray | None = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def close(self) -> None:
        if getattr(self, "ptr", 0):
            ptr, self.ptr, self.array = self.ptr, 0, None
            cuda_runtime().cudaFreeHost(ptr)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class OwnedDeviceArray(DeviceArray):
    """A DeviceArray over a DeviceBuffer it keeps alive (freed when the array is garbage collected):
    what a GPU engine hands out as heatmaps left on the device (__cuda_array_interface__ v3)."""

    def __init__(self, buffer: DeviceBuffer, shape: tuple[int, ...], dtype: str) -> None:
        super().__init__(buffer.ptr, shape, dtype)
        self._buffer = buffer

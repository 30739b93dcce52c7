"""TensorRT execution: a deserialized engine's bounded pool of slots, each one execution context
with its own stream and pinned / device buffers (the device layer, backends/device.py).

Execution contexts come from a bounded pool (default 2, `max_contexts`): one context can run
while the next batch is staged, and each context costs its own activation memory (static
allocation, TensorRT's default). A call waits for a free context; close() frees contexts, streams
and buffers. Streams are plain cudaStreamCreate streams, one per context; every copy and the
engine run on it, and a failed call synchronises it before its pinned buffers can be reused.
Never imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ...errors import EngineError
from ...ops.arrays import DeviceArray
from ..device import DeviceBuffer, HostBuffer, Stream

log = logging.getLogger(__name__)


class Slot:
    """One execution context with its stream and buffers sized for max_batch.

    Every buffer handed to TensorRT or the decode lives here, so it outlives the stream's work.
    Tensor addresses never change, so they are set once.
    """

    def __init__(self, session: Session) -> None:
        self._owned: list[Any] = []
        self.stream: Stream | None = None
        self.context = None
        self.decode_buffers: tuple[HostBuffer, DeviceBuffer, HostBuffer, DeviceBuffer] | None = None
        try:
            self.context = session.engine.create_execution_context()
            if self.context is None:
                raise EngineError("TensorRT could not create an execution context (out of GPU memory?)")
            self.stream = Stream()
            self.stream_handle = self.stream.handle
            b = session.max_batch
            in_shape, out_shape = (b, *session.input_shape), (b, *session.output_shape)
            self.h_in = self._own(HostBuffer(in_shape, session.input_dtype))
            self.d_in = self._own(DeviceBuffer(self.h_in.array.nbytes))
            self.h_out = self._own(HostBuffer(out_shape, session.output_dtype))
            self.d_out = self._own(DeviceBuffer(self.h_out.array.nbytes))
            for name, buffer in ((session.input_name, self.d_in), (session.output_name, self.d_out)):
                if not self.context.set_tensor_address(name, buffer.ptr):
                    raise EngineError(f"TensorRT rejected the address of tensor {name}")
        except BaseException:
            self.close()
            raise

    def _own(self, buffer: Any) -> Any:
        self._owned.append(buffer)
        return buffer

    def copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        self.stream.copy(dst, src, nbytes, kind)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def decode(self, max_batch: int, joints: int, fields: int) -> tuple[HostBuffer, DeviceBuffer, HostBuffer,
                                                                       DeviceBuffer]:
        """(h_dec, d_dec, h_post, d_post), made on first use: the decoded (max_batch, J, fields)
        result and the post-processing inputs, rows 0-3 boxes, 4 root depth, 5-8 intrinsics."""
        if self.decode_buffers is None:
            h_dec = self._own(HostBuffer((max_batch, joints, fields), np.dtype(np.float32)))
            d_dec = self._own(DeviceBuffer(h_dec.array.nbytes))
            h_post = self._own(HostBuffer((9, max_batch), np.dtype(np.float32)))
            d_post = self._own(DeviceBuffer(h_post.array.nbytes))
            self.decode_buffers = (h_dec, d_dec, h_post, d_post)
        return self.decode_buffers

    def close(self) -> None:
        """Free the context first (it may reference the buffers), then buffers, then the stream."""
        self.context = None
        for buffer in reversed(self._owned):
            with contextlib.suppress(Exception):
                buffer.close()
        self._owned = []
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class SlotPool:
    """At most `size` slots made by `make()`, shared by all threads: a caller waits for a free one.

    A slot whose call failed is synchronised (its stream may still copy into its pinned buffers)
    before anyone reuses it; if even that fails, it is closed and a new one made later.
    """

    def __init__(self, make: Callable[[], Any], size: int) -> None:
        self._make, self._size = make, size
        self._idle: list[Any] = []
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()

    @property
    def created(self) -> int:
        with self._cond:
            return self._count

    @contextlib.contextmanager
    def use(self) -> Iterator[Any]:
        slot = self._acquire()
        reusable = False
        try:
            yield slot
            reusable = True
        finally:
            if not reusable:
                reusable = self._settle(slot)
            self._release(slot, reusable)

    @staticmethod
    def _settle(slot: Any) -> bool:
        try:
            slot.synchronize()
        except Exception as exc:
            log.warning("discarding a TensorRT execution context whose stream could not be synchronised: %s", exc)
            return False
        return True

    def _acquire(self) -> Any:
        with self._cond:
            while True:
                if self._closed:
                    raise EngineError("this TensorRT engine was closed")
                if self._idle:
                    return self._idle.pop()
                if self._count < self._size:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            return self._make()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _release(self, slot: Any, reusable: bool) -> None:
        with self._cond:
            keep = reusable and not self._closed
            if keep:
                self._idle.append(slot)
            else:
                self._count -= 1
            self._cond.notify()
        if not keep:
            slot.close()

    def close(self) -> None:
        """Close idle slots now and busy ones when their call returns; later calls raise EngineError."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for slot in idle:
            slot.close()


class Session:
    """A deserialized engine (and its runtime) with a bounded pool of slots. Shapes are per image."""

    def __init__(self, runtime: Any, engine: Any, *, input_name: str, output_name: str,
                 input_shape: tuple[int, ...], output_shape: tuple[int, ...], max_batch: int,
                 input_dtype: np.dtype, output_dtype: np.dtype, max_contexts: int) -> None:
        self.runtime, self.engine = runtime, engine
        self.input_name, self.output_name = input_name, output_name
        self.input_shape, self.output_shape = tuple(input_shape), tuple(output_shape)
        self.input_dtype, self.output_dtype = np.dtype(input_dtype), np.dtype(output_dtype)
        self.max_batch = max_batch
        self.pool = SlotPool(lambda: Slot(self), max_contexts)

    def enqueue(self, slot: Slot, images: np.ndarray | None = None, *, n: int | None = None,
                fill: Callable[[Any, int], Any] | None = None) -> int:
        """Load the input and run the engine on the slot's stream; returns the batch size.

        The input is `images` (host, copied in through the slot's pinned buffer) or, with `fill`,
        written on the device: fill(input binding as a DeviceArray (n, 3, S, S), stream handle).
        """
        n = len(images) if images is not None else int(n or 0)
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"a TensorRT call takes 1..{self.max_batch} images, got {n}")
        context = slot.context
        shape = (n, *self.input_shape)
        if not context.set_input_shape(self.input_name, shape):
            raise EngineError(f"TensorRT rejected input shape {shape} (profile: batch 1..{self.max_batch})")
        if fill is not None:
            fill(DeviceArray(slot.d_in.ptr, shape, self.input_dtype.name), slot.stream_handle)
        else:
            slot.h_in.array[:n] = images
            slot.copy(slot.d_in.ptr, slot.h_in.ptr, images.nbytes, "cudaMemcpyHostToDevice")
        # From here on the stream reads h_in: a failure must synchronise before the slot is reused (SlotPool).
        if not context.execute_async_v3(slot.stream_handle):
            raise EngineError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        return n

    def run(self, images: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) -> (n, J*D, H, W) heatmaps on the host, n <= max_batch."""
        with self.pool.use() as slot:
            n = self.enqueue(slot, images)
            out = slot.h_out.array[:n]
            slot.copy(slot.h_out.ptr, slot.d_out.ptr, out.nbytes, "cudaMemcpyDeviceToHost")
            slot.synchronize()
            return out.copy()

    def close(self) -> None:
        self.pool.close()

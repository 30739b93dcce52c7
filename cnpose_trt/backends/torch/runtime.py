"""PyTorch at run time: TorchEngine serves the network from this package's checkpoint format
(spec + state_dict), on the CPU or a CUDA GPU.

Unlike the other backends' runtimes this one needs torch by nature (it is PyTorch serving the
network); torch is imported when an engine is loaded or run, so the registry can still ask
available() without it. On CUDA it runs in fp16 (precision "fp16") or fp32, channels-last, and
optionally replays CUDA graphs captured per batch size. On CUDA the heatmaps stay on the device:
infer_decode runs the fused CUDA decode on them on the current stream and copies back only the
(P, J, 10) result.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import CheckpointError, EngineError
from ...nn.checkpoint import load_checkpoint, weights_sha256
from ...ops._device import GRAPH_CAPTURE_LOCK
from ...ops.decoding import OUT_FIELDS, decode
from ...spec import VariantSpec
from ..base import Engine, check_engine_io, engine_mismatch, importable, library_version

NAME = "torch"
ENGINE_SUFFIX = ".pt"
LOAD_OPTIONS = ("device", "cuda_graphs", "threads")


def available() -> bool:
    return importable("torch")


def version() -> str:
    return library_version("torch")


def load(path: Path, meta: dict[str, Any], **options: Any) -> Engine:
    if not available():
        raise EngineError(f"{path} is a torch engine: install PyTorch to load it")
    return TorchEngine(path, meta, **options)


def check_engine_file(path: Path, meta: dict[str, Any]) -> None:
    """The checkpoint against its sidecar: the spec it records and the hash of its weights.

    Raises:
        EngineError: an unreadable file, or one whose contents contradict the sidecar.
    """
    try:
        state, stored = load_checkpoint(path)
    except CheckpointError as exc:
        raise EngineError(f"{exc}; rebuild with --force") from None
    _check_checkpoint(path, meta, state, stored)


def _check_checkpoint(path: Path, meta: dict[str, Any], state: dict[str, Any], stored: Any) -> None:
    spec = VariantSpec.from_dict(meta["spec"])
    if stored is None or not stored.same_architecture(spec):
        held = "no spec" if stored is None else f"variant {stored.name} ({stored.head_tag})"
        raise engine_mismatch(path, f"spec says variant {spec.name} ({spec.head_tag}), the file holds {held}")
    want = (meta.get("weights") or {}).get("sha256")
    if weights_sha256(state) != want:
        raise engine_mismatch(path, f"weights.sha256 says {str(want)[:12]}..., the file's weights hash otherwise")


class TorchEngine(Engine):
    """ConvNeXtPose in PyTorch. Thread-safe: calls are serialized by a lock (one model, and
    CUDA graphs with static buffers, are shared)."""

    backend = NAME
    options = LOAD_OPTIONS

    def __init__(self, path: Path, meta: dict[str, Any], device: str | None = None, cuda_graphs: bool = False,
                 threads: int | None = None) -> None:
        super().__init__(path, meta)
        import torch

        from ...nn.network import ConvNeXtPose  # lazy: imports torch

        try:
            self.torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r} ({exc})"
                             ) from None
        if self.torch_device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r}")
        if self.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError(f"device {device!r} asked for, but PyTorch sees no CUDA device")
        if self.precision == "fp16" and self.torch_device.type != "cuda":
            raise EngineError(f"{path} is an fp16 torch engine: it runs on a CUDA device, none is available "
                              "(use an fp32 engine on the CPU)")
        if cuda_graphs and self.torch_device.type != "cuda":
            raise EngineError("cuda_graphs needs a CUDA device")
        if threads:
            torch.set_num_threads(threads)
        state, stored = load_checkpoint(path)
        _check_checkpoint(path, meta, state, stored)
        model = ConvNeXtPose(self.spec)
        model.load_state_dict(state)
        self.dtype = torch.float16 if self.precision == "fp16" else torch.float32
        fmt = torch.channels_last if self.torch_device.type == "cuda" else torch.contiguous_format
        self.model = model.eval().to(self.torch_device, memory_format=fmt)
        if self.dtype == torch.float16:
            _half_body_fp32_stem(self.model)
        self.memory_format = fmt
        self.device = str(self.torch_device)
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}  # host path: n -> (graph, output, input)
        self._static_graph: tuple[Any, Any] | None = None  # device path: (graph, output) at max_batch rows
        self._input: Any = None
        self._lock = threading.RLock()  # enqueue_device holds it around forward_static, which takes it too
        self._last_call: Any = None  # event after the latest use of the shared device buffers (_ordered)
        out_dtype = "float16" if self.dtype == torch.float16 else "float32"
        # The module's own I/O, checked like every backend's (a stale sidecar is refused).
        found = {"inputs": [self.input_name], "outputs": [self.output_name],
                 "input": {"shape": (-1, *self.spec.input_shape), "dtype": "float32"},
                 "output": {"shape": (-1, *self.spec.heatmap_shape), "dtype": out_dtype}}
        check_engine_io(found, path, input_name=self.input_name, output_name=self.output_name,
                        input_shape=self.spec.input_shape, output_shape=self.spec.heatmap_shape,
                        max_batch=self.max_batch, input_dtype=self.input_dtype.name,
                        output_dtype=self.output_dtype.name)

    def forward_device(self, images: Any) -> Any:
        """(N, 3, S, S) torch tensor -> heatmaps on self.device (no host copy)."""
        import torch

        with self._lock, torch.inference_mode():
            x = images.to(self.torch_device, dtype=torch.float32, non_blocking=True).contiguous(
                memory_format=self.memory_format)
            if not self.cuda_graphs:
                return self.model(x).contiguous()
            with self._ordered():  # the graphs' static buffers are shared by callers on any stream
                return self._replay(x)

    @contextlib.contextmanager
    def _ordered(self) -> Iterator[tuple[Any, Any]]:
        """Order a use of the shared device buffers after the previous one, whatever streams the
        callers are on: wait for the last use's event, and record this one's, even when it fails
        part way (kernels it enqueued before failing still touch the buffers). Holding the lock.
        Yields (current stream, this use's event: recorded when the block ends)."""
        import torch

        stream = torch.cuda.current_stream(self.torch_device)
        if self._last_call is not None:
            stream.wait_event(self._last_call)
        done = torch.cuda.Event()
        try:
            yield stream, done
        finally:
            done.record(stream)
            self._last_call = done

    def _replay(self, x: Any) -> Any:
        """CUDA graph per batch size: static input/output buffers, captured on first use."""
        n = x.shape[0]
        if n not in self._graphs:
            static_in = x.clone()
            self._graphs[n] = (*self._capture(static_in), static_in)
        graph, static_out, static_in = self._graphs[n]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def forward_static(self, n: int) -> Any:
        """The network on rows 0..n of the device input buffer (input_buffer), on the current
        stream: a C-contiguous (n, J*D, H, W) heatmap tensor on the device, no host copy. With CUDA
        graphs the graph of the steady shape (max_batch rows) is replayed, captured on first use.
        enqueue_device and the device-only benchmark use it."""
        import torch

        with self._lock, torch.inference_mode():
            static = self.input_buffer()
            if not self.cuda_graphs:
                return self._net(static[:n])
            if self._static_graph is None:
                self._static_graph = self._capture(static)
            graph, out = self._static_graph
            graph.replay()
            return out[:n]

    def input_buffer(self) -> Any:
        """The engine's own device input buffer: (max_batch, 3, S, S) float32 (the stem runs in
        float32), NCHW, C-contiguous, made on first use. enqueue_device's fill writes its rows 0..n; with CUDA
        graphs the network always runs on all max_batch rows (one steady shape, one capture)."""
        import torch

        with self._lock:
            if self._input is not None:
                return self._input
            with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
                self._input = torch.zeros((self.max_batch, *self.spec.input_shape), dtype=torch.float32,
                                          device=self.torch_device)
        return self._input

    def _net(self, x: Any) -> Any:
        return self.model(x.contiguous(memory_format=self.memory_format)).contiguous()

    def _capture(self, static: Any) -> tuple[Any, Any]:
        import torch

        side = torch.cuda.Stream(self.torch_device, priority=-1)  # never torch's (default-priority) capture stream
        side.wait_stream(torch.cuda.current_stream(self.torch_device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the capture, as CUDA graphs require
                self._net(static)
        torch.cuda.current_stream(self.torch_device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the prep threads' pinned allocations and uploads on other streams go on
        # during the capture and must not invalidate it (the default 'global' mode refuses them).
        with GRAPH_CAPTURE_LOCK, torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self._net(static)
        return graph, out

    def enqueue_device(self, fill: Any, n: int, *, flip: bool = False, boxes: Any = None, root_depth: Any = None,
                       intrinsics: Any = None) -> Any:
        """Engine.enqueue_device on the current CUDA stream: fill writes the input buffer, the
        network (CUDA graph replay with cuda_graphs) and the fused decode follow, and the (P, J, 10)
        result is copied to pinned host memory behind an event; the host does not wait here."""
        import torch

        if not self.on_device:
            return super().enqueue_device(fill, n, flip=flip, boxes=boxes, root_depth=root_depth,
                                          intrinsics=intrinsics)
        p, post = self._device_call(n, flip, boxes, root_depth, intrinsics)
        j = self.spec.joints
        with self._lock, torch.inference_mode(), torch.cuda.device(self.torch_device), \
                self._ordered() as (stream, done):
            handle = int(stream.cuda_stream)
            fill(self.input_buffer()[:n], handle)
            heat = self.forward_static(n)
            out = torch.empty((p, j, OUT_FIELDS), dtype=torch.float32, device=self.torch_device)
            decode(heat[:p], j, self.spec.depth_dim, flipped=heat[p:n] if flip else None, out=out, stream=handle,
                   **post)
            host = torch.empty((p, j, OUT_FIELDS), dtype=torch.float32, pin_memory=True)
            host.copy_(out, non_blocking=True)
        return _Pending(done, host)

    def infer_device(self, images: np.ndarray) -> Any:
        """Like infer(), but the heatmaps stay on the device (a torch tensor)."""
        import torch

        if not self.on_device:
            return super().infer_device(images)
        images = self.check_input(images)
        chunks = [self.forward_device(torch.from_numpy(images[i:i + self.max_batch]))
                  for i in range(0, len(images), self.max_batch)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _infer_decode(self, images: np.ndarray, post: dict[str, np.ndarray | None], flip: bool) -> np.ndarray:
        import torch

        if not self.on_device:
            return super()._infer_decode(images, post, flip)
        heat = self.forward_device(torch.from_numpy(images))
        p = len(heat) // 2 if flip else len(heat)
        res = decode(heat[:p], self.spec.joints, self.spec.depth_dim, flipped=heat[p:] if flip else None, **post)
        return res.packed.float().cpu().numpy()  # only (P, J, 10) floats cross to the host

    def _run(self, images: np.ndarray) -> np.ndarray:
        import torch

        out = self.forward_device(torch.from_numpy(images))
        return out.float().cpu().numpy() if self.output_dtype == np.float32 else out.cpu().numpy()

    def close(self) -> None:
        self._graphs.clear()
        self._static_graph = self._input = None


def _half_body_fp32_stem(model: Any) -> None:
    """fp16 for everything but the stem (conv 4x4 + BatchNorm), which keeps float32 weights, input and math.

    Upstream's input is (pixel - mean) / std on 0..255 values (up to about 1136), so the stem's
    BatchNorm subtracts running means near 1000 from its conv output: rounded to float16 (a step
    of 0.5 to 1 there) that cancellation leaves errors of 37 % of the signal. Measured on the CPU
    with PyTorch's float16 (random weights, BatchNorm fitted to real crops): joints moved by
    0.62 / 1.17 cells mean (XS / M) with a float16 stem, 0.0026 / 0.0052 with a float32 stem.
    The ONNX graph (ONNX Runtime, TensorRT) folds that BatchNorm into the conv, whose folded bias is
    small (|b| < 2.1): there the float16 stem's output is within 8.6e-4 (relative) of float32.
    """
    import torch

    stem = model.backbone.downsample_layers[0]
    exact = {k: v.clone() for k, v in stem.state_dict().items()}
    model.half()
    stem.float()
    stem.load_state_dict(exact)  # .half() rounded them: the float32 values come back
    stem.register_forward_hook(lambda _module, _inputs, out: out.to(torch.float16))


class _Pending:
    """enqueue_device's handle: the (P, J, 10) result in pinned host memory once `done` fires."""

    def __init__(self, done: Any, host: Any) -> None:
        self._done, self._host = done, host

    def result(self) -> np.ndarray:
        self._done.synchronize()
        return self._host.numpy().copy()

"""PyTorch backend: the network served by PyTorch, on the CPU or a CUDA GPU.

The baseline on the CPU and the GPU path for users without TensorRT. On CUDA it runs in fp16
(precision "fp16") or fp32, channels-last, and optionally replays CUDA graphs captured per batch
size. The engine file is this package's checkpoint format (spec + state_dict); the fused decode
runs on the same device (cnpose_trt.decode takes torch tensors).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from .engine import Engine
from .errors import EngineError

PRECISIONS = ("fp32", "fp16")


class TorchEngine(Engine):
    """ConvNeXtPose in PyTorch. Thread-safe: calls are serialized by a lock (one model, and
    CUDA graphs with static buffers, are shared)."""

    backend = "torch"

    def __init__(self, path: Path, meta: dict[str, Any], device: str | None = None, cuda_graphs: bool = False,
                 threads: int | None = None) -> None:
        super().__init__(path, meta)
        import torch

        from .checkpoint import load_checkpoint
        from .model import ConvNeXtPose

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.precision == "fp16" and self.device.type != "cuda":
            raise EngineError(f"{path} is an fp16 torch engine: it runs on a CUDA device, none is available "
                              "(use an fp32 engine on the CPU)")
        if cuda_graphs and self.device.type != "cuda":
            raise EngineError("cuda_graphs needs a CUDA device")
        if threads:
            torch.set_num_threads(threads)
        state, _ = load_checkpoint(path)
        model = ConvNeXtPose(self.spec)
        model.load_state_dict(state)
        self.dtype = torch.float16 if self.precision == "fp16" else torch.float32
        fmt = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.model = model.eval().to(self.device, dtype=self.dtype, memory_format=fmt)
        self.memory_format = fmt
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}
        self._lock = threading.Lock()

    def forward_device(self, images: Any) -> Any:
        """(N, 3, S, S) torch tensor on self.device -> heatmaps on the device (no host copy)."""
        import torch

        with self._lock, torch.inference_mode():
            x = images.to(self.device, dtype=self.dtype, non_blocking=True).contiguous(
                memory_format=self.memory_format)
            if not self.cuda_graphs:
                return self.model(x).contiguous()
            return self._replay(x)

    def _replay(self, x: Any) -> Any:
        """CUDA graph per batch size: static input/output buffers, captured on first use."""
        import torch

        n = x.shape[0]
        if n not in self._graphs:
            static_in = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the capture, as CUDA graphs require
                    self.model(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.model(static_in)
            self._graphs[n] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[n]
        static_in.copy_(x)
        graph.replay()
        return static_out.contiguous().clone()

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def infer_device(self, images: np.ndarray) -> Any:
        """Like infer(), but the heatmaps stay on the device (for the fused decode there)."""
        import torch

        images = self.check_input(images)
        chunks = [self.forward_device(torch.from_numpy(images[i:i + self.max_batch]))
                  for i in range(0, len(images), self.max_batch)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _run(self, images: np.ndarray) -> np.ndarray:
        import torch

        out = self.forward_device(torch.from_numpy(images))
        return out.float().cpu().numpy() if self.output_dtype == np.float32 else out.cpu().numpy()


def save_engine(model: Any, path: Path) -> None:
    """Write the torch 'engine': this package's checkpoint format (spec + state_dict)."""
    from .checkpoint import save_checkpoint

    save_checkpoint(model, path)

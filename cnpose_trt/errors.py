"""One exception family, so callers can catch everything this package raises on purpose."""

from __future__ import annotations

from typing import Any


class CnposeError(Exception):
    """Base class of cnpose_trt's own errors."""


class CheckpointError(CnposeError, ValueError):
    """A checkpoint file or state_dict that cannot be used (missing, damaged, wrong variant)."""


class EngineError(CnposeError, RuntimeError):
    """An engine file that cannot be loaded or does not match what was asked."""


class BuildError(CnposeError, RuntimeError):
    """Exporting or compiling an engine failed, or a backend is not available."""


class TorchMissingError(CnposeError, ImportError):
    """A step that needs PyTorch (a build, reading a checkpoint) where torch cannot be imported."""


class ManifestError(CnposeError, ValueError):
    """A batch manifest that cannot be read: names the file, the line (or row) and the field."""


class VideoError(CnposeError, ValueError):
    """A video file that cannot be read (not a video, cannot be decoded, a wanted frame past its end) or
    written: names the file and, where one is to blame, the frame (`frame`, else None). A wanted frame
    past the end also says how many frames the video has (`end`, else None): every later frame is past
    it too, while a frame that cannot be decoded says nothing of the frames after it."""

    def __init__(self, message: str, frame: int | None = None, end: int | None = None) -> None:
        super().__init__(message)
        self.frame = frame
        self.end = end


class BatchError(CnposeError, RuntimeError):
    """An output folder that cannot be used for this job (locked, another job's results, damaged part)."""


def need_torch(what: str) -> None:
    """Raise TorchMissingError (one line, with the install command) where torch cannot be imported."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise TorchMissingError(f"{what} needs PyTorch, which is not installed here: pip install torch==2.13.0 "
                                "(the CPU build; see the README), or pass --engine with an engine built "
                                "elsewhere") from None


def need_pyarrow() -> tuple[Any, Any]:
    """pyarrow and pyarrow.parquet, or a BatchError (one line, with the install command) where pyarrow
    cannot be imported: batch jobs read and write Parquet."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise BatchError("batch jobs write Parquet and need pyarrow: pip install 'cnpose_trt[batch]'") from None
    return pa, pq

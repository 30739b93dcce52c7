"""One exception family, so callers can catch everything this package raises on purpose."""


class CnposeError(Exception):
    """Base class of cnpose_trt's own errors."""


class CheckpointError(CnposeError, ValueError):
    """A checkpoint file or state_dict that cannot be used (missing, damaged, wrong variant)."""


class EngineError(CnposeError, RuntimeError):
    """An engine file that cannot be loaded or does not match what was asked."""


class BuildError(CnposeError, RuntimeError):
    """Exporting or compiling an engine failed, or a backend is not available."""

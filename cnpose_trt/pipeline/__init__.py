"""Images to poses. estimator: PoseEstimator (batching and scheduling) and estimate; window: the
items read ahead on the prep threads; host and device: the two paths a batch runs on (crops on the
host, or uint8 images cut on the GPU); items and results: what flows through them and comes out;
gpu_stage and staging: the device path's uploads, staging ring and fill of the engine's input.

`cnpose_trt.pipeline` was one module before the package had rooms; its public names stay
importable from here (re-exports, nothing else).
"""

from .estimator import PoseEstimator, estimate  # noqa: F401  (re-exports)
from .items import call_chunks  # noqa: F401  (re-export)
from .results import PoseResult, Timings  # noqa: F401  (re-exports)

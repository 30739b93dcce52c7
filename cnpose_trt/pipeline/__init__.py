"""Images to poses: PoseEstimator (estimator: batching, scheduling, the host path) and gpu_stage
(the device path: upload, staging ring, crop on the GPU).

`cnpose_trt.pipeline` was one module before the package had rooms; its public names stay
importable from here (a re-export of pipeline.estimator, nothing else).
"""

from .estimator import PoseEstimator, PoseResult, Timings, call_chunks, estimate  # noqa: F401  (re-exports)

"""Building engines: builder (build_engine: export, precision graph, backend compile, sidecar,
cached, from a config.BuildConfig), lookup (is it cached?), storage (cache folder, locks), export,
precision (FP16 / INT8 graphs), verify (the checks a compile runs).

`cnpose_trt.build` was one module before the package had rooms; its public names stay importable
from here (a re-export of build.builder, nothing else). `python -m cnpose_trt.build` runs
build/__main__.py (the command line lives in cli/build.py).
"""

from ..backends import BACKENDS, DEFAULT_MAX_BATCH  # noqa: F401  (re-exports: the old module path)
from .builder import (  # noqa: F401
    NEARLY_FULL_BYTES,
    BuildConfig,
    BuildJob,
    BuildResult,
    Request,
    TrtOptions,
    build_engine,
    resolve_backend,
    weights_fingerprint,
)

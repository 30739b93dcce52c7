"""Batch jobs (cnpose-trt batch), one module per step of the data: manifest (the entries read and
checked), stream (images read ahead and run through PoseEstimator, bad ones becoming error rows),
output (rows, Parquet parts committed by rename, resume, summary), engine (how the job gets its
engine), job (BatchConfig and run: the plan, the local run) and ray (the same job on Ray Data);
watchdog ends a local Ray cluster whose driver was killed.

`cnpose_trt.batch` was one module before the package had rooms; its public names stay importable
from here (re-exports, nothing else). Its command line is cli/batch.py (the cli room: batch never
imports it); `python -m cnpose_trt.batch` runs it (batch/__main__.py).
"""

from ..errors import BatchError, ManifestError  # noqa: F401  (re-exports: the old module path)
from .engine import EngineOptions, engine_id  # noqa: F401
from .job import BatchConfig, run  # noqa: F401
from .manifest import (  # noqa: F401
    FIELDS,
    FORMATS,
    IMAGE_SUFFIXES,
    Entry,
    make_entries,
    make_entry,
    manifest_format,
    read_manifest,
)
from .output import (  # noqa: F401
    LOCK_FILE,
    META_KEY,
    OUTPUT_COLUMNS,
    PART_FORMAT,
    SUMMARY_FILE,
    PartWriter,
    Progress,
    RowBuffer,
    Summary,
    drop_superseded,
    output_schema,
    read_results,
    scan_output,
)
from .ray import RayPredictor, install_shipped_engine  # noqa: F401
from .stream import estimate_stream, load_entry, read_ahead  # noqa: F401

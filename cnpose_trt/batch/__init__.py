"""Batch jobs (cnpose-trt batch): manifests, Parquet / JSON-lines parts, resume, local or Ray (job).

`cnpose_trt.batch` was one module before the package had rooms; its public names stay importable
from here (a re-export of batch.job, nothing else). `python -m cnpose_trt.batch` runs
batch/__main__.py.
"""

from .job import (  # noqa: F401  (re-exports: the old module path)
    FIELDS,
    FORMATS,
    IMAGE_SUFFIXES,
    LOCK_FILE,
    META_KEY,
    OUTPUT_COLUMNS,
    PART_FORMAT,
    SUMMARY_FILE,
    BatchError,
    EngineOptions,
    Entry,
    ManifestError,
    PartWriter,
    Progress,
    RayPredictor,
    RowBuffer,
    Summary,
    add_batch_arguments,
    drop_superseded,
    engine_id,
    estimate_stream,
    install_shipped_engine,
    load_entry,
    main,
    make_entry,
    manifest_format,
    output_schema,
    read_ahead,
    read_manifest,
    read_results,
    run,
    run_batch,
    scan_output,
)

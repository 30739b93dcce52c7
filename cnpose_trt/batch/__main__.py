"""python -m cnpose_trt.batch: the batch command line (batch.job.main)."""

import sys

from .job import main

sys.exit(main())

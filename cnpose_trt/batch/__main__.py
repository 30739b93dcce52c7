"""python -m cnpose_trt.batch: the batch command line (cli/batch.py's main)."""

import sys

from ..cli.batch import main

sys.exit(main())

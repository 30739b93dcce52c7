"""python -m cnpose_trt.cli: the command line."""

import sys

from .app import main

sys.exit(main())

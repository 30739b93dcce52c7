"""python -m cnpose_trt.build: the build command line (cli/build.py)."""

import sys

from ..cli.build import main

sys.exit(main())

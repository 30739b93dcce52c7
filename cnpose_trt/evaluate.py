"""Old path, kept for the README and `python -m cnpose_trt.evaluate`: cnpose_trt.evaluate is
cnpose_trt.eval.evaluate (the same module object, so attributes and patches are shared). Package
code imports eval.evaluate directly."""

import sys

from .eval import evaluate as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved

"""Old path, kept for the README's examples: cnpose_trt.synthetic is cnpose_trt.io.synthetic (the same module
object, so attributes and patches are shared). Package code imports io.synthetic directly."""

import sys

from .io import synthetic as _moved

sys.modules[__name__] = _moved

"""Old path, kept for the README's examples: cnpose_trt.preprocess is cnpose_trt.io.preprocess (the same module
object, so attributes and patches are shared). Package code imports io.preprocess directly."""

import sys

from .io import preprocess as _moved

sys.modules[__name__] = _moved

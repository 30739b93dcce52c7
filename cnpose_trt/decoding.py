"""Old path, kept for the README's examples: cnpose_trt.decoding is cnpose_trt.ops.decoding (the same module
object, so attributes and patches are shared). Package code imports ops.decoding directly."""

import sys

from .ops import decoding as _moved

sys.modules[__name__] = _moved

"""Old path, kept for the README and `python -m cnpose_trt.evaluate`: cnpose_trt.evaluate is
cnpose_trt.eval.evaluate (the same module object, so attributes and patches are shared; it carries the
metrics' and datasets' names too). Package code imports eval.* directly. Run as a program, it is the
`eval` command (cnpose_trt.cli.eval), as before."""

import sys

from .eval import evaluate as _moved

if __name__ == "__main__":
    from .cli.eval import main

    sys.exit(main())
sys.modules[__name__] = _moved

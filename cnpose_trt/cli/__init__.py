"""The command line (cnpose-trt), one module per command: app (the command table, the parser, main),
errors (the one error boundary: an error becomes one line on stderr and an exit status), common (what
several commands share), predict, inspect, demo and build (also `python -m cnpose_trt.build`); batch,
eval and bench run from their rooms' modules. The top room: it may import every other.

`cnpose_trt.cli:main` is the console script's entry point; the old module's public names stay
importable from here (re-exports, nothing else).
"""

from ..cache import finite_json  # noqa: F401  (re-exports)
from .app import COMMANDS, build_parser, main  # noqa: F401
from .common import flip_test  # noqa: F401
from .predict import FOLDER_HINT  # noqa: F401

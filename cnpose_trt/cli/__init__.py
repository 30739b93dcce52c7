"""The command line (cnpose-trt): app (the parser, the commands, the one error boundary) and build
(the build command, also `python -m cnpose_trt.build`). The top room: it may import every other.

`cnpose_trt.cli:main` is the console script's entry point; the old module's public names stay
importable from here (a re-export of cli.app, nothing else).
"""

from .app import COMMANDS, FOLDER_HINT, build_parser, finite_json, flip_test, main  # noqa: F401  (re-exports)

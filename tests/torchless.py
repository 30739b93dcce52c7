"""Run the `cnpose-trt` command in a process where torch (and onnx) cannot be imported: what a user of
the runtime alone has (issue 21: cached engines serve the runtime commands without torch)."""

from __future__ import annotations

import subprocess
import sys

_PRELUDE = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
            "from cnpose_trt.cli.app import main\n"
            "code = main(sys.argv[1:])\n"
            "assert sys.modules['torch'] is None, 'torch was imported'\n"
            "sys.exit(code)\n")


def cli_without_torch(args: list[str], cwd: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`cnpose-trt ARGS` with torch unimportable; returns the finished process (text output)."""
    return subprocess.run([sys.executable, "-c", _PRELUDE, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)

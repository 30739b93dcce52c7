"""The command line's one error boundary: a command's exception becomes one line on stderr and an
exit status, never a traceback. Bad input and failed steps (the package's errors, ValueError,
TypeError, OSError with the file it names, MemoryError) end with status 2; Ctrl-C with 130 and
SIGTERM with 128 + 15 (interrupts.run_command). A command that ran but achieved nothing (bench, when
every configuration was skipped) raises Failed: its line, status 1. `cnpose-trt` and
`python -m cnpose_trt.build` both run here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ..errors import CnposeError
from ..interrupts import run_command

BAD_INPUT = 2  # the status of every error this boundary reports
FAILED = 1  # a command that ran but produced nothing (Failed)


class Failed(Exception):
    """A command that ran to its end without a result (its message says why): status 1, not 2."""


def os_error(exc: OSError) -> str:
    """An OSError's line: 'No space left on device: /dev/full' where the OS names the file."""
    if exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc)


def reported(fn: Callable[..., int], *args: Any) -> int:
    """fn(*args), its errors printed as one 'error: ...' line on stderr and returned as status 2."""
    status = BAD_INPUT
    try:
        return fn(*args)
    except Failed as exc:
        line, status = str(exc), FAILED
    except (CnposeError, ValueError, TypeError) as exc:
        line = str(exc)
    except OSError as exc:
        line = os_error(exc)
    except MemoryError:
        line = "out of memory"
    print(f"error: {line}", file=sys.stderr)
    return status


def run(fn: Callable[..., int], *args: Any) -> int:
    """A command's body inside the boundary: errors -> one line and 2, Ctrl-C -> 130, SIGTERM -> 143."""
    return run_command(reported, fn, *args)

"""Command-line programs end with one line and a non-zero status, not a traceback, on Ctrl-C or SIGTERM.

SIGTERM and SIGHUP are turned into an exception while a command runs, so that `with` blocks
unwind as they do for Ctrl-C: a build's temporary folder is removed, its lock released, and
the previous engine stays in place.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """The process received SIGTERM or SIGHUP (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise Terminated (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_command(fn: Callable[..., int], *args: Any) -> int:
    """fn(*args), with Ctrl-C -> 'error: interrupted' and exit status 130, SIGTERM -> 143 (128 + signal)."""
    try:
        with signals_as_exceptions():
            return fn(*args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"error: terminated by {signal.Signals(exc.signum).name}", file=sys.stderr)
        return 128 + exc.signum

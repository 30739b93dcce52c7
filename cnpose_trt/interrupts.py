"""Command-line programs end with one line and a non-zero status, not a traceback, on Ctrl-C or SIGTERM.

SIGTERM and SIGHUP are turned into an exception while a command runs, so that `with` blocks
unwind as they do for Ctrl-C: a build's temporary folder is removed, its lock released, and
the previous engine stays in place.

A stop request is also remembered. Library code can swallow the exception a signal raises: the
standard library's copyreg._slotnames (run by every copy.deepcopy of an OrderedDict, as in a
torch module) wraps a line in a bare `except: pass`, so a Ctrl-C landing there was lost and a
build went on to replace the engine. raise_if_stopped(), called at each build step, before a build
commits and for each image of a batch job, raises a remembered request again; run_command
reports one that was never raised again as what it was.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # the stop requests a command handles
_pending: int | None = None  # the signal of a stop request received inside signals_as_exceptions


class Terminated(BaseException):
    """The process received SIGTERM or SIGHUP (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _raise(signum: int, frame: Any) -> None:
    global _pending
    _pending = signum
    raise _stop(signum)


def raise_if_stopped() -> None:
    """Raise again a stop request that arrived and was swallowed; a no-op when none is pending."""
    if _pending is not None:
        raise _stop(_pending)


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise Terminated and Ctrl-C KeyboardInterrupt, and each is
    remembered for raise_if_stopped() (main thread only; elsewhere a no-op). A signal the process
    ignores (SIGINT in a script's background job, SIGHUP under nohup) stays ignored; any other
    handler (the default, or one a library such as Ray left behind) is replaced and restored after."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending = None
    previous: dict[int, Any] = {}
    try:
        for s in _SIGNALS:
            if signal.getsignal(s) not in (signal.SIG_IGN, None):  # None: set outside Python, left alone
                previous[s] = signal.signal(s, _raise)
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _pending = None


def keep_handlers(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) with this thread's signal handlers as they were before (ray.init, for
    one, installs its own SIGTERM handler, which exits without a word and is not remembered)."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    before = {s: signal.getsignal(s) for s in _SIGNALS}
    try:
        return fn(*args, **kwargs)
    finally:
        for s, handler in before.items():
            if handler is not None and signal.getsignal(s) is not handler:
                signal.signal(s, handler)


def held_stops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) with stop requests held until it returns, then raised (KeyboardInterrupt,
    Terminated), and this thread's handlers as they were before. For calls that must not be cut in
    the middle: an interrupted ray.init left its cluster's processes running and the process then
    died of a segfault at exit. Only signals with a Python handler are held (a default SIGTERM still
    ends the process); in other threads fn runs as it is."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    before = {s: signal.getsignal(s) for s in _SIGNALS}
    held: list[int] = []
    try:
        for s, handler in before.items():
            if callable(handler):
                signal.signal(s, lambda signum, frame: held.append(signum))
        result = fn(*args, **kwargs)
    finally:
        for s, handler in before.items():
            if handler is not None and signal.getsignal(s) is not handler:
                signal.signal(s, handler)
        if held:
            if before[held[0]] is _raise:  # inside a command: remembered, as _raise does
                _pending = held[0]
            raise _stop(held[0])  # the stop request wins over an error of fn
    return result


def run_command(fn: Callable[..., int], *args: Any) -> int:
    """fn(*args), with Ctrl-C -> 'error: interrupted' and exit status 130, SIGTERM -> 143 (128 + signal).
    A command that failed and said why keeps its own status and line, even when a stop request
    arrived too."""
    try:
        with signals_as_exceptions():
            status = fn(*args)
            if status == 0:
                raise_if_stopped()  # a request that fn swallowed after its last check
            return status
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"error: terminated by {signal.Signals(exc.signum).name}", file=sys.stderr)
        return 128 + exc.signum

"""Progress on stderr, one shape for every long job: build steps (say) and bars (Bar) for
calibration, evaluation and batch jobs."""

from __future__ import annotations

import math
import sys
import threading
import time
import weakref
from typing import Any


def say(message: str) -> None:
    """A build step or note on stderr (stdout stays for results, e.g. engine paths)."""
    print(message, file=sys.stderr, flush=True)


class Bar:
    """A one-line progress bar with a rate and an ETA: redrawn in place on a terminal (at most every
    `interval` s), else (a log, a pipe) a line at least every `log_interval` s, also while no unit
    finishes (a ticker thread, stopped by close()); extra counters (people, errors) after the rate.

    Args:
        total: units to do. label: text before the bar. unit: what is counted ("images").
        counters: names of extra counts shown after the rate, e.g. ("people", "errors").
    """

    def __init__(self, total: int, label: str = "", *, unit: str = "images", counters: tuple[str, ...] = (),
                 enabled: bool = True, stream: Any = None, interval: float = 0.2, log_interval: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.label, self.unit, self.enabled = total, label, unit, enabled
        self.counts = dict.fromkeys(counters, 0)
        self.done = 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else log_interval
        self.started = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False  # set under the lock: no line is drawn after the final one
        if enabled and not self.tty and log_interval > 0:
            threading.Thread(target=_tick, args=(weakref.ref(self), self._stop, log_interval), daemon=True,
                             name="cnpose-progress").start()

    def update(self, n: int = 1, **counts: int) -> None:
        self.done += n
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0) + value
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._show(final=False)

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def _show(self, final: bool) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = final
            self._last = time.monotonic()
            self._draw(final)

    def _draw(self, final: bool) -> None:
        rate = self.rate()
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        eta_text = "" if final or not math.isfinite(eta) else f"  eta {int(eta) // 60}:{int(eta) % 60:02d}"
        extra = "".join(f"  {v} {k}" for k, v in self.counts.items())
        short = {"images": "img"}.get(self.unit, self.unit)
        line = (f"{self.label + ' ' if self.label else ''}[{'#' * int(frac * 24):<24}] {self.done}/{self.total} "
                f"{self.unit}  {rate:.1f} {short}/s{extra}{eta_text}")
        self.stream.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        if self.enabled and (self.done or self.tty):
            self._show(final=True)
        with self._lock:
            self._closed = True


def _tick(ref: Any, stop: threading.Event, every: float) -> None:
    """A line at least every `every` s on a non-terminal stream, until the bar is closed or gone."""
    while not stop.wait(every / 4):
        bar = ref()
        if bar is None:
            return
        if time.monotonic() - bar._last >= every and not stop.is_set():
            bar._show(final=False)
        del bar

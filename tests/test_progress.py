"""Progress on a non-terminal stderr (a log file, a pipe, CI): a line at least every log_interval seconds,
also while nothing finishes (issue 21 item 7), and nothing after close()."""

from __future__ import annotations

import io
import time

from cnpose_trt.progress import Bar


def test_a_log_gets_a_line_while_work_stalls_and_none_after_close():
    stream = io.StringIO()
    bar = Bar(10, "job", stream=stream, log_interval=0.2)
    bar.update(1)  # then a stall: no unit finishes for a while
    deadline = time.monotonic() + 30  # generous: a loaded machine may delay the ticker, not stop it
    while len(stream.getvalue().splitlines()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3, lines  # lines keep coming while nothing finishes
    assert all(line.startswith("job [") and " 1/10 images" in line for line in lines)
    bar.close()
    closed = stream.getvalue()
    assert closed.splitlines()[-1].startswith("job [") and "eta" not in closed.splitlines()[-1]
    time.sleep(0.5)
    assert stream.getvalue() == closed  # the ticker stopped with close()


def test_default_interval_is_five_seconds_and_a_terminal_gets_no_ticker():
    import threading

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    before = set(threading.enumerate())
    bar = Bar(3, stream=Tty())
    assert not [t for t in set(threading.enumerate()) - before if t.name == "cnpose-progress"]  # redrawn on updates
    bar.close()
    log = Bar(3, stream=io.StringIO())
    assert log.interval == 5.0
    log.close()


def test_an_unclosed_bar_that_is_dropped_stops_its_ticker():
    import gc
    import threading

    before = set(threading.enumerate())
    bar = Bar(5, stream=io.StringIO(), log_interval=0.1)
    (ticker,) = [t for t in set(threading.enumerate()) - before if t.name == "cnpose-progress"]
    del bar
    gc.collect()
    ticker.join(2)
    assert not ticker.is_alive()


def test_no_line_after_the_final_one_even_when_the_ticker_races_close():
    """The ticker checks for close() under the bar's lock: a tick that was about to draw when close() ran
    draws nothing (a review found one more 'eta' line after the final one)."""
    stream = io.StringIO()
    bar = Bar(4, "job", stream=stream, log_interval=3600)
    bar.update(2)
    bar.close()
    final = stream.getvalue()
    bar._show(final=False)  # what a late tick does
    assert stream.getvalue() == final and "eta" not in final.splitlines()[-1]

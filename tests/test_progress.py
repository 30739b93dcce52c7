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
    time.sleep(0.9)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3, lines  # about one every 0.2 s while stalled
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

    before = threading.active_count()
    bar = Bar(3, stream=Tty())
    assert threading.active_count() == before  # a terminal is redrawn on updates only
    bar.close()
    log = Bar(3, stream=io.StringIO())
    assert log.interval == 5.0
    log.close()


def test_an_unclosed_bar_that_is_dropped_stops_its_ticker():
    import gc
    import threading

    before = set(threading.enumerate())
    Bar(5, stream=io.StringIO(), log_interval=0.1)
    (ticker,) = [t for t in set(threading.enumerate()) - before if t.name == "cnpose-progress"]
    gc.collect()
    ticker.join(2)
    assert not ticker.is_alive()

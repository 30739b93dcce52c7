"""The Ray processes a batch job started, ended when the job dies without ending them (kill -9).

    python -m cnpose_trt.batch.watchdog PID START

`cnpose-trt batch --ray` starts this in a session of its own before it starts a local Ray cluster. While
process PID (started at START, field 22 of /proc/PID/stat, so that a reused pid is not taken for it)
lives, the watchdog notes every Ray process among its descendants; once it is gone, it sends those
still running SIGTERM, then SIGKILL after a grace period. A job that ends normally (or on Ctrl-C)
shuts its cluster down itself and stops the watchdog first.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sys
import time


def _stat(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()  # after the name: state, ppid, ..., starttime at [19]
    except OSError:
        return None


def start_time(pid: int) -> bytes | None:
    fields = _stat(pid)
    return None if fields is None else fields[19]


def alive(pid: int, start: bytes) -> bool:
    """The process pid, started at `start`, still runs (a zombie, waiting for its parent, does not)."""
    fields = _stat(pid)
    return fields is not None and fields[19] == start and fields[0] not in (b"Z", b"X")


def ray_descendants(root: int) -> dict[int, bytes]:
    """root's descendants that run Ray (pid -> start time), from /proc; empty where there is none."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    started: dict[int, bytes] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if name.isdigit() and (fields := _stat(int(name))) is not None:
                children[int(fields[1])].append(int(name))
                started[int(name)] = fields[19]
    found: dict[int, bytes] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = started[child]
                todo.append(child)
    return {pid: t for pid, t in found.items() if _runs_ray(pid)}


def _runs_ray(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ray" in f.read()
    except OSError:
        return False


def end(procs: dict[int, bytes], grace: float) -> None:
    """SIGTERM the processes still running, SIGKILL those left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        procs = {pid: t for pid, t in procs.items() if alive(pid, t)}
        for pid in procs:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while procs and time.monotonic() < deadline:
            time.sleep(0.05)
            procs = {pid: t for pid, t in procs.items() if alive(pid, t)}


def watch(driver: int, start: bytes, every: float = 0.25, grace: float = 3.0) -> None:
    known: dict[int, bytes] = {}
    while alive(driver, start):
        known.update(ray_descendants(driver))
        time.sleep(every)
    end(known, grace)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the job's Ctrl-C is the job's to handle
    watch(int(sys.argv[1]), sys.argv[2].encode())

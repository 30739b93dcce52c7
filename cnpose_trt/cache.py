"""The engine cache: what the key covers, where files go, atomic commits and crash clean-up.

One engine, whose handle is <stem><ext> (e.g. XS-2UP-128ch-D32-fp32-onnxruntime-<key12>.onnx):

- <stem>.<sha8><ext> holds the engine bytes, named after their own sha256. It is written once,
  complete, and never modified afterwards.
- <stem><ext>.json, the sidecar, holds the metadata and names the engine file with its sha256.
  Replacing the sidecar (one atomic rename) is the only commit point: a build writes its new
  engine file, then replaces the sidecar, then deletes the engine file the old sidecar named.
  A reader sees the old or the new engine, never a mix, and a build killed at any step leaves
  the previous engine loadable. (A reader that read the old sidecar just before its engine file
  was deleted reads the sidecar again: see engine.load_engine.)

Temporary files and folders are named .<name>.<random>.tmp and hold an flock(2) for as long as
their writer lives (a file on itself, a folder on its owner.lock). The kernel drops the lock
when the writer dies, however it dies (SIGKILL included), so the next build removes every
temporary whose lock it can take (clean_stale), whichever process or host left it; no PIDs or
clocks are trusted, except a grace period of STALE_GRACE_S seconds for an entry so new that
its writer may not have locked it yet. Engine files that no sidecar names (a build killed
between writing its engine and committing it) are removed under that engine's build lock
(remove_orphans).

Files are created as open() creates them: mode 0666 less the umask.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# 2: upstream's input convention ((pixel - mean) / std on 0..255 values, upstream's box rule); format 1
# engines were checked and INT8-calibrated on [0, 1]-scaled inputs and are never reused.
ENGINE_FORMAT = 2
SIDECAR_SUFFIX = ".json"
ENV_ENGINE_DIR = "CNPOSE_TRT_ENGINES"
TEMP_SUFFIX = ".tmp"
OWNER_LOCK = "owner.lock"
STALE_GRACE_S = 5.0
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
_ENGINE_FILE = re.compile(r"(?P<stem>.+)\.(?P<sha>[0-9a-f]{8})(?P<ext>\.[A-Za-z0-9]+)")
_UMASK_LOCK = threading.Lock()


def default_engine_dir() -> Path:
    """$CNPOSE_TRT_ENGINES, else ./engines."""
    return Path(os.environ.get(ENV_ENGINE_DIR) or "engines")


def cache_key(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that changes the engine."""
    blob = json.dumps({"engine_format": ENGINE_FORMAT, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def engine_stem(name: str, head_tag: str, precision: str, backend: str, key: str) -> str:
    return f"{name}-{head_tag}-{precision}-{backend}-{key[:12]}"


def engine_file_name(handle: str | Path, sha256: str) -> str:
    """<stem>.<sha8><ext>: the name of the engine file with these contents."""
    h = Path(handle)
    return f"{h.stem}.{sha256[:8]}{h.suffix}"


def sidecar_path(engine_path: str | Path) -> Path:
    """The sidecar of an engine: the path itself if it ends in .json, else <handle>.json, where
    both the handle <stem><ext> and an engine file <stem>.<sha8><ext> have the handle <stem><ext>."""
    p = Path(engine_path)
    if p.suffix == SIDECAR_SUFFIX:
        return p
    m = _ENGINE_FILE.fullmatch(p.name)
    return p.with_name((m["stem"] + m["ext"] if m else p.name) + SIDECAR_SUFFIX)


def is_plain_name(name: object) -> bool:
    """A file name without folders (what a sidecar may name as its engine file)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_no_space(exc: BaseException) -> bool:
    """True if exc, or an exception it was raised from, is 'no space left' (or over quota)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_name(folder: Path, label: str) -> Path:
    return folder / f".{label}.{secrets.token_hex(6)}{TEMP_SUFFIX}"


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write via a locked temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    tmp = _temp_name(path.parent, path.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: marks the temporary as alive for clean_stale
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return path


def finite_json(doc: Any) -> str:
    """Indented JSON in which NaN and infinities (not JSON) are written as null."""
    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(doc), indent=2, allow_nan=False)


def write_json(path: str | Path, obj: Mapping[str, Any]) -> Path:
    return atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def install_file(src: str | Path, dst: str | Path) -> Path:
    """Move a complete file (in the same file system) to dst: fsync, mode 0666 less umask, rename."""
    src, dst = Path(src), Path(dst)
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        os.fchmod(fd, 0o666 & ~umask())
    finally:
        os.close(fd)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    return dst


@contextlib.contextmanager
def temp_dir(folder: str | Path, label: str) -> Iterator[Path]:
    """A private work folder .<label>.<random>.tmp in folder, removed on exit (exceptions,
    KeyboardInterrupt and signals turned into exceptions included); clean_stale removes it
    if its process dies without exiting."""
    path = _temp_name(Path(folder), label)
    os.mkdir(path)
    fd = None
    try:
        fd = os.open(path / OWNER_LOCK, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # before unlocking: never seen unlocked while it exists
        if fd is not None:
            os.close(fd)


def _lock_is_free(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases the probe's lock


def clean_stale(folder: str | Path) -> list[Path]:
    """Remove the temporaries of dead writers in folder (see the module docstring); returns them.

    Never raises: a read-only or vanished folder simply has nothing removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)):
            continue
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            lock = path / OWNER_LOCK if is_dir else path
            has_lock = lock.is_file()
            if now - os.stat(lock if has_lock else path).st_mtime < STALE_GRACE_S:
                continue  # just created: its writer may be about to lock it
            if has_lock and not _lock_is_free(lock):
                continue  # its writer is alive
            if is_dir:
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError as exc:
            log.debug("cannot remove stale temporary %s: %s", path, exc)
    if removed:
        log.info("removed %d temporaries of killed builds in %s", len(removed), folder)
    return removed


@contextlib.contextmanager
def file_lock(path: str | Path, blocking: bool = True) -> Iterator[None]:
    """Exclusive advisory lock, so two builds of one engine do not interleave.

    In a read-only folder an existing lock file is locked through a read-only descriptor.
    Raises:
        OSError: the lock file cannot be created or opened; BlockingIOError if not blocking
            and another process holds the lock.
    """
    path = Path(path)
    try:
        f = open(path, "a+b")
    except OSError as exc:
        if exc.errno not in READ_ONLY_ERRNOS or not path.is_file():
            raise
        f = open(path, "rb")
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def current_engine_file(handle: str | Path) -> Path | None:
    """The engine file the handle's sidecar names, or None (no sidecar, unreadable, or no name)."""
    handle = Path(handle)
    try:
        meta = json.loads(sidecar_path(handle).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    name = meta.get("engine_file") if isinstance(meta, dict) else None
    return handle.with_name(name) if is_plain_name(name) else None


def engine_files(handle: str | Path) -> list[Path]:
    """Every engine file of the handle in its folder (<stem>.<sha8><ext>, and <stem><ext> of format 1)."""
    handle = Path(handle)
    found = [handle] if handle.is_file() else []
    for p in handle.parent.glob(f"{glob.escape(handle.stem)}.*{glob.escape(handle.suffix)}"):
        m = _ENGINE_FILE.fullmatch(p.name)
        if m and m["stem"] == handle.stem and m["ext"] == handle.suffix and p.is_file():
            found.append(p)
    return found


def remove_orphans(handle: str | Path) -> list[Path]:
    """Delete the handle's engine files its sidecar does not name. Call under the build lock."""
    current = current_engine_file(handle)
    removed = []
    for p in engine_files(handle):
        if p != current:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    if removed:
        log.info("removed %d engine files no sidecar names: %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def commit_engine(handle: str | Path, built: str | Path,
                  describe: Callable[[Path, str], Mapping[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """Make the complete engine file `built` the handle's engine. Call under the build lock.

    Args:
        handle: <folder>/<stem><ext>.
        built: the finished engine, in a temporary folder of the same file system (it is moved).
        describe: (engine file, its sha256) -> the sidecar's metadata.
    Returns:
        (the engine file <stem>.<sha8><ext>, the metadata written).
    """
    handle = Path(handle)
    sha = file_sha256(built)
    engine = handle.with_name(engine_file_name(handle, sha))
    previous = current_engine_file(handle)
    install_file(built, engine)
    meta = dict(describe(engine, sha))
    write_json(sidecar_path(handle), meta)  # the commit point
    if previous is not None and previous != engine and previous in engine_files(handle):
        remove_replaced(previous)  # (only this handle's own files: a sidecar may have been edited by hand)
    return engine, meta


def remove_replaced(path: Path) -> None:
    """Delete the engine file a commit replaced (readers still holding it retry, see load_engine)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

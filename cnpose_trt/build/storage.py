"""The engine cache as storage: its folder, the per-engine build lock, the temporary build folder,
tidying what killed builds left, and one clear error for a full or read-only disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..cache import ENV_ENGINE_DIR, READ_ONLY_ERRNOS, clean_stale, file_lock, is_no_space, remove_orphans, temp_dir
from ..errors import BuildError

# Below this much free space, a failed build step is reported as a full disk: ONNX Runtime, for
# one, reports a write that ran out of space as an invalid protobuf.
NEARLY_FULL_BYTES = 8 << 20


def storage_error(out: Path, exc: OSError) -> BuildError:
    """One clear line for a file-system error in the engine cache."""
    where = exc.filename2 or exc.filename or out  # os.replace: filename2 is the destination
    if is_no_space(exc):
        return BuildError(f"no space left on the device holding the engine cache {out}: free some space and build "
                          "again (the previous engine, if any, is untouched)")
    if exc.errno in READ_ONLY_ERRNOS:
        return BuildError(f"the engine cache {out} is read-only ({exc.strerror}: {where}): its valid engines load, but "
                          f"new ones cannot be built there; build where it is writable, or pick a writable folder "
                          f"with --out / --engines / ${ENV_ENGINE_DIR}")
    return BuildError(f"cannot write in the engine cache {out}: {exc.strerror or exc}: {where}")


def engine_folder(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise BuildError(f"the engine cache {out} is a file, not a folder (from --out / --engines or "
                         f"${ENV_ENGINE_DIR})")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(out, exc) from None
    return out


@contextlib.contextmanager
def build_lock(out: Path, stem: str) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(out / f".{stem}.lock"))
        except OSError as exc:
            raise storage_error(out, exc) from None
        yield


@contextlib.contextmanager
def workspace(out: Path, stem: str) -> Iterator[Path]:
    """A temporary build folder in the cache (removed on exit, or by a later build if this process
    is killed); a failure for lack of space becomes one clear BuildError."""
    try:
        with temp_dir(out, stem) as tmp:
            try:
                yield tmp
            except Exception as exc:
                # Judged before the folder is removed, while the disk is still as full as it was.
                if is_no_space(exc):
                    raise BuildError(f"no space left on the device holding the engine cache {out}: free some "
                                     "space and build again (the previous engine, if any, is untouched)") from exc
                free = shutil.disk_usage(out).free
                if free < NEARLY_FULL_BYTES and not isinstance(exc, ValueError):
                    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                    raise BuildError(f"the disk holding the engine cache {out} is full ({free >> 20} MB free; "
                                     f"{first}): free some space and build again (the previous engine, if any, "
                                     "is untouched)") from exc
                raise
    except OSError as exc:
        raise storage_error(out, exc) from exc


def tidy(out: Path, stem: str, handle: Path) -> None:
    """Remove what killed builds left behind; never blocks and never fails (read-only caches)."""
    if not os.access(out, os.W_OK):
        return
    clean_stale(out)
    with contextlib.suppress(OSError), file_lock(out / f".{stem}.lock", blocking=False):
        remove_orphans(handle)


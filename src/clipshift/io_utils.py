"""Small file helpers shared by stages: atomic JSON writes, private temp names, clear disk
errors, and a lock that keeps two runs from writing the same output at once."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clipshift.errors import ClipshiftError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
# How long a run waits for another run writing the same output before giving up.
LOCK_TIMEOUT_ENV = "CLIPSHIFT_LOCK_TIMEOUT_S"
DEFAULT_LOCK_TIMEOUT_S = 1800.0
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def temp_path(path: str | Path) -> Path:
    """A temp name beside ``path``, private to this writer: two processes writing the same file
    at once each fill their own temp file and the last rename wins with a complete file (a
    shared ``<path>.tmp`` would interleave their bytes). Ends in ``.tmp`` so crash leftovers
    are easy to find and are never taken for outputs."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")


def _existing_parent(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path(".")


def write_error_message(exc: OSError, path: str | Path, what: str) -> str:
    """What failed, where, why and the fix, for an OSError raised while writing ``path``."""
    path = Path(path)
    reason = exc.strerror or str(exc)
    if exc.errno in _DISK_FULL:
        free = shutil.disk_usage(_existing_parent(path)).free
        fix = (
            f"the filesystem holding {path.parent} is full ({free / 2**20:.1f} MiB free); free "
            "space there (old checkpoints, .cache/clipshift, dvc gc) or point the output "
            "directory at a larger disk, then run the stage again"
        )
    elif exc.errno in _NOT_WRITABLE:
        fix = f"{path.parent} is not writable; fix its permissions or choose another directory"
    else:
        fix = "check the disk and the path, then run the stage again"
    return f"could not write {what} {path} ({reason}); {fix}. Earlier outputs were left intact"


def write_text_atomic(path: str | Path, text: str, what: str = "the file") -> Path:
    """Write ``text`` via a temp file and rename, so readers (DVC, MLflow, a browser) never
    see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError as exc:
        raise ClipshiftError(write_error_message(exc, path, what)) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (see :func:`write_text_atomic`)."""
    return write_text_atomic(
        path, json.dumps(obj, indent=2, sort_keys=True, default=str), "the JSON file"
    )


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------------------------
# one writer at a time


def lock_timeout_s() -> float:
    return float(os.environ.get(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT_S))


@contextlib.contextmanager
def output_lock(target: str | Path, timeout_s: float | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on the output ``target`` (a file or directory) while writing it.

    A second run writing the same output waits for the first (logging who holds it) and fails
    with a clear error after ``timeout_s`` (default ``$CLIPSHIFT_LOCK_TIMEOUT_S``, 1800 s).
    The lock is ``flock`` on ``<target>.lock``: the kernel drops it when its holder dies, even
    by ``kill -9``, so a crash never leaves a stale lock; the file is removed on release.
    """
    import fcntl

    lock = Path(target).with_name(Path(target).name + LOCK_SUFFIX)
    lock.parent.mkdir(parents=True, exist_ok=True)
    timeout_s = lock_timeout_s() if timeout_s is None else timeout_s
    fd = _acquire(lock, timeout_s, fcntl)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        lock.unlink(missing_ok=True)  # before unlocking: a waiter then sees a stale inode
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _acquire(lock: Path, timeout_s: float, fcntl: Any) -> int:
    deadline = time.monotonic() + timeout_s
    warned = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise ClipshiftError(
                    f"another clipshift run (pid {_holder(lock)}) is still writing "
                    f"{lock.with_suffix('')} after {timeout_s:.0f} s; wait for it to finish, or "
                    f"point this run's output directory elsewhere (the wait is set by "
                    f"{LOCK_TIMEOUT_ENV})"
                ) from None
            if not warned:
                log.warning("waiting for pid %s, which is writing %s", _holder(lock), lock)
                warned = True
            time.sleep(0.2)
            continue
        # The holder may have removed the file between our open and our flock: then we hold
        # a lock on an orphaned inode that nobody else sees, so start over on the new file.
        if _same_file(fd, lock):
            return fd
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _holder(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "?"
    except OSError:
        return "?"

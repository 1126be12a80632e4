"""One run per output folder at a time.

[`lock_output_dir`] holds an OS lock (`flock`) on `<folder>/.vocalign.lock` for as long as a run writes into the
folder. The kernel drops the lock when the process ends, however it ends (a SIGKILL included), so a lock is never
left stale. A second run, overwrite or resume on the same folder fails at once with a
[`~vocalign_hf.errors.UsageError`] naming the process that holds it (its pid, host, start time and command, which
the holder writes into the lock file).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError

try:
    import fcntl
except ImportError:  # Windows: no flock; the run goes on unlocked, with a warning
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = ["LOCK_FILE", "lock_output_dir"]

#: The lock file in a locked folder; it is removed when the run ends (a killed run leaves it, unlocked).
LOCK_FILE = ".vocalign.lock"


@contextmanager
def lock_output_dir(output_dir: str | os.PathLike, flag: str = "--output_dir") -> Iterator[Path]:
    """Hold the lock of `output_dir` (created if missing) for the `with` block; yields the folder.

    On leaving, the lock file is removed, and so is the folder if this call created it and nothing else was
    written into it: a refused run leaves no trace.

    Raises:
        UsageError: another process holds the folder's lock (the message names it), or the folder cannot be made.
    """
    folder = Path(output_dir).expanduser()
    created = not folder.exists()
    descriptor = _acquire(folder, flag)
    try:
        yield folder
    finally:
        _release(folder, descriptor, remove_folder=created)


def _acquire(folder: Path, flag: str) -> int:
    path = folder / LOCK_FILE
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the previous holder removed the folder it had created, just now
            continue
        except OSError as error:
            raise UsageError(f"{flag} {folder} cannot be locked for this run ({error.strerror}); give another folder") from None
        if fcntl is None:
            logger.warning("no file locks on this system: a second run on %s at the same time would not be stopped", folder)
            return descriptor
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(descriptor)
            os.close(descriptor)
            raise UsageError(
                f"{flag} {folder} is in use by another run ({holder}); nothing was changed. Wait for it to end or "
                f"stop it, or give another {flag}"
            ) from None
        except OSError as error:  # a file system without locks (some network mounts)
            logger.warning("cannot lock %s (%s): a second run on it at the same time would not be stopped", path,
                           error.strerror)
            return descriptor
        if _still_the_lock_file(descriptor, path):
            _write_holder(descriptor)
            return descriptor
        os.close(descriptor)  # the previous holder removed that file as it released it: lock the new one


def _still_the_lock_file(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False


def _write_holder(descriptor: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)[:300]}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(holder).encode(), 0)


def _describe_holder(descriptor: int) -> str:
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0).decode())
        return f"pid {holder['pid']} on {holder['host']}, since {holder['started']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its name yet
        return "a process that has just started"


def _release(folder: Path, descriptor: int, *, remove_folder: bool) -> None:
    """Remove the lock file while still holding the lock (a waiting process notices, see `_acquire`), then let go."""
    try:
        (folder / LOCK_FILE).unlink(missing_ok=True)
        if remove_folder and not any(folder.iterdir()):
            folder.rmdir()
    except OSError:  # another run took the folder in between, or it is gone: nothing of ours is left to remove
        pass
    finally:
        os.close(descriptor)

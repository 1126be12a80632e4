"""The errors a user can cause, and how the programs show them.

The library raises; only programs exit. [`UsageError`] is a problem with what the user passed (a flag, a file, a
folder): its message is one line that names the problem and the fix. The recipes and console scripts run their
`main` through [`run_program`], which prints that line and returns status 2 (argparse's status for bad usage) for
the program to exit with: `raise SystemExit(run_program(main))`, or a console script's entry point, whose wrapper
exits with what it returns. `-v` / `--verbose` on the command line, or `VOCALIGN_TRACEBACK=1`, shows the traceback
instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["UsageError", "run_program", "USER_ERRORS"]


class UsageError(ValueError):
    """Something the user passed cannot be used; the message says what and what to pass instead."""


#: What a user can cause: their inputs, and the files and folders they name.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
)


def run_program(main: Callable[..., Any], argv: list[str] | None = None, *, extra_errors: tuple = ()) -> int:
    """Run a program's `main(argv)`; return its exit status: 0, or 2 for a user error, printed as one line on stderr.

    `-v` / `--verbose` are taken out of `argv` (default `sys.argv[1:]`) and, like `VOCALIGN_TRACEBACK=1`, let the
    traceback through. `extra_errors` are further exception types the program's users can cause. A full disk (or
    quota) anywhere in the program is one line too: the file it was writing and the space left.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = bool(os.environ.get("VOCALIGN_TRACEBACK")) or any(flag in argv for flag in ("-v", "--verbose"))
    argv = [item for item in argv if item not in ("-v", "--verbose")]
    try:
        main(argv)
        return 0
    except USER_ERRORS + tuple(extra_errors) as error:
        if verbose:
            raise
        message = str(error).strip() or type(error).__name__
        if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
            message = f"{message}: {error.filename}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    except OSError as error:
        if verbose or error.errno not in _DISK_FULL:
            raise
        print(f"error: {disk_full_message(error)}", file=sys.stderr)
        return 2


#: A full disk or an exhausted quota: caused by where the user writes, not a bug.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(error: OSError) -> str:
    """One line for a write that failed on a full disk: the file, the space left on its disk, and the fix."""
    where = f" writing {error.filename}" if error.filename else ""
    free = ""
    probe = os.path.dirname(os.path.abspath(error.filename)) if error.filename else ""
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    if probe:
        free = f"; {shutil.disk_usage(probe).free / 2**20:.1f} MiB free on its disk now"
    return (f"the disk filled up{where} ({error.strerror or 'no space left on device'}{free}): free some space or "
            "write to another disk, then run the command again")

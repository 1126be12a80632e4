"""Crash-safe file writes (temp file in the destination directory, fsync, ``os.replace``), and the one checked reader
of the JSON files they write."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_file", "atomic_write_text", "atomic_write_json", "atomic_write_folder", "read_json_object"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_file(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Write a file whole: ``write(tmp)`` fills a temporary file beside ``path`` (a PIL ``save``, safetensors'
    ``save_file``, ...), which is then fsynced and moved over ``path`` with :func:`os.replace`. On failure the
    temporary file is removed and ``path`` is untouched. Missing parent directories are created.

    Returns:
        The destination path.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp_name))
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        with contextlib.suppress(OSError):  # mkstemp creates files with mode 0600
            os.chmod(tmp_name, 0o666 & ~_current_umask())
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_folder(dest.parent)
    return dest


def _fsync_folder(folder: Path) -> None:
    """Persist a rename in `folder` (best effort; not supported on every platform / filesystem)."""
    with contextlib.suppress(OSError, AttributeError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see either the old file or the complete new one.

    The data goes to a temporary file in the same directory, which is flushed and fsynced and then
    moved over the destination with :func:`os.replace` (atomic on POSIX and Windows). If anything
    fails before the replace (including ``KeyboardInterrupt``), the temporary file is removed and
    the destination is left untouched. Missing parent directories are created.

    Returns:
        The destination path.
    """
    return atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n"))


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2) -> Path:
    """Serialise ``data`` as UTF-8 JSON (non-ASCII kept as is) and write it with :func:`atomic_write_text`.

    The data is serialised completely before the file is touched, so an unserialisable object never
    leaves a file behind.
    """
    text = json.dumps(data, indent=indent, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


def atomic_write_folder(
    destination: str | os.PathLike[str], write: Callable[[Path], Any], *, replace: bool = False
) -> Path:
    """Write a folder as a whole: ``write(tmp)`` fills a new sibling folder, which then takes ``destination``'s place.

    Readers see the old complete folder or the new complete one, never new files beside old ones (peft's and
    transformers' ``save_pretrained`` write file by file). If ``write`` fails, ``destination`` is untouched and the
    temporary folder is removed. The new folder gets the usual permissions (``mkdtemp`` makes it private).

    An existing non-empty ``destination`` is replaced only with ``replace=True``: the caller has checked that it is
    a previous output of its own (:func:`vocalign_hf.outputs.write_output_folder`), never a user's folder.

    Raises:
        FileExistsError: ``destination`` is a file, or a non-empty folder and ``replace`` is False.

    Returns:
        The destination path.
    """
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise FileExistsError(f"{destination} is a file, not a folder; nothing was written")
    if not replace and destination.is_dir() and any(destination.iterdir()):
        raise FileExistsError(f"{destination} exists and is not empty; nothing was written")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_current_umask())
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if destination.exists():
        old = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".old"))
        os.replace(destination, old / destination.name)
    os.replace(tmp, destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return destination


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON file that must hold an object.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is unreadable, not JSON, or not an object; the message names the file and says it is damaged.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the file is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object: the file is damaged")
    return data

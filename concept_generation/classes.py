"""Reading and validating target class lists.

Names are compared under the one name key (:func:`name_key`, from ``vocalign_hf.class_names``):
``"café"`` typed with a precomposed ``é`` and ``"café"`` written as ``e`` + combining accent are the
same class (they look identical, and a model answer may use either form).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vocalign_hf.class_names import CLASS_LIST_SUFFIXES, load_class_names, name_key
from vocalign_hf.class_names import normalize_name as _normalize_whitespace
from vocalign_hf.class_names import validate_class_names as _validate

from .errors import ClassListError

__all__ = [
    "CLASS_LIST_SUFFIXES",
    "normalize_name",
    "name_key",
    "validate_class_names",
    "read_class_list",
    "class_list_path",
]


# A comma-free, space-free token ending in a file-like suffix ("classes.yaml", "labels.jsn") is a file
# name, never a class name.
_FILE_LIKE = re.compile(r"^[^\s,]+\.[A-Za-z][A-Za-z0-9]{0,4}$")


def normalize_name(text: str) -> str:
    """Strip ``text``, collapse inner whitespace to one space and apply Unicode NFC."""
    return unicodedata.normalize("NFC", _normalize_whitespace(text))


def validate_class_names(names: Iterable[Any], *, source: str = "class list") -> list[str]:
    """:func:`vocalign_hf.class_names.validate_class_names` on the NFC forms of the names, raising
    :class:`ClassListError` (so names that differ only in their Unicode form are duplicates)."""
    if isinstance(names, (str, bytes)):
        raise ClassListError(f"{source}: expected a list of class names, got a single string {names!r}")
    try:
        return _validate(
            [unicodedata.normalize("NFC", n) if isinstance(n, str) else n for n in names], source=source
        )
    except (TypeError, ValueError) as exc:
        raise ClassListError(str(exc)) from None


def read_class_list(spec: str | os.PathLike[str] | Iterable[str]) -> list[str]:
    """Read a class list from a file, an inline comma-separated string or an iterable.

    Accepted forms:

    * a path to a file (``~`` is expanded), read by its suffix:

      - ``.json``: ``["a", "b"]`` or ``{"classes": ["a", "b"]}``;
      - ``.yaml`` / ``.yml``: a list, or a mapping with a ``classes`` list;
      - ``.txt``: one class per line; blank lines and lines starting with ``#`` are skipped;

    * an inline string ``"a,b,c"``;
    * any iterable of strings.

    A string is read as a path when it names an existing file, or when it looks like one: it
    contains a path separator or starts with ``~`` and has no comma, or it ends in a file suffix
    (``.json``, ``.txt``, ``.yaml``, ``.yml``, or any short ``.ext`` on a single comma-free word such
    as ``classes.jsn``). Such a string that is not a file is an error ("file not found"), never a
    one-class list, so a mistyped path cannot turn into a paid request for the class "classes.yaml".
    A directory is an error too.

    Returns:
        The validated class names (see :func:`validate_class_names`).

    Raises:
        ClassListError: the file is missing, a directory, of an unknown type or malformed, or the
            list fails validation.
    """
    path = class_list_path(spec)
    if path is not None:
        return _read_class_file(path, os.fspath(spec))  # type: ignore[arg-type]
    if isinstance(spec, str):
        parts = spec.split(",")
        if any(not p.strip() for p in parts):
            raise ClassListError(f"inline class list {spec!r} has an empty entry")
        return validate_class_names(parts, source="inline class list")
    return validate_class_names(list(spec))


def _looks_like_path(text: str) -> bool:
    if text.lower().endswith(CLASS_LIST_SUFFIXES):
        return True
    if "," in text:
        return False
    return any(sep in text for sep in ("/", "\\", os.sep)) or text.startswith("~") or bool(_FILE_LIKE.match(text))


def _read_class_file(path: Path, spec: str) -> list[str]:
    if path.is_dir():
        raise ClassListError(f"class list {spec} is a directory; give a {'/'.join(CLASS_LIST_SUFFIXES)} file")
    if not path.is_file():
        hint = "" if "," in spec or spec.strip().lower().endswith(CLASS_LIST_SUFFIXES) else (
            ' (it looks like a path, so it is not read as a one-class inline list; inline lists are "a,b,c")'
        )
        raise ClassListError(f"class list file not found: {spec}{hint}")
    try:
        names = load_class_names(path)
    except (OSError, ValueError) as exc:
        raise ClassListError(str(exc)) from None
    return validate_class_names(names, source=str(path))  # this package's NFC form


def class_list_path(spec: Any) -> Path | None:
    """The file :func:`read_class_list` would read for ``spec``, or ``None`` for an inline list or an iterable."""
    if isinstance(spec, os.PathLike):
        return Path(spec).expanduser()
    if isinstance(spec, str):
        text = spec.strip()
        path = Path(text).expanduser()
        if text and (path.exists() or _looks_like_path(text)):
            return path
    return None


"""Reading and validating target class lists."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vocalign_hf.class_names import load_class_names, name_key, normalize_name
from vocalign_hf.class_names import validate_class_names as _validate

from .errors import ClassListError

__all__ = ["normalize_name", "name_key", "validate_class_names", "read_class_list"]


def validate_class_names(names: Iterable[Any], *, source: str = "class list") -> list[str]:
    """:func:`vocalign_hf.class_names.validate_class_names`, raising :class:`ClassListError`."""
    try:
        return _validate(names, source=source)
    except (TypeError, ValueError) as exc:
        raise ClassListError(str(exc)) from None


def read_class_list(spec: str | os.PathLike[str] | Iterable[str]) -> list[str]:
    """Read a class list from a JSON file, an inline comma-separated string or an iterable.

    Accepted forms:

    * a path to a JSON file holding ``["a", "b"]`` or ``{"classes": ["a", "b"]}``;
    * an inline string ``"a,b,c"`` (used when ``spec`` is not an existing file; a string ending in
      ``.json`` that is not a file is reported as a missing file instead);
    * any iterable of strings.

    Returns:
        The validated class names (see :func:`validate_class_names`).

    Raises:
        ClassListError: the file is missing or malformed, or the list fails validation.
    """
    if isinstance(spec, os.PathLike) or isinstance(spec, str):
        path = Path(spec)
        text_spec = os.fspath(spec)
        if path.is_file():
            return _read_class_file(path)
        if isinstance(spec, os.PathLike) or text_spec.strip().lower().endswith(".json"):
            raise ClassListError(f"class list file not found: {text_spec}")
        parts = text_spec.split(",")
        if any(not p.strip() for p in parts):
            raise ClassListError(f"inline class list {text_spec!r} has an empty entry")
        return validate_class_names(parts, source="inline class list")
    return validate_class_names(list(spec))


def _read_class_file(path: Path) -> list[str]:
    try:
        return load_class_names(path)
    except ValueError as exc:
        raise ClassListError(str(exc)) from None

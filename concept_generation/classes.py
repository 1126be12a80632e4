"""Reading and validating target class lists."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ClassListError

__all__ = ["normalize_name", "name_key", "validate_class_names", "read_class_list"]

_WS = re.compile(r"\s+")


def normalize_name(text: str) -> str:
    """Strip ``text`` and collapse inner runs of whitespace to one space."""
    return _WS.sub(" ", text).strip()


def name_key(text: str) -> str:
    """Comparison key for class names and concepts: whitespace-normalised and case-folded."""
    return normalize_name(text).casefold()


def validate_class_names(names: Iterable[Any], *, source: str = "class list") -> list[str]:
    """Check a class list and return it whitespace-normalised, in the given order.

    Every entry must be a string that is not blank; names must be unique ignoring case and
    surrounding/repeated whitespace (``"bed "`` in the SceneParse150 list becomes ``"bed"``).

    Raises:
        ClassListError: the list is empty, or has a non-string, blank or duplicate entry.
    """
    if isinstance(names, (str, bytes)):
        raise ClassListError(f"{source}: expected a list of class names, got a single string")
    result: list[str] = []
    seen: dict[str, str] = {}
    for index, raw in enumerate(names):
        if not isinstance(raw, str):
            raise ClassListError(f"{source}: entry {index} is {type(raw).__name__} {raw!r}, expected a string")
        name = normalize_name(raw)
        if not name:
            raise ClassListError(f"{source}: entry {index} is blank")
        key = name.casefold()
        if key in seen:
            raise ClassListError(f"{source}: duplicate class name {name!r} (entry {index}; same as {seen[key]!r})")
        seen[key] = name
        result.append(name)
    if not result:
        raise ClassListError(f"{source}: the class list is empty")
    return result


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
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ClassListError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassListError(f"{path}: cannot read class list ({exc})") from None
    if isinstance(data, dict):
        if "classes" not in data:
            raise ClassListError(f'{path}: a JSON object must have a "classes" key holding the list of class names')
        data = data["classes"]
    if not isinstance(data, list):
        raise ClassListError(
            f'{path}: expected a JSON list of class names or {{"classes": [...]}}, got {type(data).__name__}'
        )
    return validate_class_names(data, source=str(path))

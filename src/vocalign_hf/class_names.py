"""Class lists: the one validator and JSON reader that the processor, the data loaders, the trainer and the
concept generator share."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_WHITESPACE = re.compile(r"\s+")


def normalize_name(text: str) -> str:
    """Strip `text` and collapse inner runs of whitespace to one space."""
    return _WHITESPACE.sub(" ", text).strip()


def name_key(text: str) -> str:
    """Comparison key for class names and concepts: whitespace-normalised and case-folded."""
    return normalize_name(text).casefold()


def validate_class_names(names: Iterable[Any], *, source: str = "class list") -> list[str]:
    """Check a class list and return it whitespace-normalised, in the given order.

    Every entry must be a non-blank string; names must be unique ignoring case and surrounding or repeated
    whitespace (`"bed "` of the SceneParse150 list becomes `"bed"`).

    Raises:
        TypeError: a single string was given instead of a list.
        ValueError: the list is empty, or has a non-string, blank or duplicate entry (the message names it).
    """
    if isinstance(names, (str, bytes)):
        raise TypeError(f"{source}: expected a list of class names, got a single string {names!r}")
    result: list[str] = []
    seen: dict[str, str] = {}
    for index, raw in enumerate(names):
        if not isinstance(raw, str):
            raise ValueError(f"{source}: entry {index} is {type(raw).__name__} {raw!r}, expected a string")
        name = normalize_name(raw)
        if not name:
            raise ValueError(f"{source}: entry {index} is blank")
        key = name.casefold()
        if key in seen:
            raise ValueError(f"{source}: duplicate class name {name!r} (entry {index}; same as {seen[key]!r})")
        seen[key] = name
        result.append(name)
    if not result:
        raise ValueError(f"{source}: the class list is empty")
    return result


def load_class_names(path: str | Path) -> list[str]:
    """Read and validate a class-list JSON file: `["a", "b", ...]` or `{"classes": ["a", "b", ...]}`.

    Returns the names in label-id order (value k in a mask is names[k]).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON, a wrong structure, or a list that fails :func:`validate_class_names`; the message
            names the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class list file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read class list ({exc})") from None
    if isinstance(data, dict):
        if "classes" not in data:
            raise ValueError(f'{path}: a JSON object must have a "classes" key, got keys {sorted(data)}')
        data = data["classes"]
    if not isinstance(data, list):
        raise ValueError(f'{path}: expected a JSON list of class names or {{"classes": [...]}}, got {type(data).__name__}')
    return validate_class_names(data, source=str(path))

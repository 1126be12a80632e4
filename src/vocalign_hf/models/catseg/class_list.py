"""Class-name validation: the one validator of class lists that the processor, the data loaders, the trainer and the
concept generator share (beside the processor, so that the Hub's remote code carries it)."""

from __future__ import annotations

import re
from collections.abc import Iterable
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

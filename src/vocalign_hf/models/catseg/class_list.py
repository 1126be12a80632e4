"""Class-name validation: the one validator of class lists that the processor, the data loaders, the trainer and the
concept generator share (beside the processor, so that the Hub's remote code carries it)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from typing import Any

_WHITESPACE = re.compile(r"\s+")


def normalize_name(text: str) -> str:
    """Strip `text` and collapse inner runs of whitespace to one space."""
    return _WHITESPACE.sub(" ", text).strip()


def _invisible_or_space(char: str) -> bool:
    return char.isspace() or unicodedata.category(char) == "Cf"  # Cf: BOM, zero-width space and joiners, ...


def _clean_name(text: str) -> str:
    """The one normalisation of a class name: invisible format characters at the ends (a UTF-8 BOM, as Notepad
    saves a text file; a zero-width space) and surrounding whitespace stripped, inner whitespace collapsed, NFC."""
    start, end = 0, len(text)
    while start < end and _invisible_or_space(text[start]):
        start += 1
    while end > start and _invisible_or_space(text[end - 1]):
        end -= 1
    return unicodedata.normalize("NFC", normalize_name(text[start:end]))


def name_key(text: str) -> str:
    """The one comparison key for class names and concepts, everywhere (the validator, the concept files, the
    vocabularies, the demo): names that look or read the same are one name. Equal after NFKC (fullwidth `ｓｋｙ` is
    `sky`), without invisible format characters (`sky\u200b` is `sky`), whitespace-normalised, case-folded, NFC (a
    precomposed `é` and `e` + combining accent are one letter)."""
    visible = "".join(c for c in unicodedata.normalize("NFKC", text) if unicodedata.category(c) != "Cf")
    return unicodedata.normalize("NFC", normalize_name(visible).casefold())


def validate_class_names(names: Iterable[Any], *, source: str = "class list") -> list[str]:
    """Check a class list and return it normalised once, in the given order.

    Every entry must be a non-blank string. Each is returned stripped of surrounding whitespace and invisible
    characters (a UTF-8 BOM), with inner whitespace collapsed, in NFC (`"bed "` of the SceneParse150 list becomes
    `"bed"`). Names must be unique ignoring case, Unicode compatibility forms (NFKC) and invisible characters.

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
        name = _clean_name(raw)
        if not name:
            raise ValueError(f"{source}: entry {index} is blank")
        key = name_key(name)
        if key in seen:
            shown = name if name == raw.strip() else raw  # what was given, where stripping hid the difference
            raise ValueError(f"{source}: duplicate class name {shown!r} (entry {index}; same as {seen[key]!r} once "
                             "case, Unicode forms and invisible characters are ignored): remove one")
        seen[key] = name
        result.append(name)
    if not result:
        raise ValueError(f"{source}: the class list is empty")
    return result

"""Loading and validating concept files (shipped sets or user files)."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .classes import name_key, normalize_name, validate_class_names
from .errors import ClassListError, ConceptFileError
from vocalign_hf.models.catseg.concept_phrases import MAX_CONCEPT_CHARS, ConceptOwners
from .validation import excerpt

__all__ = ["SHIPPED_CONCEPT_SETS", "list_shipped_concepts", "shipped_concepts_path", "load_concepts"]

SHIPPED_CONCEPT_SETS: dict[str, str] = {
    "cityscapes": "cityscapes",
    "ade20k_150": "ade20k_150",
    "ade20k": "ade20k_150",
    "ade150": "ade20k_150",
    "pascal_context_59": "pascal_context_59",
    "pascal_context": "pascal_context_59",
    "pc59": "pascal_context_59",
}
"""Accepted names (and aliases) of the concept files in ``vocalign_hf/resources/concepts/``."""


def list_shipped_concepts() -> list[str]:
    """Canonical names of the shipped concept sets: ``["ade20k_150", "cityscapes", "pascal_context_59"]``."""
    return sorted(set(SHIPPED_CONCEPT_SETS.values()))


def _resources_dir() -> Path:
    # Locate the package without importing it (vocalign_hf's __init__ may pull in heavy dependencies).
    spec = importlib.util.find_spec("vocalign_hf")
    if spec is None or not spec.submodule_search_locations:
        raise ConceptFileError("the vocalign_hf package is not installed; cannot find the shipped concept files")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "resources" / "concepts"
        if candidate.is_dir():
            return candidate
    raise ConceptFileError("vocalign_hf/resources/concepts/ is missing from the installed package")


def shipped_concepts_path(name: str) -> Path:
    """Path of the shipped concept file ``name`` (canonical name or alias, case-insensitive).

    Raises:
        ConceptFileError: unknown name.
    """
    canonical = SHIPPED_CONCEPT_SETS.get(name.strip().lower().replace("-", "_"))
    if canonical is None:
        raise ConceptFileError(
            f"unknown concept set {name!r}: give a path to a JSON file or one of {', '.join(list_shipped_concepts())}"
        )
    return _resources_dir() / f"{canonical}.json"


def _resolve(path_or_name: str | os.PathLike[str]) -> Path:
    if isinstance(path_or_name, os.PathLike):
        return Path(path_or_name)
    path = Path(path_or_name)
    if path.is_file():
        return path
    looks_like_path = path_or_name.lower().endswith(".json") or os.sep in path_or_name or "/" in path_or_name
    if looks_like_path:
        raise ConceptFileError(f"concept file not found: {path_or_name}")
    return shipped_concepts_path(path_or_name)


def load_concepts(
    path_or_name: str | os.PathLike[str],
    class_names: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Load a concept file: ``{class_name: [concept, ...]}``.

    Args:
        path_or_name: a path to a JSON file, or the name of a shipped set (``"cityscapes"``,
            ``"ade20k_150"``, ``"pascal_context_59"``; aliases ``"ade20k"``, ``"ade150"``,
            ``"pascal_context"``, ``"pc59"``).
        class_names: the dataset's classes. If given, every class in the file must be one of them
            (compared ignoring case and extra whitespace), and the result is keyed by
            ``class_names`` in its order and exact spelling, with ``[]`` for classes the file does
            not cover (such a class is then scored by its name only).

    The file holds either the plain mapping ``{class: [concepts]}`` or the document written by
    ``vocalign-concepts`` (``{"concepts": {class: [concepts]}, "metadata": {...}}``). Checks (names
    and concepts are compared after Unicode NFC normalisation, ignoring case and extra whitespace):
    the top level is an object; class names are non-blank strings, unique; each value is a list of
    non-blank strings of at most ``MAX_CONCEPT_CHARS`` (100) characters without duplicates; no
    concept is another class of the file (or of ``class_names``) or a form of it (plural, leading
    article, spacing or hyphenation: ``"sidewalks"``, ``"side-walk"``), and no concept is listed
    under two classes (up to the same forms), since summing such an entry into the wrong class
    would corrupt the pseudo-labels. Concepts that merely *contain* another class's name as a word
    (``"wall clock"`` with a class ``"wall"``) are accepted here; the generator removes them.
    Concepts are returned whitespace- and NFC-normalised; a concept equal to its own class name is
    dropped.

    Returns:
        ``{class_name: [concept, ...]}``.

    Raises:
        ConceptFileError: missing file, invalid JSON or format, or classes outside ``class_names``;
            the message names the file and the problem.
    """
    path = _resolve(path_or_name)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Notepad's UTF-8) is no part of the text
    except FileNotFoundError:
        raise ConceptFileError(f"concept file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConceptFileError(f"{path}: cannot read concept file ({exc})") from None
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise ConceptFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except _DuplicateKey as exc:
        raise ConceptFileError(
            f"{path}: key {exc.key!r} appears twice in one JSON object, and JSON would keep only the last one's "
            "list: merge them into one entry"
        ) from None
    return _validate_mapping(data, path, class_names)


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads`' object hook: a repeated key is an error (the default keeps the last value silently)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _check_shared(cleaned: dict[str, list[str]], names: dict[str, str], fail: Any) -> None:
    """Fail on a concept that two classes share (up to plural, article and spacing): VocAlign sums
    one entry's probability into one class only."""
    owners = ConceptOwners(names.values())
    for key, kept in cleaned.items():
        for text in kept:
            hit = owners.collision(text, names[key])
            if hit is not None and not hit.is_name:  # names were checked class by class already
                raise fail(
                    f"concept {text!r} of class {names[key]!r} is also listed under class {hit.other_class!r} "
                    f"(as {hit.other_text!r}); a concept may belong to one class only"
                )
            owners.claim(text, names[key])


def _validate_mapping(data: Any, path: Path, class_names: Sequence[str] | None) -> dict[str, list[str]]:
    def fail(problem: str) -> ConceptFileError:
        return ConceptFileError(f"{path}: {problem}")

    if isinstance(data, dict) and isinstance(data.get("concepts"), dict) and set(data) <= {"concepts", "metadata"}:
        data = data["concepts"]
    if not isinstance(data, dict):
        raise fail(f'expected a JSON object {{"class name": ["concept", ...]}}, got a {type(data).__name__}')
    if not data:
        raise fail("the file has no classes")

    file_classes = _file_classes(data, fail)
    all_classes: dict[str, str] = {k: normalize_name(v) for k, v in file_classes.items()}
    if class_names is not None:
        _add_wanted_classes(all_classes, file_classes, class_names, fail)
    class_owners = ConceptOwners(all_classes.values())
    cleaned = {
        key: _file_class_concepts(normalize_name(raw_name), data[raw_name], class_owners, fail)
        for key, raw_name in file_classes.items()
    }
    _check_shared(cleaned, {k: normalize_name(v) for k, v in file_classes.items()}, fail)

    if class_names is None:
        return {normalize_name(file_classes[k]): v for k, v in cleaned.items()}
    # Keys keep the caller's exact spelling (e.g. SceneParse150's "bed " with its trailing space).
    return {raw: cleaned.get(name_key(raw), []) for raw in class_names}


def _file_classes(data: dict[str, Any], fail: Any) -> dict[str, str]:
    """`{name key: the file's spelling}` of the file's classes; fails on a blank or repeated class."""
    file_classes: dict[str, str] = {}
    for raw in data:
        name = normalize_name(raw)
        if not name:
            raise fail("a class name is blank")
        if name_key(name) in file_classes:
            raise fail(f"class {name!r} appears more than once (ignoring case, spaces and Unicode form)")
        file_classes[name_key(name)] = raw
    return file_classes


def _add_wanted_classes(
    all_classes: dict[str, str], file_classes: dict[str, str], class_names: Sequence[str], fail: Any
) -> None:
    """Add the caller's `class_names` to `all_classes`; fails on a file class that is not one of them."""
    try:
        wanted = validate_class_names(list(class_names), source="class_names")
    except ClassListError as exc:
        raise ConceptFileError(str(exc)) from None
    wanted_keys = {name_key(n) for n in wanted}
    unknown = [file_classes[k] for k in file_classes if k not in wanted_keys]
    if unknown:
        raise fail(f"{len(unknown)} class(es) are not in class_names: {', '.join(map(repr, unknown))}")
    for n in wanted:
        all_classes.setdefault(name_key(n), n)


def _file_class_concepts(name: str, values: Any, class_owners: ConceptOwners, fail: Any) -> list[str]:
    """Class `name`'s concepts, normalised, without its own name; fails on a bad entry or one that names another
    class (concepts shared between classes are checked after, by `_check_shared`)."""
    if not isinstance(values, list):
        raise fail(f"class {name!r}: expected a list of concept strings, got a {type(values).__name__}")
    seen: set[str] = set()
    kept: list[str] = []
    for index, concept in enumerate(values):
        text = _concept_text(name, index, concept, fail)
        if name_key(text) in seen:
            raise fail(f"class {name!r}: concept {text!r} is listed twice")
        seen.add(name_key(text))
        if name_key(text) == name_key(name):
            continue
        hit = class_owners.collision(text, name, names_only=True)
        if hit is not None and hit.exact:
            raise fail(
                f"class {name!r}: concept {text!r} is the name of another class ({hit.other_class!r}); "
                "it would steal probability from that class"
            )
        if hit is not None:
            raise fail(
                f"class {name!r}: concept {text!r} is a form (plural, article or spacing) of the name of "
                f"another class ({hit.other_class!r}); it would steal probability from that class"
            )
        kept.append(text)
    return kept


def _concept_text(name: str, index: int, concept: Any, fail: Any) -> str:
    """Entry `index` of class `name`, normalised; fails on a non-string, blank or overlong entry."""
    if not isinstance(concept, str):
        raise fail(f"class {name!r}: concept {index} is {type(concept).__name__} {concept!r}, expected a string")
    text = normalize_name(concept)
    if not text:
        raise fail(f"class {name!r}: concept {index} is blank")
    if len(text) > MAX_CONCEPT_CHARS:
        raise fail(
            f"class {name!r}: concept {index} has {len(text)} characters, more than {MAX_CONCEPT_CHARS} "
            f"(concepts are short phrases): {excerpt(text, 60)!r}"
        )
    return text

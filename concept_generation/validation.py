"""Parsing and cleaning of a model answer into ``{class_name: [concept, ...]}``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from .classes import name_key, normalize_name
from .errors import ConceptGenerationError

__all__ = ["parse_answer", "clean_concepts", "excerpt"]

logger = logging.getLogger("concept_generation")


def excerpt(text: str, limit: int = 200) -> str:
    """A one-line excerpt of ``text`` of at most ``limit`` characters, for error messages."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def parse_answer(content: str | None) -> list[tuple[str, Any]]:
    """Decode the model's JSON answer into ``(class_name, concepts)`` pairs, in answer order.

    The structured-output form ``{"concepts": [{"class_name": ..., "concepts": [...]}, ...]}`` is
    expected. As a fallback (for servers that ignore ``response_format``) a plain mapping
    ``{class_name: [concepts]}`` is also accepted.

    Raises:
        ConceptGenerationError: empty answer, invalid JSON or an unexpected structure; the message
            includes a short excerpt of the answer.
    """
    if content is None or not str(content).strip():
        raise ConceptGenerationError("the model returned an empty answer")
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        raise ConceptGenerationError(
            f"the model's answer is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            f"answer starts with: {excerpt(content)!r}"
        ) from None
    if not isinstance(data, dict):
        raise ConceptGenerationError(
            f"the model's answer is a JSON {type(data).__name__}, expected an object; answer: {excerpt(content)!r}"
        )
    entries = data.get("concepts")
    if isinstance(entries, list) and all(isinstance(e, dict) for e in entries):
        pairs: list[tuple[str, Any]] = []
        for index, entry in enumerate(entries):
            name = entry.get("class_name")
            if not isinstance(name, str) or "concepts" not in entry:
                raise ConceptGenerationError(
                    f'entry {index} of the model\'s answer lacks a string "class_name" or a "concepts" list; '
                    f"answer starts with: {excerpt(content)!r}"
                )
            pairs.append((name, entry["concepts"]))
        return pairs
    if data and all(isinstance(v, list) for v in data.values()):
        return list(data.items())
    raise ConceptGenerationError(
        'the model\'s answer does not follow the schema {"concepts": [{"class_name": ..., "concepts": [...]}]}; '
        f"answer starts with: {excerpt(content)!r}"
    )


def clean_concepts(
    pairs: Sequence[tuple[str, Any]],
    class_names: Sequence[str],
    *,
    num_concepts: int | None = None,
    warnings: list[str] | None = None,
) -> dict[str, list[str]]:
    """Validate and clean parsed ``(class_name, concepts)`` pairs against the target classes.

    Rules (class names and concepts are compared ignoring case and extra whitespace):

    * answer class names are matched to the targets; unknown (extra) classes are **dropped with a
      warning** naming them; a class given twice has its lists merged (with a warning);
    * every target class must be present, otherwise an error names the missing ones;
    * concepts are stripped and inner whitespace collapsed; empty strings and duplicates are removed;
    * a concept equal to its own class name is dropped (it adds nothing);
    * a concept equal to **another** target class name is removed with a warning, because it would
      move probability to the wrong class when concepts are summed back (paper Eq. 7);
    * a concept listed under two classes is kept but reported with a warning;
    * if ``num_concepts`` is given, only the first ``num_concepts`` cleaned concepts are kept;
    * every class must keep at least one concept, otherwise an error names the empty classes.

    Args:
        pairs: output of :func:`parse_answer`.
        class_names: the validated target classes (output keys follow this order and spelling).
        num_concepts: optional cap per class.
        warnings: if given, warning messages are appended to it (they are also logged).

    Returns:
        ``{class_name: [concept, ...]}`` for every target class, in ``class_names`` order.

    Raises:
        ConceptGenerationError: missing classes, non-string concepts, or classes left without concepts.
    """

    def warn(message: str) -> None:
        logger.warning(message)
        if warnings is not None:
            warnings.append(message)

    by_key = {name_key(n): n for n in class_names}
    collected: dict[str, list[Any]] = {}
    extra: list[str] = []
    for raw_name, concepts in pairs:
        target = by_key.get(name_key(raw_name)) if isinstance(raw_name, str) else None
        if target is None:
            extra.append(str(raw_name))
            continue
        if not isinstance(concepts, list):
            raise ConceptGenerationError(
                f"concepts for class {target!r} must be a list of strings, got {type(concepts).__name__}"
            )
        if target in collected:
            warn(f"class {target!r} appears more than once in the answer; its concept lists were merged")
            collected[target].extend(concepts)
        else:
            collected[target] = list(concepts)
    if extra:
        warn(f"dropped {len(extra)} class(es) that are not target classes: {', '.join(map(repr, extra))}")
    missing = [n for n in class_names if n not in collected]
    if missing:
        raise ConceptGenerationError(
            f"the model's answer is missing {len(missing)} of {len(class_names)} class(es): "
            f"{', '.join(map(repr, missing))}"
        )

    result: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for name in class_names:
        own_key = name_key(name)
        seen: set[str] = set()
        kept: list[str] = []
        stolen: list[str] = []
        for concept in collected[name]:
            if not isinstance(concept, str):
                raise ConceptGenerationError(
                    f"class {name!r} has a non-string concept {concept!r} ({type(concept).__name__})"
                )
            text = normalize_name(concept)
            key = text.casefold()
            if not text or key in seen or key == own_key:
                continue
            seen.add(key)
            if key in by_key:
                stolen.append(text)
                continue
            kept.append(text)
        if stolen:
            warn(
                f"class {name!r}: removed concept(s) naming other target classes "
                f"{', '.join(repr(by_key[s.casefold()]) for s in stolen)}; they would steal probability from them"
            )
        if num_concepts is not None and len(kept) > num_concepts:
            logger.info("class %r: kept the first %d of %d concepts", name, num_concepts, len(kept))
            kept = kept[:num_concepts]
        for text in kept:
            other = owner.setdefault(text.casefold(), name)
            if other != name:
                warn(f"concept {text!r} is listed under both {other!r} and {name!r}; it adds to both classes")
        result[name] = kept
    empty = [n for n, c in result.items() if not c]
    if empty:
        raise ConceptGenerationError(
            f"no usable concept left after cleaning for {len(empty)} class(es): {', '.join(map(repr, empty))} "
            "(concepts that are empty, repeat the class name or name another target class are removed)"
        )
    return result

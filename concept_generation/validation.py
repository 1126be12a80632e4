"""Parsing and cleaning of a model answer into ``{class_name: [concept, ...]}``."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from .classes import name_key, normalize_name
from .errors import ConceptGenerationError
from vocalign_hf.models.catseg.concept_phrases import MAX_CONCEPT_CHARS, ConceptOwners, contains_phrase, phrase_form

__all__ = ["parse_answer", "clean_concepts", "excerpt"]

logger = logging.getLogger("concept_generation")


def excerpt(text: str, limit: int = 200) -> str:
    """A one-line excerpt of ``text`` of at most ``limit`` characters, for error messages."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# A Markdown code block: ```json ... ``` (the language tag is optional).
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n(.*?)```", re.DOTALL)


def _unfence(content: str) -> str | None:
    """The body of the one Markdown code block in ``content``, or ``None`` (no block, or several)."""
    blocks = [m for m in _FENCE.finditer(content) if m.group(1).lower() in ("", "json", "json5", "javascript")]
    if len(blocks) != 1:
        return None
    return blocks[0].group(2)


def parse_answer(content: str | None) -> list[tuple[str, Any]]:
    """Decode the model's JSON answer into ``(class_name, concepts)`` pairs, in answer order.

    The structured-output form ``{"concepts": [{"class_name": ..., "concepts": [...]}, ...]}`` is
    expected. As fallbacks for servers that ignore ``response_format``, a plain mapping
    ``{class_name: [concepts]}`` is also accepted, and so is JSON wrapped in one Markdown code block
    (```` ```json ... ``` ````, with or without text around it).

    Raises:
        ConceptGenerationError: empty answer, invalid JSON or an unexpected structure; the message
            includes a short excerpt of the answer.
    """
    if content is None or not str(content).strip():
        raise ConceptGenerationError("the model returned an empty answer")
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        body = _unfence(content)
        if body is None:
            raise ConceptGenerationError(
                f"the model's answer is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                f"answer starts with: {excerpt(content)!r}"
            ) from None
        try:
            data = json.loads(body)
        except json.JSONDecodeError as inner:
            raise ConceptGenerationError(
                f"the JSON in the model's code block is not valid ({inner.msg} at line {inner.lineno}, "
                f"column {inner.colno} of the block); answer starts with: {excerpt(content)!r}"
            ) from None
        logger.info("the model wrapped its JSON answer in a Markdown code block; read the block")
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


def _quoted(items: Sequence[str]) -> str:
    return ", ".join(map(repr, items))


def clean_concepts(
    pairs: Sequence[tuple[str, Any]],
    class_names: Sequence[str],
    *,
    num_concepts: int | None = None,
    warnings: list[str] | None = None,
    max_concept_chars: int = MAX_CONCEPT_CHARS,
) -> dict[str, list[str]]:
    """Validate and clean parsed ``(class_name, concepts)`` pairs against the target classes.

    Rules (names and concepts are compared after Unicode NFC normalisation, ignoring case and extra
    whitespace; "names" and "contains" below also ignore plurals, a leading article, and spacing or
    hyphenation, see :mod:`vocalign_hf.models.catseg.concept_phrases`):

    * answer class names are matched to the targets; unknown (extra) classes are **dropped with a
      warning** naming them; a class given twice has its lists merged (with a warning);
    * every target class must be present, otherwise an error names the missing ones;
    * concepts are stripped, inner whitespace collapsed and NFC applied; empty strings and
      duplicates are removed; a concept equal to its own class name is dropped (it adds nothing);
    * a concept longer than ``max_concept_chars`` is removed with a warning;
    * a concept that **names another target class** (``"sidewalks"`` under ``"road"``) or
      **contains one** as whole words (``"sidewalk edge"``) is removed with a warning naming both,
      because it would move that class's probability to the wrong class when concepts are summed
      back (paper Eq. 7); words inside the concept's own class name do not count;
    * a concept listed under **two or more classes** is removed from all of them with a warning
      (the same entry adds its probability to each class);
    * if ``num_concepts`` is given, only the first ``num_concepts`` remaining concepts are kept;
    * every class must keep at least one concept, otherwise an error names the empty classes.

    Args:
        pairs: output of :func:`parse_answer`.
        class_names: the validated target classes (output keys follow this order and spelling).
        num_concepts: optional cap per class.
        warnings: if given, warning messages are appended to it (they are also logged).
        max_concept_chars: longest concept kept, in characters.

    Returns:
        ``{class_name: [concept, ...]}`` for every target class, in ``class_names`` order.

    Raises:
        ConceptGenerationError: missing classes, non-string concepts, or classes left without concepts.
    """

    def warn(message: str) -> None:
        logger.warning(message)
        if warnings is not None:
            warnings.append(message)

    collected = _match_classes(pairs, class_names, warn)
    owners = ConceptOwners(class_names)
    cleaned = {name: _clean_class(name, collected[name], class_names, owners, max_concept_chars, warn)
               for name in class_names}
    _remove_shared(cleaned, warn)

    result: dict[str, list[str]] = {}
    for name, kept in cleaned.items():
        if num_concepts is not None and len(kept) > num_concepts:
            logger.info("class %r: kept the first %d of %d concepts", name, num_concepts, len(kept))
            kept = kept[:num_concepts]
        result[name] = kept
        logger.debug("class %r: %d concept(s): %s", name, len(kept), _quoted(kept))
    empty = [n for n, c in result.items() if not c]
    if empty:
        raise ConceptGenerationError(
            f"no usable concept left after cleaning for {len(empty)} class(es): {_quoted(empty)} "
            "(concepts that are empty, too long, repeat the class name, or name, contain or share a concept "
            "with another target class are removed)"
        )
    return result


def _match_classes(
    pairs: Sequence[tuple[str, Any]], class_names: Sequence[str], warn: Callable[[str], None]
) -> dict[str, list[Any]]:
    """``{target class: [raw concepts]}``; warns about unknown classes, fails on missing ones."""
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
        warn(f"dropped {len(extra)} class(es) that are not target classes: {_quoted(extra)}")
    missing = [n for n in class_names if n not in collected]
    if missing:
        raise ConceptGenerationError(
            f"the model's answer is missing {len(missing)} of {len(class_names)} class(es): {_quoted(missing)}"
        )
    return collected


def _clean_class(
    name: str,
    concepts: list[Any],
    class_names: Sequence[str],
    owners: ConceptOwners,
    max_chars: int,
    warn: Callable[[str], None],
) -> list[str]:
    """One class's concepts, normalised, de-duplicated and without concepts that are too long or
    name or contain another target class (each removal is warned about)."""
    own_key = name_key(name)
    others = [n for n in class_names if n != name]
    seen: set[str] = set()
    kept: list[str] = []
    naming: list[str] = []
    containing: list[str] = []
    too_long: list[str] = []
    for concept in concepts:
        if not isinstance(concept, str):
            raise ConceptGenerationError(
                f"class {name!r} has a non-string concept {concept!r} ({type(concept).__name__})"
            )
        text = normalize_name(concept)
        key = name_key(text)
        if not text or key in seen or key == own_key:
            continue
        seen.add(key)
        if len(text) > max_chars:
            too_long.append(f"{excerpt(text, 60)!r} ({len(text)} characters)")
            continue
        named = owners.collision(text, name, names_only=True)
        if named is not None:
            naming.append(f"{text!r} (names {named.other_class!r})")
            continue
        inside = next((o for o in others if contains_phrase(text, o, own=name)), None)
        if inside is not None:
            containing.append(f"{text!r} (contains {inside!r})")
            continue
        kept.append(text)
    if naming:
        warn(
            f"class {name!r}: removed concept(s) naming other target classes: {', '.join(naming)}; "
            "they would steal probability from them"
        )
    if containing:
        warn(
            f"class {name!r}: removed concept(s) containing the name of another target class: "
            f"{', '.join(containing)}; they would steal probability from it"
        )
    if too_long:
        warn(f"class {name!r}: removed concept(s) longer than {max_chars} characters: {', '.join(too_long)}")
    return kept


def _remove_shared(cleaned: dict[str, list[str]], warn: Callable[[str], None]) -> None:
    """Remove, from every class, concepts that two or more classes share (same
    :func:`~vocalign_hf.models.catseg.concept_phrases.phrase_form`: up to case, plural, article and spacing)."""
    owners: dict[str, list[tuple[str, str]]] = {}
    for name, kept in cleaned.items():
        for text in kept:
            form = phrase_form(text)
            if form:  # punctuation-only concepts have no words to compare
                owners.setdefault(form, []).append((name, text))
    for holders in owners.values():
        classes = list(dict.fromkeys(name for name, _ in holders))
        if len(classes) < 2:
            continue
        spellings = list(dict.fromkeys(text for _, text in holders))
        for name, text in holders:
            if text in cleaned[name]:
                cleaned[name].remove(text)
        warn(
            f"concept {' / '.join(map(repr, spellings))} is listed under {len(classes)} classes "
            f"({_quoted(classes)}); removed from all of them, since one entry would add its probability to each"
        )

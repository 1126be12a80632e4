"""Word-level comparison of concepts with class names: plurals, articles, spacing and sub-phrases.

Shared by :mod:`concept_generation` (cleaning model answers, loading concept files),
:class:`~vocalign_hf.adaptation.ConceptVocabulary`, the model's `aligned_entries` and the demo, through the one
concept-collision check :class:`ConceptOwners` (beside the model, so that the Hub's remote code carries it).

Summing concept probabilities back to their class (VocAlign Eq. 7) goes wrong when a concept of
class A names another class B: the softmax mass that CLIP gives to "sidewalks" is mass that
"sidewalk" would otherwise get, and it is added to A. An exact copy of B is easy to catch; these
helpers also catch the forms that look different but name the same thing:

* :func:`same_phrase`: ``"sidewalks"``, ``"the sidewalk"``, ``"side-walk"`` and ``"Side walk"`` all
  name the class ``"sidewalk"``;
* :func:`contains_phrase`: ``"wet sidewalk edge"`` contains the class ``"sidewalk"`` as whole words.

Words are compared under the one name key (`class_list.name_key`: NFKC, invisible characters dropped,
case-folded, NFC); plurals are reduced by a few
English rules (:func:`singular`), not by a dictionary, so this is a heuristic that errs on the
side of the forms an LLM writes (regular plurals, ``-ies``, ``-ves``, ``-ches``, a few irregulars).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

from .class_list import name_key

__all__ = [
    "MAX_CONCEPT_CHARS",
    "singular",
    "phrase_words",
    "phrase_key",
    "phrase_form",
    "same_phrase",
    "contains_phrase",
    "Collision",
    "ConceptOwners",
]

MAX_CONCEPT_CHARS = 100
"""Longest concept accepted, in characters. Concepts are short phrases (the prompt asks for one to
five words); anything much longer is a sentence or a runaway answer, and CLIP's 77-token context
would cut it anyway."""

_WORD = re.compile(r"\w+")
_ARTICLES = frozenset({"a", "an", "the"})
_IRREGULAR = {
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "feet": "foot",
    "teeth": "tooth",
    "geese": "goose",
}


def singular(word: str) -> str:
    """A singular form of the (case-folded) English ``word`` by simple rules.

    ``sidewalks -> sidewalk``, ``benches -> bench``, ``shelves -> shelf``, ``knives -> knife``,
    ``bodies -> body``, ``people -> person``; words ending in ``ss``, ``us`` or ``is`` (``glass``,
    ``bus``, ``tennis``) are left alone. Both sides of every comparison go through this function,
    so an imperfect singular (``houses -> house`` but ``buses -> buse``) only misses a match.
    """
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("ives"):
        return word[:-3] + "fe"
    if word.endswith("ves"):
        return word[:-3] + "f"
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


@lru_cache(maxsize=8192)
def phrase_words(text: str) -> tuple[str, ...]:
    """The words of ``text``: its name key (NFC, case-folded, ...), split on anything that is not a letter
    or digit (so hyphens and spaces are alike), each reduced by :func:`singular`."""
    return tuple(singular(w) for w in _WORD.findall(name_key(text)))


def phrase_key(text: str) -> tuple[str, ...]:
    """:func:`phrase_words` without leading articles: the key under which two concepts are "the same"."""
    words = phrase_words(text)
    start = 0
    while start < len(words) - 1 and words[start] in _ARTICLES:
        start += 1
    return words[start:]


def phrase_form(text: str) -> str:
    """:func:`phrase_key` joined without spaces: equal for ``"The side-walks"`` and ``"sidewalk"``."""
    return "".join(phrase_key(text))


def same_phrase(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name the same thing up to case, Unicode form, plural, a leading
    article, and spacing or hyphenation (``"side walk"`` vs ``"sidewalk"``)."""
    form = phrase_form(a)
    return bool(form) and form == phrase_form(b)


def _occurrences(words: tuple[str, ...], sub: tuple[str, ...]) -> list[range]:
    n = len(sub)
    return [range(i, i + n) for i in range(len(words) - n + 1) if n and words[i : i + n] == sub]


def contains_phrase(concept: str, other: str, own: str | None = None) -> bool:
    """Whether ``concept`` contains ``other`` as a run of whole words (plural-insensitive).

    Words of ``concept`` that belong to an occurrence of ``own`` (the concept's own class) do not
    count: with classes ``"traffic light"`` and ``"light"``, the concept ``"red traffic light"`` of
    ``"traffic light"`` does not contain ``"light"``, but ``"pendant light"`` of ``"lamp"`` does.
    """
    words = phrase_words(concept)
    other_words = phrase_words(other)
    covered: set[int] = set()
    if own is not None:
        for span in _occurrences(words, phrase_words(own)):
            covered.update(span)
    return any(not covered.issuperset(span) for span in _occurrences(words, other_words))


class Collision(NamedTuple):
    """A concept that would also score for another class (see :class:`ConceptOwners`)."""

    other_class: str  # the class it collides with
    other_text: str  # what it matches there: that class's name, or one of its concepts
    is_name: bool  # whether `other_text` is the other class's name
    exact: bool  # equal under `name_key`; otherwise a form of it (plural, leading article, spacing)


class ConceptOwners:
    """The one concept-collision check: which class each class name and accepted concept scores for.

    Summing concept probabilities back to their class (Eq. 7) goes wrong when a concept of one class names another
    class, or is a concept of another class, exactly (under `name_key`) or as a form (:func:`phrase_form`: plural,
    leading article, spacing). Callers decide what a collision means: the concept files and the vocabularies raise,
    the answer cleaner and the demo drop the concept.
    """

    def __init__(self, class_names) -> None:
        self._by_key: dict[str, list[tuple[str, str, bool]]] = {}
        self._by_form: dict[str, list[tuple[str, str, bool]]] = {}
        for name in class_names:
            self._add(name, name, is_name=True)

    def _add(self, text: str, owner: str, is_name: bool) -> None:
        self._by_key.setdefault(name_key(text), []).append((owner, text, is_name))
        form = phrase_form(text)
        if form:  # punctuation-only text has no words to compare
            self._by_form.setdefault(form, []).append((owner, text, is_name))

    def collision(self, concept: str, owner: str, *, names_only: bool = False) -> Collision | None:
        """The other class `concept` (a concept of class `owner`) would also score for, or `None`.

        An exact match wins over a form, a name over a concept; with `names_only`, accepted concepts of other
        classes do not count."""
        for table, key, exact in ((self._by_key, name_key(concept), True), (self._by_form, phrase_form(concept), False)):
            hits = [hit for hit in table.get(key, ()) if hit[0] != owner and (hit[2] or not names_only)]
            if hits:
                other, text, is_name = max(hits, key=lambda hit: hit[2])  # the first name, else the first concept
                return Collision(other, text, is_name, exact)
        return None

    def claim(self, concept: str, owner: str) -> None:
        """Record `concept` as accepted for class `owner` (later concepts of other classes then collide with it)."""
        self._add(concept, owner, is_name=False)

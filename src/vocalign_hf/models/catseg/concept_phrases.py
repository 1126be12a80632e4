"""Word-level comparison of concepts with class names: plurals, articles, spacing and sub-phrases.

Shared by :mod:`concept_generation` (cleaning model answers, loading concept files) and
:class:`~vocalign_hf.adaptation.ConceptVocabulary`.

Summing concept probabilities back to their class (VocAlign Eq. 7) goes wrong when a concept of
class A names another class B: the softmax mass that CLIP gives to "sidewalks" is mass that
"sidewalk" would otherwise get, and it is added to A. An exact copy of B is easy to catch; these
helpers also catch the forms that look different but name the same thing:

* :func:`same_phrase`: ``"sidewalks"``, ``"the sidewalk"``, ``"side-walk"`` and ``"Side walk"`` all
  name the class ``"sidewalk"``;
* :func:`contains_phrase`: ``"wet sidewalk edge"`` contains the class ``"sidewalk"`` as whole words.

Words are compared after Unicode NFC normalisation and case folding; plurals are reduced by a few
English rules (:func:`singular`), not by a dictionary, so this is a heuristic that errs on the
side of the forms an LLM writes (regular plurals, ``-ies``, ``-ves``, ``-ches``, a few irregulars).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

__all__ = [
    "MAX_CONCEPT_CHARS",
    "singular",
    "phrase_words",
    "phrase_key",
    "phrase_form",
    "same_phrase",
    "contains_phrase",
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
    """The words of ``text``: NFC-normalised, case-folded, split on anything that is not a letter or
    digit (so hyphens and spaces are alike), each reduced by :func:`singular`."""
    folded = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())
    return tuple(singular(w) for w in _WORD.findall(folded))


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

"""Word-level comparison of concepts with class names (the implementation lives in
:mod:`vocalign_hf.concept_phrases`, shared with :class:`~vocalign_hf.adaptation.ConceptVocabulary`)."""

from vocalign_hf.concept_phrases import (
    MAX_CONCEPT_CHARS,
    contains_phrase,
    phrase_form,
    phrase_key,
    phrase_words,
    same_phrase,
    singular,
)

__all__ = [
    "MAX_CONCEPT_CHARS",
    "singular",
    "phrase_words",
    "phrase_key",
    "phrase_form",
    "same_phrase",
    "contains_phrase",
]

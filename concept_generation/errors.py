"""Exceptions raised by :mod:`concept_generation`."""

from __future__ import annotations

__all__ = ["ConceptGenerationError", "ConceptFileError", "ClassListError"]


class ConceptGenerationError(RuntimeError):
    """Concept generation failed (API error, malformed or incomplete answer, bad input).

    Messages are meant to be shown to users as they are; they never contain the API key.
    """


class ClassListError(ConceptGenerationError, ValueError):
    """A class list is empty, has blank or duplicate names, or cannot be read."""


class ConceptFileError(ConceptGenerationError, ValueError):
    """A concept JSON file is missing, not valid JSON or not in the ``{class: [concept, ...]}`` format."""

"""Concept generation and loading for VocAlign vocabulary alignment (paper section 3.3).

VocAlign scores each target class together with extra *concepts* (synonyms, parts, broader or
narrower terms, short descriptions) and sums their probabilities back to the class (Eq. 7).
Concepts are stored as ``{class_name: [concept, ...]}``.

Public API:

* :func:`generate_concepts` / :func:`write_concepts`: ask an OpenAI-compatible chat model
  (structured output, explicit retries, on-disk cache) and write the result atomically;
* :func:`load_concepts`: read a shipped set (``"cityscapes"``, ``"ade20k_150"``,
  ``"pascal_context_59"``) or a JSON file, validated;
* :func:`read_class_list`, :func:`render_prompt`, :func:`build_response_format`,
  :func:`parse_answer`, :func:`clean_concepts`, :class:`RetryPolicy`, :func:`atomic_write_json`.

Command line: ``python -m concept_generation --help`` or ``vocalign-concepts --help``.
"""

from __future__ import annotations

from .atomic import atomic_write_json, atomic_write_text
from .cache import ConceptCache, cache_key, default_cache_dir
from .classes import read_class_list, validate_class_names
from .client import API_KEY_ENV, RetryPolicy
from .errors import ClassListError, ConceptFileError, ConceptGenerationError
from .generate import DEFAULT_MODEL, ConceptGenerationResult, generate_concepts, write_concepts
from .loading import SHIPPED_CONCEPT_SETS, list_shipped_concepts, load_concepts, shipped_concepts_path
from .prompt import (
    DEFAULT_TEMPLATE,
    SCHEMA_VERSION,
    RenderedPrompt,
    available_templates,
    build_response_format,
    render_prompt,
)
from .validation import clean_concepts, parse_answer

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_MODEL",
    "DEFAULT_TEMPLATE",
    "SCHEMA_VERSION",
    "SHIPPED_CONCEPT_SETS",
    "ClassListError",
    "ConceptCache",
    "ConceptFileError",
    "ConceptGenerationError",
    "ConceptGenerationResult",
    "RenderedPrompt",
    "RetryPolicy",
    "atomic_write_json",
    "atomic_write_text",
    "available_templates",
    "build_response_format",
    "cache_key",
    "clean_concepts",
    "default_cache_dir",
    "generate_concepts",
    "list_shipped_concepts",
    "load_concepts",
    "parse_answer",
    "read_class_list",
    "render_prompt",
    "shipped_concepts_path",
    "validate_class_names",
    "write_concepts",
]

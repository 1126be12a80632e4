"""Versioned prompt templates and the structured-output schema for concept generation.

A template lives in ``concept_generation/templates/<name>.txt`` where ``<name>`` carries the version
(``concepts_v1``). It has a ``[system]`` and a ``[user]`` section and uses :class:`string.Template`
placeholders: ``$description``, ``$class_list``, ``$num_classes`` and ``$num_concepts``. A changed
prompt must get a new file name, so that the version recorded in outputs and cache keys stays honest.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .errors import ConceptGenerationError

__all__ = [
    "DEFAULT_TEMPLATE",
    "SCHEMA_VERSION",
    "RenderedPrompt",
    "available_templates",
    "load_template",
    "render_prompt",
    "build_response_format",
]

DEFAULT_TEMPLATE = "concepts_v1"
"""Name (and version) of the default prompt template."""

SCHEMA_VERSION = "class_concepts_array_v1"
"""Version of the structured-output schema built by :func:`build_response_format`."""

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
_SECTION = re.compile(r"^\[(system|user)\]\s*$", re.MULTILINE)
_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9_.-]+_v\d+$")

# OpenAI structured outputs limit enum sizes; above these the class name is a free string
# (still checked by the validator).
_MAX_ENUM_VALUES = 500
_MAX_ENUM_CHARS = 7500


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt ready to send.

    Attributes:
        template: template name, including its version (e.g. ``"concepts_v1"``).
        system: the system message.
        user: the user message.
    """

    template: str
    system: str
    user: str

    def messages(self) -> list[dict[str, str]]:
        """Chat-completions ``messages`` for this prompt."""
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]

    @property
    def sha256(self) -> str:
        """SHA-256 of the rendered system and user messages."""
        blob = json.dumps([self.template, self.system, self.user], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def available_templates() -> list[str]:
    """Names of the shipped prompt templates (e.g. ``["concepts_v1"]``)."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt") if _TEMPLATE_NAME.match(p.stem))


@cache
def load_template(name: str = DEFAULT_TEMPLATE) -> tuple[str, str]:
    """Return the ``(system, user)`` template texts of the template ``name``.

    Raises:
        ConceptGenerationError: unknown template or a file without both sections.
    """
    if not _TEMPLATE_NAME.match(name):
        raise ConceptGenerationError(f"invalid template name {name!r}: expected something like 'concepts_v1'")
    path = TEMPLATE_DIR / f"{name}.txt"
    if not path.is_file():
        raise ConceptGenerationError(
            f"unknown prompt template {name!r}; available: {', '.join(available_templates()) or 'none'}"
        )
    text = path.read_text(encoding="utf-8")
    parts = _SECTION.split(text)
    # parts = [preamble, "system", body, "user", body]
    sections = {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
    if set(sections) != {"system", "user"}:
        raise ConceptGenerationError(f"prompt template {path} must have a [system] and a [user] section")
    return sections["system"], sections["user"]


def render_prompt(
    class_names: Sequence[str],
    description: str = "",
    num_concepts: int = 5,
    template: str = DEFAULT_TEMPLATE,
) -> RenderedPrompt:
    """Fill the template with the dataset description and the class list (in the given order).

    Class names are listed one per line as JSON strings, so unusual characters stay unambiguous.
    """
    system_t, user_t = load_template(template)
    desc = " ".join(description.split()) or "(no description given; infer the domain from the class names)"
    values = {
        "description": desc,
        "class_list": "\n".join(f"- {json.dumps(name, ensure_ascii=False)}" for name in class_names),
        "num_classes": str(len(class_names)),
        "num_concepts": str(num_concepts),
    }
    try:
        system = string.Template(system_t).substitute(values)
        user = string.Template(user_t).substitute(values)
    except (KeyError, ValueError) as exc:
        raise ConceptGenerationError(f"prompt template {template!r} has a bad placeholder: {exc}") from None
    return RenderedPrompt(template=template, system=system, user=user)


def build_response_format(class_names: Sequence[str]) -> dict[str, Any]:
    """Chat-completions ``response_format`` asking for strict structured output.

    Schema (``SCHEMA_VERSION``)::

        {"concepts": [{"class_name": <one of the classes>, "concepts": [<str>, ...]}, ...]}

    An array of ``{class_name, concepts}`` objects is used instead of one property per class
    because class names are arbitrary strings (spaces, punctuation, hundreds of classes), which
    strict-mode property names and property-count limits handle badly. ``class_name`` is an
    ``enum`` of the target classes when the list is small enough for the API's enum limits.
    Strict mode cannot require "every class exactly once"; the validator checks that.
    """
    class_field: dict[str, Any] = {"type": "string", "description": "A target class name, copied exactly."}
    names = list(class_names)
    if len(names) <= _MAX_ENUM_VALUES and sum(len(n) for n in names) <= _MAX_ENUM_CHARS:
        class_field["enum"] = names
    schema = {
        "type": "object",
        "properties": {
            "concepts": {
                "type": "array",
                "description": "One entry per target class.",
                "items": {
                    "type": "object",
                    "properties": {
                        "class_name": class_field,
                        "concepts": {
                            "type": "array",
                            "description": "Short concept phrases for this class, most useful first.",
                            "items": {"type": "string"},
                        },
                    },
                    "required": ["class_name", "concepts"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["concepts"],
        "additionalProperties": False,
    }
    return {
        "type": "json_schema",
        "json_schema": {"name": "class_concepts", "strict": True, "schema": schema},
    }

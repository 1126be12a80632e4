"""On-disk cache of validated model answers, keyed by a hash of everything that shapes the answer."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json

__all__ = ["default_cache_dir", "cache_key", "ConceptCache"]

logger = logging.getLogger("concept_generation")

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """The default cache directory.

    ``$VOCALIGN_CONCEPTS_CACHE``, else ``$XDG_CACHE_HOME/vocalign_hf/concepts``, else
    ``~/.cache/vocalign_hf/concepts``.
    """
    explicit = os.environ.get("VOCALIGN_CONCEPTS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vocalign_hf" / "concepts"


def cache_key(
    *,
    template: str,
    rendered_prompt: Sequence[str],
    model: str,
    temperature: float | None,
    class_names: Sequence[str],
    num_concepts: int,
    description: str,
    schema_version: str,
    base_url: str | None = None,
) -> str:
    """SHA-256 hex digest of the prompt template version, the rendered prompt, the model, the
    temperature, the sorted classes, ``num_concepts``, the description, the schema version and the
    server's base URL (another server may run another model under the same name, so its answer is
    another cache entry; pass :func:`~concept_generation.client.resolve_base_url`'s value).

    Only these inputs are hashed; the API key never is.
    """
    payload = {
        "template": template,
        "prompt": list(rendered_prompt),
        "model": model,
        "temperature": temperature,
        "classes": sorted(class_names),
        "num_concepts": num_concepts,
        "description": description,
        "schema": schema_version,
        "base_url": base_url,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ConceptCache:
    """A directory of ``<key>.json`` files, each written atomically.

    A record holds the raw model answer (re-validated on every hit, so stricter validation applies
    to old entries too) and the request metadata. Unreadable or corrupt entries count as misses.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        """File of the entry ``key``."""
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The record stored under ``key``, or ``None``."""
        path = self.path(key)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            logger.warning("ignoring unreadable cache entry %s (%s)", path, exc)
            return None
        if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT or record.get("key") != key:
            logger.warning("ignoring cache entry %s with an unexpected format", path)
            return None
        if not isinstance(record.get("answer"), str):
            logger.warning("ignoring cache entry %s without an answer", path)
            return None
        return record

    def put(self, key: str, answer: str, metadata: dict[str, Any]) -> Path:
        """Store the raw ``answer`` and its ``metadata`` under ``key`` (atomically)."""
        record = {"format": CACHE_FORMAT, "key": key, "metadata": metadata, "answer": answer}
        return atomic_write_json(self.path(key), record)

"""End-to-end concept generation: prompt, cache, API request, validation, output file."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .cache import ConceptCache, cache_key, default_cache_dir
from .classes import validate_class_names
from .client import RetryPolicy, get_api_key, make_client, redact, request_completion, resolve_base_url
from .errors import ConceptGenerationError
from .prompt import DEFAULT_TEMPLATE, SCHEMA_VERSION, RenderedPrompt, build_response_format, render_prompt
from .validation import clean_concepts, excerpt, parse_answer

__all__ = [
    "DEFAULT_MODEL",
    "OUTPUT_FORMAT",
    "ConceptGenerationResult",
    "generate_concepts",
    "write_concepts",
]

logger = logging.getLogger("concept_generation")

DEFAULT_MODEL = "gpt-4o-mini"
OUTPUT_FORMAT = "vocalign-concepts/v1"
"""Value of ``metadata.format`` in files written by :func:`write_concepts`."""


@dataclass
class ConceptGenerationResult:
    """Outcome of :func:`generate_concepts`.

    Attributes:
        concepts: ``{class_name: [concept, ...]}`` in class order, validated and cleaned.
        metadata: provenance (template version, model, temperature, cache key, ...), JSON-serialisable.
        warnings: warnings raised while cleaning the answer (also logged).
        from_cache: whether the answer came from the cache (no request sent).
        requests_made: HTTP requests sent (0 on a cache hit; includes retries).
    """

    concepts: dict[str, list[str]]
    metadata: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    from_cache: bool = False
    requests_made: int = 0

    def to_json(self) -> dict[str, Any]:
        """The document written by :func:`write_concepts`: ``{"concepts": ..., "metadata": ...}``."""
        return {"concepts": self.concepts, "metadata": self.metadata}


def generate_concepts(
    class_names: Sequence[str],
    description: str = "",
    *,
    model: str = DEFAULT_MODEL,
    temperature: float | None = 0.2,
    num_concepts: int = 5,
    base_url: str | None = None,
    timeout: float = 60.0,
    max_retries: int = 3,
    backoff_base: float = 1.0,
    backoff_max: float = 30.0,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    template: str = DEFAULT_TEMPLATE,
    sleep: Callable[[float], None] = time.sleep,
) -> ConceptGenerationResult:
    """Ask a chat model for VocAlign concepts for ``class_names`` and validate the answer.

    The prompt is rendered from the versioned template ``template``; the request uses the
    ``openai`` client (chat completions, strict JSON-schema structured output, SDK retries off)
    and the retry policy of :class:`~concept_generation.client.RetryPolicy`. A validated answer is
    cached under a SHA-256 key of (template version, rendered prompt, model, server base URL,
    temperature, sorted classes, ``num_concepts``, description); a cache hit sends no request and needs no API key.

    Args:
        class_names: target classes (validated: non-empty, unique, not blank).
        description: a short description of the target dataset / domain.
        model: chat model name.
        temperature: sampling temperature, or ``None`` to omit it (e.g. for reasoning models).
        num_concepts: concepts requested (and kept at most) per class.
        base_url: API base URL (``None``: ``$OPENAI_BASE_URL`` or the OpenAI API). It is part of the
            cache key and recorded in the metadata as ``base_url`` (without credentials or query).
        timeout: per-request timeout in seconds.
        max_retries: retries after the first attempt for 429 / 5xx / connection errors / timeouts.
        backoff_base: first backoff delay in seconds (doubles per retry, with jitter).
        backoff_max: largest backoff delay in seconds.
        cache_dir: cache directory (``None``: :func:`~concept_generation.cache.default_cache_dir`).
        use_cache: read and write the cache.
        template: prompt template name, e.g. ``"concepts_v1"``.
        sleep: wait function used between retries.

    Returns:
        A :class:`ConceptGenerationResult`.

    Raises:
        ConceptGenerationError: bad inputs, missing ``$OPENAI_API_KEY`` (when a request is needed),
            API failure, or an answer that is malformed or incomplete after cleaning.
    """
    names = validate_class_names(class_names)
    policy = _checked_retry_policy(num_concepts, timeout, max_retries, backoff_base, backoff_max)
    description = " ".join((description or "").split())
    prompt, base_meta = _prompt_and_metadata(
        names, description, template=template, model=model, base_url=base_url, temperature=temperature,
        num_concepts=num_concepts,
    )
    cache = ConceptCache(cache_dir if cache_dir is not None else default_cache_dir()) if use_cache else None
    cached = _cached_result(cache, base_meta["cache_key"], names, num_concepts, base_meta)
    if cached is not None:
        return cached
    return _requested_result(
        prompt, names, num_concepts, base_meta, cache,
        model=model, temperature=temperature, base_url=base_url, timeout=timeout, policy=policy, sleep=sleep,
    )


def _checked_retry_policy(
    num_concepts: int, timeout: float, max_retries: int, backoff_base: float, backoff_max: float
) -> RetryPolicy:
    """The retry policy of :func:`generate_concepts`, once its numeric settings are checked."""
    if not isinstance(num_concepts, int) or num_concepts < 1:
        raise ConceptGenerationError(f"num_concepts must be a positive integer, got {num_concepts!r}")
    if timeout is not None and timeout <= 0:
        raise ConceptGenerationError(f"timeout must be positive, got {timeout!r}")
    try:
        return RetryPolicy(max_retries=max_retries, backoff_base=backoff_base, backoff_max=backoff_max)
    except ValueError as exc:
        raise ConceptGenerationError(str(exc)) from None


def _prompt_and_metadata(
    names: list[str], description: str, *, template: str, model: str, base_url: str | None,
    temperature: float | None, num_concepts: int,
) -> tuple[RenderedPrompt, dict[str, Any]]:
    """The rendered prompt, and the provenance every result carries (with the cache key of this request)."""
    prompt = render_prompt(names, description, num_concepts, template)
    server = resolve_base_url(base_url)
    key = cache_key(
        template=template,
        rendered_prompt=[prompt.system, prompt.user],
        model=model,
        temperature=temperature,
        class_names=names,
        num_concepts=num_concepts,
        description=description,
        schema_version=SCHEMA_VERSION,
        base_url=server,
    )
    base_meta: dict[str, Any] = {
        "format": OUTPUT_FORMAT,
        "generator": "concept_generation",
        "prompt_template": template,
        "prompt_sha256": prompt.sha256,
        "schema": SCHEMA_VERSION,
        "model": model,
        "base_url": server,
        "temperature": temperature,
        "num_concepts": num_concepts,
        "description": description,
        "classes": names,
        "cache_key": key,
    }
    logger.debug(
        "%d class(es), template %s (prompt sha256 %s), model %s at %s, temperature %s, num_concepts %d",
        len(names), template, prompt.sha256[:12], model, server, temperature, num_concepts,
    )
    return prompt, base_meta


def _cached_result(
    cache: ConceptCache | None, key: str, names: list[str], num_concepts: int, base_meta: dict[str, Any]
) -> ConceptGenerationResult | None:
    """The result of the cache entry `key` if there is one that still validates, else None."""
    if cache is None:
        logger.debug("cache disabled")
        return None
    logger.debug("cache key %s, entry %s", key, cache.path(key))
    record = cache.get(key)
    if record is None:
        logger.debug("cache miss")
        return None
    warnings: list[str] = []
    try:
        concepts = clean_concepts(parse_answer(record["answer"]), names, num_concepts=num_concepts, warnings=warnings)
    except ConceptGenerationError as exc:
        logger.warning("ignoring cache entry %s that no longer validates: %s", cache.path(key), exc)
        return None
    logger.info("cache hit %s: no request sent", cache.path(key))
    meta = {**base_meta, **_response_meta(record.get("metadata")), "from_cache": True}
    return ConceptGenerationResult(concepts, meta, warnings, from_cache=True, requests_made=0)


def _requested_result(
    prompt: RenderedPrompt, names: list[str], num_concepts: int, base_meta: dict[str, Any],
    cache: ConceptCache | None, *, model: str, temperature: float | None, base_url: str | None, timeout: float,
    policy: RetryPolicy, sleep: Callable[[float], None],
) -> ConceptGenerationResult:
    """Ask the model (this needs the API key), validate its answer and cache it."""
    api_key = get_api_key()
    client = make_client(api_key, base_url=base_url, timeout=timeout)
    logger.debug(
        "sending the request to %s/chat/completions (timeout %s s, %d retries)",
        base_meta["base_url"], timeout, policy.max_retries,
    )
    completion, attempts = request_completion(
        client,
        model=model,
        messages=prompt.messages(),
        response_format=build_response_format(names),
        temperature=temperature,
        policy=policy,
        sleep=sleep,
        secret=api_key,
        timeout=timeout,
    )
    answer = _answer_text(completion, api_key)
    logger.debug(
        "answer %s from model %s after %d request(s): %d characters, usage %s",
        getattr(completion, "id", None), getattr(completion, "model", None), attempts, len(answer), _usage(completion),
    )
    warnings: list[str] = []
    try:
        concepts = clean_concepts(parse_answer(answer), names, num_concepts=num_concepts, warnings=warnings)
    except ConceptGenerationError as exc:
        raise ConceptGenerationError(redact(str(exc), api_key)) from None

    response_meta = _completion_metadata(completion)
    if cache is not None:
        key = base_meta["cache_key"]
        try:
            cache.put(key, answer, {**base_meta, **response_meta})
        except OSError as exc:  # a cache that cannot be written must not lose a paid-for answer
            logger.warning("could not write the cache entry %s (%s)", cache.path(key), exc)
    meta = {**base_meta, **response_meta, "from_cache": False}
    return ConceptGenerationResult(concepts, meta, warnings, from_cache=False, requests_made=attempts)


def _completion_metadata(completion: Any) -> dict[str, Any]:
    """What the metadata records of the response (its id, model, fingerprint, token usage) and when it came."""
    return {
        "response_id": getattr(completion, "id", None),
        "response_model": getattr(completion, "model", None),
        "system_fingerprint": getattr(completion, "system_fingerprint", None),
        "usage": _usage(completion),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_concepts(result: ConceptGenerationResult, path: str | os.PathLike[str]) -> Path:
    """Write ``{"concepts": {...}, "metadata": {...}}`` to ``path`` atomically.

    :func:`~concept_generation.loading.load_concepts` reads this file as well as plain
    ``{class: [concepts]}`` files.
    """
    return atomic_write_json(path, result.to_json())


_RESPONSE_KEYS = ("response_id", "response_model", "system_fingerprint", "usage", "created_at")


def _response_meta(stored: Any) -> dict[str, Any]:
    if not isinstance(stored, dict):
        return {}
    return {k: stored.get(k) for k in _RESPONSE_KEYS if k in stored}


def _usage(completion: Any) -> dict[str, Any] | None:
    usage = getattr(completion, "usage", None)
    if usage is None:
        return None
    fields = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {f: getattr(usage, f, None) for f in fields}


def _answer_text(completion: Any, secret: str) -> str:
    choices = getattr(completion, "choices", None) or []
    if not choices:
        raise ConceptGenerationError("the API returned a completion without choices")
    choice = choices[0]
    message = getattr(choice, "message", None)
    refusal = getattr(message, "refusal", None)
    if refusal:
        raise ConceptGenerationError(redact(f"the model refused to answer: {excerpt(str(refusal))!r}", secret))
    content = getattr(message, "content", None)
    finish = getattr(choice, "finish_reason", None)
    if finish == "length":
        raise ConceptGenerationError(
            "the model's answer was cut off at the token limit (finish_reason='length'); "
            "use fewer classes per request or a smaller --num-concepts"
            + (f"; answer starts with: {excerpt(redact(content, secret))!r}" if content else "")
        )
    if finish == "content_filter":
        raise ConceptGenerationError("the model's answer was blocked by the content filter")
    if not isinstance(content, str) or not content.strip():
        raise ConceptGenerationError("the model returned an empty answer")
    return content

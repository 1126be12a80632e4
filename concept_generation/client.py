"""Chat-completions request through the ``openai`` client, with an explicit retry policy."""

from __future__ import annotations

import email.utils
import logging
import os
import random
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConceptGenerationError
from .validation import excerpt

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "RetryPolicy",
    "get_api_key",
    "resolve_base_url",
    "make_client",
    "request_completion",
    "redact",
]

logger = logging.getLogger("concept_generation")

API_KEY_ENV = "OPENAI_API_KEY"
"""The only place the API key is read from."""

BASE_URL_ENV = "OPENAI_BASE_URL"
"""Environment variable the ``openai`` client reads when no base URL is given."""

DEFAULT_BASE_URL = "https://api.openai.com/v1"
"""The ``openai`` client's default base URL."""


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before retrying a failed request.

    Retried: HTTP 429 (rate limit), HTTP >= 500, connection errors and timeouts. Any other HTTP
    error (400, 401, 403, 404, 422, ...) fails at once. Before retry ``n`` (0-based) the client waits
    the server's ``Retry-After`` / ``retry-after-ms`` header if present (capped at
    ``max_retry_after``), otherwise ``min(backoff_max, backoff_base * 2**n)`` scaled by a random
    factor in ``[1 - jitter, 1]``.

    Attributes:
        max_retries: retries after the first attempt (total attempts = ``max_retries + 1``).
        backoff_base: first backoff delay in seconds.
        backoff_max: largest backoff delay in seconds.
        jitter: fraction of the delay that is randomised (0 = none, 1 = "full jitter").
        max_retry_after: largest ``Retry-After`` honoured, in seconds.
    """

    max_retries: int = 3
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    jitter: float = 0.5
    max_retry_after: float = 120.0
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.backoff_base < 0 or self.backoff_max < 0 or self.max_retry_after < 0:
            raise ValueError("backoff_base, backoff_max and max_retry_after must be >= 0")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be in [0, 1]")

    def backoff(self, retry_index: int) -> float:
        """Backoff delay (seconds) before retry number ``retry_index`` (0-based), with jitter."""
        delay = min(self.backoff_max, self.backoff_base * (2.0**retry_index))
        return delay * (1.0 - self.jitter * self.rng.random())


def get_api_key() -> str:
    """Return ``$OPENAI_API_KEY``.

    Raises:
        ConceptGenerationError: the variable is unset or blank.
    """
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise ConceptGenerationError(
            f"the environment variable {API_KEY_ENV} is not set; export your API key there "
            "(it is read only from the environment and never written to any file)"
        )
    return key


def redact(text: str, secret: str | None) -> str:
    """Replace every occurrence of ``secret`` (and of its last 8+ characters) in ``text`` by ``***``."""
    if not secret:
        return text
    text = text.replace(secret, "***")
    tail = secret[-8:]
    if len(secret) > 12 and tail in text:
        text = text.replace(tail, "***")
    return text


def resolve_base_url(base_url: str | None = None) -> str:
    """The base URL the ``openai`` client will use: ``base_url``, else ``$OPENAI_BASE_URL``, else
    :data:`DEFAULT_BASE_URL`; without user info (``user:password@``), query or fragment, and without a
    trailing slash, so that it can be recorded and hashed."""
    raw = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).strip()
    parts = urllib.parse.urlsplit(raw)
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme.lower(), netloc.lower(), parts.path.rstrip("/"), "", ""))


def make_client(api_key: str, *, base_url: str | None = None, timeout: float = 60.0) -> Any:
    """An ``openai.OpenAI`` client with the SDK's own retries disabled (``max_retries=0``).

    ``base_url=None`` uses the SDK default (``$OPENAI_BASE_URL`` or the OpenAI API).
    """
    import openai  # here, not at the top: it takes about 1 s, which `vocalign-concepts --help` must not pay

    return openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)


def _retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _status_error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    detail = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            detail = err.get("message")
    if not detail:
        detail = getattr(exc, "message", None) or str(exc)
    return excerpt(str(detail), 300)


def _retryable_failure(
    exc: Exception, *, model: str, timeout: float | None, secret: str | None
) -> tuple[str, float | None]:
    """What went wrong with a request worth retrying (unredacted), and the wait the server asked for (if any).

    Raises:
        ConceptGenerationError: the failure is not worth retrying (an HTTP error other than 429 / 5xx, or another
            client error).
    """
    import openai  # here, not at the top: it takes about 1 s, which `vocalign-concepts --help` must not pay

    if isinstance(exc, openai.APITimeoutError):
        return "request timed out" + (f" after {timeout:g} s" if timeout is not None else ""), None
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        failure = "connection error"
        if cause is not None:
            failure += f" ({type(cause).__name__}: {excerpt(str(cause), 200)})"
        return failure, None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        detail = _status_error_message(exc)
        if status == 429 or status >= 500:
            kind = "rate limited" if status == 429 else "server error"
            return f"HTTP {status} {kind}: {detail}", _retry_after_seconds(getattr(exc.response, "headers", None))
        hint = ""
        if status == 401:
            hint = f" (check the key in ${API_KEY_ENV})"
        elif status == 404:
            hint = f" (check the model name {model!r} and the base URL)"
        elif status == 400:
            hint = " (the model may not support structured outputs or this temperature)"
        raise ConceptGenerationError(
            redact(f"OpenAI API request failed with HTTP {status}: {detail}{hint}", secret)
        ) from None
    raise ConceptGenerationError(redact(f"OpenAI client error: {excerpt(str(exc), 300)}", secret)) from None


def request_completion(
    client: Any,
    *,
    model: str,
    messages: Sequence[Mapping[str, str]],
    response_format: Mapping[str, Any],
    temperature: float | None,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    secret: str | None = None,
    timeout: float | None = None,
) -> tuple[Any, int]:
    """Send one chat-completions request, retrying transient failures per ``policy``.

    Args:
        client: an ``openai.OpenAI`` client (see :func:`make_client`).
        model: model name.
        messages: chat messages.
        response_format: structured-output format (see ``prompt.build_response_format``).
        temperature: sampling temperature, or ``None`` to omit it (for models that reject it).
        policy: retry policy.
        sleep: the function used to wait between attempts (injectable for tests).
        secret: the API key, redacted from any error message.
        timeout: the client timeout, only used in messages.

    Returns:
        ``(completion, attempts)``: the ``ChatCompletion`` and the number of requests sent.

    Raises:
        ConceptGenerationError: a non-retryable HTTP error, or all attempts failed (the message
            names the last failure).
    """
    import openai  # here, not at the top: it takes about 1 s, which `vocalign-concepts --help` must not pay

    kwargs: dict[str, Any] = {
        "model": model,
        "messages": list(messages),
        "response_format": dict(response_format),
    }
    if temperature is not None:
        kwargs["temperature"] = temperature

    attempts = policy.max_retries + 1
    last_failure = "no attempt made"
    for attempt in range(attempts):
        try:
            completion = client.chat.completions.create(**kwargs)
            return completion, attempt + 1
        except openai.OpenAIError as exc:
            last_failure, retry_after = _retryable_failure(exc, model=model, timeout=timeout, secret=secret)

        last_failure = redact(last_failure, secret)
        if attempt + 1 >= attempts:
            break
        if retry_after is not None:
            delay = min(retry_after, policy.max_retry_after)
            source = "Retry-After"
        else:
            delay = policy.backoff(attempt)
            source = "backoff"
        logger.warning(
            "attempt %d/%d failed (%s); retrying in %.2f s (%s)", attempt + 1, attempts, last_failure, delay, source
        )
        sleep(delay)
    raise ConceptGenerationError(f"giving up after {attempts} attempt(s); last failure: {last_failure}")

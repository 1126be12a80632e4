"""Command line: ``python -m concept_generation`` / ``vocalign-concepts``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .classes import class_list_path, read_class_list
from .errors import ConceptGenerationError
from .generate import DEFAULT_MODEL, generate_concepts, write_concepts
from .prompt import DEFAULT_TEMPLATE, available_templates, build_response_format, render_prompt

__all__ = ["build_parser", "check_output_path", "main"]

_EPILOG = """\
The API key is read only from $OPENAI_API_KEY (never from the command line) and is never written
anywhere. Answers are cached (default ~/.cache/vocalign_hf/concepts, or $VOCALIGN_CONCEPTS_CACHE),
so re-running with the same inputs sends no request.

example:
  export OPENAI_API_KEY=...
  vocalign-concepts --classes classes.json \\
      --description "dashcam images of German cities" --out concepts.json
"""


def _temperature(value: str) -> float | None:
    if value.strip().lower() in {"none", "omit", "default"}:
        return None
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {value!r}") from None
    if not 0.0 <= number <= 2.0:
        raise argparse.ArgumentTypeError("temperature must be between 0 and 2")
    return number


def _number(kind: type, minimum: float, inclusive: bool, description: str):
    """An argparse type: `kind(value)` that is >= `minimum` (or > it when not `inclusive`)."""

    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {value!r}") from None
        if number < minimum or (number == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {description}, got {value!r}")
        return number

    return parse


_positive_int = _number(int, 1, True, "a positive integer")
_non_negative_int = _number(int, 0, True, "an integer >= 0")
_positive_float = _number(float, 0.0, False, "a positive number")
_non_negative_float = _number(float, 0.0, True, "a number >= 0")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vocalign-concepts`` command."""
    parser = argparse.ArgumentParser(
        prog="vocalign-concepts",
        description=(
            "Generate VocAlign concepts (synonyms, parts, broader/narrower terms, short visual "
            "descriptions) for a list of target classes with an OpenAI-compatible chat model, "
            'and write them as {"concepts": {class: [concept, ...]}, "metadata": {...}}.'
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--classes",
        required=True,
        help=(
            'class list file: .json (["a", "b"] or {"classes": [...]}), .yaml/.yml (a list or classes: [...]) '
            'or .txt (one class per line); or an inline list "a,b,c". A string that looks like a path is '
            "always read as one (a missing file is an error)"
        ),
    )
    parser.add_argument("--description", default="", help="short description of the target dataset / domain")
    parser.add_argument("--out", help="output JSON file (written atomically); required unless --print-prompt")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"chat model (default: {DEFAULT_MODEL})")
    parser.add_argument(
        "--temperature",
        type=_temperature,
        default=0.2,
        help="sampling temperature, or 'none' to omit it for models that reject it (default: 0.2)",
    )
    parser.add_argument(
        "--num-concepts", type=_positive_int, default=5, help="concepts per class, at most (default: 5)"
    )
    parser.add_argument("--base-url", default=None, help="API base URL (default: $OPENAI_BASE_URL or OpenAI)")
    parser.add_argument("--cache-dir", default=None, help="cache directory (default: ~/.cache/vocalign_hf/concepts)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument(
        "--max-retries",
        type=_non_negative_int,
        default=3,
        help="retries on 429 / 5xx / connection errors / timeouts (default: 3)",
    )
    parser.add_argument(
        "--timeout", type=_positive_float, default=60.0, help="per-request timeout in seconds (default: 60)"
    )
    parser.add_argument(
        "--backoff-base",
        type=_non_negative_float,
        default=1.0,
        help="first retry delay in seconds, doubled per retry, with jitter (default: 1)",
    )
    parser.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        choices=available_templates(),
        help=f"prompt template version (default: {DEFAULT_TEMPLATE})",
    )
    parser.add_argument(
        "--print-prompt",
        action="store_true",
        help="print the rendered prompt and response schema, and exit without sending a request",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug log: server, cache key and file, request and answer details, concepts kept per class",
    )
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 success, 1 generation error, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.print_prompt and not args.out:
        parser.error("--out is required (unless --print-prompt is given)")
    if args.out and not args.print_prompt:
        try:  # before any request: a bad --out must not cost a paid answer
            check_output_path(args.out, classes=args.classes)
        except ConceptGenerationError as exc:
            parser.error(str(exc))

    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
    logger = logging.getLogger("concept_generation")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        return _run(args)
    except ConceptGenerationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (the output file, if any, is either unchanged or complete)", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def check_output_path(out: str | os.PathLike[str], *, classes: str | os.PathLike[str] | None = None) -> Path:
    """Check, before anything is paid for, that the concept file can be written to ``out``.

    Raises:
        ConceptGenerationError: ``out`` is a directory or not a regular file, is the class list file
            ``classes``, or its directory cannot be created or written.
    """
    path = Path(out).expanduser()
    if path.is_dir():
        raise ConceptGenerationError(f"--out {out} is a directory; give a file name, e.g. {path / 'concepts.json'}")
    if path.exists() and not path.is_file():
        raise ConceptGenerationError(f"--out {out} exists and is not a regular file")
    source = class_list_path(classes) if classes is not None else None
    if source is not None and (
        path.resolve() == source.resolve() or (path.exists() and source.exists() and os.path.samefile(path, source))
    ):
        raise ConceptGenerationError(
            f"--out {out} is the class list file given to --classes; refusing to overwrite it"
        )
    parent = path.resolve().parent
    while not parent.exists():  # the nearest existing ancestor decides whether the folders can be made
        parent = parent.parent
    if not parent.is_dir():
        raise ConceptGenerationError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConceptGenerationError(f"--out {out}: the directory {parent} is not writable")
    return path


def _run(args: argparse.Namespace) -> int:
    classes = read_class_list(args.classes)
    if args.print_prompt:
        prompt = render_prompt(classes, args.description, args.num_concepts, args.template)
        print(f"# template: {args.template}\n# --- system ---\n{prompt.system}\n# --- user ---\n{prompt.user}")
        print("# --- response_format ---")
        print(json.dumps(build_response_format(classes), indent=2, ensure_ascii=False))
        return 0
    result = generate_concepts(
        classes,
        args.description,
        model=args.model,
        temperature=args.temperature,
        num_concepts=args.num_concepts,
        base_url=args.base_url,
        timeout=args.timeout,
        max_retries=args.max_retries,
        backoff_base=args.backoff_base,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        template=args.template,
    )
    try:
        path = write_concepts(result, args.out)
    except OSError as exc:
        raise ConceptGenerationError(f"cannot write {args.out}: {exc}") from None
    total = sum(len(c) for c in result.concepts.values())
    source = "cache" if result.from_cache else f"{result.requests_made} request(s)"
    print(f"wrote {total} concepts for {len(result.concepts)} classes to {path} ({source})", file=sys.stderr)
    return 0

"""Class lists: the one file reader (JSON, YAML, text; the recipes and the concept generator both use it), and the
validator that the processor, the data loaders, the trainer and the concept generator share (defined
in `models.catseg.class_list`)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .errors import UsageError

from .models.catseg.class_list import name_key, normalize_name, validate_class_names  # noqa: F401


#: The class-list file types every command reads (the recipes' `--class_names_file`, `vocalign-concepts`).
CLASS_LIST_SUFFIXES = (".json", ".txt", ".yaml", ".yml")


def load_class_names(path: str | Path) -> list[str]:
    """Read and validate a class-list file, by its suffix:

    * `.json`: `["a", "b", ...]` or `{"classes": ["a", "b", ...]}`;
    * `.yaml` / `.yml`: a list, or a mapping with a `classes` list;
    * `.txt`: one class per line; blank lines and lines starting with `#` are skipped.

    Returns the names in label-id order (value k in a mask is names[k]).

    Raises:
        FileNotFoundError: the file does not exist.
        UsageError: another file type, unreadable or invalid contents, a wrong structure, or a list that fails
            :func:`validate_class_names`; the message names the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class list file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in CLASS_LIST_SUFFIXES:
        raise UsageError(
            f"class list {path}: unsupported file type {path.suffix or '(none)'!r}; use one of "
            f"{', '.join(CLASS_LIST_SUFFIXES)}"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Notepad's UTF-8) is no part of the first name
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read class list ({exc})") from None
    if suffix == ".txt":
        names: list = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    elif suffix == ".json":
        try:
            names = unwrap_class_list(json.loads(text), path, "JSON")
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    else:
        try:
            names = unwrap_class_list(yaml.safe_load(text), path, "YAML")
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    try:
        return validate_class_names(names, source=str(path))
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def unwrap_class_list(data: object, path: str | Path, file_format: str) -> list:
    """The list of a parsed class-list document: the document itself, or its `"classes"` entry.

    Raises:
        ValueError: a mapping without a `"classes"` key, or anything but a list; the message names the file and the
            format (`"JSON"`, `"YAML"`).
    """
    if isinstance(data, dict):
        if "classes" not in data:
            keys = sorted(map(str, data))
            raise UsageError(f'{path}: a {file_format} mapping must have a "classes" key, got keys {keys}')
        data = data["classes"]
    if not isinstance(data, list):
        raise UsageError(
            f'{path}: expected a {file_format} list of class names or a mapping with a "classes" list, '
            f"got {type(data).__name__}"
        )
    return data

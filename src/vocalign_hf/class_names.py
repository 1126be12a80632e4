"""Class lists: the JSON reader (its unwrapping of `{"classes": [...]}` is shared with the concept generator's YAML
reader), and the validator that the processor, the data loaders, the trainer and the concept generator share (defined
in `models.catseg.class_list`)."""

from __future__ import annotations

import json
from pathlib import Path

from .models.catseg.class_list import name_key, normalize_name, validate_class_names  # noqa: F401


def load_class_names(path: str | Path) -> list[str]:
    """Read and validate a class-list JSON file: `["a", "b", ...]` or `{"classes": ["a", "b", ...]}`.

    Returns the names in label-id order (value k in a mask is names[k]).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON, a wrong structure, or a list that fails :func:`validate_class_names`; the message
            names the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class list file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read class list ({exc})") from None
    return validate_class_names(unwrap_class_list(data, path, "JSON"), source=str(path))


def unwrap_class_list(data: object, path: str | Path, file_format: str) -> list:
    """The list of a parsed class-list document: the document itself, or its `"classes"` entry.

    Raises:
        ValueError: a mapping without a `"classes"` key, or anything but a list; the message names the file and the
            format (`"JSON"`, `"YAML"`).
    """
    if isinstance(data, dict):
        if "classes" not in data:
            keys = sorted(map(str, data))
            raise ValueError(f'{path}: a {file_format} mapping must have a "classes" key, got keys {keys}')
        data = data["classes"]
    if not isinstance(data, list):
        raise ValueError(
            f'{path}: expected a {file_format} list of class names or a mapping with a "classes" list, '
            f"got {type(data).__name__}"
        )
    return data

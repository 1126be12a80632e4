"""Where a CAT-Seg base model or a VocAlign adapter comes from: a local folder checked before anything loads, or a Hub
repo id tried once (honouring `HF_HUB_OFFLINE`).

Below the recipes and the adaptation package, so that both the recipes' checks and the library's own `merge_adapter`
name a missing or damaged folder as such, not as a failed Hub lookup. Every failure is a
[`~vocalign_hf.errors.UsageError`] whose message names the folder or repo and what to pass instead.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

from .atomic import read_json_object
from .errors import UsageError
from .file_checks import damaged_files

__all__ = ["resolve_adapter", "resolve_base_model"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _folder_hint(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f" (its parent {parent} does not exist either)"
    close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir() if p.is_dir()], n=3)
    return f" (similar folders in {parent}: {', '.join(close)})" if close else ""


def _check_files_intact(folder: Path, flag: str, fix: str) -> None:
    damaged = damaged_files(folder)
    if damaged:
        path, problem = damaged[0]
        raise UsageError(f"{flag}: {path} is damaged ({problem}): {fix}")


def _check_model_folder(folder: Path, flag: str) -> None:
    if (folder / "config.json").is_file():
        model_type = _check_json(folder / "config.json", flag).get("model_type")
        if model_type != "catseg":
            raise UsageError(
                f"{flag} {folder} holds a {model_type or 'model without a model_type'} model, not CAT-Seg: give a "
                "folder written by convert-catseg-checkpoint or CATSegForSemanticSegmentation.save_pretrained"
            )
        _check_files_intact(folder, flag, "convert, save or download the model again")
        return
    if (folder / "adapter_config.json").is_file():
        raise UsageError(
            f"{flag} {folder} is a LoRA adapter folder, not a base model: pass it as --adapter {folder} and the "
            f"CAT-Seg it was trained on as {flag} (its adapter_config.json names it)"
        )
    raise UsageError(
        f"{flag} {folder} has no config.json: give a folder written by save_pretrained / convert-catseg-checkpoint"
    )


def _check_json(path: Path, flag: str) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except ValueError as error:
        raise UsageError(f"{flag}: {error}") from None


def _check_adapter_folder(folder: Path, flag: str) -> None:
    if (folder / "adapter_config.json").is_file():
        _check_json(folder / "adapter_config.json", flag)
        _check_files_intact(folder, flag, "save or download the adapter again")
        return
    hint = " (it is a base model folder: pass it as --base_model)" if (folder / "config.json").is_file() else ""
    raise UsageError(f"{flag} {folder} has no adapter_config.json: give an adapter folder written by adapt.py{hint}")


def resolve_base_model(name: str, flag: str = "--base_model") -> str:
    """Check `name` as a local model folder or a Hub repo id before anything is loaded, and return it.

    A name that exists locally must be a model folder (with `config.json`; an adapter folder is pointed at
    `--adapter`). A name that does not exist and cannot be a Hub id (`org/name`), or that starts like a path
    (`./`, `/`, `~`) or whose first part is an existing local folder, is reported as a missing folder at once. Any
    other name is looked up once on the Hub (or only in the cache when `HF_HUB_OFFLINE` is set), and the message
    says what was tried.

    Raises:
        UsageError: the folder or repo cannot be used.
    """
    return _resolve(name, flag, _check_model_folder, "config.json")


def resolve_adapter(name: str, flag: str = "--adapter") -> str:
    """As :func:`resolve_base_model`, for a VocAlign adapter (a folder with `adapter_config.json`, or a Hub id)."""
    return _resolve(name, flag, _check_adapter_folder, "adapter_config.json")


def _resolve(name: str, flag: str, check_folder: Callable[[Path, str], None], hub_file: str) -> str:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {name} is a file; give a folder (save_pretrained output) or a Hub id")
        check_folder(path, flag)
        return name
    path_like = name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name
    first = name.split("/", 1)[0]
    if path_like or not _REPO_ID.match(name) or Path(first).is_dir():
        raise UsageError(f"{flag}: folder not found: {name} (resolved to {path.resolve()}){_folder_hint(path)}")
    if isinstance(try_to_load_from_cache(name, hub_file), str):
        return name
    if constants.HF_HUB_OFFLINE:
        raise UsageError(
            f"{flag} {name}: no local folder {path.resolve()}, and HF_HUB_OFFLINE is set and the Hub cache has no "
            "copy of this repo; download it once with network, or give a local folder"
        )
    try:  # one request, without huggingface_hub's retries (five, over 23 s, on a machine without network)
        get_hf_file_metadata(hf_hub_url(name, hub_file), timeout=10)
    except Exception as exc:  # any Hub failure: say what was tried, once, instead of retrying every file
        raise UsageError(
            f"{flag} {name}: no local folder {path.resolve()}, and the Hub repo {name!r} could not be read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Check the path, or set HF_HUB_OFFLINE=1 "
            "to use the Hub cache only"
        ) from None
    return name

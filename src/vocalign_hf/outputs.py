"""Which folders this library may write over: only those it wrote itself, never one that holds an input.

Every folder the library writes as a whole (an adapter, a merged model) records what it is in its `vocalign.json`
(`"written_as": "adapter"`). An existing destination is replaced only when it is empty or was written as the same
kind (or, for folders written before that key existed, holds exactly the files of that kind); anything else is
refused before any work starts, with the folder's foreign entries named. A destination that is, contains or lies
inside one of the command's inputs is refused too: `vocalign-merge d/base d/adapter d` must never delete `d`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .atomic import atomic_write_folder, read_json_object
from .errors import UsageError

__all__ = ["OUTPUT_INFO_FILE", "KNOWN_LAYOUTS", "check_not_overlapping", "check_replaceable", "write_output_folder"]

OUTPUT_INFO_FILE = "vocalign.json"
_MODEL_FILES = frozenset({
    "config.json", "model.safetensors", "vocalign.json", "preprocessor_config.json", "processor_config.json",
    "tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "generation_config.json", "configuration_catseg.py", "modeling_catseg.py",
})
#: The files each kind of output folder holds (how a folder written before `written_as` existed is recognised).
KNOWN_LAYOUTS: dict[str, frozenset[str]] = {
    "adapter": frozenset({"adapter_config.json", "adapter_model.safetensors", "vocalign.json", "README.md"}),
    "merged_model": _MODEL_FILES,
    "converted_model": _MODEL_FILES | {"README.md"},
}


def written_as(folder: Path) -> str | None:
    """The kind a folder records in its `vocalign.json` (None: not one of ours, or written before the key)."""
    try:
        return read_json_object(folder / OUTPUT_INFO_FILE).get("written_as")
    except (OSError, ValueError):
        return None


def check_replaceable(destination: str | os.PathLike, kind: str, flag: str = "output folder") -> bool:
    """Whether `destination` exists and will be replaced; raises when it must not be.

    Raises:
        UsageError: `destination` is a file, or a non-empty folder this library did not write as `kind`.
    """
    folder = Path(destination).expanduser()
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file; give a folder path (new, or one written by vocalign as {kind})")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return True
    mark = written_as(folder)
    if mark == kind:
        return True
    foreign = [name for name in entries if name not in KNOWN_LAYOUTS[kind]]
    if mark is None and not foreign and OUTPUT_INFO_FILE in entries:
        return True  # written by an earlier version of this library: the exact layout of `kind`
    what = f"written as {mark}" if mark else f"not written by vocalign as {kind} (it holds {_listing(foreign or entries)})"
    raise UsageError(
        f"{flag} {folder} already exists and is {what}; nothing was changed. Give a new folder, or move its "
        "contents away yourself"
    )


def check_not_overlapping(destination: str | os.PathLike, inputs: Iterable[tuple[str, Any]], flag: str) -> None:
    """Refuse a destination that is, contains or lies inside an input (`(name, path)` pairs; None paths skipped,
    as are Hub ids that do not exist locally)."""
    dest = Path(destination).expanduser().resolve()
    for name, value in inputs:
        if value is None or not Path(value).expanduser().exists():
            continue
        source = Path(value).expanduser().resolve()
        if dest == source or source.is_relative_to(dest) or dest.is_relative_to(source):
            relation = "is" if dest == source else "contains" if source.is_relative_to(dest) else "lies inside"
            raise UsageError(
                f"{flag} {destination} {relation} the {name} {value}: writing there would replace or mix with an "
                "input; give a folder outside it"
            )


def write_output_folder(
    destination: str | os.PathLike,
    kind: str,
    write: Callable[[Path], Any],
    inputs: Iterable[tuple[str, Any]] = (),
    flag: str = "output folder",
) -> Path:
    """Check `destination` ([`check_not_overlapping`], [`check_replaceable`]), then write it whole with
    [`atomic_write_folder`]: `write(tmp)` fills a sibling folder that takes the destination's place when complete.
    `write` must leave a `vocalign.json` whose `written_as` is `kind`. A destination that is a symbolic link is
    followed: the folder it points to is replaced and the link kept (a link replaced by a folder would leave its
    target stale)."""
    if Path(destination).expanduser().is_symlink():
        destination = Path(destination).expanduser().resolve()
    check_not_overlapping(destination, inputs, flag)
    check_replaceable(destination, kind, flag)

    def checked(folder: Path) -> None:
        write(folder)
        if written_as(folder) != kind:
            raise RuntimeError(f"the {kind} writer did not record written_as={kind!r} in {OUTPUT_INFO_FILE}")

    return atomic_write_folder(destination, checked, replace=True)


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

"""Whether a weights or state file was written to the end: a truncated `*.safetensors` (its header promises more
bytes than the file holds) or a truncated `torch.save` archive (`*.pt`, `*.pth`, `*.bin`: a zip whose directory,
written last, is missing) is found by reading a few bytes, before any model loads, and named."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

__all__ = ["damaged_files", "file_problem"]

_CHECKED = (".safetensors", ".pt", ".pth", ".bin")


def file_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the weights or state file `path` (None: it is whole, or of a kind not checked here)."""
    path = Path(path)
    if path.suffix not in _CHECKED:
        return None
    if path.stat().st_size == 0:
        return "it is empty"
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    with open(path, "rb") as handle:
        if handle.read(2) != b"PK":  # not a zip: a legacy torch.save file, not checked
            return None
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"cut off: {error}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    try:
        with safe_open(str(path), "pt"):
            return None
    except (SafetensorError, OSError) as error:
        return f"cut off or corrupt: {str(error).strip().splitlines()[0]}"


def damaged_files(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """The weights and state files directly in `folder` that are damaged, with what is wrong with each."""
    found = [(p, file_problem(p)) for p in sorted(Path(folder).iterdir()) if p.is_file()]
    return [(path, problem) for path, problem in found if problem]

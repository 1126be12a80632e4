"""The folder of a world source model, whether pretrained or unpacked from the shipped archive."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError

__all__ = ["INFO_FILE", "check_source_model_folder"]

#: Written last into a source model's folder: its settings hash, training record and source-domain mIoU.
INFO_FILE = "pretrain_info.json"


def check_source_model_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a source model (or nothing) that a new one may replace; a folder of other files is
    refused, never deleted (`--world_source_model_dir` may name any folder).

    Raises:
        UsageError: `folder` is a file, or a non-empty folder without `pretrain_info.json`.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"world source model folder {folder} is a file; give a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / INFO_FILE).is_file():
        raise UsageError(
            f"world source model folder {folder} holds other files (no {INFO_FILE}); nothing was changed. Give a "
            "new or empty folder (--world_source_model_dir)"
        )
    return folder.exists()

"""The world's source model shipped with the package: the stand-in for downloading CAT-Seg weights.

Pretraining the source model takes minutes and its result depends on the floating-point details of the machine
(another CPU type, another BLAS, a refactor that reorders a sum: 700 steps of training amplify any rounding
difference into another model). The package therefore ships the default world's source model (world seed 0,
default `WorldConfig`, the recipe's pretraining settings), and `pretrain_source_model` unpacks it instead of
training whenever the settings hash of the request equals the shipped one. Any other world or setting is
pretrained as before. How the archive is made: `vocalign_hf.world.export`.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from ..atomic import atomic_write_folder
from ..models.catseg import CATSegConfig, CATSegProcessor
from .source_folder import INFO_FILE, check_source_model_folder

__all__ = ["SHIPPED_SOURCE_MODEL", "shipped_settings_hash", "unpack_shipped_source_model"]

SHIPPED_SOURCE_MODEL = Path(__file__).resolve().parents[1] / "resources" / "world_source_model.zip"


def shipped_settings_hash(archive: str | os.PathLike | None = None) -> str | None:
    """The settings hash recorded in the shipped archive (None when there is no archive)."""
    try:
        with zipfile.ZipFile(archive or SHIPPED_SOURCE_MODEL) as zf:
            return json.loads(zf.read(INFO_FILE))["settings_hash"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def unpack_shipped_source_model(
    settings_hash: str, output_dir: str | os.PathLike, archive: str | os.PathLike | None = None
) -> bool:
    """Unpack the shipped model (or `archive`) into `output_dir`, atomically, if it was made with `settings_hash`;
    True if so."""
    archive = archive or SHIPPED_SOURCE_MODEL
    if shipped_settings_hash(archive) != settings_hash:
        return False
    def write(folder: Path) -> None:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(folder)
        CATSegProcessor.from_config(CATSegConfig.from_pretrained(folder)).save_pretrained(folder)

    atomic_write_folder(output_dir, write, replace=check_source_model_folder(output_dir))
    return True

"""Check every file of a dataset before a model is loaded: images and masks that exist and decode, masks of their
image's size holding only known class ids or the ignore value.

Images get a fast check (header, plus the chunk checksums of a PNG and the end marker of a JPEG, which catch
truncated files without decoding the pixels); masks are decoded, since their values must be read anyway. All
problems are collected and reported together, each with the file it concerns, in one :class:`DatasetValidationError`.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ._image_utils import mask_to_array
from .dataset_info import IGNORE_INDEX

logger = logging.getLogger(__name__)

__all__ = ["DatasetReport", "DatasetValidationError", "validate_segmentation_dataset"]

_MAX_LISTED = 20
#: From this many rows on, a progress bar shows the check's progress.
PROGRESS_FROM = 1000


class DatasetValidationError(ValueError):
    """One or more files of a dataset cannot be used; the message lists each file and its problem."""


@dataclass
class DatasetReport:
    """What :func:`validate_segmentation_dataset` saw: row count, image sizes and labelled pixels."""

    rows: int
    min_size: Optional[tuple[int, int]] = None  # (height, width) of the smallest image (by its shorter side)
    labelled_pixels: int = 0
    checked: bool = True


def _open(value: Any) -> tuple[Image.Image, str, Optional[bytes]]:
    """PIL image (header only), a name for messages, and the raw bytes when they are at hand."""
    if isinstance(value, Image.Image):
        return value, getattr(value, "filename", "") or "", None
    if isinstance(value, dict):
        path = value.get("path") or ""
        data = value.get("bytes")
        if data is not None:
            return Image.open(io.BytesIO(data)), path, data
        if path:
            return Image.open(path), path, None
    if isinstance(value, (str, os.PathLike)):
        return Image.open(value), str(value), None
    raise ValueError(f"cannot read an image from a {type(value).__name__}")


def _check_image(value: Any) -> tuple[tuple[int, int], str]:
    """(height, width) and name of a readable image; raises OSError / ValueError / SyntaxError otherwise."""
    image, name, data = _open(value)
    size = image.size
    if image.format == "PNG":
        image.verify()  # walks the chunks and their checksums without decoding: catches truncated files
    elif image.format == "JPEG":
        if data is None:
            with open(name, "rb") as handle:
                handle.seek(max(os.path.getsize(name) - 4096, 0))
                data = handle.read()
        if b"\xff\xd9" not in data[-4096:]:
            raise OSError("image file is truncated (no JPEG end marker)")
    elif not isinstance(value, Image.Image):
        image.load()
    return (size[1], size[0]), name


def _decoded(dataset: datasets.Dataset, column: str) -> datasets.Dataset:
    feature = dataset.features.get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


class _FileProblem(Exception):
    """One file of one row cannot be used; the message names the file and says why."""


def _checked_row_image(value: Any, where: str) -> tuple[tuple[int, int], str]:
    """(height, width) and name (`where` when it has none) of a row's image; raises `_FileProblem` otherwise."""
    try:
        size, name = _check_image(value)
    except FileNotFoundError:
        raise _FileProblem(f"{_name(value) or where}: file not found") from None
    except Exception as exc:  # any decoder error is a problem of this file
        raise _FileProblem(f"{_name(value) or where}: unreadable image ({type(exc).__name__}: {exc})") from None
    return size, name or where


def _checked_mask_labelled_pixels(
    value: Any, size: tuple[int, int], image_name: str, num_classes: Optional[int], ignore_index: int
) -> int:
    """The labelled (not ignored) pixels of a row's mask; raises `_FileProblem` if the mask cannot be used."""
    label_name = _name(value) or f"mask of {image_name}"
    try:
        mask = mask_to_array(_open(value)[0])
    except FileNotFoundError:
        raise _FileProblem(f"{label_name}: file not found") from None
    except Exception as exc:
        raise _FileProblem(f"{label_name}: unreadable mask ({type(exc).__name__}: {exc})") from None
    if mask.shape != size:
        raise _FileProblem(
            f"{label_name}: mask is {mask.shape[0]}x{mask.shape[1]} but its image {image_name} is {size[0]}x{size[1]}"
        )
    values = np.unique(mask)
    if num_classes is not None:
        bad = [int(v) for v in values if not (0 <= v < num_classes or v == ignore_index)]
        if bad:
            raise _FileProblem(
                f"{label_name}: mask values {bad[:10]} are not class ids 0-{num_classes - 1} nor the ignore value "
                f"{ignore_index}"
            )
    return int(mask.size - np.count_nonzero(mask == ignore_index))


def validate_segmentation_dataset(
    dataset: Any,
    *,
    split: str,
    num_classes: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
    require_labelled_pixels: bool = True,
    progress: Optional[bool] = None,
) -> DatasetReport:
    """Check every image (and mask, when the dataset has a ``label`` column) of ``dataset``.

    Args:
        dataset: a ``datasets.Dataset`` with ``image`` (and optionally ``label``) columns, before any transform.
            An ``IterableDataset`` (streaming) is not checked: reading it would consume it.
        split: a name for messages (e.g. ``"evaluation split (my/val/images)"``).
        num_classes: masks may hold ``0 .. num_classes - 1`` and ``ignore_index``; ``None`` skips the value check.
        ignore_index: the mask value that is not scored.
        require_labelled_pixels: a labelled dataset must have at least one pixel that is not ``ignore_index``.
        progress: show a progress bar (default: from :data:`PROGRESS_FROM` rows on).

    Returns:
        a :class:`DatasetReport`.

    Raises:
        DatasetValidationError: listing each bad file (missing, undecodable, truncated, a mask of another size or
            with unknown values, a colour-coded mask), or a labelled split without any labelled pixel.
    """
    if isinstance(dataset, datasets.IterableDataset) or not hasattr(dataset, "features"):
        logger.info("%s is streamed: its files are checked as they are read", split)
        return DatasetReport(rows=0, checked=False)
    has_label = "label" in dataset.column_names
    raw = _decoded(dataset, "image")
    if has_label:
        raw = _decoded(raw, "label")
    raw = raw.select_columns(["image", "label"] if has_label else ["image"])
    show = progress if progress is not None else len(raw) >= PROGRESS_FROM
    problems: list[str] = []
    report = DatasetReport(rows=len(raw))
    for index, row in enumerate(tqdm(raw, desc=f"checking {split}", total=len(raw), disable=not show)):
        try:
            size, name = _checked_row_image(row["image"], f"row {index}")
            if report.min_size is None or min(size) < min(report.min_size):
                report.min_size = size
            if has_label and row["label"] is not None:
                report.labelled_pixels += _checked_mask_labelled_pixels(
                    row["label"], size, name, num_classes, ignore_index
                )
        except _FileProblem as problem:
            problems.append(str(problem))
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DatasetValidationError(f"{len(problems)} bad file(s) in the {split}:\n  {listed}{more}")
    if has_label and require_labelled_pixels and report.rows and report.labelled_pixels == 0:
        raise DatasetValidationError(
            f"every mask of the {split} is entirely the ignore value {ignore_index}: there is no pixel to score"
        )
    return report


def _name(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("path") or ""
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    return getattr(value, "filename", "") or ""

"""Cityscapes from its official folder layout (the licence forbids redistribution, so this is the main route).

Expected layout (as unpacked from ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``)::

    root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png        (raw label ids 0..33)
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelTrainIds.png   (optional, from createTrainIdLabelImgs)

``*_labelTrainIds.png`` is used when present for **every** image; otherwise the ``*_labelIds.png`` masks are
converted once with the official labelId -> trainId table (vectorised look-up) and kept in memory as PNG bytes
(about 20 ms a mask, ~1 min for the 2975 training masks on one core; ``num_proc`` parallelises it). Running the official
``cityscapesscripts/preparation/createTrainIdLabelImgs.py`` once avoids that cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import datasets

from .dataset_info import get_dataset_info
from .normalize import normalize_segmentation_dataset

__all__ = ["load_cityscapes"]

_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
_TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"


def _require_dir(path: Path, hint: str = "") -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"Cityscapes folder not found: {path}{hint}")


def _split_images(root: Path, split: str, cities: Optional[Sequence[str]]) -> list[Path]:
    """The ``leftImg8bit`` images of one split, sorted by city then file name."""
    _require_dir(root)
    img_split = root / "leftImg8bit" / split
    _require_dir(img_split, " (expected root/leftImg8bit/{split}/{city}/*_leftImg8bit.png)")
    if cities is None:
        city_dirs = sorted(p for p in img_split.iterdir() if p.is_dir())
    else:
        city_dirs = [img_split / c for c in cities]
        for d in city_dirs:
            _require_dir(d)
    images = [p for d in city_dirs for p in sorted(d.glob("*" + _IMAGE_SUFFIX))]
    if not images:
        raise FileNotFoundError(f"no '*{_IMAGE_SUFFIX}' images under {img_split}")
    return images


def _mask_path(gt_split: Path, img: Path, suffix: str) -> Path:
    stem = img.name[: -len(_IMAGE_SUFFIX)]
    return gt_split / img.parent.name / (stem + suffix)


def _split_masks(gt_split: Path, images: Sequence[Path], label_type: str) -> tuple[list[str], bool]:
    """The mask file of every image, and whether they are the ``labelTrainIds`` masks (else ``labelIds``)."""
    if label_type == "auto":
        use_train_ids = all(_mask_path(gt_split, p, _TRAIN_IDS_SUFFIX).is_file() for p in images)
    else:
        use_train_ids = label_type == "labelTrainIds"
    suffix = _TRAIN_IDS_SUFFIX if use_train_ids else _LABEL_IDS_SUFFIX
    masks = []
    for img in images:
        m = _mask_path(gt_split, img, suffix)
        if not m.is_file():
            raise FileNotFoundError(f"Cityscapes image {img} has no mask: expected {m}")
        masks.append(str(m))
    return masks, use_train_ids


def load_cityscapes(
    root: Union[str, Path],
    split: str = "val",
    *,
    with_labels: bool = True,
    label_type: Literal["auto", "labelIds", "labelTrainIds"] = "auto",
    cities: Optional[Sequence[str]] = None,
    num_proc: Optional[int] = None,
) -> datasets.Dataset:
    """Load a Cityscapes split from the official folder layout.

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"``, ``"val"`` or ``"test"`` (``"validation"`` is accepted for ``"val"``).
        with_labels: ``False`` for unlabeled adaptation data: only ``leftImg8bit`` is read (``gtFine`` may be absent).
        label_type: ``"auto"`` uses ``*_gtFine_labelTrainIds.png`` if every image has one, else
            ``*_gtFine_labelIds.png`` mapped to train ids; ``"labelIds"`` / ``"labelTrainIds"`` force one.
        cities: restrict to these city folders (default: all, sorted).
        num_proc: processes for the labelIds -> trainIds conversion.

    Returns:
        A ``datasets.Dataset`` with column ``image`` (``datasets.Image``) and, when ``with_labels``, ``label``
        (``datasets.Image``, 8-bit masks holding train ids ``0..18`` and ``255`` = ignore), sorted by city then
        file name.

    Raises:
        FileNotFoundError: a missing root / split / city folder, a split without images, or an image without its
            mask (the message names the image and the expected mask file).
        ValueError: a bad ``split`` or ``label_type``.
    """
    if label_type not in ("auto", "labelIds", "labelTrainIds"):
        raise ValueError(f"label_type must be 'auto', 'labelIds' or 'labelTrainIds', got {label_type!r}")
    split = {"validation": "val"}.get(split, split)
    if split not in ("train", "val", "test"):
        raise ValueError(f"Cityscapes split must be 'train', 'val' or 'test', got {split!r}")

    root = Path(root).expanduser()
    images = _split_images(root, split, cities)
    if not with_labels:
        return datasets.Dataset.from_dict(
            {"image": [str(p) for p in images]}, features=datasets.Features({"image": datasets.Image()})
        )

    gt_split = root / "gtFine" / split
    _require_dir(gt_split, " (pass with_labels=False to load unlabeled images)")
    masks, use_train_ids = _split_masks(gt_split, images, label_type)
    ds = datasets.Dataset.from_dict(
        {"image": [str(p) for p in images], "label": masks},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Image()}),
    )
    return normalize_segmentation_dataset(
        ds,
        get_dataset_info("cityscapes"),
        label_encoding="train_ids" if use_train_ids else "label_ids",
        num_proc=num_proc,
    )

"""Plain image folders: unlabeled target images for adaptation, optionally with masks and a class list.

Layout::

    images/                 masks/ (optional)          classes.json (optional)
      a.jpg                   a.png                      ["road", "car", ...]   or   {"classes": [...]}
      sub/b.png               sub/b.png

Images (``.png .jpg .jpeg .bmp .webp``, case-insensitive) are listed sorted; ``recursive=True`` also walks
sub-folders. Masks are matched to images by file stem (by relative path + stem when recursive), after removing
optional ``image_suffix`` / ``mask_suffix`` (e.g. ``"_leftImg8bit"`` / ``"_gtFine_labelTrainIds"``). Masks must be
single-channel class-index images (``L``, ``P`` or 16-bit); pixel value ``k`` is class ``k`` of the class list and
255 is ignored, unless a ``dataset_info`` with a label conversion (e.g. ADE20K reduce labels) is given.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import datasets

from ._image_utils import IMAGE_EXTENSIONS
from ..class_names import load_class_names  # noqa: F401  (re-exported)
from .dataset_info import DatasetInfo
from .normalize import LabelEncoding, normalize_segmentation_dataset

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "MASK_EXTENSIONS", "list_images", "load_class_names", "load_image_folder"]

#: Extensions accepted for masks (lossless formats; ``.jpg`` masks are accepted with a warning).
MASK_EXTENSIONS: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff", ".webp", ".jpg", ".jpeg")

_MAX_LISTED = 10


def _fmt(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" ... (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def list_images(
    folder: Union[str, Path], *, recursive: bool = False, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> list[Path]:
    """Sorted image files of ``folder`` (extension match is case-insensitive; hidden files are skipped).

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a directory.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    exts = {e.lower() for e in extensions}
    pattern = "**/*" if recursive else "*"
    files = [
        p
        for p in folder.glob(pattern)
        if p.is_file()
        and p.suffix.lower() in exts
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _key(path: Path, folder: Path, suffix: str, recursive: bool) -> Optional[str]:
    stem = path.stem
    if suffix:
        if not stem.endswith(suffix):
            return None
        stem = stem[: -len(suffix)]
    if recursive:
        parent = path.parent.relative_to(folder).as_posix()
        return stem if parent == "." else f"{parent}/{stem}"
    return stem


def _index(files: Sequence[Path], folder: Path, suffix: str, recursive: bool, what: str) -> dict[str, Path]:
    index: dict[str, Path] = {}
    dups: list[str] = []
    for f in files:
        k = _key(f, folder, suffix, recursive)
        if k is None:
            continue
        if k in index:
            dups.append(f"{index[k].name} / {f.name}")
        index[k] = f
    if dups:
        raise ValueError(f"several {what} files share a stem in {folder}: {_fmt(dups)}")
    return index


def _image_index(image_dir: Path, recursive: bool, image_suffix: str) -> dict[str, Path]:
    """The images of `image_dir` by matching key; raises when there is none."""
    images = list_images(image_dir, recursive=recursive)
    img_index = _index(images, image_dir, image_suffix, recursive, "image")
    if not img_index:
        nested = [] if recursive else list_images(image_dir, recursive=True)
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}"
            + (f" with suffix {image_suffix!r}" if image_suffix else "")
            + (
                f" ({len(nested)} in its sub-folders, e.g. {nested[0].relative_to(image_dir).as_posix()}: pass "
                "recursive=True, or --recursive true to the recipes)"
                if nested
                else ""
            )
        )
    return img_index


def _mask_index(mask_dir: Path, recursive: bool, mask_suffix: str) -> dict[str, Path]:
    """The masks of `mask_dir` by matching key; warns about lossy (JPEG) masks."""
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"mask folder not found: {mask_dir}")
    masks = list_images(mask_dir, recursive=recursive, extensions=MASK_EXTENSIONS)
    mask_index = _index(masks, mask_dir, mask_suffix, recursive, "mask")
    lossy = [p.name for p in mask_index.values() if p.suffix.lower() in (".jpg", ".jpeg")]
    if lossy:
        logger.warning("JPEG masks are lossy and may hold wrong class ids: %s", _fmt(lossy))
    return mask_index


def _check_images_match_masks(
    img_index: dict[str, Path], mask_index: dict[str, Path], image_dir: Path, mask_dir: Path, *, strict: bool,
    image_suffix: str, mask_suffix: str,
) -> None:
    """Raise, listing the unmatched names, if an image has no mask (or, when `strict`, a mask has no image)."""
    no_mask = [img_index[k].relative_to(image_dir).as_posix() for k in sorted(img_index) if k not in mask_index]
    no_image = sorted(m.relative_to(mask_dir).as_posix() for k, m in mask_index.items() if k not in img_index)
    if no_mask or (strict and no_image):
        parts = []
        if no_mask:
            parts.append(f"{len(no_mask)} image(s) without a mask in {mask_dir}: {_fmt(no_mask)}")
        if strict and no_image:
            parts.append(f"{len(no_image)} mask(s) without an image in {image_dir}: {_fmt(no_image)}")
        hint = f" (matching by stem; mask_suffix={mask_suffix!r}, image_suffix={image_suffix!r})"
        raise ValueError("images and masks do not match: " + "; ".join(parts) + hint)


def load_image_folder(
    image_dir: Union[str, Path],
    mask_dir: Union[str, Path, None] = None,
    *,
    recursive: bool = False,
    image_suffix: str = "",
    mask_suffix: str = "",
    strict: bool = True,
    dataset_info: Union[str, DatasetInfo, None] = None,
    label_encoding: LabelEncoding = "auto",
    num_proc: Optional[int] = None,
) -> datasets.Dataset:
    """Load a folder of images (unlabeled) or of images and masks matched by stem.

    Args:
        image_dir: folder of images.
        mask_dir: optional folder of masks; ``None`` gives an unlabeled dataset (``image`` column only).
        recursive: also walk sub-folders (matching then uses the relative path + stem).
        image_suffix: suffix removed from image stems before matching (images without it are skipped).
        mask_suffix: suffix removed from mask stems before matching (masks without it are skipped).
        strict: ``True``: every image needs a mask **and** every mask an image. ``False``: masks without an
            image are ignored (images without a mask still raise).
        dataset_info: known dataset (name or :class:`DatasetInfo`) whose label conversion should be applied to the
            masks (e.g. ``"ade20k_150"`` for raw ADE annotations). ``None``: masks already hold training ids.
        label_encoding: see :func:`~vocalign_hf.data.normalize.normalize_segmentation_dataset`.
        num_proc: processes for the label conversion.

    Returns:
        ``datasets.Dataset`` with ``image`` (and ``label``) ``datasets.Image`` columns, sorted by relative path.

    Raises:
        FileNotFoundError: a missing folder, or no image in ``image_dir``.
        ValueError: images and masks that do not match; the message lists the unmatched names.
    """
    image_dir = Path(image_dir).expanduser()
    img_index = _image_index(image_dir, recursive, image_suffix)
    keys = sorted(img_index)
    if mask_dir is None:
        return datasets.Dataset.from_dict(
            {"image": [str(img_index[k]) for k in keys]}, features=datasets.Features({"image": datasets.Image()})
        )

    mask_dir = Path(mask_dir).expanduser()
    mask_index = _mask_index(mask_dir, recursive, mask_suffix)
    _check_images_match_masks(
        img_index, mask_index, image_dir, mask_dir, strict=strict, image_suffix=image_suffix, mask_suffix=mask_suffix
    )
    ds = datasets.Dataset.from_dict(
        {"image": [str(img_index[k]) for k in keys], "label": [str(mask_index[k]) for k in keys]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Image()}),
    )
    if dataset_info is None:
        return ds
    return normalize_segmentation_dataset(ds, dataset_info, label_encoding=label_encoding, num_proc=num_proc)

"""Target datasets from the Hugging Face Hub, normalised to ``image`` / ``label`` with training-id masks.

Known sources (``load_hub_dataset(name)``):

* ``"cityscapes"`` -> ``Chris1/cityscapes`` (parquet; columns ``image``, ``semantic_segmentation``; splits
  ``train`` / ``validation`` / ``test``). Its mask encoding is undocumented, so ``label_encoding="auto"`` detects
  labelIds vs trainIds from the first masks (see
  :func:`~vocalign_hf.data.normalize.detect_cityscapes_label_encoding`). A Hub discussion on that repo reports
  image / mask misalignment: check a few samples before trusting scores. Cityscapes may not be redistributed;
  the official download + :func:`~vocalign_hf.data.cityscapes.load_cityscapes` is the safe route.
* ``"ade20k_150"`` -> ``zhoubolei/scene_parse_150``, config ``scene_parsing``. That repo is **script-based**, and
  ``datasets>=4`` no longer runs loading scripts, so it is read from the Hub's automatic parquet conversion
  (branch ``refs/convert/parquet``, folder ``scene_parsing/{split}/``) with the ``parquet`` builder. Columns
  ``image``, ``annotation`` (0 = other, 1..150); reduce labels is applied (0 -> 255, k -> k - 1). If that branch
  moves, pass ``data_files=`` (any parquet mirror with the same columns) or use ``datasets<4`` with
  ``load_dataset("scene_parse_150", "scene_parsing", trust_remote_code=True)`` and
  :func:`~vocalign_hf.data.normalize.normalize_segmentation_dataset`.
* ``"pascal_context_59"``: no Hub dataset carries PC-59 semantic labels; :func:`load_hub_dataset` raises
  :class:`DatasetNotOnHubError` explaining how to build it locally and load it with
  :func:`~vocalign_hf.data.folder.load_image_folder`.

Any other string is treated as a Hub repo id (``load_dataset(repo, split=...)``), with columns auto-detected or
given explicitly, and the label conversion of ``dataset_info`` (if any) applied.

The column / label logic is :func:`~vocalign_hf.data.normalize.normalize_segmentation_dataset`, shared with the
local loaders. ``tests/test_hub.py`` loads small repos laid out as these sources (the ADE20K parquet conversion
branch, the Cityscapes shards and label encoding) from a Hub on 127.0.0.1 with the real ``datasets`` client,
streaming included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import datasets

from .dataset_info import DatasetInfo, get_dataset_info
from .normalize import AnyDataset, LabelEncoding, normalize_segmentation_dataset

__all__ = ["HUB_SOURCES", "DatasetNotOnHubError", "HubSource", "hub_dataset_id", "load_hub_dataset"]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class DatasetNotOnHubError(ValueError):
    """A known dataset that has no usable copy on the Hugging Face Hub."""


@dataclass(frozen=True)
class HubSource:
    """How to load one known dataset from the Hub.

    Attributes:
        dataset: key of :func:`~vocalign_hf.data.dataset_info.get_dataset_info`.
        path: first argument of ``datasets.load_dataset`` (repo id or builder name such as ``"parquet"``).
        name: dataset config name, if any.
        data_files: ``{split: glob}`` for builder-based sources (``{split}`` is filled in).
        image_column / label_column: source column names.
        split_aliases: accepted split names -> the source's split names.
        label_encoding: default mask encoding of this source.
        unavailable: when set, the source cannot be loaded and this text is the error message.
        hub_id: the Hub dataset repo the data comes from (for model cards' `datasets:`).
    """

    dataset: str
    path: Optional[str] = None
    name: Optional[str] = None
    data_files: Optional[str] = None
    image_column: str = "image"
    label_column: Optional[str] = None
    split_aliases: Mapping[str, str] = field(default_factory=dict)
    label_encoding: LabelEncoding = "auto"
    unavailable: Optional[str] = None
    hub_id: Optional[str] = None


_PC59_MESSAGE = (
    "PASCAL-Context-59 has no copy with semantic labels on the Hugging Face Hub (inpaint-context/pascal-context is "
    "an inpainting set, not PC-59). Build it locally: download VOC2010 (VOCtrainval_03-May-2010.tar) and the "
    "PASCAL-Context 'trainval_merged.json' annotations, then convert them with CAT-Seg's "
    "datasets/prepare_pascal_context_59.py (masks 0..58, background 255) or mmsegmentation's "
    "tools/dataset_converters/pascal_context.py (Detail API; masks 0 = background, 1..59). Then load it with "
    "vocalign_hf.data.load_image_folder('.../JPEGImages', '.../<mask folder>', "
    "dataset_info=get_dataset_info('pascal_context_59')) for mmseg masks, or "
    "dataset_info=get_dataset_info('pascal_context_59').without_reduce_labels() for CAT-Seg masks. "
    "Select the 5105 val images with the official val list (image_dir can be a folder of symlinks)."
)

#: Known Hub sources, keyed by canonical dataset name.
HUB_SOURCES: dict[str, HubSource] = {
    "cityscapes": HubSource(
        dataset="cityscapes",
        path="Chris1/cityscapes",
        image_column="image",
        label_column="semantic_segmentation",
        split_aliases={"val": "validation"},
        label_encoding="auto",
        hub_id="Chris1/cityscapes",
    ),
    "ade20k_150": HubSource(
        dataset="ade20k_150",
        path="parquet",
        data_files="hf://datasets/zhoubolei/scene_parse_150@refs%2Fconvert%2Fparquet/scene_parsing/{split}/*.parquet",
        image_column="image",
        label_column="annotation",
        split_aliases={"val": "validation"},
        label_encoding="raw",
        hub_id="zhoubolei/scene_parse_150",
    ),
    "pascal_context_59": HubSource(dataset="pascal_context_59", unavailable=_PC59_MESSAGE),
}


def _known_source(name_or_repo: str) -> Optional[HubSource]:
    # Known names and their aliases, including repo ids such as "Chris1/cityscapes", map to a source.
    try:
        info = get_dataset_info(name_or_repo)
    except ValueError:
        return None
    return HUB_SOURCES.get(info.name)


def hub_dataset_id(name_or_repo: Optional[str]) -> Optional[str]:
    """The Hub dataset repo id behind a dataset name (``"cityscapes"`` -> ``"Chris1/cityscapes"``), the name itself
    when it already is a repo id (``"org/name"``), or ``None`` (the built-in world, local folders, PASCAL-Context)."""
    if not name_or_repo:
        return None
    src = _known_source(name_or_repo)
    if src is not None:
        return src.hub_id
    return name_or_repo if _REPO_ID.fullmatch(name_or_repo) else None


def load_hub_dataset(
    name_or_repo: str,
    split: str = "validation",
    *,
    dataset_info: Union[str, DatasetInfo, None] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    with_labels: bool = True,
    label_encoding: Optional[LabelEncoding] = None,
    data_files: Optional[Union[str, list[str]]] = None,
    streaming: bool = False,
    num_proc: Optional[int] = None,
    **load_kwargs: Any,
) -> AnyDataset:
    """Load a segmentation dataset from the Hub and normalise it to ``image`` / ``label`` (training ids).

    Args:
        name_or_repo: a known dataset (``"cityscapes"``, ``"ade20k_150"``, ``"pascal_context_59"`` or an alias,
            see :data:`HUB_SOURCES`) or any Hub dataset repo id.
        split: split name; ``"val"`` is mapped to ``"validation"`` for the known sources.
        dataset_info: label conversion / class names for a repo id that is not a known source (name or
            :class:`DatasetInfo`); known sources use their own.
        image_column / label_column: override the source column names (auto-detected for unknown repos).
        with_labels: ``False`` drops the masks (unlabeled adaptation data).
        label_encoding: override the source's mask encoding (see
            :func:`~vocalign_hf.data.normalize.normalize_segmentation_dataset`).
        data_files: override the parquet files of a builder-based source (e.g. another ADE20K-150 mirror), or
            passed to ``load_dataset`` for a repo id.
        streaming: return an ``IterableDataset`` (labels converted lazily).
        num_proc: processes for the label conversion.
        **load_kwargs: forwarded to ``datasets.load_dataset`` (``revision``, ``cache_dir``, ``token`` ...).

    Returns:
        ``datasets.Dataset`` (or ``IterableDataset`` when ``streaming``) with ``image`` and ``label`` columns.

    Raises:
        DatasetNotOnHubError: for PASCAL-Context-59 (with instructions to build it locally).
    """
    src = _known_source(name_or_repo)
    if src is not None and src.unavailable:
        raise DatasetNotOnHubError(src.unavailable)

    if src is not None:
        info: Optional[DatasetInfo] = get_dataset_info(src.dataset)
        split = src.split_aliases.get(split, split)
        kwargs: dict[str, Any] = dict(load_kwargs)
        if src.name is not None:
            kwargs.setdefault("name", src.name)
        if data_files is not None:
            kwargs["data_files"] = {split: data_files}
        elif src.data_files is not None:
            kwargs["data_files"] = {split: src.data_files.format(split=split)}
        ds = datasets.load_dataset(src.path, split=split, streaming=streaming, **kwargs)  # type: ignore[arg-type]
        img_col = image_column or src.image_column
        lbl_col = label_column or src.label_column
        encoding = label_encoding or src.label_encoding
    else:
        info = dataset_info if isinstance(dataset_info, DatasetInfo) or dataset_info is None else get_dataset_info(
            dataset_info
        )
        kwargs = dict(load_kwargs)
        if data_files is not None:
            kwargs["data_files"] = data_files
        ds = datasets.load_dataset(name_or_repo, split=split, streaming=streaming, **kwargs)  # type: ignore[arg-type]
        img_col, lbl_col = image_column, label_column
        encoding = label_encoding or "auto"

    return normalize_segmentation_dataset(
        ds,  # type: ignore[arg-type]
        info,
        image_column=img_col,
        label_column=lbl_col if with_labels else None,
        with_labels=with_labels,
        label_encoding=encoding,
        num_proc=num_proc,
    )

"""Column and label normalisation shared by every loader (Hub, Cityscapes folders, plain folders).

Every dataset this library returns has the same schema:

* ``image``: a ``datasets.Image()`` column;
* ``label`` (optional, absent for unlabeled adaptation data): a ``datasets.Image()`` column of single-channel masks
  holding **training ids** (``0..num_classes-1``) and ``ignore_index`` (255) for pixels to skip.

:func:`normalize_segmentation_dataset` renames the source columns to this schema, drops the others and converts
raw masks to training ids with the dataset's :class:`~vocalign_hf.data.dataset_info.DatasetInfo` (Cityscapes
labelId -> trainId table, ADE20K / PASCAL-Context "reduce labels"). The conversion is done once, eagerly, with
``Dataset.map`` (cached by ``datasets`` for Hub data; lazily per example for streaming ``IterableDataset``).
"""

from __future__ import annotations

import io
import logging
from typing import Any, Iterable, Literal, Optional, Sequence, Union

import datasets
import numpy as np

from ._image_utils import array_to_mask_image, load_pil, mask_to_array
from .dataset_info import DatasetInfo, get_dataset_info

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_COLUMN_CANDIDATES",
    "LABEL_COLUMN_CANDIDATES",
    "LabelEncoding",
    "detect_cityscapes_label_encoding",
    "normalize_segmentation_dataset",
]

#: Source column names recognised as the image column, in order of preference.
IMAGE_COLUMN_CANDIDATES: tuple[str, ...] = ("image", "img", "images", "pixel_values", "rgb")
#: Source column names recognised as the mask column, in order of preference (``Image`` or path-string columns).
LABEL_COLUMN_CANDIDATES: tuple[str, ...] = (
    "label",
    "semantic_segmentation",
    "annotation",
    "segmentation",
    "mask",
    "seg_map",
    "segmentation_mask",
    "gt",
    "labels",
)

#: How the masks of a source are encoded.
#: ``"auto"``: detect (Cityscapes) or assume raw (datasets with reduce labels);
#: ``"raw"`` / ``"label_ids"``: apply the dataset's conversion; ``"train_ids"``: masks already hold training ids.
LabelEncoding = Literal["auto", "raw", "label_ids", "train_ids"]

AnyDataset = Union[datasets.Dataset, datasets.IterableDataset]


def detect_cityscapes_label_encoding(masks: Iterable[Any]) -> Literal["label_ids", "train_ids"]:
    """Tell Cityscapes ``labelIds`` masks from ``trainIds`` masks.

    Heuristic: train ids only take the values ``0..18`` and ``255``; label ids take ``0..33`` and almost every
    Cityscapes image contains at least one id in ``19..33`` (traffic light/sign, vegetation, terrain, sky, person,
    rider, car, truck, bus, train, motorcycle, bicycle). So if **any** probed mask holds a value in ``19..33`` the
    source is ``"label_ids"``, otherwise ``"train_ids"``. The decision is taken once for the whole dataset (from the
    first few masks), never per image, so a labelIds mask that happens to contain only ids <= 18 is still mapped.
    Values in ``34..254`` fit neither encoding: they are logged and end up as ignore (255) either way.

    Args:
        masks: decoded masks (PIL images, arrays, or ``datasets.Image`` raw dicts).
    """
    seen_any = False
    for m in masks:
        arr = mask_to_array(m)
        seen_any = True
        vals = np.unique(arr)
        odd = vals[(vals > 33) & (vals != 255)]
        if odd.size:
            logger.warning("Cityscapes mask holds values %s that are neither label ids nor train ids", odd[:10])
        if np.any((vals >= 19) & (vals <= 33)):
            return "label_ids"
    if not seen_any:
        raise ValueError("cannot detect the Cityscapes label encoding from an empty dataset")
    return "train_ids"


def _features(ds: AnyDataset) -> Optional[datasets.Features]:
    return ds.features if getattr(ds, "features", None) is not None else None


def _column_names(ds: AnyDataset) -> list[str]:
    names = getattr(ds, "column_names", None)
    if names is None:
        feats = _features(ds)
        if feats is None:
            raise ValueError(
                "cannot read the column names of this streaming dataset; pass image_column / label_column "
                "explicitly or call `.resolve_features()` first"
            )
        names = list(feats)
    return list(names)


def _is_image_feature(feat: Any) -> bool:
    return isinstance(feat, datasets.Image)


def _acceptable_source(feat: Any) -> bool:
    # Image columns, or string columns holding file paths (cast to Image below). An int "label" column of a
    # classification dataset is not a mask.
    return feat is None or _is_image_feature(feat) or (
        isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string")
    )


def _pick_column(
    names: Sequence[str], feats: Optional[datasets.Features], candidates: Sequence[str], exclude: Sequence[str] = ()
) -> Optional[str]:
    for cand in candidates:
        if cand in names and cand not in exclude:
            if _acceptable_source(feats.get(cand) if feats is not None else None):
                return cand
    return None


def _resolve_info(dataset_info: Union[str, DatasetInfo, None]) -> Optional[DatasetInfo]:
    if dataset_info is None or isinstance(dataset_info, DatasetInfo):
        return dataset_info
    return get_dataset_info(dataset_info)


def _probe_masks(ds: AnyDataset, column: str, n: int) -> list[Any]:
    if isinstance(ds, datasets.Dataset):
        n = min(n, len(ds))
        if n == 0:
            return []
        raw = ds.cast_column(column, datasets.Image(decode=False)) if _is_image_feature(_features(ds)[column]) else ds
        return list(raw.select(range(n))[column])
    return [ex[column] for ex in ds.take(n)]


def _encode_mask(arr: np.ndarray) -> dict[str, Any]:
    buf = io.BytesIO()
    array_to_mask_image(arr).save(buf, format="PNG", compress_level=1)
    return {"bytes": buf.getvalue(), "path": None}


def _make_converter(info: DatasetInfo, column: str, encode: bool = True):
    def convert(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: list[Any] = []
        for value in batch[column]:
            if value is None:
                out.append(None)
                continue
            arr = info.convert_label(mask_to_array(load_pil(value) if not isinstance(value, np.ndarray) else value))
            out.append(_encode_mask(arr) if encode else array_to_mask_image(arr))
        return {column: out}

    return convert


def _check_named_columns_exist(
    names: Sequence[str], image_column: Optional[str], label_column: Optional[str], keep_columns: Sequence[str]
) -> None:
    """Raise if a column the caller named explicitly is not in the dataset."""
    for given, what in ((image_column, "image_column"), (label_column, "label_column")):
        if given is not None and given not in names:
            raise ValueError(f"{what}={given!r} is not a column of this dataset (columns: {names})")
    missing_keep = [c for c in keep_columns if c not in names]
    if missing_keep:
        raise ValueError(f"keep_columns {missing_keep} are not columns of this dataset (columns: {names})")


def _keep_and_rename_columns(
    ds: AnyDataset, names: Sequence[str], img_col: str, lbl_col: Optional[str], keep_columns: Sequence[str]
) -> AnyDataset:
    """Drop every column but the image, mask and `keep_columns` ones; rename image/mask to ``image`` / ``label``."""
    keep = [img_col] + ([lbl_col] if lbl_col else []) + [c for c in keep_columns if c not in (img_col, lbl_col)]
    drop = [c for c in names if c not in keep]
    if drop:
        ds = ds.remove_columns(drop)
    rename = {}
    if img_col != "image":
        rename[img_col] = "image"
    if lbl_col and lbl_col != "label":
        rename[lbl_col] = "label"
    if rename:
        if any(new in keep and new not in rename for new in rename.values()):
            raise ValueError(f"cannot rename {rename}: a kept column already uses one of the target names")
        ds = ds.rename_columns(rename)
    return ds


def _masks_need_conversion(ds: AnyDataset, info: DatasetInfo, label_encoding: LabelEncoding, probe_size: int) -> bool:
    """Whether the ``label`` masks must go through `info`'s conversion to training ids."""
    if not info.needs_conversion:
        return False
    if label_encoding != "auto":
        return label_encoding in ("raw", "label_ids")
    if info.label_mapping is None:
        return True
    encoding = detect_cityscapes_label_encoding(_probe_masks(ds, "label", probe_size))
    logger.info("%s masks detected as %s", info.name, encoding)
    return encoding == "label_ids"


def _convert_masks_to_train_ids(ds: AnyDataset, info: DatasetInfo, num_proc: Optional[int]) -> AnyDataset:
    """Map the ``label`` masks through `info`'s conversion."""
    # Read masks undecoded, convert, write back PNG bytes: the image column is never decoded here.
    raw = ds.cast_column("label", datasets.Image(decode=False))
    out_features = raw.features.copy() if raw.features is not None else None
    if isinstance(raw, datasets.Dataset):
        raw = raw.map(
            _make_converter(info, "label"),
            batched=True,
            batch_size=64,
            features=out_features,
            num_proc=num_proc,
            desc=f"Converting {info.name} masks to train ids",
        )
        return raw.cast_column("label", datasets.Image())
    # streaming: converted lazily, batch by batch, returned as decoded PIL masks
    if out_features is not None:
        out_features["label"] = datasets.Image()
    return raw.map(_make_converter(info, "label", encode=False), batched=True, batch_size=64, features=out_features)

def normalize_segmentation_dataset(
    ds: AnyDataset,
    dataset_info: Union[str, DatasetInfo, None] = None,
    *,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    with_labels: bool = True,
    label_encoding: LabelEncoding = "auto",
    keep_columns: Sequence[str] = (),
    probe_size: int = 16,
    num_proc: Optional[int] = None,
) -> AnyDataset:
    """Rename a segmentation dataset's columns to ``image`` / ``label`` and convert its masks to training ids.

    Args:
        ds: a ``datasets.Dataset`` or ``datasets.IterableDataset``.
        dataset_info: the dataset's :class:`DatasetInfo` (or its name). ``None``: masks are kept as they are.
        image_column: source image column; auto-detected from :data:`IMAGE_COLUMN_CANDIDATES` when ``None``.
        label_column: source mask column; auto-detected from :data:`LABEL_COLUMN_CANDIDATES` when ``None``
            (``Image`` or file-path string columns only, so an integer classification ``label`` is skipped). If none
            is found the result is unlabeled (``image`` only).
        with_labels: ``False`` drops the mask column (unlabeled adaptation data).
        label_encoding: ``"auto"`` detects Cityscapes labelIds vs trainIds (:func:`detect_cityscapes_label_encoding`
            on the first ``probe_size`` masks) and applies ``reduce_labels`` for datasets that declare it;
            ``"raw"`` / ``"label_ids"`` always apply the dataset's conversion; ``"train_ids"`` never does.
        keep_columns: other source columns to keep (e.g. a file name), unchanged.
        probe_size: number of masks inspected by the ``"auto"`` Cityscapes heuristic.
        num_proc: processes for the conversion ``map``.

    Returns:
        A dataset of the same kind with columns ``image`` (+ ``label``) (+ ``keep_columns``).

    Raises:
        ValueError: no image column, an explicitly named column that does not exist, or a bad ``label_encoding``.
    """
    if label_encoding not in ("auto", "raw", "label_ids", "train_ids"):
        raise ValueError(f"label_encoding must be 'auto', 'raw', 'label_ids' or 'train_ids', got {label_encoding!r}")
    info = _resolve_info(dataset_info)
    names = _column_names(ds)
    feats = _features(ds)
    _check_named_columns_exist(names, image_column, label_column, keep_columns)

    img_col = image_column or _pick_column(names, feats, IMAGE_COLUMN_CANDIDATES)
    if img_col is None:
        raise ValueError(
            f"no image column found among {names}; pass image_column=... (looked for {list(IMAGE_COLUMN_CANDIDATES)})"
        )
    lbl_col = label_column or _pick_column(names, feats, LABEL_COLUMN_CANDIDATES, exclude=(img_col,))
    if not with_labels:
        lbl_col = None
    ds = _keep_and_rename_columns(ds, names, img_col, lbl_col, keep_columns)

    feats = _features(ds)
    if feats is not None and not _is_image_feature(feats["image"]):
        ds = ds.cast_column("image", datasets.Image())
    if lbl_col is None:
        return ds
    if feats is not None and not _is_image_feature(feats["label"]):
        ds = ds.cast_column("label", datasets.Image())

    if info is None or not _masks_need_conversion(ds, info, label_encoding, probe_size):
        return ds
    return _convert_masks_to_train_ids(ds, info, num_proc)


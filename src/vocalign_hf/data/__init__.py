"""Target-domain data for VocAlign: loaders (Hub, Cityscapes folders, plain folders), label metadata, augmentations.

Every loader returns a ``datasets.Dataset`` with an ``image`` column and, when masks exist, a ``label`` column
(``datasets.Image``) of training ids with ``255`` = ignore. Attach :func:`make_train_transform` /
:func:`make_eval_transform` with ``dataset.with_transform(...)`` to get ``pixel_values`` (float ``[0, 1]``,
``(3, H, W)``) and ``labels`` (``int64``, ``(H, W)``), and batch them with :func:`collate_fn`.
"""

from . import dataset_info, transforms
from .cityscapes import load_cityscapes
from .dataset_info import (
    ADE20K_150_CLASSES,
    ADE20K_150_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABEL_ID_TO_TRAIN_ID,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    PASCAL_CONTEXT_59_CLASSES,
    PASCAL_CONTEXT_59_PALETTE,
    DatasetInfo,
    get_dataset_info,
    known_dataset_names,
    make_palette,
    map_label_ids,
    reduce_labels,
)
from .folder import IMAGE_EXTENSIONS, list_images, load_class_names, load_image_folder
from .hub import HUB_SOURCES, DatasetNotOnHubError, HubSource, load_hub_dataset
from .normalize import detect_cityscapes_label_encoding, normalize_segmentation_dataset
from .transforms import (
    ColorJitter,
    PhotoMetricDistortion,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    collate_fn,
    color_jitter,
    hsv_to_rgb,
    make_eval_transform,
    make_train_transform,
    photometric_distortion,
    rgb_to_hsv,
    to_label_tensor,
    to_pixel_values,
    train_transform_preset,
)

__all__ = [
    *dataset_info.__all__,  # metadata
    # loaders
    "load_cityscapes",
    "IMAGE_EXTENSIONS",
    "list_images",
    "load_class_names",
    "load_image_folder",
    "HUB_SOURCES",
    "HubSource",
    "DatasetNotOnHubError",
    "load_hub_dataset",
    "normalize_segmentation_dataset",
    "detect_cityscapes_label_encoding",
    *transforms.__all__,
]

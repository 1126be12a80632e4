# Copyright 2025 The vocalign-hf authors. Licensed under the Apache License, Version 2.0.
# Semantics follow the Hugging Face Hub `evaluate` "mean_iou" metric (Apache-2.0), itself from MMSegmentation.
#
# NOTE: `evaluate` scans this file's import lines to check dependencies: keep exactly one `import x` per line.
"""Mean IoU (Intersection-over-Union) metric, offline drop-in for the Hub `mean_iou` evaluate metric."""

from typing import Dict, Optional

import datasets
import evaluate
import numpy as np

from vocalign_hf.metrics.streaming_miou import StreamingMeanIoU
from vocalign_hf.metrics.streaming_miou import remap_labels


_DESCRIPTION = """
IoU is the area of overlap between the predicted segmentation and the ground truth divided by the area of union
between the predicted segmentation and the ground truth. For multi-class segmentation the mean IoU is the mean of the
per-class IoUs over the classes that occur in the prediction or the ground truth (classes absent from both are NaN
and left out of the mean). Counts are accumulated over all images before dividing (dataset-level IoU).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`):
        List of predicted segmentation maps, each of shape (height, width). Sizes may differ between images.
    references (`List[ndarray]`):
        List of ground truth segmentation maps, each of the same shape as the matching prediction.
    num_labels (`int`):
        Number of classes (categories).
    ignore_index (`int`):
        Reference value whose pixels are ignored during evaluation.
    nan_to_num (`int`, *optional*):
        If specified, NaN values will be replaced by the number defined by the user.
    label_map (`dict`, *optional*):
        If specified, dictionary mapping old reference label ids to new ones. All mappings use the original labels.
    reduce_labels (`bool`, *optional*, defaults to `False`):
        Whether to reduce all reference label values by 1 and map background 0 to 255 (e.g. ADE20k).

Returns:
    `Dict[str, float | ndarray]` with
    - *mean_iou* (`float`): IoU averaged over classes (NaN classes excluded).
    - *mean_accuracy* (`float`): per-class accuracy averaged over classes (NaN classes excluded).
    - *overall_accuracy* (`float`): pixel accuracy over all non-ignored pixels.
    - *per_category_iou* (`ndarray` of shape `(num_labels,)`).
    - *per_category_accuracy* (`ndarray` of shape `(num_labels,)`).

Unlike the Hub metric, label values outside [0, num_labels) (other than ignore_index in the references)
raise a ValueError instead of being silently dropped.

Examples:

    >>> from vocalign_hf.metrics import load_mean_iou
    >>> mean_iou = load_mean_iou()
    >>> results = mean_iou.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [0, 255]]],
    ...                            num_labels=2, ignore_index=255)
    >>> round(results["mean_iou"], 4)
    0.5
"""

_CITATION = """\
@software{MMSegmentation_Contributors_OpenMMLab_Semantic_Segmentation_2020,
author = {{MMSegmentation Contributors}},
license = {Apache-2.0},
month = {7},
title = {{OpenMMLab Semantic Segmentation Toolbox and Benchmark}},
url = {https://github.com/open-mmlab/mmsegmentation},
year = {2020}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    """Dataset-level mean IoU backed by :class:`vocalign_hf.metrics.StreamingMeanIoU`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
            reference_urls=[
                "https://github.com/open-mmlab/mmsegmentation/blob/71c201b1813267d78764f306a297ca717827c4bf/mmseg/core/evaluation/metrics.py"
            ],
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int,
        nan_to_num: Optional[int] = None,
        label_map: Optional[Dict[int, int]] = None,
        reduce_labels: bool = False,
    ):
        if len(predictions) != len(references):
            raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
        acc = StreamingMeanIoU(num_classes=num_labels, ignore_index=ignore_index)
        for pred, ref in zip(predictions, references):
            ref = remap_labels(ref, label_map=label_map, reduce_labels=reduce_labels)
            acc.update(np.asarray(pred, dtype=np.int64), ref)
        return acc.compute(nan_to_num=nan_to_num)

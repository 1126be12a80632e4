"""Streaming mean IoU as a `compute_metrics` of transformers' `Trainer` with `batch_eval_metrics=True`."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from .streaming_miou import StreamingMeanIoU

__all__ = ["BatchMeanIoU"]


class BatchMeanIoU:
    """`compute_metrics` for a Trainer whose `prediction_step` returns predicted class ids and labels.

    Each call adds one batch, as the Trainer's loop gathered it from all processes, to a confusion matrix; the call
    with `compute_result=True` (the last batch) returns `mean_iou` and `iou_<class>` in percent (NaN for a class
    absent from both prediction and reference, left out of the mean), leaves the per-class table in `table` and
    starts afresh. Without `batch_eval_metrics` the Trainer calls it once with every batch: the same numbers.

    `pad_index`: what the loop pads a process's predictions and labels with to gather maps of other sizes
    (`pad_across_processes`, -100); those positions are not pixels and are ignored.
    """

    def __init__(self, class_names: Sequence[str], ignore_index: int = 255, pad_index: int = -100) -> None:
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.pad_index = pad_index
        self.table: Optional[str] = None
        self.reset()

    def reset(self) -> None:
        """Drop the counts of a running evaluation (one that stopped before its last batch, say)."""
        self.metric = StreamingMeanIoU(len(self.class_names), ignore_index=self.ignore_index)

    def __call__(self, eval_pred: Any, compute_result: bool = True) -> dict[str, float]:
        references = torch.as_tensor(eval_pred.label_ids)
        references = references.masked_fill(references == self.pad_index, self.ignore_index)
        self.metric.update(torch.as_tensor(eval_pred.predictions), references)
        if not compute_result:
            return {}
        return self._result()

    def _result(self) -> dict[str, float]:
        """The metrics of the counts so far; the table is kept, the counts are reset."""
        results = self.metric.compute()
        metrics = {"mean_iou": 100 * results["mean_iou"]}
        for name, iou in zip(self.class_names, results["per_category_iou"]):
            metrics[f"iou_{name}"] = float("nan") if math.isnan(iou) else 100 * float(iou)
        self.table = self.metric.format_table(self.class_names, results)
        self.reset()
        return metrics

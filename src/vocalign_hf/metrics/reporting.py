"""Metrics for reports (results files, model cards, printed summaries): a NaN is no number to report."""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["split_absent_metrics"]


def split_absent_metrics(metrics: Mapping[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    """Separate finite metrics from those without a value (NaN), with the reason each is absent.

    A mean IoU is absent when no pixel of the evaluation split is labelled (every mask pixel is the ignore value);
    a class's IoU when the class occurs neither in the masks nor in the predictions.
    """
    finite: dict[str, float] = {}
    absent: dict[str, str] = {}
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or math.isfinite(value):
            finite[key] = value
        elif key.endswith("mean_iou") or key.endswith("_miou"):
            absent[key] = "no labelled pixel in the evaluation split (every mask pixel is the ignore value 255)"
        elif "_iou_" in key:
            absent[key] = f"class {key.split('_iou_', 1)[1]!r} is in neither the masks nor the predictions"
        else:
            absent[key] = "no value (NaN)"
    return finite, absent

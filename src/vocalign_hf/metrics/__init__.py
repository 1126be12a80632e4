"""Evaluation metrics: streaming mean IoU and an offline `evaluate` mean_iou module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .batch_eval import BatchMeanIoU
from .reporting import split_absent_metrics
from .streaming_miou import (
    StreamingMeanIoU,
    confusion_matrix,
    metrics_from_confusion_matrix,
    predicted_classes,
    remap_labels,
)

__all__ = [
    "BatchMeanIoU",
    "MEAN_IOU_MODULE_DIR",
    "StreamingMeanIoU",
    "confusion_matrix",
    "load_mean_iou",
    "metrics_from_confusion_matrix",
    "predicted_classes",
    "remap_labels",
    "split_absent_metrics",
]

#: Folder holding the `evaluate` metric script ``mean_iou.py`` shipped with the package.
MEAN_IOU_MODULE_DIR: Path = Path(__file__).resolve().parent / "mean_iou"


def load_mean_iou(**kwargs: Any) -> Any:
    """Load the packaged ``mean_iou`` metric with :func:`evaluate.load`, fully offline.

    Equivalent to ``evaluate.load("mean_iou")`` (same inputs and result keys) without contacting the Hub.
    ``kwargs`` are forwarded to :func:`evaluate.load` (e.g. ``cache_dir``, ``keep_in_memory``,
    ``num_process``, ``process_id``, ``experiment_id``).  Note that ``evaluate`` copies the script into
    ``$HF_MODULES_CACHE`` (default ``$HF_HOME/modules``), which must be writable.

    Returns:
        an ``evaluate.EvaluationModule`` (instance of ``MeanIoU``).
    """
    # Here, not at the top: `evaluate` (with `datasets`, `pandas`) adds seconds and ~2,900 modules to
    # `import vocalign_hf.metrics`, and only this Hub-compatible loader needs it.
    import evaluate

    script = MEAN_IOU_MODULE_DIR / "mean_iou.py"
    if not script.is_file():  # pragma: no cover - broken installation
        raise FileNotFoundError(f"packaged metric script not found: {script}")
    return evaluate.load(str(MEAN_IOU_MODULE_DIR), **kwargs)

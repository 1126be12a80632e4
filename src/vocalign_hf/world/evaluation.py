"""mIoU of a CAT-Seg model on a labeled world split, for any class vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..metrics import StreamingMeanIoU

__all__ = ["evaluate_segmenter"]


@torch.no_grad()
def evaluate_segmenter(
    model: Any,
    processor: Any,
    dataset: Any,
    class_names: Sequence[str],
    batch_size: int = 50,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Score a segmenter on a dataset with `image` and `label` columns.

    The vocabulary is encoded once (`text_embeds`); logits are upsampled bilinearly to the label size before the
    argmax; label 255 is ignored. Label id i must be the class `class_names[i]`: passing other names for the
    same ids (e.g. the source names of the target classes) measures what the wording alone costs.

    One way from logits and labels to mIoU: the adaptation trainer evaluates through transformers' Trainer loop
    (`VocAlignTrainer.prediction_step`, then `metrics.BatchMeanIoU`); this function turns scores into classes with
    the same `metrics.predicted_classes` (through `StreamingMeanIoU.update_from_scores`) and counts them in the same
    `StreamingMeanIoU` that `BatchMeanIoU` wraps, so equal logits give equal numbers (a test checks it). It keeps
    its own loop of a few lines because it scores models that no Trainer holds: the source model on its source
    domain while `pretrain_source_model` trains it, and the benchmarks' models, with any vocabulary and without an
    adapter, TrainingArguments or output folder. It also returns fractions, accuracies and the confusion matrix,
    where the Trainer logs percentages.

    Args:
        model: a `CATSegForSemanticSegmentation` (its train/eval mode is restored afterwards).
        processor: the matching `CATSegProcessor`.
        dataset: a `datasets.Dataset` (or anything sliceable to `{"image": [...], "label": [...]}`).
        class_names: one name per label id.
        batch_size: images per forward pass.
        device: where to run (default: the model's device).
    Returns:
        `{"mean_iou", "mean_accuracy", "overall_accuracy"}` (floats, 0..1), `"per_category_iou"` (dict name ->
        IoU, NaN for classes absent from both prediction and reference), `"confusion_matrix"` (list of lists, rows
        = reference) and `"table"` (a printable per-class table).
    """
    names = list(class_names)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        text = model.get_text_embeddings(processor(text=names)["input_ids"].to(device))
        metric = StreamingMeanIoU(len(names), ignore_index=255)
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            images = [image.convert("RGB") for image in rows["image"]]
            labels = torch.from_numpy(np.stack([np.asarray(label) for label in rows["label"]]).astype(np.int64))
            pixel_values = processor(images=images)["pixel_values"].to(device)
            metric.update_from_scores(model(pixel_values=pixel_values, text_embeds=text).logits.cpu(), labels)
    finally:
        model.train(was_training)
    result = metric.compute()
    return {
        "mean_iou": result["mean_iou"],
        "mean_accuracy": result["mean_accuracy"],
        "overall_accuracy": result["overall_accuracy"],
        "per_category_iou": {name: float(v) for name, v in zip(names, result["per_category_iou"])},
        "confusion_matrix": metric.confusion_matrix.tolist(),
        "table": metric.format_table(names, results=result),
    }

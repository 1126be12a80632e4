"""Streaming mean Intersection-over-Union (mIoU) for semantic segmentation.

The metric accumulates a ``num_classes x num_classes`` confusion matrix (rows: reference class, columns:
predicted class) batch by batch, so that arbitrarily large evaluation sets can be scored without keeping
predictions in memory.  The final numbers follow the semantics of the Hugging Face Hub ``evaluate``
``mean_iou`` metric (itself taken from MMSegmentation):

* pixels whose *reference* equals ``ignore_index`` are excluded entirely (whatever was predicted there);
* ``IoU_c = intersect_c / union_c`` with ``union_c = |pred == c| + |ref == c| - intersect_c``; a class whose
  union is 0 (absent from both prediction and reference) gets ``NaN``;
* ``acc_c = intersect_c / |ref == c|``; a class absent from the reference gets ``NaN``;
* ``mean_iou`` / ``mean_accuracy`` are ``nanmean`` over classes, i.e. classes with ``NaN`` are left out;
* ``overall_accuracy = sum_c intersect_c / sum_c |ref == c|``.

One deliberate difference: the Hub metric silently drops label values outside ``[0, num_labels)``; here such
values (in the prediction at a non-ignored pixel, or in the reference other than ``ignore_index``) raise a
:class:`ValueError` naming the bad value, because they almost always indicate a bug (wrong ``num_classes``,
forgotten label reduction, logits instead of class indices, ...).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

__all__ = [
    "ArrayLike",
    "StreamingMeanIoU",
    "confusion_matrix",
    "metrics_from_confusion_matrix",
    "predicted_classes",
    "remap_labels",
]

#: Anything that can be turned into an integer label array: a tensor, a numpy array or nested lists.
ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[Any]]


def _as_label_tensor(x: ArrayLike, name: str, device: Optional[torch.device] = None) -> torch.Tensor:
    """Convert ``x`` to an ``int64`` tensor of class indices (on ``device`` if given, else where it lives)."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.asarray(x)
        if arr.dtype == object:
            raise TypeError(f"{name} could not be converted to a regular integer array (ragged input?)")
        if arr.dtype.kind not in "biu":
            raise TypeError(
                f"{name} must hold integer class indices, got numpy dtype {arr.dtype} "
                "(pass argmax-ed class ids, not logits/probabilities)"
            )
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
    if t.is_floating_point() or t.is_complex():
        raise TypeError(
            f"{name} must hold integer class indices, got torch dtype {t.dtype} "
            "(pass argmax-ed class ids, not logits/probabilities)"
        )
    if device is not None:
        t = t.to(device)
    return t.long()


def confusion_matrix(
    predictions: ArrayLike,
    references: ArrayLike,
    num_classes: int,
    ignore_index: Optional[int] = 255,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Confusion matrix of one batch, fully vectorised with :func:`torch.bincount`.

    Args:
        predictions: predicted class ids, any shape.
        references: reference class ids, same shape as ``predictions``.
        num_classes: number of classes ``C``.
        ignore_index: reference value whose pixels are excluded (``None``: exclude nothing).
        device: where to compute; defaults to the device of ``predictions`` (CPU for numpy input).

    Returns:
        ``int64`` tensor of shape ``(C, C)``; entry ``[t, p]`` counts pixels with reference ``t`` predicted as ``p``.

    Raises:
        ValueError: shapes differ, or a prediction (at a non-ignored pixel) / reference (other than
            ``ignore_index``) lies outside ``[0, num_classes)``.
        TypeError: non-integer input (e.g. logits).
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    pred = _as_label_tensor(predictions, "predictions", torch.device(device) if device is not None else None)
    ref = _as_label_tensor(references, "references", pred.device)
    if pred.shape != ref.shape:
        raise ValueError(
            f"predictions and references must have the same shape, got {tuple(pred.shape)} and {tuple(ref.shape)}"
        )
    pred = pred.reshape(-1)
    ref = ref.reshape(-1)
    if ignore_index is not None:
        keep = ref != ignore_index
        pred = pred[keep]
        ref = ref[keep]
    for values, name in ((ref, "reference"), (pred, "prediction")):
        bad = values[(values < 0) | (values >= num_classes)]
        if bad.numel() > 0:
            if name == "reference":
                where = ""
                allowed = f"a class id in [0, {num_classes - 1}]"
                if ignore_index is not None:
                    allowed += f" or ignore_index={ignore_index}"
            else:
                where = " at a non-ignored pixel" if ignore_index is not None else ""
                allowed = f"a class id in [0, {num_classes - 1}]"
            uniq = torch.unique(bad)[:10].tolist()
            raise ValueError(
                f"{name} value {int(bad[0].item())} is out of range{where}: expected {allowed} "
                f"(num_classes={num_classes}); {bad.numel()} such pixel(s), values {uniq}"
            )
    counts = torch.bincount(num_classes * ref + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def predicted_classes(scores: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The class of each pixel (B, H, W) from class scores (B, C, h, w), resized bilinearly to ``size`` first if
    they are of another size."""
    if tuple(scores.shape[-2:]) != tuple(size):
        scores = torch.nn.functional.interpolate(scores.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return scores.argmax(dim=1)


def metrics_from_confusion_matrix(
    confmat: Union[torch.Tensor, np.ndarray], nan_to_num: Optional[float] = None
) -> Dict[str, Any]:
    """mIoU-style metrics from a ``(C, C)`` confusion matrix (rows: reference, columns: prediction).

    Args:
        confmat: the confusion matrix.
        nan_to_num: if given, every ``NaN`` in the result (scalars and arrays) is replaced by this value.

    Returns:
        dict with ``mean_iou``, ``mean_accuracy``, ``overall_accuracy`` (floats) and ``per_category_iou``,
        ``per_category_accuracy`` (``float64`` numpy arrays of shape ``(C,)``), as in the Hub ``mean_iou``.
    """
    if isinstance(confmat, torch.Tensor):
        cm = confmat.detach().to("cpu", torch.float64).numpy()
    else:
        cm = np.asarray(confmat, dtype=np.float64)
    intersect = np.diag(cm)
    area_label = cm.sum(axis=1)
    area_pred = cm.sum(axis=0)
    union = area_pred + area_label - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union
        acc = intersect / area_label
        total = area_label.sum()
        overall = float(intersect.sum() / total) if total > 0 else math.nan
    mean_iou = float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else math.nan
    mean_acc = float(np.nanmean(acc)) if np.any(~np.isnan(acc)) else math.nan
    out: Dict[str, Any] = {
        "mean_iou": mean_iou,
        "mean_accuracy": mean_acc,
        "overall_accuracy": overall,
        "per_category_iou": iou,
        "per_category_accuracy": acc,
    }
    if nan_to_num is not None:
        out = {
            k: (np.nan_to_num(v, nan=nan_to_num) if isinstance(v, np.ndarray) else (nan_to_num if math.isnan(v) else v))
            for k, v in out.items()
        }
    return out


def remap_labels(
    labels: ArrayLike, label_map: Optional[Mapping[int, int]] = None, reduce_labels: bool = False
) -> np.ndarray:
    """Apply the Hub ``mean_iou`` reference preprocessing (``label_map`` then ``reduce_labels``).

    ``label_map`` maps old ids to new ids, every lookup using the *original* labels.  ``reduce_labels``
    shifts all labels down by one and sends 0 (background) to 255, as for ADE20k.  Returns a new ``int64`` array.
    """
    label = np.array(labels, dtype=np.int64)  # always a copy
    if label_map is not None:
        original = label.copy()
        for old_id, new_id in label_map.items():
            label[original == int(old_id)] = int(new_id)
    if reduce_labels:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    return label


class StreamingMeanIoU:
    """Accumulates a confusion matrix over batches and reports mean IoU.

    Example::

        metric = StreamingMeanIoU(num_classes=19)
        for batch in loader:
            metric.update(model(batch).argmax(1), batch["labels"])
        metric = metric.gather(accelerator)  # optional, multi-process
        print(metric.compute()["mean_iou"])
        print(metric.format_table(class_names))

    The confusion matrix is an ``int64`` tensor that lives on the device of the first predictions passed to
    :meth:`update` (or on ``device`` if given).  No label reduction / remapping is done here: pass references
    already in ``[0, num_classes)`` or equal to ``ignore_index`` (see :func:`remap_labels`).

    Args:
        num_classes: number of classes ``C``.
        ignore_index: reference value to exclude (default 255; ``None`` excludes nothing).
        device: optionally, where to allocate the confusion matrix right away.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: Optional[int] = 255,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        if int(num_classes) <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self._confmat: Optional[torch.Tensor] = None
        if device is not None:
            self._confmat = self._zeros(torch.device(device))

    def _zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """The accumulated ``(C, C)`` ``int64`` matrix, rows = reference, columns = prediction (zeros if empty)."""
        if self._confmat is None:
            return self._zeros(torch.device("cpu"))
        return self._confmat

    @property
    def device(self) -> torch.device:
        """Device of the confusion matrix (CPU until the first update)."""
        return self.confusion_matrix.device

    @torch.no_grad()
    def update(self, predictions: ArrayLike, references: ArrayLike) -> None:
        """Add a batch (any shape, identical for both) of predicted and reference class ids.

        Raises:
            ValueError: shapes differ or a value is out of range (see :func:`confusion_matrix`).
            TypeError: non-integer input.
        """
        pred = _as_label_tensor(predictions, "predictions")
        if self._confmat is None:
            self._confmat = self._zeros(pred.device)
        cm = confusion_matrix(pred, references, self.num_classes, self.ignore_index, device=self._confmat.device)
        self._confmat += cm

    def update_from_scores(self, scores: torch.Tensor, references: torch.Tensor) -> None:
        """Add a batch of class scores (B, C, h, w): resized bilinearly to the references' (B, H, W), then argmax."""
        self.update(predicted_classes(scores, references.shape[-2:]), references)

    def reset(self) -> None:
        """Zero the confusion matrix (its device is kept)."""
        if self._confmat is not None:
            self._confmat.zero_()

    def _check_compatible(self, other: "StreamingMeanIoU") -> None:
        if not isinstance(other, StreamingMeanIoU):
            raise TypeError(f"can only merge another StreamingMeanIoU, got {type(other).__name__}")
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                "cannot merge metrics with different settings: "
                f"(num_classes={self.num_classes}, ignore_index={self.ignore_index}) vs "
                f"(num_classes={other.num_classes}, ignore_index={other.ignore_index})"
            )

    def merge(self, other: "StreamingMeanIoU") -> "StreamingMeanIoU":
        """Add ``other``'s counts into this accumulator (in place) and return ``self``."""
        self._check_compatible(other)
        if other._confmat is None:
            return self
        if self._confmat is None:
            self._confmat = other._confmat.clone()
        else:
            self._confmat += other._confmat.to(self._confmat.device)
        return self

    def gather(self, accelerator: "Accelerator") -> "StreamingMeanIoU":
        """Sum the confusion matrices of all processes.

        Uses ``accelerator.reduce(matrix, reduction="sum")``, so it is a collective call: every process must
        call it (also those that saw no batch).  Works unchanged on a single process.  ``self`` is left
        untouched (calling twice does not double count); a new accumulator holding the global counts,
        on ``accelerator.device``, is returned.
        """
        local = self.confusion_matrix.to(accelerator.device)
        total = accelerator.reduce(local, reduction="sum")
        out = StreamingMeanIoU(self.num_classes, self.ignore_index)
        out._confmat = total.to(torch.int64)
        return out

    def compute(self, nan_to_num: Optional[float] = None) -> Dict[str, Any]:
        """Return ``mean_iou``, ``mean_accuracy``, ``overall_accuracy``, ``per_category_iou`` and
        ``per_category_accuracy`` (see :func:`metrics_from_confusion_matrix`)."""
        return metrics_from_confusion_matrix(self.confusion_matrix, nan_to_num=nan_to_num)

    def format_table(
        self,
        class_names: Optional[Sequence[str]] = None,
        results: Optional[Mapping[str, Any]] = None,
        digits: int = 2,
    ) -> str:
        """Readable per-class table (IoU and accuracy in percent, reference/predicted pixel counts).

        Args:
            class_names: one name per class (default: the class index).
            results: output of :meth:`compute` to display (default: computed now).
            digits: decimals of the percentages.

        Classes absent from both prediction and reference show ``-`` and are not part of the mean.
        """
        if class_names is None:
            class_names = [str(i) for i in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(f"got {len(class_names)} class names for {self.num_classes} classes")
        res = self.compute() if results is None else results
        cm = self.confusion_matrix.detach().cpu()
        gt_px = cm.sum(dim=1).tolist()
        pred_px = cm.sum(dim=0).tolist()

        def pct(v: float) -> str:
            return "-" if v is None or math.isnan(float(v)) else f"{100.0 * float(v):.{digits}f}"

        name_w = max([len("class")] + [len(str(n)) for n in class_names])
        idx_w = max(2, len(str(self.num_classes - 1)))
        num_w = max(8, digits + 5)
        px_w = max(10, len(str(max(gt_px + pred_px + [0]))))
        header = (
            f"{'id':>{idx_w}}  {'class':<{name_w}}  {'IoU':>{num_w}}  {'Acc':>{num_w}}  "
            f"{'ref px':>{px_w}}  {'pred px':>{px_w}}"
        )
        lines = [header, "-" * len(header)]
        for i, name in enumerate(class_names):
            lines.append(
                f"{i:>{idx_w}}  {str(name):<{name_w}}  {pct(res['per_category_iou'][i]):>{num_w}}  "
                f"{pct(res['per_category_accuracy'][i]):>{num_w}}  {gt_px[i]:>{px_w}}  {pred_px[i]:>{px_w}}"
            )
        lines.append("-" * len(header))
        lines.append(
            f"mIoU {pct(res['mean_iou'])}  mAcc {pct(res['mean_accuracy'])}  aAcc {pct(res['overall_accuracy'])}"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"device={self.device}, pixels={int(self.confusion_matrix.sum().item())})"
        )

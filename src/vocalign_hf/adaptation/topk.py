"""Top-K class selection for the student (VocAlign Sec. 3.4).

Paper: from the teacher's (concept-enhanced) class probabilities, compute the mean
activation per class and keep the K classes with the highest means; the others are pruned
from the student's cost volume.

Released code (``mmseg/models/segmentors/teacher_module.py``, l.131-152 guided / l.89-108
plain): ``topk`` of the spatial mean per image, indices **sorted ascending** (l.144), the
probabilities of the selected classes are ``gather``-ed (l.146-148), and the pseudo-label
and its confidence are the max / arg-max over the *gathered* K channels (l.152-156), so
every pixel gets a label in ``0..K-1`` (position in the sorted index list) even where the
full arg-max was a pruned class. :func:`topk_pseudo_labels` does exactly that. The student
then encodes only the selected classes' texts, per image
(``CAT-Seg/cat_seg/models/clip_ovseg.py`` l.382-413), i.e. text features ``(B, K, P, D)``, which
``CATSegForSemanticSegmentation`` gathers itself from ``class_indices``. (The released ``randomk`` option, extra
random classes, is not implemented here.)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .pseudo_labels import pseudo_labels_from_probs

__all__ = [
    "select_topk_classes",
    "gather_class_probs",
    "topk_pseudo_labels",
]


def _expand_index(indices: Tensor, like: Tensor) -> Tensor:
    """``(B, K)`` -> ``(B, K, *like.shape[2:])`` for ``gather``/``scatter`` on dim 1."""
    view = indices.view(indices.shape + (1,) * (like.dim() - 2))
    return view.expand(indices.shape + tuple(like.shape[2:]))


@torch.no_grad()
def select_topk_classes(class_probs: Tensor, k: Optional[int], mass: Optional[float] = None) -> Tensor:
    """Indices of the K classes with the highest spatial-mean probability, per image.

    Args:
        class_probs: ``(B, N_c, *spatial)`` teacher class probabilities.
        k: number of classes to keep; ``None`` or ``k >= N_c`` keeps all classes.
        mass: extension beyond the paper (``None``: off). K adapts to the teacher: each image needs the fewest
            top classes whose mean probabilities sum to ``mass``, and the batch keeps as many as its neediest
            image, at most ``k``. A confident teacher prunes hard; an unsure one keeps the classes it hesitates
            between instead of pruning a class that is present.

    Returns:
        ``LongTensor (B, K)``, each row sorted ascending (as the released code).
    """
    if class_probs.dim() < 3:
        raise ValueError(f"class_probs must be (B, N_c, *spatial), got {tuple(class_probs.shape)}")
    b, n = class_probs.shape[:2]
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if mass is not None and not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    means = class_probs.detach().flatten(2).mean(dim=2)
    if mass is not None:
        ranked = means.sort(dim=1, descending=True).values
        needed = int((ranked.cumsum(dim=1) < mass * ranked.sum(dim=1, keepdim=True)).sum(dim=1).max()) + 1
        k = min(needed, k if k is not None else n)
    if k is None or k >= n:
        return torch.arange(n, device=class_probs.device).expand(b, n).clone()
    top = torch.topk(means, k=k, dim=1, largest=True, sorted=False).indices
    return torch.sort(top, dim=1).values


def gather_class_probs(class_probs: Tensor, indices: Tensor) -> Tensor:
    """Select channels per image: ``(B, N_c, *spatial)``, ``(B, K)`` -> ``(B, K, *spatial)``."""
    if indices.dim() != 2 or indices.shape[0] != class_probs.shape[0]:
        raise ValueError(f"indices must be (B, K) with B={class_probs.shape[0]}, got {tuple(indices.shape)}")
    return torch.gather(class_probs, 1, _expand_index(indices.to(class_probs.device), class_probs))


def topk_pseudo_labels(
    class_probs: Tensor,
    k: Optional[int],
    threshold: Optional[float],
    per_image: bool = False,
    mass: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Top-K selection + pseudo-labels as in the released teacher (gather first, then max).

    Args:
        class_probs: ``(B, N_c, H, W)`` teacher class probabilities (after Eq. 7).
        k: classes kept per image (``None``/``>= N_c``: all).
        threshold: confidence threshold ``tau`` (``>=``), or ``None`` for weight 1.
        per_image: per-image weight ``(B,)`` instead of one batch scalar.
        mass: adaptive K (see :func:`select_topk_classes`), ``None`` for the paper's fixed K.

    Returns:
        ``indices (B, K)`` sorted; ``labels (B, H, W)`` in ``0..K-1`` (arg-max over the
        gathered K probabilities); ``weight`` computed from those gathered probabilities.
    """
    indices = select_topk_classes(class_probs, k, mass)
    gathered = gather_class_probs(class_probs.detach(), indices)
    labels, weight = pseudo_labels_from_probs(gathered, threshold, per_image=per_image)
    return indices, labels, weight

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
(``CAT-Seg/cat_seg/models/clip_ovseg.py`` l.382-413), i.e. text features ``(B, K, P, D)``:
:func:`gather_text_embeddings`. (The released ``randomk`` option, extra random classes,
is not implemented here.)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .pseudo_labels import pseudo_labels_from_probs

__all__ = [
    "select_topk_classes",
    "gather_class_probs",
    "gather_text_embeddings",
    "remap_to_selected",
    "scatter_to_full",
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


def gather_text_embeddings(text_embeds: Tensor, indices: Tensor) -> Tensor:
    """Per-image text embeddings of the selected classes.

    Args:
        text_embeds: ``(N_c, P, D)`` shared by the batch, or ``(B, N_c, P, D)`` per image
            (P = prompt templates, D = embedding size).
        indices: ``LongTensor (B, K)`` from :func:`select_topk_classes`.

    Returns:
        ``(B, K, P, D)``.
    """
    if indices.dim() != 2:
        raise ValueError(f"indices must be (B, K), got {tuple(indices.shape)}")
    indices = indices.to(text_embeds.device)
    if text_embeds.dim() == 3:
        return text_embeds[indices]
    if text_embeds.dim() == 4:
        if text_embeds.shape[0] != indices.shape[0]:
            raise ValueError(f"batch mismatch: text_embeds {text_embeds.shape[0]} vs indices {indices.shape[0]}")
        batch = torch.arange(indices.shape[0], device=indices.device).unsqueeze(1)
        return text_embeds[batch, indices]
    raise ValueError(f"text_embeds must be (N_c, P, D) or (B, N_c, P, D), got {tuple(text_embeds.shape)}")


def remap_to_selected(
    labels: Tensor,
    indices: Tensor,
    num_classes: Optional[int] = None,
    ignore_index: int = 255,
) -> Tensor:
    """Map full-vocabulary labels to positions among the selected classes.

    Args:
        labels: ``LongTensor (B, H, W)`` in ``0..N_c-1`` (``ignore_index`` allowed).
        indices: ``LongTensor (B, K)`` selected classes per image.
        num_classes: ``N_c``; inferred from the largest label / index if ``None``.
        ignore_index: value for ignored pixels and for pixels whose class was not selected.

    Returns:
        ``LongTensor (B, H, W)``: label ``c`` -> its position ``j`` in ``indices[b]``
        (``indices[b, j] == c``), or ``ignore_index`` if ``c`` is not selected.
    """
    if labels.dim() < 2 or indices.dim() != 2 or labels.shape[0] != indices.shape[0]:
        raise ValueError(f"labels (B, ...) and indices (B, K) expected, got {tuple(labels.shape)}, {tuple(indices.shape)}")
    b, k = indices.shape
    labels = labels.long()
    indices = indices.to(labels.device)
    valid = (labels >= 0) & (labels != ignore_index)
    if num_classes is None:
        num_classes = int(max(indices.max().item(), labels[valid].max().item() if valid.any() else -1)) + 1
    valid &= labels < num_classes
    lookup = torch.full((b, num_classes), ignore_index, dtype=torch.long, device=labels.device)
    lookup.scatter_(1, indices, torch.arange(k, device=labels.device).expand(b, k))
    safe = torch.where(valid, labels, torch.zeros_like(labels)).flatten(1)
    out = torch.gather(lookup, 1, safe).view_as(labels)
    return torch.where(valid, out, torch.full_like(out, ignore_index))


def scatter_to_full(
    logits: Tensor,
    indices: Tensor,
    num_classes: int,
    fill: float = -100.0,
) -> Tensor:
    """Place K selected-class logits back into an ``N_c``-channel tensor.

    ``(B, K, *spatial)`` -> ``(B, N_c, *spatial)``; pruned classes get ``fill`` (a large
    negative logit, so they never win an arg-max and get ~0 softmax probability).
    Differentiable w.r.t. ``logits``.
    """
    if indices.shape != logits.shape[:2]:
        raise ValueError(f"indices {tuple(indices.shape)} do not match logits {tuple(logits.shape[:2])}")
    full = logits.new_full((logits.shape[0], num_classes) + tuple(logits.shape[2:]), fill)
    return full.scatter(1, _expand_index(indices.to(logits.device), logits), logits)


@torch.no_grad()
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

"""Teacher pseudo-labels, confidence weight and the student's losses (VocAlign Eq. 3-4).

* Eq. 3: the pseudo-label is the arg-max class of the teacher's probabilities.
* Eq. 4: the confidence weight ``q`` is the share of pixels whose max probability passes
  the threshold ``tau``. The paper writes ``> tau``; the released code
  (``mmseg/models/segmentors/teacher_module.py``, l.110 and l.154) uses
  ``pseudo_prob.ge(tau)``, i.e. ``>= tau``. **We follow the code (``>=``).** The released
  code computes ONE scalar per batch (``sum(ps_large_p) / numel`` over B*H*W pixels) and
  broadcasts it to every pixel; ``per_image=True`` is an extension giving one weight per image.
* ``L_M = q * H(y_M, p_T)`` (end of Sec. 3.2): :func:`weighted_cross_entropy`, with the
  released loss settings (``CrossEntropyLoss(avg_non_ignore=True)``, bilinear resize of the
  logits to the label size with ``align_corners=False``, ``decode_head.py::loss_by_feat``):
  ``sum(w * ce) / #non-ignored pixels``.

Note on the released code: ``UDADecorator.loss`` (``mmseg/models/segmentors/uda_decorator.py``
l.212-224) passes ``seg_weight=masked_prob`` (the per-pixel max probability, a Tensor) rather
than the computed ``masked_seg_weight``, and ``BaseDecodeHead.loss_by_feat``
(``mmseg/models/decode_heads/decode_head.py`` l.329-337) only uses a weight given as a
``list``; with no pixel sampler configured the weight becomes ``None``. So the released
training loop effectively trains with ``q = 1``. To reproduce that, call with
``threshold=None``; to follow the paper, pass ``tau`` (0.968 in the configs).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pseudo_labels_from_probs", "weighted_cross_entropy", "entropy_loss"]


@torch.no_grad()
def pseudo_labels_from_probs(
    probs: Tensor,
    threshold: Optional[float],
    per_image: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Arg-max pseudo-labels (Eq. 3) and the confidence weight (Eq. 4, code semantics).

    Args:
        probs: teacher probabilities ``(B, C, H, W)`` (softmax already applied; after
            concept aggregation / Top-K gathering if used). Detached internally.
        threshold: ``tau``; a pixel is confident iff ``max_c probs >= tau``. ``None`` -> weight 1.
        per_image: if True return a ``(B,)`` weight (share of confident pixels per image)
            instead of the released code's single batch scalar.

    Returns:
        ``labels``: ``LongTensor (B, H, W)`` in ``0..C-1``;
        ``weight``: float tensor, shape ``()`` (or ``(B,)`` with ``per_image``), on ``probs.device``.
    """
    if probs.dim() < 2:
        raise ValueError(f"probs must be (B, C, ...), got shape {tuple(probs.shape)}")
    max_prob, labels = probs.detach().max(dim=1)
    wdtype = max_prob.dtype if max_prob.is_floating_point() else torch.float32
    if threshold is None:
        shape = (probs.shape[0],) if per_image else ()
        return labels, torch.ones(shape, dtype=wdtype, device=probs.device)
    confident = max_prob.ge(threshold).to(wdtype)
    weight = confident.flatten(1).mean(dim=1) if per_image else confident.mean()
    return labels, weight


def weighted_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    weight: Union[float, Tensor] = 1.0,
    ignore_index: int = 255,
) -> Tensor:
    """Confidence-weighted pixel cross-entropy ``q * H(y_M, p_T)``.

    Args:
        logits: student logits ``(B, K, h, w)``; bilinearly resized (``align_corners=False``)
            to the label size if needed.
        labels: ``LongTensor (B, H, W)`` in ``0..K-1`` or ``ignore_index``.
        weight: python float, scalar tensor, per-image ``(B,)`` tensor, or per-pixel
            ``(B, H, W)`` tensor.
        ignore_index: label value excluded from the loss and from the denominator.

    Returns:
        Scalar ``sum(weight * ce) / #non-ignored pixels`` (0 if every pixel is ignored).
    """
    if logits.dim() != 4 or labels.dim() != 3:
        raise ValueError(f"expected logits (B,K,h,w) and labels (B,H,W), got {tuple(logits.shape)}, {tuple(labels.shape)}")
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"batch mismatch: logits {logits.shape[0]} vs labels {labels.shape[0]}")
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits, labels.long(), reduction="none", ignore_index=ignore_index)
    w = torch.as_tensor(weight, dtype=ce.dtype, device=ce.device)
    if w.dim() == 1:
        if w.numel() != ce.shape[0]:
            raise ValueError(f"per-image weight has {w.numel()} entries for batch {ce.shape[0]}")
        w = w.view(-1, 1, 1)
    valid = (labels != ignore_index).sum().clamp_min(1)
    return (ce * w).sum() / valid


def entropy_loss(logits: Tensor, dim: int = 1) -> Tensor:
    """Mean per-pixel Shannon entropy of ``softmax(logits)`` (TENT-style Min-Entropy baseline).

    Same quantity as VocAlign's ``EntropyMinimizationTENT``
    (``mmseg/models/losses/entropy_minimization.py`` l.178-179):
    ``mean(-(softmax * log_softmax).sum(class_dim))``. Uniform logits over C classes give ``log C``.
    """
    log_p = torch.log_softmax(logits, dim=dim)
    return -(log_p.exp() * log_p).sum(dim=dim).mean()

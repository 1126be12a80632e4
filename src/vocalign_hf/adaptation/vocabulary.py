"""Vocabulary Alignment: class names expanded with concepts (VocAlign Sec. 3.3, Eq. 7).

The teacher scores ``n_tot`` text entries (class names plus concepts); a softmax is taken
over ALL ``n_tot`` entries and each class's probability is the sum of its entries'
probabilities (Eq. 7). This matches the released code
(``mmseg/models/segmentors/teacher_module.py::get_guided_pseudo_label_and_weight``,
l.124-127: ``softmax`` over all entries, then ``softmax_logits[:, conc_i].sum(dim=1)`` per
class via ``classes_to_concepts``); here the per-class loop is one ``index_add``.

``include_class_names=True`` (default) makes every class's own name one of its entries,
as the paper states ("the cost volume is expanded to n_tot classes, including the original
ones plus concepts"). The released configs instead read a separate concepts JSON
(``concepts_json``) mapped by ``classes_to_concepts``; that JSON is not in the repository,
so whether it repeats the class names cannot be checked there.
"""

from __future__ import annotations

import copy

from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..models.catseg.class_list import name_key, validate_class_names
from ..models.catseg.concept_phrases import ConceptOwners
from ..models.catseg.vocabulary_catseg import class_log_probs

__all__ = ["ConceptVocabulary"]


def _check_collision(concept: str, name: str, owners: ConceptOwners) -> None:
    """Raise when `concept` of class `name` would also score for another class (the one collision check)."""
    hit = owners.collision(concept, name)
    if hit is None:
        return
    if hit.exact and hit.is_name:
        raise ValueError(f"concept {concept!r} of class {name!r} equals the name of class {hit.other_class!r}")
    if hit.exact:
        raise ValueError(f"concept {concept!r} of class {name!r} is also an entry of class {hit.other_class!r}")
    raise ValueError(
        f"concept {concept!r} of class {name!r} is a form (plural, article, spacing) of the name "
        f"or an entry of class {hit.other_class!r}"
    )


def _class_entries(name: str, items: object, owners: ConceptOwners, include_class_names: bool) -> List[str]:
    """One class's entries: its name (when included), then its concepts, checked and de-duplicated."""
    if isinstance(items, str) or not isinstance(items, (list, tuple)):
        raise ValueError(f"concepts for class {name!r} must be a list of strings, got {type(items).__name__}")
    entries: List[str] = [name.strip()] if include_class_names else []
    keys = {name_key(name)} if include_class_names else set()
    for concept in items:
        if not isinstance(concept, str) or not concept.strip():
            raise ValueError(f"empty or non-string concept {concept!r} for class {name!r}")
        _check_collision(concept, name, owners)
        if name_key(concept) in keys:
            continue  # duplicate within the class: de-duplicate
        keys.add(name_key(concept))
        owners.claim(concept, name)
        entries.append(concept.strip())
    return entries


class ConceptVocabulary:
    """Class names plus per-class concepts, with the Eq. 7 aggregation.

    Attributes:
        class_names: the ``N_c`` target class names, in order.
        entries: all ``n_tot`` prompts, grouped by class in class order (class name first
            when ``include_class_names``, then its concepts in the given order).
        entry_to_class: ``LongTensor (n_tot,)`` mapping each entry to its class index.
        class_to_entries: ``{class index: [entry indices]}`` (the released ``classes_to_concepts``).
        entry_log_weights: ``None`` (Eq. 7), or ``(n_tot,)`` log-weights added to the entries' logits before the
            softmax (extension: the concept guard's teacher, see :meth:`with_log_weights`).

    Raises ``ValueError`` on: a class list that fails ``validate_class_names`` (empty, blank or
    duplicate names); concept keys that are not class names; empty/blank concepts or non-list concept
    values; a concept that collides with another class (``ConceptOwners``: equal, under the one name
    key, to another class's name or entry, or a form of one: plural, leading article, spacing or
    hyphens, ``"sidewalks"`` under ``"road"`` when ``"sidewalk"`` is a class), since its probability
    would be summed into the wrong class; a class left with no entry. Duplicate concepts within one
    class are dropped (first kept).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        concepts: Optional[Mapping[str, Sequence[str]]] = None,
        include_class_names: bool = True,
    ) -> None:
        class_names = list(class_names)
        concepts = dict(concepts or {})
        validate_class_names(class_names, source="class_names")  # the one validator; names are kept as given
        unknown = [k for k in concepts if k not in class_names]
        if unknown:
            raise ValueError(f"concept keys are not class names: {unknown}")
        owners = ConceptOwners(class_names)
        per_class = [_class_entries(name, concepts.get(name, []), owners, include_class_names) for name in class_names]
        empty = [class_names[i] for i, e in enumerate(per_class) if not e]
        if empty:
            raise ValueError(f"classes without any entry (give concepts or include_class_names=True): {empty}")

        self.class_names: List[str] = class_names
        self.include_class_names = include_class_names
        self.entries: List[str] = [e for group in per_class for e in group]
        self.entry_to_class: Tensor = torch.repeat_interleave(
            torch.arange(len(class_names)), torch.tensor([len(g) for g in per_class])
        )
        self.class_to_entries: Dict[int, List[int]] = {}
        start = 0
        for ci, group in enumerate(per_class):
            self.class_to_entries[ci] = list(range(start, start + len(group)))
            start += len(group)

    entry_log_weights: Optional[Tensor] = None

    def with_log_weights(self, log_weights: Mapping[str, Mapping[str, float]]) -> "ConceptVocabulary":
        """A copy whose :meth:`aggregate` adds ``log_weights[class][concept]`` to that concept's logit before the
        softmax: its probability is multiplied by ``exp(log_weight)`` against the other entries (extension: the
        concept guard, ``adaptation.concept_audit``). Raises ``ValueError`` for a concept not in this vocabulary."""
        weights = torch.zeros(self.num_entries)
        entry_of = {(self.class_names[c], self.entries[e]): e for c, group in self.class_to_entries.items() for e in group}
        for class_name, concepts in log_weights.items():
            for concept, value in concepts.items():
                if (class_name, concept) not in entry_of:
                    raise ValueError(f"no concept {concept!r} of class {class_name!r} in this vocabulary")
                weights[entry_of[class_name, concept]] = float(value)
        weighted = copy.copy(self)
        weighted.entry_log_weights = weights
        return weighted

    @classmethod
    def identity(cls, class_names: Sequence[str]) -> "ConceptVocabulary":
        """One entry per class (its name): aggregation reduces to a plain softmax."""
        return cls(class_names, concepts=None, include_class_names=True)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_entries(self) -> int:
        return len(self.entries)

    def __len__(self) -> int:
        return self.num_entries

    def __repr__(self) -> str:
        return f"ConceptVocabulary(num_classes={self.num_classes}, num_entries={self.num_entries})"

    def aggregate(self, scores: Tensor, from_logits: bool = True, reduce: str = "sum") -> Tensor:
        """Eq. 7: per-class probabilities from scores over all ``n_tot`` entries.

        Args:
            scores: ``(B, n_tot, *spatial)`` logits (``from_logits=True``: softmax over the
                ``n_tot`` entries is applied first) or probabilities over the entries.
            from_logits: whether ``scores`` are logits.
            reduce: ``"sum"`` (Eq. 7, paper and released code) or ``"max"`` (extension): a class takes its best
                entry's probability, renormalised over the classes, so a class with many entries does not win
                pixels only because the source model spreads its doubt over several of its words.

        Returns:
            ``(B, N_c, *spatial)``; class ``n`` = sum (or renormalised max) of its entries' probabilities.
            Differentiable w.r.t. ``scores``.
        """
        if scores.dim() < 2 or scores.shape[1] != self.num_entries:
            raise ValueError(
                f"expected scores with {self.num_entries} entries on dim 1, got shape {tuple(scores.shape)}"
            )
        if reduce not in ("sum", "max"):
            raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")
        if self.entry_log_weights is not None:
            if not from_logits:
                raise ValueError("a vocabulary with entry log-weights aggregates logits (from_logits=True)")
            shape = (1, -1) + (1,) * (scores.dim() - 2)
            scores = scores + self.entry_log_weights.to(scores.device, scores.dtype).view(shape)
        probs = torch.softmax(scores, dim=1) if from_logits else scores
        if reduce == "sum" and self.num_entries == self.num_classes:
            return probs if from_logits else probs.clone()  # one entry per class, in class order: nothing to sum
        out_shape = (probs.shape[0], self.num_classes) + tuple(probs.shape[2:])
        owner = self.entry_to_class.to(probs.device)
        if reduce == "sum":
            return probs.new_zeros(out_shape).index_add(1, owner, probs)
        index = owner.view((1, -1) + (1,) * (probs.dim() - 2)).expand_as(probs)
        best = probs.new_zeros(out_shape).scatter_reduce(1, index, probs, "amax", include_self=False)
        return best / best.sum(dim=1, keepdim=True)

    def entries_of(self, class_indices: Tensor) -> tuple[Tensor, Tensor]:
        """The entries of each image's kept classes (Top-K over classes, applied to the aligned vocabulary).

        Args:
            class_indices: ``LongTensor (B, K)`` kept classes per image.

        Returns:
            ``entry_indices (B, E)`` into :attr:`entries` and ``positions (B, E)``: each entry's class as a position
            ``0..K-1`` among the image's kept classes, ``-1`` for padding. Images keep different numbers of entries;
            the shorter rows are padded with their first entry, to be masked out by :meth:`log_class_probs`.
        """
        owner = self.entry_to_class.to(class_indices.device)
        # (B, K, n_tot): which entries belong to which kept class; an entry belongs to at most one.
        member = owner.view(1, 1, -1) == class_indices.unsqueeze(-1)
        kept = member.any(dim=1)
        width = int(kept.sum(dim=1).max())
        # Kept entries first, in vocabulary order (a stable sort of "not kept").
        order = torch.sort((~kept).to(torch.uint8), dim=1, stable=True).indices[:, :width]
        valid = torch.gather(kept, 1, order)
        entry_indices = torch.where(valid, order, order[:, :1])
        positions = torch.gather(member.to(torch.uint8).argmax(dim=1), 1, order)
        return entry_indices, positions.masked_fill(~valid, -1)

    @staticmethod
    def log_class_probs(logits: Tensor, positions: Tensor, num_classes: int) -> Tensor:
        """Eq. 7 in log space, differentiable: ``log sum_{e in c} softmax(logits)_e`` per class.

        Args:
            logits: ``(B, E, *spatial)`` scores of the entries.
            positions: ``(B, E)`` or ``(E,)`` class position of each entry (``0..num_classes-1``), ``-1`` for an
                entry left out of the softmax (padding).
            num_classes: classes to aggregate into.

        Returns:
            ``(B, num_classes, *spatial)`` log-probabilities. The per-pixel maximum is subtracted before ``exp``, so
            a class is only lost to underflow (log-probability clamped, no gradient) when all of its entries trail
            the best entry by more than ~87 nats in fp32.
        """
        # The model's reduction (in float32), returned in the dtype of `logits` as before.
        return class_log_probs(logits, positions, num_classes).to(logits.dtype)

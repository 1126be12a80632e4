"""Concept audit and guard (extension beyond the paper): which pixels each concept wins, and from which class.

Vocabulary alignment lets a concept win pixels that the class names alone give to another class. That is the point
when the class's own name is a word the model reads poorly, and a failure when the concept *steals* a class the names
already get right: on world seed 200 the source model reads target water as "road" (a concept of "ground"), the
teacher's very first pseudo-labels send water there, and self-training cannot undo a confident error (docs/world.md).

Before adapting, on unlabeled target images, one forward of the source model over the aligned vocabulary's entries
gives two readings: the *names-only* one (a softmax over each class's name entry alone) and the *aligned* one (which
entry wins the pixel). For every concept the audit reports the share of pixels it wins, which class the names-only
reading gives those pixels, how many of them it gives to *another* class with at least `confidence` probability
(the stolen share), and its *victim*: the other class of which it takes the largest share of the pixels the names
alone confidently give that class (among classes holding at least `min_territory` of the pixels that way).

The stolen share does not tell a thief from a finder: a renamed class's name wins no pixel, so its concepts must take
theirs from other classes (docs/world.md). The guard (`guard_concepts`) therefore weighs down a concept only when its
class is read by name (its name wins at least `min_name_share` of the pixels: the concept is not the class's only
finder) *and* it takes more than `max_victim_share` of its victim's confident pixels; the teacher then scores it with
`log_weight` added to its logit (its probability times exp(log_weight) before the classes are summed, Eq. 7), so it
still finds its class where it is sure and stops winning the pixels it contests with the victim's own name. The
thresholds were chosen on validation world seeds (benchmarks/concept_guard.py). No label is used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .vocabulary import ConceptVocabulary

__all__ = ["ConceptAudit", "audit_concepts", "audit_entry_logits", "format_audit", "guard_concepts"]


@dataclass(frozen=True)
class ConceptAudit:
    """One concept's pixels on the audited images.

    Attributes:
        class_name, concept: the concept and the class it scores for.
        pixel_share: share of all audited pixels where this concept is the winning entry of the aligned vocabulary.
        stolen_share: share of the concept's pixels that the names-only reading gives to another class with at least
            the audit's `confidence`.
        taken_from: names-only class -> share of the concept's pixels it gets (largest first).
        names_confidence: mean names-only top probability on the concept's pixels.
        class_name_share: share of all audited pixels the names-only reading gives to the concept's class.
        victim: the other class of which the concept wins the largest share of the pixels the names-only reading
            gives it with at least the audit's `confidence` (None if it takes none), and `victim_share` that share.
    """

    class_name: str
    concept: str
    pixel_share: float
    stolen_share: float
    taken_from: dict[str, float]
    names_confidence: float
    class_name_share: float
    victim: str | None = None
    victim_share: float = 0.0


@torch.no_grad()
def audit_concepts(
    model, processor, images: Sequence, vocabulary: ConceptVocabulary, confidence: float = 0.5, batch_size: int = 8,
    min_territory: float = 0.02,
) -> list[ConceptAudit]:
    """Audit every concept of `vocabulary` on `images` (PIL images) with `model` (see the module docstring).

    The vocabulary must hold the class names (`include_class_names=True`): they are the names-only reading."""
    if not vocabulary.include_class_names:
        raise ValueError("the concept audit reads each class by its name entry: build the vocabulary with its names")
    device = model.device
    text = model.get_text_embeddings(processor.tokenize_classes(vocabulary.entries)["input_ids"].to(device))
    entry_ids = torch.arange(vocabulary.num_entries, device=device)

    def entry_logits():
        for start in range(0, len(images), batch_size):
            pixel_values = processor(images=list(images[start : start + batch_size]))["pixel_values"].to(device)
            yield model(pixel_values=pixel_values, text_embeds=text, entry_class_ids=entry_ids).logits.float()

    return audit_entry_logits(entry_logits(), vocabulary, confidence, min_territory)


@torch.no_grad()
def audit_entry_logits(
    batches: Iterable[torch.Tensor], vocabulary: ConceptVocabulary, confidence: float = 0.5, min_territory: float = 0.02
) -> list[ConceptAudit]:
    """The audit from the entries' logits, `(B, num_entries, h, w)` per batch (what `audit_concepts` computes with
    the model; benchmarks/concept_guard.py replays saved ones)."""
    num_entries, num_classes = vocabulary.num_entries, vocabulary.num_classes
    names = torch.tensor([vocabulary.class_to_entries[c][0] for c in range(num_classes)])
    taken = torch.zeros(num_entries * num_classes)
    taken_confident = torch.zeros(num_entries * num_classes)
    stolen = torch.zeros(num_entries)
    confidence_sum = torch.zeros(num_entries)
    for logits in batches:
        logits = logits.float().cpu()
        winner = logits.argmax(dim=1).flatten()
        names_confidence, names_class = (t.flatten() for t in logits[:, names].softmax(dim=1).max(dim=1))
        pair = winner * num_classes + names_class
        confident = (names_confidence >= confidence).float()
        taken += torch.bincount(pair, minlength=num_entries * num_classes)
        taken_confident += torch.bincount(pair, weights=confident, minlength=num_entries * num_classes)
        steals = (names_class != vocabulary.entry_to_class[winner]).float() * confident
        stolen += torch.bincount(winner, weights=steals, minlength=num_entries)
        confidence_sum += torch.bincount(winner, weights=names_confidence, minlength=num_entries)
    counts = _Counts(taken.view(num_entries, num_classes), taken_confident.view(num_entries, num_classes), stolen,
                     confidence_sum)
    return _rows(vocabulary, counts, min_territory)


@dataclass(frozen=True)
class _Counts:
    """Pixel counts over the audited images: `taken[e, c]` pixels entry e wins that the names-only reading gives class
    c (`taken_confident`: with at least the audit's confidence); per entry, its stolen pixels and summed confidence."""

    taken: torch.Tensor
    taken_confident: torch.Tensor
    stolen: torch.Tensor
    confidence_sum: torch.Tensor


def _rows(vocabulary: ConceptVocabulary, counts: _Counts, min_territory: float) -> list[ConceptAudit]:
    wins, by_name = counts.taken.sum(dim=1), counts.taken.sum(dim=0)
    territory = counts.taken_confident.sum(dim=0)  # pixels the names alone give each class confidently
    total = max(float(wins.sum()), 1.0)
    rows = []
    for class_index, entries in vocabulary.class_to_entries.items():
        for entry in entries[1:]:  # the first entry is the class's name
            count = max(float(wins[entry]), 1.0)
            shares = {vocabulary.class_names[c]: float(counts.taken[entry, c]) / count
                      for c in range(vocabulary.num_classes)}
            victims = {c: float(counts.taken_confident[entry, c]) / float(territory[c])
                       for c in range(vocabulary.num_classes)
                       if c != class_index and territory[c] >= max(min_territory * total, 1.0)}
            victim = max(victims, key=victims.get) if victims and max(victims.values()) > 0 else None
            rows.append(ConceptAudit(
                class_name=vocabulary.class_names[class_index], concept=vocabulary.entries[entry],
                pixel_share=float(wins[entry]) / total, stolen_share=float(counts.stolen[entry]) / count,
                taken_from=dict(sorted(((k, v) for k, v in shares.items() if v > 0), key=lambda kv: -kv[1])),
                names_confidence=float(counts.confidence_sum[entry]) / count,
                class_name_share=float(by_name[class_index]) / total,
                victim=None if victim is None else vocabulary.class_names[victim],
                victim_share=0.0 if victim is None else victims[victim],
            ))
    return rows


def guard_concepts(
    audit: Sequence[ConceptAudit], max_victim_share: float = 0.3, min_name_share: float = 0.02, log_weight: float = -1.5,
) -> tuple[dict[str, dict[str, float]], list[ConceptAudit]]:
    """The teacher's log-weights of the concepts that take more than `max_victim_share` of their victim's confident
    pixels while their own class is read by name (at least `min_name_share` of the pixels), as
    `{class: {concept: log_weight}}`; and those concepts' audit rows. Defaults: chosen on validation world seeds."""
    guarded = [row for row in audit
               if row.victim is not None and row.victim_share > max_victim_share and row.class_name_share >= min_name_share]
    weights: dict[str, dict[str, float]] = {}
    for row in guarded:
        weights.setdefault(row.class_name, {})[row.concept] = log_weight
    return weights, guarded


def format_audit(audit: Sequence[ConceptAudit], confidence: float) -> str:
    """The audit as a table: one concept a line, the classes the names-only reading gives its pixels."""
    lines = [f"{'class':<14} {'by name':>7} {'concept':<18} {'pixels':>7} {'stolen':>7} {'victim':<14} {'taken':>6}  "
             f"names-only reading of its pixels (stolen: another class at >= {confidence:.2f}; taken: share of the "
             "victim's confident pixels)"]
    for row in audit:
        reading = ", ".join(f"{name} {share:.0%}" for name, share in list(row.taken_from.items())[:3])
        lines.append(f"{row.class_name[:14]:<14} {row.class_name_share:>7.1%} {row.concept[:18]:<18} "
                     f"{row.pixel_share:>7.1%} {row.stolen_share:>7.1%} {(row.victim or '-')[:14]:<14} "
                     f"{row.victim_share:>6.1%}  {reading or '-'} "
                     f"(confidence {row.names_confidence:.2f})")
    return "\n".join(lines)

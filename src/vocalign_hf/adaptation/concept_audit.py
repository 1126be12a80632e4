"""Concept audit and gate (extension beyond the paper): which pixels each concept wins, and from which class.

Vocabulary alignment lets a concept win pixels that the class names alone give to another class. That is the point
when the class's own name is a word the model reads poorly, and a failure when the concept *steals* a class the names
already get right: on world seed 200 the source model reads target water as "road" (a concept of "ground"), the
teacher's very first pseudo-labels send water there, and self-training cannot undo a confident error (docs/world.md).

Before adapting, on unlabeled target images, one forward of the source model over the aligned vocabulary's entries
gives two readings: the *names-only* one (a softmax over each class's name entry alone) and the *aligned* one (which
entry wins the pixel). For every concept the audit reports the share of pixels it wins, which class the names-only
reading gives those pixels, and how many of them it gives to *another* class with at least `confidence` probability
(the stolen share). The gate drops a concept whose won pixels are mostly stolen *and* whose class the names alone
already find (its name wins at least `min_name_share` of the pixels): such a concept is not needed to find its class
and takes pixels the model confidently reads as another one. A class whose name the model cannot read (a renamed
class: its name wins almost no pixel) keeps its concepts, which must take their pixels from other classes. No label
is used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .vocabulary import ConceptVocabulary

__all__ = ["ConceptAudit", "audit_concepts", "format_audit", "gate_concepts"]


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
    """

    class_name: str
    concept: str
    pixel_share: float
    stolen_share: float
    taken_from: dict[str, float]
    names_confidence: float
    class_name_share: float


@torch.no_grad()
def audit_concepts(
    model, processor, images: Sequence, vocabulary: ConceptVocabulary, confidence: float = 0.5, batch_size: int = 8
) -> list[ConceptAudit]:
    """Audit every concept of `vocabulary` on `images` (PIL images) with `model` (see the module docstring).

    The vocabulary must hold the class names (`include_class_names=True`): they are the names-only reading."""
    if not vocabulary.include_class_names:
        raise ValueError("the concept audit reads each class by its name entry: build the vocabulary with its names")
    device = model.device
    num_entries, num_classes = vocabulary.num_entries, vocabulary.num_classes
    text = model.get_text_embeddings(processor.tokenize_classes(vocabulary.entries)["input_ids"].to(device))
    names = torch.tensor([vocabulary.class_to_entries[c][0] for c in range(num_classes)], device=device)
    owner = vocabulary.entry_to_class.to(device)
    taken = torch.zeros(num_entries * num_classes, device=device)
    stolen = torch.zeros(num_entries, device=device)
    confidence_sum = torch.zeros(num_entries, device=device)
    for start in range(0, len(images), batch_size):
        pixel_values = processor(images=list(images[start : start + batch_size]))["pixel_values"].to(device)
        logits = model(pixel_values=pixel_values, text_embeds=text,
                       entry_class_ids=torch.arange(num_entries, device=device)).logits.float()
        winner = logits.argmax(dim=1).flatten()
        names_confidence, names_class = logits[:, names].softmax(dim=1).max(dim=1)
        names_confidence, names_class = names_confidence.flatten(), names_class.flatten()
        taken += torch.bincount(winner * num_classes + names_class, minlength=num_entries * num_classes)
        steals = (names_class != owner[winner]) & (names_confidence >= confidence)
        stolen += torch.bincount(winner, weights=steals.float(), minlength=num_entries)
        confidence_sum += torch.bincount(winner, weights=names_confidence, minlength=num_entries)
    return _rows(vocabulary, taken.view(num_entries, num_classes).cpu(), stolen.cpu(), confidence_sum.cpu())


def _rows(vocabulary: ConceptVocabulary, taken: torch.Tensor, stolen: torch.Tensor, confidence_sum: torch.Tensor):
    wins, by_name = taken.sum(dim=1), taken.sum(dim=0)
    total = max(float(wins.sum()), 1.0)
    rows = []
    for class_index, entries in vocabulary.class_to_entries.items():
        for entry in entries[1:]:  # the first entry is the class's name
            count = max(float(wins[entry]), 1.0)
            shares = {vocabulary.class_names[c]: float(taken[entry, c]) / count for c in range(vocabulary.num_classes)}
            rows.append(ConceptAudit(
                class_name=vocabulary.class_names[class_index], concept=vocabulary.entries[entry],
                pixel_share=float(wins[entry]) / total, stolen_share=float(stolen[entry]) / count,
                taken_from=dict(sorted(((k, v) for k, v in shares.items() if v > 0), key=lambda kv: -kv[1])),
                names_confidence=float(confidence_sum[entry]) / count, class_name_share=float(by_name[class_index]) / total,
            ))
    return rows


def gate_concepts(
    concepts: Mapping[str, Sequence[str]],
    audit: Sequence[ConceptAudit],
    max_stolen_share: float,
    min_name_share: float = 0.02,
) -> tuple[dict[str, list[str]], list[ConceptAudit]]:
    """The concepts without those whose won pixels are more than `max_stolen_share` stolen while the names alone
    give their class at least `min_name_share` of the pixels; and the dropped ones."""
    dropped = [row for row in audit if row.stolen_share > max_stolen_share and row.class_name_share >= min_name_share]
    out = {(row.class_name, row.concept) for row in dropped}
    kept = {name: [c for c in items if (name, c) not in out] for name, items in concepts.items()}
    return {name: items for name, items in kept.items() if items}, dropped


def format_audit(audit: Sequence[ConceptAudit], confidence: float) -> str:
    """The audit as a table: one concept a line, the classes the names-only reading gives its pixels."""
    lines = [f"{'class':<14} {'by name':>7} {'concept':<18} {'pixels':>7} {'stolen':>7}  names-only reading of its "
             f"pixels (stolen: another class at >= {confidence:.2f})"]
    for row in audit:
        reading = ", ".join(f"{name} {share:.0%}" for name, share in list(row.taken_from.items())[:3])
        lines.append(f"{row.class_name[:14]:<14} {row.class_name_share:>7.1%} {row.concept[:18]:<18} "
                     f"{row.pixel_share:>7.1%} {row.stolen_share:>7.1%}  {reading or '-'} "
                     f"(confidence {row.names_confidence:.2f})")
    return "\n".join(lines)

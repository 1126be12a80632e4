"""The aligned vocabulary a CAT-Seg model can hold: class names scored with their concepts (VocAlign, Eq. 7).

VocAlign's vocabulary alignment scores every *entry* (a class name or one of its concepts, "sky" and "heaven") in
one cost volume, takes a softmax over all entries and sums each class's entries back into the class. In log space
that is, per pixel,

    log p(c) = logsumexp_{e of c} z_e - logsumexp_{all e} z_e,

so the class "logits" a model returns with concepts are these log-probabilities: their softmax over the classes is
exactly Eq. 7, their argmax the prediction, and with one entry per class they reduce to a log-softmax (the model then
returns its raw logits, which give the same softmax and argmax).

This module owns the entries: which prompts score a class (`aligned_entries`), the token table a model keeps in
its config so that a saved, merged or pushed model scores with its concepts when it is given only class names
(`concept_token_table`, `expand_with_concepts`), and the reduction (`class_log_probs`). It lives beside the model
so that the Hub's remote code carries it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .class_list import name_key, normalize_name, validate_class_names
from .concept_phrases import ConceptOwners

__all__ = ["aligned_entries", "class_log_probs", "concept_token_table", "expand_with_concepts", "is_one_per_class"]


def aligned_entries(
    class_names: Sequence[str], concepts: Mapping[str, Sequence[str]]
) -> tuple[list[str], torch.Tensor]:
    """The entries that score `class_names`: each class's name, then its concepts, class-major.

    Returns the entry prompts and `entry_class_ids` (num_entries,), the class index of each entry. A concept repeated
    within its class is kept once.

    Raises:
        ValueError: a concept key that is not one of `class_names`, a concept list that is not a list of non-blank
            strings, or a concept that collides with another class's name or concept (`ConceptOwners`: equal under
            `name_key`, or a plural, article or spacing form of it): its probability would be summed into the wrong
            class.
    """
    names = validate_class_names(class_names)
    concepts = {normalize_name(str(key)): value for key, value in concepts.items()}
    unknown = sorted(set(concepts) - set(names))
    if unknown:
        raise ValueError(f"concepts given for {unknown}, which are not among the class names {names}; "
                         "give concepts only for the classes you segment")
    owners = ConceptOwners(names)
    entries, classes = [], []
    for index, name in enumerate(names):
        items = concepts.get(name, [])
        if isinstance(items, str) or not isinstance(items, Sequence):
            raise ValueError(f"the concepts of {name!r} must be a list of strings, got {items!r}")
        entries.append(name)
        classes.append(index)
        kept = {name_key(name)}
        for concept in items:
            if not isinstance(concept, str) or not concept.strip():
                raise ValueError(f"the concepts of {name!r} hold a blank or non-string entry {concept!r}")
            hit = owners.collision(concept, name)
            if hit is not None:
                form = "" if hit.exact else " a form (plural, article, spacing) of"
                raise ValueError(f"concept {concept!r} of {name!r} is also{form} the class or a concept of "
                                 f"{hit.other_class!r}: it would score both; remove it from one of them")
            key = name_key(concept)
            if key not in kept:
                owners.claim(concept, name)
                kept.add(key)
                entries.append(normalize_name(concept))
                classes.append(index)
    return entries, torch.tensor(classes)


def is_one_per_class(entry_class_ids: torch.Tensor) -> bool:
    """Whether the entries are exactly the classes, in order (Eq. 7 is then a plain softmax)."""
    return bool(torch.equal(entry_class_ids.cpu(), torch.arange(len(entry_class_ids))))


def class_log_probs(
    entry_logits: torch.Tensor, entry_class_ids: torch.Tensor, num_classes: int | None = None
) -> torch.Tensor:
    """Eq. 7 in log space: `(B, num_entries, ...)` entry logits -> `(B, num_classes, ...)` class log-probabilities.

    `entry_class_ids` is `(num_entries,)`, or `(B, num_entries)` when each image scores its own entries (the trainer's
    Top-K); an id of -1 leaves that entry out of the softmax (padding). `num_classes` defaults to the largest id + 1.
    Computed in float32 with the per-pixel maximum subtracted before `exp`; differentiable."""
    logits = entry_logits.float()
    owner = entry_class_ids.to(logits.device)
    num_classes = int(owner.max()) + 1 if num_classes is None else num_classes
    if owner.dim() == 1 and int(owner.min()) >= 0:
        shifted = (logits - logits.amax(dim=1, keepdim=True)).exp()
        sums = shifted.new_zeros((logits.shape[0], num_classes, *logits.shape[2:])).index_add_(1, owner, shifted)
    else:
        owner = owner.expand(logits.shape[0], -1)
        valid = (owner >= 0).view(owner.shape + (1,) * (logits.dim() - 2))
        logits = logits.masked_fill(~valid, float("-inf"))
        shifted = (logits - logits.amax(dim=1, keepdim=True)).exp()
        index = owner.clamp_min(0).view(valid.shape).expand_as(shifted)
        sums = shifted.new_zeros((logits.shape[0], num_classes, *logits.shape[2:])).scatter_add(1, index, shifted)
    return sums.clamp_min(torch.finfo(sums.dtype).tiny).log() - shifted.sum(dim=1, keepdim=True).log()


def _trimmed(rows: torch.Tensor, eos_token_id: int) -> tuple[tuple[int, ...], ...]:
    """The prompts `rows` (P, L) of one entry cut after the token CLIP pools (see `prompts_by_length`)."""
    pooled = rows.int().argmax(dim=-1) if eos_token_id == 2 else (rows == eos_token_id).int().argmax(dim=-1)
    return tuple(tuple(row[: int(end) + 1]) for row, end in zip(rows.tolist(), pooled))


def concept_token_table(
    entry_token_ids: torch.Tensor, entry_class_ids: torch.Tensor, class_names: Sequence[str], eos_token_id: int
) -> dict[str, list[list[list[int]]]]:
    """Per class with concepts: the prompt token ids (entries, templates, tokens), its name's first, each prompt cut
    after its EOT token. This is what a model keeps in `config.concept_token_ids`."""
    table: dict[str, list[list[list[int]]]] = {}
    for index, name in enumerate(class_names):
        rows = entry_token_ids[entry_class_ids == index]
        if len(rows) > 1:
            table[name] = [[list(prompt) for prompt in _trimmed(entry, eos_token_id)] for entry in rows]
    return table


def expand_with_concepts(
    input_ids: torch.Tensor, table: Mapping[str, list], concepts: Mapping[str, Sequence[str]], eos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Add the concepts the model holds to the classes of a call given by name.

    Args:
        input_ids: (num_classes, P, L) prompt token ids of the call's class names.
        table: `config.concept_token_ids`; a class of the call is recognised by its name's prompts.
        concepts: `config.concepts`, for the error message.

    Returns:
        The entries' token ids (num_entries, P, L') and `entry_class_ids`, or `input_ids` and `None` when no class of
        the call has concepts.

    Raises:
        ValueError: a concept of a class of the call is itself a class of the call.
    """
    calls = [_trimmed(rows, eos_token_id) for rows in input_ids]
    by_name = {_key(entries[0]): name for name, entries in table.items()}
    matched = [by_name.get(call) for call in calls]
    if not any(matched):
        return input_ids, None
    in_call = set(calls)
    entries: list[tuple[tuple[int, ...], ...]] = []
    classes: list[int] = []
    for index, (call, name) in enumerate(zip(calls, matched)):
        extra = [_key(rows) for rows in table[name][1:]] if name else []
        for position, concept in enumerate(extra):
            if concept in in_call:
                raise ValueError(
                    f"the model scores {name!r} with its concept {list(concepts.get(name, []))[position]!r}, which is "
                    "also a class of this call; pass the concepts explicitly (processor(..., concepts={...}), or "
                    "concepts={} for the names alone)"
                )
        entries += [call, *extra]
        classes += [index] * (1 + len(extra))
    return _pad(entries, eos_token_id, input_ids.device), torch.tensor(classes, device=input_ids.device)


def _key(rows: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(row) for row in rows)


def _pad(entries: list[tuple[tuple[int, ...], ...]], pad_id: int, device) -> torch.Tensor:
    """(num_entries, P, L) token ids, each prompt padded after its EOT (which CLIP never reads past)."""
    length = max(len(prompt) for entry in entries for prompt in entry)
    padded = [[list(prompt) + [pad_id] * (length - len(prompt)) for prompt in entry] for entry in entries]
    return torch.tensor(padded, device=device)

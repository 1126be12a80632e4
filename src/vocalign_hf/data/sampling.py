"""Resumable sampling: the data order and each example's random augmentation are functions of where it is drawn.

A training run resumed from a checkpoint must draw what the uninterrupted run drew. The Trainer restores the model,
optimiser, scheduler and global RNG states and skips the batches already trained, but a training transform with
its own random stream (:class:`~vocalign_hf.data.SegmentationTrainTransform`) would restart that stream from its
seed. Here the epoch's order is a permutation drawn from ``(seed, epoch)``, and every position of it carries a *draw
key*, a hash of ``(seed, epoch, position)``; :class:`KeyedDataset` loads the example with that key in effect, and
the transform seeds the example's augmentation from it (:func:`current_draw_key`). Skipping batches replays the
same positions, so a resumed run gets the same images with the same crops, flips and colours, on every rank and in
every DataLoader worker (the key travels with the index, from the main process).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["KeyedDataset", "ResumableSampler", "current_draw_key", "draw_key", "seeded_draws"]

_DRAW_KEY: contextvars.ContextVar[int | None] = contextvars.ContextVar("vocalign_draw_key", default=None)


def draw_key(*numbers: int) -> int:
    """A 63-bit hash of non-negative integers (numpy's `SeedSequence`): independent streams for distinct tuples."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1, np.uint64)[0] >> 1)


def current_draw_key() -> int | None:
    """The draw key of the example being loaded (None outside :meth:`KeyedDataset.__getitem__`)."""
    return _DRAW_KEY.get()


@contextmanager
def seeded_draws(key: int) -> Iterator[None]:
    """Make `key` the draw key of the transforms that run inside the block."""
    token = _DRAW_KEY.set(int(key))
    try:
        yield
    finally:
        _DRAW_KEY.reset(token)


class ResumableSampler(Sampler):
    """Yields `(index, draw_key)` pairs: epoch `e`'s order is a permutation seeded by `(seed, e)` (or 0..n-1 without
    `shuffle`), and the key of position `p` is `draw_key(seed, e, p)`. The Trainer calls `set_epoch` every epoch."""

    def __init__(self, num_examples: int, seed: int, shuffle: bool = True) -> None:
        self.num_examples, self.seed, self.shuffle = int(num_examples), int(seed), shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(draw_key(self.seed, self.epoch))
            order = torch.randperm(self.num_examples, generator=generator).tolist()
        else:
            order = range(self.num_examples)
        for position, index in enumerate(order):
            yield index, draw_key(self.seed, self.epoch, position)


class KeyedDataset(Dataset):
    """A map-style dataset indexed by the `(index, draw_key)` pairs of :class:`ResumableSampler`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, draw = key
        with seeded_draws(draw):
            return self.dataset[index]

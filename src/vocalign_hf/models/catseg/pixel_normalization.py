"""The per-channel mean/std normalisation of images and its inverse: one place for the image processor, the model's
v1 backbone input, the trainer's collator and student view, the world's pretraining and the recipes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .configuration_catseg import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD

__all__ = ["denormalize_pixels", "normalize_pixels"]


def normalize_pixels(
    images: torch.Tensor, mean: Sequence[float] = CLIP_PIXEL_MEAN, std: Sequence[float] = CLIP_PIXEL_STD
) -> torch.Tensor:
    """`(images - mean) / std` per channel of `(..., C, H, W)` 0..1 images (default: CLIP's mean and std)."""
    return (images - _per_channel(mean, images)) / _per_channel(std, images)


def denormalize_pixels(
    images: torch.Tensor, mean: Sequence[float] = CLIP_PIXEL_MEAN, std: Sequence[float] = CLIP_PIXEL_STD
) -> torch.Tensor:
    """`images * std + mean` per channel: the 0..1 images that [`normalize_pixels`] turned into `images`."""
    return images * _per_channel(std, images) + _per_channel(mean, images)


def _per_channel(values: Sequence[float], images: torch.Tensor) -> torch.Tensor:
    """`values` (one, or one per channel) in the dtype and on the device of `images`, shaped (C, 1, 1)."""
    return torch.as_tensor(values, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)

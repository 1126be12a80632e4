"""`normalize_pixels` / `denormalize_pixels`, the one CLIP normalisation (processor, model, trainer, world)."""

import torch

from vocalign_hf import CATSegProcessor
from vocalign_hf.models.catseg.configuration_catseg import (
    CLIP_PIXEL_MEAN,
    CLIP_PIXEL_STD,
    IMAGENET_PIXEL_MEAN,
    IMAGENET_PIXEL_STD,
)
from vocalign_hf.models.catseg.pixel_normalization import denormalize_pixels, normalize_pixels


def test_normalize_is_the_per_channel_formula_bit_for_bit():
    images = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(CLIP_PIXEL_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_PIXEL_STD).view(1, 3, 1, 1)
    assert torch.equal(normalize_pixels(images), (images - mean) / std)
    assert torch.equal(denormalize_pixels(images), images * std + mean)
    imagenet = normalize_pixels(images[0], IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD)  # (C, H, W) and other statistics
    assert torch.equal(imagenet, (images[0] - torch.tensor(IMAGENET_PIXEL_MEAN).view(3, 1, 1))
                       / torch.tensor(IMAGENET_PIXEL_STD).view(3, 1, 1))


def test_denormalize_inverts_normalize_in_the_images_dtype():
    images = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(denormalize_pixels(normalize_pixels(images)), images, atol=1e-6, rtol=0)
    half = normalize_pixels(images.bfloat16())
    assert half.dtype == torch.bfloat16 and normalize_pixels(images, [0.5], [0.25]).shape == images.shape


def test_the_processor_normalises_with_it(tiny_processor: CATSegProcessor):
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    pixel_values = tiny_processor(images=[image])["pixel_values"]
    assert torch.equal(pixel_values[0], normalize_pixels((image.double() / 255).float()))

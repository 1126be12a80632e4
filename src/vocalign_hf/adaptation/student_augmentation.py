"""Strong colour augmentation of the student's view (the released code's ``jitter_aug=True``).

The released VocAlign configs (``configs/vocalign/*.py``: ``data_preprocessor=dict(..., jitter_aug=True)``) add a
second view of every training image in ``SegDataPreProcessor.get_preaugment_jitter``
(``mmseg/models/data_preprocessor.py``): torchvision ``ColorJitter(0.5, 0.5, 0.5, 0.25)``, ``RandomGrayscale(p=0.2)``
and, half of the time, ``GaussianBlur(kernel_size=5, sigma=U(0.1, 2.0))``. That view, block-masked, is what the
student's CLIP sees; the teacher (and a v1 model's ResNet) see the clean image. The paper does not mention it.

Differences on purpose: the released code draws the blur decision and sigma once per batch; here every image
draws its own (so images do not depend on their batch mates, nor ranks on each other). Colours are processed in
float ``[0, 1]`` instead of on uint8 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.transforms import color_jitter, rgb_to_gray

__all__ = ["StudentAugmentation", "gaussian_blur"]


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 5) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` images with one ``sigma`` per image (reflect padding, as
    torchvision's ``GaussianBlur``)."""
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    b, c, h, w = images.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma.to(images).view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, k)
    weight = kernel.repeat_interleave(c, dim=0)  # one kernel per (image, channel) group
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="reflect"), weight.view(b * c, 1, 1, kernel_size), groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, half, half), mode="reflect"), weight.view(b * c, 1, kernel_size, 1), groups=b * c)
    return x.view(b, c, h, w)


@dataclass(frozen=True)
class StudentAugmentation:
    """The released student view: colour jitter, random grayscale, random Gaussian blur, on images in ``[0, 1]``.

    Attributes:
        brightness, contrast, saturation, hue: torchvision ``ColorJitter`` strengths (released: 0.5, 0.5, 0.5, 0.25).
        grayscale_prob: probability of turning an image gray (released: 0.2).
        blur_prob: probability of a blur (released: 0.5).
        blur_sigma: range of the blur's sigma in pixels (released: 0.1-2.0).
        blur_kernel_size: kernel side (released: 5).
    """

    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.25
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 5

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch ``(B, 3, H, W)`` in ``[0, 1]``; every image draws its own parameters from ``generator``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (B, 3, H, W), got {tuple(images.shape)}")
        b = images.shape[0]
        out = color_jitter(images, self.brightness, self.contrast, self.saturation, self.hue, generator=generator)
        draws = torch.rand(3, b, generator=generator).to(images.device)  # grayscale?, blur?, sigma
        gray = rgb_to_gray(out).expand_as(out)
        out = torch.where((draws[0] < self.grayscale_prob).view(b, 1, 1, 1), gray, out)
        low, high = self.blur_sigma
        blurred = gaussian_blur(out, low + (high - low) * draws[2], self.blur_kernel_size)
        return torch.where((draws[1] < self.blur_prob).view(b, 1, 1, 1), blurred, out).clamp_(0.0, 1.0)

"""Block masking of the student's input (VocAlign Eq. 5-6, after MIC).

Paper (Sec. 3.2, Eq. 5): the image is split into ``b x b`` patches and a patch is
*visible* iff ``v > r`` with ``v ~ U(0, 1)``; the student sees ``x_M = M * x_T`` (Eq. 6).

Released code (``mmseg/models/utils/masking_transforms.py::BlockMaskGenerator``, taken from
MIC): ``rand(B, 1, round(H/b), round(W/b)) > ratio`` nearest-resized to ``(H, W)``, then
``imgs * mask``. When ``H`` and ``W`` are multiples of ``b`` this module gives the *same*
mask for the same random draw. When they are not, we follow the paper instead (exact
``b x b`` blocks): we sample a ``ceil(H/b) x ceil(W/b)`` grid and crop the bottom/right
border, whereas the released code would stretch ``round(H/b)`` cells over ``H`` pixels.

Mask geometry: the released code draws blocks in the pixels of its 384 crops, which the CLIP ViT-B/16 sees at
its own 384 resolution, so 16-pixel blocks cover whole ViT patches. When the training crop differs from the CLIP
resolution (the paper's 512 crops are resized to 384 inside the model), :func:`sample_clip_aligned_block_mask`
draws the blocks on the CLIP canvas and stretches them to the image, so they stay aligned with the patches.

Where to apply it: the released code masks the *un-normalised* RGB tensor (its
``SegDataPreProcessor`` has no mean/std; CLIP normalisation happens later inside the
backbone), so masked pixels are black. If you mask already-normalised ``pixel_values``,
pass ``fill = -mean / std`` (per channel) to :func:`apply_block_mask` to reproduce that.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sample_block_mask", "sample_clip_aligned_block_mask", "apply_block_mask"]


def _check_ratio_and_block(block_size: int, ratio: float) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio!r}")


def sample_block_mask(
    batch_size: int,
    height: int,
    width: int,
    block_size: int,
    ratio: float,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sample a binary block mask, 1 = visible, 0 = masked (Eq. 5).

    Args:
        batch_size, height, width: output size ``(B, 1, H, W)``.
        block_size: side ``b`` of the square blocks in pixels.
        ratio: mask ratio ``r``; a block is visible iff ``U(0,1) > r``, so the expected
            visible share is ``1 - r``.
        generator: optional ``torch.Generator`` for reproducible masks. The block grid
            is drawn with one ``torch.rand((B, 1, ceil(H/b), ceil(W/b)))`` call.
        device: device of the mask; defaults to the generator's device (or CPU).
        dtype: dtype of the returned mask (values are exactly 0 and 1).

    Returns:
        Tensor ``(B, 1, H, W)`` with values in ``{0, 1}``, constant on each ``b x b`` block
        (blocks on the bottom/right border are cropped when ``H``/``W`` is not a multiple
        of ``b``).
    """
    _check_ratio_and_block(block_size, ratio)
    if batch_size < 0 or height < 1 or width < 1:
        raise ValueError(f"invalid mask size B={batch_size}, H={height}, W={width}")
    if device is None and generator is not None:
        device = generator.device
    grid_h = math.ceil(height / block_size)
    grid_w = math.ceil(width / block_size)
    noise = torch.rand((batch_size, 1, grid_h, grid_w), generator=generator, device=device)
    grid = (noise > ratio).to(dtype)
    mask = grid.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
    return mask[:, :, :height, :width].contiguous()


def sample_clip_aligned_block_mask(
    batch_size: int,
    height: int,
    width: int,
    block_size: int,
    ratio: float,
    canvas_size: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A block mask whose ``block_size`` is measured on the ``canvas_size x canvas_size`` image the model's CLIP
    sees (the model resizes every input to that canvas), nearest-resized to the input's ``(height, width)``.

    With ``block_size`` a multiple of the ViT patch size every block covers whole patches after the model's resize.
    When the input already has the canvas size, this is :func:`sample_block_mask` with the same random draw.
    """
    mask = sample_block_mask(batch_size, canvas_size, canvas_size, block_size, ratio, generator, device, dtype)
    if (height, width) == (canvas_size, canvas_size):
        return mask
    return F.interpolate(mask, size=(height, width), mode="nearest")


def apply_block_mask(
    pixel_values: Tensor,
    mask: Tensor,
    fill: Optional[Union[float, Sequence[float], Tensor]] = None,
) -> Tensor:
    """Return ``mask * pixel_values`` (Eq. 6), optionally filling masked pixels.

    Args:
        pixel_values: images ``(B, C, H, W)``.
        mask: ``(B, 1, H, W)`` (or ``(B, C, H, W)``) with 1 = visible, 0 = masked.
        fill: value of masked pixels. ``None``/0 reproduces ``imgs * mask`` of the
            released code; a per-channel sequence/tensor of length ``C`` (e.g.
            ``-mean/std``) is broadcast over ``(B, C, H, W)``.

    Returns:
        The masked images, same shape and dtype as ``pixel_values``.
    """
    if pixel_values.dim() != 4 or mask.dim() != 4:
        raise ValueError(
            f"expected 4-D pixel_values and mask, got {tuple(pixel_values.shape)} and {tuple(mask.shape)}"
        )
    b, c, h, w = pixel_values.shape
    if mask.shape[0] != b or mask.shape[2:] != (h, w) or mask.shape[1] not in (1, c):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit pixel_values of shape {tuple(pixel_values.shape)}"
        )
    mask = mask.to(dtype=pixel_values.dtype, device=pixel_values.device)
    out = pixel_values * mask
    if fill is None:
        return out
    fill_t = torch.as_tensor(fill, dtype=pixel_values.dtype, device=pixel_values.device)
    if fill_t.dim() == 1:
        if fill_t.numel() != c:
            raise ValueError(f"fill has {fill_t.numel()} values but pixel_values has {c} channels")
        fill_t = fill_t.view(1, c, 1, 1)
    return out + fill_t * (1 - mask)

"""Image processor for CAT-Seg: any PIL/numpy/torch image in, normalised CLIP tensors out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .configuration_catseg import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD

ImageLike = Image.Image | np.ndarray | torch.Tensor


def to_rgb_tensor(image: ImageLike) -> torch.Tensor:
    """Convert one image to a float (3, H, W) tensor in 0..1.

    Accepted: PIL images of any mode (grayscale, palette, RGBA, 16-bit, ...), numpy arrays (H, W), (H, W, 1|3|4)
    with uint8 values 0..255 or floats 0..1, and torch tensors (C, H, W) likewise. Alpha channels are dropped (the
    colour is kept as is, not composited), grayscale is repeated to three channels.
    """
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float64)
            peak = array.max() if array.size else 1.0
            array = (array / max(peak, 1.0) * 255.0).astype(np.uint8)
            image = Image.fromarray(array)
        image = image.convert("RGB")
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    if isinstance(image, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(image))
        if tensor.dim() == 2:
            tensor = tensor.unsqueeze(-1)
        if tensor.dim() != 3 or tensor.shape[-1] not in (1, 3, 4):
            raise ValueError(f"numpy images must be (H, W) or (H, W, 1|3|4); got shape {image.shape}")
        tensor = tensor.permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        tensor = image.unsqueeze(0) if image.dim() == 2 else image
        if tensor.dim() != 3 or tensor.shape[0] not in (1, 3, 4):
            raise ValueError(f"tensor images must be (H, W) or (1|3|4, H, W); got shape {tuple(image.shape)}")
    else:
        raise TypeError(f"Unsupported image type {type(image).__name__}; use a PIL image, numpy array or tensor")
    if tensor.shape[-1] == 0 or tensor.shape[-2] == 0:
        raise ValueError(f"Empty image of shape {tuple(tensor.shape)}")
    is_integer = not torch.is_floating_point(tensor)
    tensor = tensor.float()
    if is_integer:
        tensor = tensor / 255.0
    if tensor.shape[0] == 4:
        tensor = tensor[:3]
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor.contiguous()


class CATSegImageProcessor(BaseImageProcessor):
    r"""Prepares images for [`CATSegForSemanticSegmentation`] and post-processes its outputs.

    Args:
        do_resize (`bool`): resize every image to `size` (bilinear, as the model's own resize to CLIP resolution).
        size (`dict`): `{"height": 384, "width": 384}`.
        do_normalize (`bool`), image_mean, image_std: CLIP normalisation on 0..1 values (CAT-Seg's constants).
        size_divisibility (`int`, *optional*): when not resizing, pad (after normalisation, with zeros, bottom and
            right) to a multiple of this, as detectron2's `ImageList` in the reference; images of different sizes
            in one batch are padded to the largest.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        do_normalize: bool = True,
        image_mean: Sequence[float] = CLIP_PIXEL_MEAN,
        image_std: Sequence[float] = CLIP_PIXEL_STD,
        size_divisibility: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.size = dict(size) if size is not None else {"height": 384, "width": 384}
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.size_divisibility = size_divisibility

    def preprocess(
        self,
        images: ImageLike | Sequence[ImageLike],
        do_resize: bool | None = None,
        size: dict[str, int] | None = None,
        size_divisibility: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Turn one image or a list of images into `pixel_values` (B, 3, H, W)."""
        do_resize = self.do_resize if do_resize is None else do_resize
        size = size or self.size
        size_divisibility = self.size_divisibility if size_divisibility is None else size_divisibility
        if isinstance(images, (Image.Image, np.ndarray)) or (isinstance(images, torch.Tensor) and images.dim() < 4):
            images = [images]
        if len(images) == 0:
            raise ValueError("No images given.")
        tensors = [to_rgb_tensor(image) for image in images]
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        processed = []
        for tensor in tensors:
            if do_resize:
                tensor = F.interpolate(
                    tensor[None], size=(size["height"], size["width"]), mode="bilinear", align_corners=False
                )[0]
            if self.do_normalize:
                tensor = (tensor - mean) / std
            processed.append(tensor)
        pixel_values = self._pad(processed, size_divisibility)
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)

    @staticmethod
    def _pad(images: list[torch.Tensor], size_divisibility: int | None) -> torch.Tensor:
        height = max(image.shape[-2] for image in images)
        width = max(image.shape[-1] for image in images)
        if size_divisibility:
            height = -(-height // size_divisibility) * size_divisibility
            width = -(-width // size_divisibility) * size_divisibility
        batch = images[0].new_zeros(len(images), 3, height, width)
        for index, image in enumerate(images):
            batch[index, :, : image.shape[-2], : image.shape[-1]] = image
        return batch

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | None = None,
        return_probabilities: bool = False,
    ) -> list[torch.Tensor]:
        """Per-image class-index maps from model outputs.

        Args:
            outputs: a `SemanticSegmenterOutput` (or anything with `.logits` (B, C, h, w)), or a tensor of logits or
                probabilities (B, C, h, w) such as `predict_sliding_window`'s.
            target_sizes: (height, width) per image; logits are resized bilinearly before the argmax. None keeps
                the logits' resolution.
            return_probabilities: also return the per-class sigmoid scores (C, H, W) of each image.
        Returns:
            a list of (H, W) long tensors, or of (segmentation, probabilities) pairs.
        """
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        if target_sizes is not None and len(target_sizes) != logits.shape[0]:
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {logits.shape[0]} images")
        results = []
        for index in range(logits.shape[0]):
            scores = logits[index : index + 1]
            if target_sizes is not None:
                scores = F.interpolate(scores, size=tuple(target_sizes[index]), mode="bilinear", align_corners=False)
            segmentation = scores[0].argmax(dim=0)
            results.append((segmentation, scores[0].sigmoid()) if return_probabilities else segmentation)
        return results

"""Image processor for CAT-Seg: any PIL/numpy/torch image in, normalised CLIP tensors out.

It follows the `transformers` image-processor protocol (`BaseImageProcessor`) through its documented extension
points only: the options are declared as a `TypedDict` of `ImagesKwargs` fields (`valid_kwargs`, plus detectron2's
`size_divisibility`) with class defaults, so they are attributes saved in `preprocessor_config.json`, can be
overridden per call, are type-checked by `validate_typed_dict` and checked for consistency by
`validate_preprocess_arguments`; `process_image` turns one input into a channels-first tensor and `_preprocess`
runs the batch, as the `BaseImageProcessor` docstring describes; `preprocess` (public) only adds the rejection of
unknown options and a channel axis for (H, W) images. Inputs are everything transformers' processors take: PIL
images, numpy arrays and torch tensors, channels first or last (`input_data_format`, else inferred), single images,
lists and (B, C, H, W) batches, paths and URLs.

It is the model's PIL/numpy-backend processor (`backend == "pil"`, registered under `"pil"` with
`AutoImageProcessor`), not a torchvision one: the torchvision wheel does not load with the CPU torch the project
supports. Its image operations run in plain torch on CPU (bilinear resize as the model's own resize to
`clip_resolution`) rather than through PIL, so that processing an image and letting the model resize it give the
same numbers.
"""

from collections.abc import Sequence
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_utils import (
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    infer_channel_dimension_format,
)
from transformers.processing_utils import ImagesKwargs

from .image_conversion import composite_alpha_array, to_rgb
from .configuration_catseg import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
from .pixel_normalization import normalize_pixels

ImageLike = Image.Image | np.ndarray | torch.Tensor

# The per-call options this processor implements: these standard ones (with transformers' own type validators) and
# detectron2's `size_divisibility`. Anything else is rejected instead of being silently ignored.
_STANDARD_OPTIONS = (
    "do_convert_rgb", "do_resize", "size", "default_to_square", "resample", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "return_tensors", "input_data_format",
)
CATSegImageProcessorKwargs = TypedDict(
    "CATSegImageProcessorKwargs",
    {**{name: ImagesKwargs.__annotations__[name] for name in _STANDARD_OPTIONS}, "size_divisibility": int | None},
    total=False,
)

_INTERPOLATION = {
    PILImageResampling.NEAREST: "nearest",
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
}
# Float images may overshoot 0..1 by rounding (or a bicubic resize) without being on another scale.
_FLOAT_RANGE_SLACK = 1e-2


def _to_channels_first(image: ImageLike, input_data_format: ChannelDimension | str | None = None) -> torch.Tensor:
    """A (C, H, W) tensor of an (H, W) image or a 3-d one with 1, 3 or 4 channels first or last; dtype unchanged.

    The channel axis is `input_data_format` when given, else inferred (when both axes could hold the channels,
    numpy arrays are read channels-last and tensors channels-first)."""
    if not isinstance(image, (np.ndarray, torch.Tensor)):
        raise TypeError(f"Unsupported image type {type(image).__name__}; use a PIL image, numpy array or tensor")
    tensor = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if tensor.dim() == 2:
        return tensor.unsqueeze(0)
    if tensor.dim() != 3 or not {tensor.shape[0], tensor.shape[-1]} & {1, 3, 4}:
        raise ValueError(f"images must be (H, W), (1|3|4, H, W) or (H, W, 1|3|4); got shape {tuple(image.shape)}")
    if input_data_format is None:  # numpy images are most often (H, W, C) (PIL's layout), tensors (C, H, W)
        numpy_last = isinstance(image, np.ndarray) and tensor.shape[-1] in (1, 3, 4)
        input_data_format = ChannelDimension.LAST if numpy_last else infer_channel_dimension_format(tensor, (1, 3, 4))
    if ChannelDimension(input_data_format) == ChannelDimension.LAST:
        tensor = tensor.permute(2, 0, 1)
    if tensor.shape[0] not in (1, 3, 4):
        raise ValueError(f"images must have 1, 3 or 4 channels; got shape {tuple(image.shape)} ({input_data_format})")
    if tensor.shape[-1] == 0 or tensor.shape[-2] == 0:
        raise ValueError(f"Empty image of shape {tuple(tensor.shape)}")
    return tensor


def _with_channel_axis(images: Any, input_data_format: ChannelDimension | str | None) -> Any:
    """`images` with each (H, W) array or tensor given a channel axis (where `input_data_format` puts it, else
    last for numpy and first for torch), since transformers' batching takes only 3-d images."""
    def expand(image: Any) -> Any:
        if not isinstance(image, (np.ndarray, torch.Tensor)) or image.ndim != 2:
            return image
        last = isinstance(image, np.ndarray) if input_data_format is None else (
            ChannelDimension(input_data_format) == ChannelDimension.LAST)
        return image[..., None] if last else image[None]

    if isinstance(images, (list, tuple)):
        return [expand(image) for image in images]
    return expand(images)


def to_rgb_tensor(
    image: ImageLike, do_convert_rgb: bool = True, input_data_format: ChannelDimension | str | None = None
) -> torch.Tensor:
    """Convert one image to a (3, H, W) tensor, keeping its dtype and scale (uint8 stays 0..255).

    Accepted: PIL images of any mode, numpy arrays and torch tensors (H, W), or with 1, 3 or 4 channels first or
    last (`input_data_format`, inferred when not given).
    With `do_convert_rgb`, images are made RGB exactly as the data pipeline does
    ([`vocalign_hf.data.transforms.to_pixel_values`]): transparency is alpha-composited over black, grayscale is
    repeated to three channels, 16-bit and float PIL images are mapped to 8 bits. Without it, the image keeps its
    channels, as in every transformers image processor (the model itself takes three).
    """
    if isinstance(image, Image.Image):
        if do_convert_rgb:
            return torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).permute(2, 0, 1)
        image = np.array(image)
        input_data_format = ChannelDimension.LAST
    tensor = _to_channels_first(image, input_data_format)
    channels = tensor.shape[0]
    if channels == 3 or not do_convert_rgb:
        return tensor.contiguous()
    if channels == 1:
        return tensor.expand(3, -1, -1).contiguous()
    if tensor.dtype == torch.uint8:  # through PIL, as the data pipeline, so both give the same pixels
        rgb = np.array(to_rgb(tensor.permute(1, 2, 0).numpy()), dtype=np.uint8)
        return torch.from_numpy(rgb).permute(2, 0, 1)
    return torch.from_numpy(composite_alpha_array(tensor.permute(1, 2, 0).numpy())).permute(2, 0, 1)


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (float32) of class logits (..., C, H, W): the softmax over the classes, the activation of
    the project's score convention (see `CATSegImageProcessor.post_process_semantic_segmentation`)."""
    return logits.float().softmax(dim=-3)


class CATSegImageProcessor(BaseImageProcessor):
    r"""Prepares images for [`CATSegForSemanticSegmentation`] and post-processes its outputs.

    Every argument is an attribute saved with `save_pretrained` and can be overridden per call
    (`processor(images, do_normalize=False)`); unknown keyword arguments are errors.

    Args:
        do_convert_rgb (`bool`, defaults to `True`): make every image RGB: transparency composited over black,
            grayscale repeated (the same conversion as the data pipeline's).
        do_resize (`bool`, defaults to `True`): resize every image to `size`.
        size (`dict`, defaults to `{"height": 384, "width": 384}`): output size when resizing (an int is a square
            while `default_to_square` is `True`, the default).
        resample (`PILImageResampling`, defaults to `BILINEAR`): `NEAREST`, `BILINEAR` or `BICUBIC` (run with
            `torch.nn.functional.interpolate`, `align_corners=False`, as the model's own resize).
        do_rescale (`bool`, defaults to `True`): scale integer images (uint8 0..255) by `rescale_factor`. Float images
            are taken as already scaled to 0..1 (as `torchvision`'s `ToDtype(scale=True)` does); a float image with
            values outside 0..1 is an error that says how to fix it. With `do_rescale=False` no image is scaled.
        rescale_factor (`float`, defaults to `1/255`).
        do_normalize (`bool`, defaults to `True`), image_mean, image_std: normalisation on the rescaled values
            (CAT-Seg's CLIP constants on the 0..1 scale).
        size_divisibility (`int`, *optional*): when not resizing, pad (after normalisation, with zeros, bottom and
            right) to a multiple of this, as detectron2's `ImageList` in the reference; images of different sizes
            in one batch are padded to the largest.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = CATSegImageProcessorKwargs

    do_convert_rgb = True
    do_resize = True
    size = {"height": 384, "width": 384}
    resample = PILImageResampling.BILINEAR
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = CLIP_PIXEL_MEAN
    image_std = CLIP_PIXEL_STD
    size_divisibility = None
    return_tensors = None
    default_to_square = True  # an int `size` is a square

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)

    @property
    def backend(self) -> str:
        """`"pil"`, as transformers' PIL/numpy backend (`PilBackend`) names itself (no torchvision needed)."""
        return "pil"

    def preprocess(self, images: ImageLike | Sequence[ImageLike], **kwargs: Any) -> BatchFeature:
        """Turn one image or a list of images into `pixel_values` (B, 3, H, W) (a torch tensor unless
        `return_tensors` asks for another type). Keyword arguments override the processor's attributes for this
        call."""
        unknown = sorted(set(kwargs) - set(self._valid_kwargs_names))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.preprocess() got unexpected keyword argument(s) {unknown}; it accepts "
                f"{sorted(self._valid_kwargs_names)}"
            )
        return super().preprocess(_with_channel_axis(images, kwargs.get("input_data_format")), **kwargs)

    def process_image(
        self, image: ImageLike, do_convert_rgb: bool = True, input_data_format: str | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """One image as a (3, H, W) tensor of its own dtype and scale (see [`to_rgb_tensor`])."""
        return to_rgb_tensor(image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format)

    def _preprocess(
        self,
        images: list[torch.Tensor],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Sequence[float],
        image_std: float | Sequence[float],
        size_divisibility: int | None,
        return_tensors: str | None,
        **kwargs: Any,
    ) -> BatchFeature:
        if not images:
            raise ValueError("No images given.")
        processed = []
        for index, image in enumerate(images):
            image = self._rescale(image, index, do_rescale, rescale_factor)
            if do_resize:
                image = self._resize(image, size, resample)
            if do_normalize:
                image = self._normalize(image, index, image_mean, image_std)
            processed.append(image)
        pixel_values = self._pad(processed, size_divisibility)
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)

    @staticmethod
    def _rescale(image: torch.Tensor, index: int, do_rescale: bool, rescale_factor: float) -> torch.Tensor:
        """Integer images times `rescale_factor` (in float64, so uint8 / 255 is exact); float images checked."""
        if not torch.is_floating_point(image):
            return (image.double() * rescale_factor).float() if do_rescale else image.float()
        image = image.float()
        if do_rescale:
            low, high = float(image.min()), float(image.max())
            if low < -_FLOAT_RANGE_SLACK or high > 1 + _FLOAT_RANGE_SLACK:
                raise ValueError(
                    f"Image {index} is a float image with values in [{low:g}, {high:g}], but float images are read as "
                    "already scaled to 0..1 (do_rescale=True scales only integer images, by rescale_factor). If it "
                    "holds 0..255 values, pass it as uint8 (image.round().to(torch.uint8)) or divide it by 255; "
                    "pass do_rescale=False to use its values unscaled."
                )
        return image

    @staticmethod
    def _normalize(image: torch.Tensor, index: int, image_mean, image_std) -> torch.Tensor:
        for name, values in (("image_mean", image_mean), ("image_std", image_std)):
            count = torch.as_tensor(values).numel()
            if count not in (1, image.shape[0]):
                raise ValueError(
                    f"{name} has {count} values but image {index} has {image.shape[0]} channels; give one value "
                    "per channel, or keep do_convert_rgb=True to make images RGB"
                )
        return normalize_pixels(image, image_mean, image_std)

    @staticmethod
    def _resize(image: torch.Tensor, size: SizeDict, resample: PILImageResampling) -> torch.Tensor:
        if not (size.height and size.width):
            raise ValueError(f"size must give 'height' and 'width' (the model takes a fixed square input); got {size}")
        if resample not in _INTERPOLATION:
            raise ValueError(f"resample must be one of NEAREST, BILINEAR, BICUBIC; got {resample!r}")
        mode = _INTERPOLATION[resample]
        align = {} if mode == "nearest" else {"align_corners": False}
        return F.interpolate(image[None], size=(size.height, size.width), mode=mode, **align)[0]

    @staticmethod
    def _pad(images: list[torch.Tensor], size_divisibility: int | None) -> torch.Tensor:
        height = max(image.shape[-2] for image in images)
        width = max(image.shape[-1] for image in images)
        if size_divisibility:
            height = -(-height // size_divisibility) * size_divisibility
            width = -(-width // size_divisibility) * size_divisibility
        channels = {image.shape[0] for image in images}
        if len(channels) > 1:
            raise ValueError(f"images of one batch have different channel counts {sorted(channels)}; keep do_convert_rgb=True")
        batch = images[0].new_zeros(len(images), channels.pop(), height, width)
        for index, image in enumerate(images):
            batch[index, :, : image.shape[-2], : image.shape[-1]] = image
        return batch

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | None = None,
        return_segmentation_scores: bool = False,
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """Per-image class-index maps from model outputs, optionally with the class probabilities.

        Args:
            outputs: a `SemanticSegmenterOutput` (or anything with `.logits` (B, C, h, w)), or a tensor of logits
                (B, C, h, w) such as `predict_sliding_window`'s.
            target_sizes: (height, width) per image; logits are resized bilinearly before the argmax (and before the
                softmax). None keeps the logits' resolution.
            return_segmentation_scores: return, per image, a `SemanticSegmentationPostProcessorOutput` with the map
                `segmentation` (H, W) and `segmentation_scores` (C, H, W), the class probabilities: a softmax over
                the classes of the resized logits (float32), whose argmax is the map.

        The activation is a softmax across classes, not CAT-Seg's per-class sigmoid, because the classes compete:
        the models here are trained with the softmax cross-entropy (`config.loss_type="cross_entropy"`, VocAlign's
        loss, its pseudo-labels and its Eq. 7 are softmaxes over the vocabulary), and with concepts the model's
        logits are Eq. 7 log-probabilities, whose softmax is exactly those probabilities. The reference CVPR'24
        CAT-Seg trains with a one-hot BCE and averages sigmoid probabilities in its sliding window: for such a
        checkpoint the softmax gives the same map, and `logits.sigmoid()` its per-class probabilities.

        Returns:
            a list of (H, W) long tensors, or of `SemanticSegmentationPostProcessorOutput`.
        """
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        if target_sizes is not None and any(
            isinstance(size, (int, float)) or (isinstance(size, torch.Tensor) and size.dim() == 0) for size in target_sizes
        ):
            raise ValueError(
                f"target_sizes must be a list of (height, width), one per image; got {tuple(target_sizes)!r}. "
                f"For one image pass [{tuple(target_sizes)!r}]."
            )
        if target_sizes is not None and len(target_sizes) != logits.shape[0]:
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {logits.shape[0]} images")
        results = []
        for index in range(logits.shape[0]):
            resized = logits[index : index + 1]
            if target_sizes is not None:
                resized = F.interpolate(resized, size=tuple(target_sizes[index]), mode="bilinear", align_corners=False)
            segmentation = resized[0].argmax(dim=0)
            results.append(
                SemanticSegmentationPostProcessorOutput(
                    data={"segmentation": segmentation, "segmentation_scores": class_probabilities(resized[0])}
                )
                if return_segmentation_scores
                else segmentation
            )
        return results

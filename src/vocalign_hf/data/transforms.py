"""Paired image / mask augmentations applied on the fly (``dataset.with_transform(...)``), plus a collate function.

Output convention (what the model side receives):

* ``pixel_values``: ``torch.float32`` tensor ``(3, H, W)``, RGB, **values in [0, 1]** (not normalised; the image
  processor / model applies the CLIP or ImageNet mean / std).
* ``labels``: ``torch.int64`` tensor ``(H, W)`` of training ids, ``ignore_index`` (255) for pixels to skip,
  including the padding added when a crop is larger than the (rescaled) image. Present only when the dataset has
  a ``label`` column.

Training pipeline (:class:`SegmentationTrainTransform`), in the order of the mmseg pipelines used by VocAlign's
released configs: random rescale (mmseg ``RandomResize``: target ``scale`` x ratio in ``ratio_range``, aspect
ratio kept) -> random crop (``cat_max_ratio`` re-draws up to 10 times a crop dominated by one class, as mmseg
``RandomCrop``) -> pad to the crop size (image 0, mask ``ignore_index``, bottom / right) -> horizontal flip ->
photometric distortion (mmseg ``PhotoMetricDistortion``) -> colour jitter (torchvision-style). Geometry is drawn
once and applied identically to image and mask; masks are resized with NEAREST only. Colour operations touch the
image only.

Images are converted to RGB first: grayscale is replicated, palette images are expanded, and images with an alpha
channel are **alpha-composited over black** (see :func:`~vocalign_hf.models.catseg.image_conversion.to_rgb`).

Randomness comes from a ``numpy.random.Generator``: pass ``seed`` (or ``rng``) for reproducible runs. Inside
``torch.utils.data.DataLoader`` workers each worker derives its own generator from ``seed`` and the worker's torch
seed, so workers do not repeat each other and runs are reproducible when torch is seeded. An example loaded through
:class:`~vocalign_hf.data.sampling.KeyedDataset` (as the trainer does) draws from ``(seed, its draw key)`` instead,
so that a resumed run augments every example as the uninterrupted run did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ._image_utils import array_to_mask_image, load_pil, mask_to_array, to_rgb
from .dataset_info import IGNORE_INDEX, get_dataset_info
from .sampling import current_draw_key

__all__ = [
    "ColorJitter",
    "PhotoMetricDistortion",
    "SegmentationTrainTransform",
    "SegmentationEvalTransform",
    "make_train_transform",
    "make_eval_transform",
    "train_transform_preset",
    "collate_fn",
    "color_jitter",
    "photometric_distortion",
    "to_pixel_values",
    "to_label_tensor",
    "rgb_to_gray",
    "rgb_to_hsv",
    "hsv_to_rgb",
]

Interpolation = Literal["nearest", "bilinear", "bicubic"]
_PIL_INTERP = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


# ---------------------------------------------------------------------------------------------------------------
# Tensor conversion
# ---------------------------------------------------------------------------------------------------------------


def to_pixel_values(image: Any) -> torch.Tensor:
    """Any image (PIL of any mode, array, path) -> ``float32`` tensor ``(3, H, W)`` in ``[0, 1]``."""
    arr = np.array(to_rgb(image), dtype=np.uint8)  # a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div_(255.0)


def to_label_tensor(mask: Any) -> torch.Tensor:
    """Any single-channel mask (PIL, array, path) -> ``int64`` tensor ``(H, W)`` (values unchanged)."""
    return torch.from_numpy(mask_to_array(mask).astype(np.int64))


# ---------------------------------------------------------------------------------------------------------------
# Colour operations on float tensors in [0, 1], shape (..., 3, H, W)
# ---------------------------------------------------------------------------------------------------------------


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R BT.601 weights) of float tensors ``(..., 3, H, W)``: shape ``(..., 1, H, W)``."""
    r, g, b = x.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV for float tensors ``(..., 3, H, W)`` in ``[0, 1]``; hue in ``[0, 1)`` (fraction of a turn)."""
    r, g, b = x.unbind(-3)
    maxc, _ = x.max(dim=-3)
    minc, _ = x.min(dim=-3)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(
        maxc == r,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    return torch.stack((torch.remainder(h, 1.0), s, maxc), dim=-3)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """HSV -> RGB, inverse of :func:`rgb_to_hsv`."""
    h, s, v = x.unbind(-3)
    h6 = torch.remainder(h, 1.0) * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.to(torch.int64) % 6
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    r = torch.stack((v, q, p, p, t, v), dim=0).gather(0, i.unsqueeze(0)).squeeze(0)
    g = torch.stack((t, v, v, q, p, p), dim=0).gather(0, i.unsqueeze(0)).squeeze(0)
    b = torch.stack((p, p, t, v, v, q), dim=0).gather(0, i.unsqueeze(0)).squeeze(0)
    return torch.stack((r, g, b), dim=-3)


def _adjust_brightness_factor(x: torch.Tensor, factor: float) -> torch.Tensor:
    return (x * factor).clamp_(0.0, 1.0)


def _adjust_brightness_delta(x: torch.Tensor, delta: float) -> torch.Tensor:
    return (x + delta).clamp_(0.0, 1.0)


def _adjust_contrast_blend(x: torch.Tensor, factor: float) -> torch.Tensor:
    mean = rgb_to_gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return ((x - mean) * factor + mean).clamp_(0.0, 1.0)


def _adjust_contrast_mul(x: torch.Tensor, factor: float) -> torch.Tensor:
    return (x * factor).clamp_(0.0, 1.0)


def _adjust_saturation_blend(x: torch.Tensor, factor: float) -> torch.Tensor:
    gray = rgb_to_gray(x)
    return ((x - gray) * factor + gray).clamp_(0.0, 1.0)


def _adjust_saturation_hsv(x: torch.Tensor, factor: float) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    hsv[..., 1, :, :] = (hsv[..., 1, :, :] * factor).clamp_(0.0, 1.0)
    return hsv_to_rgb(hsv).clamp_(0.0, 1.0)


def _adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate hue by ``shift`` turns (``shift`` in [-0.5, 0.5])."""
    hsv = rgb_to_hsv(x)
    hsv[..., 0, :, :] = torch.remainder(hsv[..., 0, :, :] + shift, 1.0)
    return hsv_to_rgb(hsv).clamp_(0.0, 1.0)


# torchvision-style colour jitter blends with a grey / mean image; mmseg's photometric distortion adds and
# multiplies, and saturates in HSV. Both share the hue shift.
_JITTER_OPS = {
    "brightness": _adjust_brightness_factor,
    "contrast": _adjust_contrast_blend,
    "saturation": _adjust_saturation_blend,
    "hue": _adjust_hue,
}
_PHOTOMETRIC_OPS = {
    "brightness": _adjust_brightness_delta,
    "contrast": _adjust_contrast_mul,
    "saturation": _adjust_saturation_hsv,
    "hue": _adjust_hue,
}


def _apply_ops(x: torch.Tensor, ops: Optional[Sequence[tuple[str, float]]], table) -> torch.Tensor:
    for name, value in ops or ():
        x = table[name](x, value)
    return x


@dataclass(frozen=True)
class ColorJitter:
    """torchvision-style colour jitter, applied with probability ``p``.

    Factors are drawn uniformly: brightness / contrast / saturation in ``[max(0, 1 - s), 1 + s]`` (brightness
    multiplies, contrast blends with the mean gray level, saturation with the gray image), hue shift in
    ``[-hue, hue]`` turns (``hue <= 0.5``); the four operations run in a random order.
    """

    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.2
    p: float = 1.0

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation", "hue"):
            if getattr(self, name) < 0:
                raise ValueError(f"ColorJitter.{name} must be >= 0")
        if self.hue > 0.5:
            raise ValueError("ColorJitter.hue must be <= 0.5")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError("ColorJitter.p must be in [0, 1]")

    def sample(self, rng: np.random.Generator) -> Optional[list[tuple[str, float]]]:
        """Draw the operations and factors (``None`` when the jitter is skipped)."""
        if rng.random() >= self.p:
            return None
        ops: list[tuple[str, float]] = []
        for name in rng.permutation(4):
            if name == 0 and self.brightness > 0:
                ops.append(("brightness", float(rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness))))
            elif name == 1 and self.contrast > 0:
                ops.append(("contrast", float(rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast))))
            elif name == 2 and self.saturation > 0:
                ops.append(("saturation", float(rng.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation))))
            elif name == 3 and self.hue > 0:
                ops.append(("hue", float(rng.uniform(-self.hue, self.hue))))
        return ops

    @staticmethod
    def apply(x: torch.Tensor, ops: Optional[Sequence[tuple[str, float]]]) -> torch.Tensor:
        """Apply sampled operations to a float image ``(3, H, W)`` in ``[0, 1]``."""
        return _apply_ops(x, ops, _JITTER_OPS)


@dataclass(frozen=True)
class PhotoMetricDistortion:
    """mmseg ``PhotoMetricDistortion`` (defaults identical), on float images in ``[0, 1]``.

    Each step runs with probability 0.5: additive brightness ``delta ~ U(-brightness_delta, brightness_delta)/255``,
    then contrast (multiplicative, ``alpha ~ U(contrast_range)``) either first or last (coin flip), saturation
    (HSV S x ``alpha``), hue (HSV H + ``delta/180`` turn, OpenCV's 0..180 hue scale). Unlike mmseg, intermediate
    results are not rounded to uint8.
    """

    brightness_delta: float = 32.0
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: float = 18.0

    def sample(self, rng: np.random.Generator) -> list[tuple[str, float]]:
        """Draw the operations and their values, in application order."""
        ops: list[tuple[str, float]] = []
        if rng.integers(2):
            ops.append(("brightness", float(rng.uniform(-self.brightness_delta, self.brightness_delta)) / 255.0))
        contrast_first = bool(rng.integers(2))
        contrast = (
            ("contrast", float(rng.uniform(*self.contrast_range))) if rng.integers(2) else None
        )
        if contrast_first and contrast:
            ops.append(contrast)
        if rng.integers(2):
            ops.append(("saturation", float(rng.uniform(*self.saturation_range))))
        if rng.integers(2):
            ops.append(("hue", float(rng.uniform(-self.hue_delta, self.hue_delta)) / 180.0))
        if not contrast_first and contrast:
            ops.append(contrast)
        return ops

    @staticmethod
    def apply(x: torch.Tensor, ops: Sequence[tuple[str, float]]) -> torch.Tensor:
        """Apply sampled operations to a float image ``(3, H, W)`` in ``[0, 1]``."""
        return _apply_ops(x, ops, _PHOTOMETRIC_OPS)


def _np_rng_from_torch(generator: Optional[torch.Generator]) -> np.random.Generator:
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return np.random.default_rng(seed)


def color_jitter(
    pixel_values: torch.Tensor,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.2,
    p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Colour jitter on a float tensor ``(3, H, W)`` or a batch ``(B, 3, H, W)`` in ``[0, 1]`` (any device).

    Each image of a batch gets its own factors (see :class:`ColorJitter`), drawn from ``generator`` (torch's
    global RNG when ``None``). Meant for model-side augmentation, e.g. the MIC-style jitter of the masked student
    input. Returns a new tensor.
    """
    cj = ColorJitter(brightness, contrast, saturation, hue, p)
    rng = _np_rng_from_torch(generator)
    if pixel_values.dim() == 3:
        return ColorJitter.apply(pixel_values.clone(), cj.sample(rng))
    return torch.stack([ColorJitter.apply(img.clone(), cj.sample(rng)) for img in pixel_values])


def photometric_distortion(
    pixel_values: torch.Tensor,
    config: Optional[PhotoMetricDistortion] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """:class:`PhotoMetricDistortion` on ``(3, H, W)`` or ``(B, 3, H, W)`` float tensors in ``[0, 1]``."""
    cfg = config or PhotoMetricDistortion()
    rng = _np_rng_from_torch(generator)
    if pixel_values.dim() == 3:
        return PhotoMetricDistortion.apply(pixel_values.clone(), cfg.sample(rng))
    return torch.stack([PhotoMetricDistortion.apply(img.clone(), cfg.sample(rng)) for img in pixel_values])


# ---------------------------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------------------------


def _pair(size: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _rescaled_size(
    width: int, height: int, scale: Optional[Sequence[int]], ratio: float, keep_ratio: bool = True
) -> tuple[int, int]:
    """mmcv ``rescale_size`` semantics: fit (long, short) = ``scale`` x ``ratio``, keeping the aspect ratio."""
    if scale is None:
        factor_w = factor_h = ratio
    elif keep_ratio:
        long_t, short_t = max(scale) * ratio, min(scale) * ratio
        factor_w = factor_h = min(long_t / max(height, width), short_t / min(height, width))
    else:  # scale is (w, h) as in mmseg Resize(scale=(w, h), keep_ratio=False)
        return max(1, int(scale[0] * ratio + 0.5)), max(1, int(scale[1] * ratio + 0.5))
    return max(1, int(width * factor_w + 0.5)), max(1, int(height * factor_h + 0.5))


def _resize_mask(mask: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    if mask.shape[1] == size_wh[0] and mask.shape[0] == size_wh[1]:
        return mask
    resized = array_to_mask_image(mask).resize(size_wh, Image.Resampling.NEAREST)
    return np.asarray(resized).astype(mask.dtype, copy=False)


def _accept_crop(crop: np.ndarray, ignore_index: int, cat_max_ratio: float) -> bool:
    labels, counts = np.unique(crop, return_counts=True)
    counts = counts[labels != ignore_index]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def _process_rank() -> int:
    """This process's rank under torchrun / `accelerate launch` (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


class _RngMixin:
    """Per-process / per-DataLoader-worker numpy generators derived from one seed.

    With a seed, the stream of a process is seeded from ``(seed, rank)`` and that of a DataLoader worker from
    ``(seed, rank, the worker's torch seed)``, so ranks and workers draw different augmentations and every run of
    the same command draws the same ones. A given ``rng`` is used as is in the process that built the transform.
    """

    seed: Optional[int]
    rng: Optional[np.random.Generator]

    def _init_rng(self) -> None:
        self._owner = None
        if self.seed is not None:
            self._base_seed = int(self.seed)
        elif self.rng is not None:
            self._base_seed = int(self.rng.integers(0, 2**62))
            self._owner, self._gen = (os.getpid(), None), self.rng
        else:
            self._base_seed = int(np.random.SeedSequence().entropy % (2**62))  # type: ignore[operator]

    def _generator(self) -> np.random.Generator:
        key = current_draw_key()
        if key is not None:  # loaded by a resumable sampler: this example's draws depend on its position only
            return np.random.default_rng([self._base_seed, key])
        info = torch.utils.data.get_worker_info()
        key = (os.getpid(), None if info is None else info.id)
        if key != self._owner:
            stream = [self._base_seed, _process_rank()] + ([] if info is None else [int(info.seed) % (2**62)])
            self._gen = np.random.default_rng(stream)
            self._owner = key
        return self._gen


# ---------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------


def _file_of(value: Any) -> str:
    """` <file name>` of an image given as a path, a PIL image read from a file or a `datasets` dict, else ``""``."""
    if isinstance(value, (str, os.PathLike)):
        name = str(value)
    elif isinstance(value, dict):
        name = value.get("path") or ""
    else:
        name = getattr(value, "filename", "") or ""
    return f" {name}" if name else ""


def _batch_to_examples(batch: Mapping[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    if "image" not in batch:
        raise KeyError(f"the dataset has no 'image' column (columns: {list(batch)}); normalise it first")
    batched = isinstance(batch["image"], (list, tuple))
    if not batched:
        return [dict(batch)], False
    n = len(batch["image"])
    return [{k: batch[k][i] for k in batch} for i in range(n)], True


def _examples_to_batch(outs: list[dict[str, Any]], batched: bool) -> dict[str, Any]:
    if not batched:
        return outs[0]
    keys = outs[0].keys() if outs else []
    return {k: [o[k] for o in outs] for k in keys}


@dataclass
class SegmentationTrainTransform(_RngMixin):
    """Random rescale, crop, flip and colour augmentation for ``dataset.with_transform``.

    Call it on a batch dict (``{"image": [...], "label": [...]}``, as ``with_transform`` does) or use
    :meth:`apply` on one image / mask pair. Returns ``{"pixel_values": [...], "labels": [...]}`` (no ``labels``
    when the batch has no ``label`` column; a ``None`` label becomes an all-ignore mask).

    Attributes:
        crop_size: crop ``(h, w)`` or an int; ``None`` disables cropping. The paper uses 512, the released
            configs 384.
        scale: mmseg ``RandomResize`` target ``(long, short)`` before the ratio; ``None``: the ratio rescales the
            original size.
        ratio_range: ``(low, high)`` for the uniform rescale ratio; ``None``: no rescale.
        cat_max_ratio: re-draw a crop (up to 10 times) while one class covers ``>= cat_max_ratio`` of its labelled
            pixels (mmseg ``RandomCrop``; 1.0 disables it, and it has no effect without labels).
        flip_prob: probability of a horizontal flip.
        photometric: :class:`PhotoMetricDistortion` settings, or ``None``.
        jitter: :class:`ColorJitter` settings, or ``None``.
        ignore_index: mask value for padding.
        image_interpolation: resampling for images (masks always use NEAREST).
        seed / rng: randomness source (see module docstring).
        keep_columns: dataset columns passed through unchanged.
        small_image: what happens to an image that is smaller than the crop after the rescale: ``"pad"`` (mmseg:
            pad with black / ``ignore_index``) or ``"upscale"`` (resize it, aspect ratio kept, until it covers the
            crop, so no crop holds padding: for custom images much smaller than the crop).
    """

    crop_size: Optional[Union[int, tuple[int, int]]] = 512
    scale: Optional[tuple[int, int]] = None
    ratio_range: Optional[tuple[float, float]] = (0.5, 2.0)
    cat_max_ratio: float = 1.0
    flip_prob: float = 0.5
    photometric: Optional[PhotoMetricDistortion] = None
    jitter: Optional[ColorJitter] = None
    ignore_index: int = IGNORE_INDEX
    image_interpolation: Interpolation = "bilinear"
    seed: Optional[int] = None
    rng: Optional[np.random.Generator] = field(default=None, repr=False)
    keep_columns: Sequence[str] = ()
    small_image: Literal["pad", "upscale"] = "pad"

    def __post_init__(self) -> None:
        if self.small_image not in ("pad", "upscale"):
            raise ValueError(f"small_image must be 'pad' or 'upscale', got {self.small_image!r}")
        if self.image_interpolation not in _PIL_INTERP:
            raise ValueError(f"image_interpolation must be one of {list(_PIL_INTERP)}")
        if self.ratio_range is not None and not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {self.ratio_range}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError("flip_prob must be in [0, 1]")
        if self.crop_size is not None and min(_pair(self.crop_size)) <= 0:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        self._init_rng()

    def apply(
        self, image: Any, label: Any = None, rng: Optional[np.random.Generator] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Augment one pair. Returns ``(pixel_values (3,H,W) float [0,1], labels (H,W) int64 or None)``."""
        rng = rng if rng is not None else self._generator()
        img = to_rgb(image)
        w, h = img.size
        mask = None
        if label is not None:
            mask = mask_to_array(load_pil(label) if not isinstance(label, np.ndarray) else label)
            if mask.shape != (h, w):
                raise ValueError(
                    f"image{_file_of(image)} is {h}x{w} but its mask{_file_of(label)} is {mask.shape[0]}x{mask.shape[1]}"
                )

        # 1. random rescale
        if self.ratio_range is not None:
            ratio = float(rng.uniform(*self.ratio_range))
            new_w, new_h = _rescaled_size(w, h, self.scale, ratio)
            if (new_w, new_h) != (w, h):
                img = img.resize((new_w, new_h), _PIL_INTERP[self.image_interpolation])
                if mask is not None:
                    mask = _resize_mask(mask, (new_w, new_h))
                w, h = new_w, new_h
        if self.small_image == "upscale" and self.crop_size is not None:
            ch, cw = _pair(self.crop_size)
            if h < ch or w < cw:  # cover the crop instead of padding it
                factor = max(ch / h, cw / w)
                new_w, new_h = max(cw, int(w * factor + 0.5)), max(ch, int(h * factor + 0.5))
                img = img.resize((new_w, new_h), _PIL_INTERP[self.image_interpolation])
                if mask is not None:
                    mask = _resize_mask(mask, (new_w, new_h))
                w, h = new_w, new_h
        arr = np.asarray(img)

        # 2. random crop (+ cat_max_ratio re-draws) and pad
        if self.crop_size is not None:
            ch, cw = _pair(self.crop_size)

            def draw() -> tuple[int, int]:
                return int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))

            y0, x0 = draw()
            if mask is not None and self.cat_max_ratio < 1.0:
                for _ in range(10):
                    if _accept_crop(mask[y0 : y0 + ch, x0 : x0 + cw], self.ignore_index, self.cat_max_ratio):
                        break
                    y0, x0 = draw()
            arr = arr[y0 : y0 + ch, x0 : x0 + cw]
            if mask is not None:
                mask = mask[y0 : y0 + ch, x0 : x0 + cw]
            ph, pw = ch - arr.shape[0], cw - arr.shape[1]
            if ph > 0 or pw > 0:
                arr = np.pad(arr, ((0, ph), (0, pw), (0, 0)), constant_values=0)
                if mask is not None:
                    mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=self.ignore_index)

        # 3. horizontal flip
        if self.flip_prob > 0 and rng.random() < self.flip_prob:
            arr = arr[:, ::-1]
            if mask is not None:
                mask = mask[:, ::-1]

        x = torch.from_numpy(np.require(arr, requirements=["C", "W"])).permute(2, 0, 1).to(torch.float32).div_(255.0)

        # 4. colour (image only)
        if self.photometric is not None:
            x = PhotoMetricDistortion.apply(x, self.photometric.sample(rng))
        if self.jitter is not None:
            x = ColorJitter.apply(x, self.jitter.sample(rng))

        y = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))
        return x, y

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        examples, batched = _batch_to_examples(batch)
        has_label = "label" in batch
        rng = self._generator()
        outs = []
        for ex in examples:
            label = ex.get("label") if has_label else None
            if has_label and label is None:
                label = np.full(to_rgb(ex["image"]).size[::-1], self.ignore_index, dtype=np.int64)
            x, y = self.apply(ex["image"], label, rng=rng)
            out: dict[str, Any] = {"pixel_values": x}
            if has_label:
                out["labels"] = y
            for k in self.keep_columns:
                out[k] = ex[k]
            outs.append(out)
        return _examples_to_batch(outs, batched)


@dataclass
class SegmentationEvalTransform:
    """Deterministic evaluation transform: RGB conversion and an optional resize of the image.

    As in mmseg's test pipelines, labels stay at their original resolution unless ``resize_labels`` (then with
    NEAREST): upsample the logits to the label size before scoring.

    Attributes:
        scale: ``None`` (no resize); with ``keep_ratio`` a ``(long, short)`` bound fitted as mmseg ``Resize``
            (e.g. ``(2048, 512)`` for ADE20K), without it an exact ``(w, h)`` size (PC-59 uses ``(520, 520)``).
        keep_ratio: see ``scale``.
        resize_labels: also resize masks (NEAREST) to the image size.
        image_interpolation: resampling for images.
        keep_columns: dataset columns passed through unchanged.
    """

    scale: Optional[tuple[int, int]] = None
    keep_ratio: bool = True
    resize_labels: bool = False
    image_interpolation: Interpolation = "bilinear"
    keep_columns: Sequence[str] = ()

    def apply(self, image: Any, label: Any = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Transform one pair. Returns ``(pixel_values, labels or None)``."""
        img = to_rgb(image)
        mask = None if label is None else mask_to_array(load_pil(label) if not isinstance(label, np.ndarray) else label)
        if mask is not None and mask.shape != img.size[::-1]:  # scored pixel by pixel: a shifted mask scores wrong
            raise ValueError(
                f"image{_file_of(image)} is {img.size[1]}x{img.size[0]} but its mask{_file_of(label)} is "
                f"{mask.shape[0]}x{mask.shape[1]}"
            )
        if self.scale is not None:
            size = _rescaled_size(img.size[0], img.size[1], self.scale, 1.0, keep_ratio=self.keep_ratio)
            if size != img.size:
                img = img.resize(size, _PIL_INTERP[self.image_interpolation])
                if mask is not None and self.resize_labels:
                    mask = _resize_mask(mask, size)
        x = to_pixel_values(img)
        y = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))
        return x, y

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        examples, batched = _batch_to_examples(batch)
        has_label = "label" in batch
        outs = []
        for ex in examples:
            x, y = self.apply(ex["image"], ex.get("label") if has_label else None)
            out: dict[str, Any] = {"pixel_values": x}
            if has_label:
                if y is None:  # a missing mask in a labelled dataset: all pixels ignored
                    size = tuple(x.shape[1:]) if self.resize_labels else to_rgb(ex["image"]).size[::-1]
                    y = torch.full(size, IGNORE_INDEX, dtype=torch.int64)
                out["labels"] = y
            for k in self.keep_columns:
                out[k] = ex[k]
            outs.append(out)
        return _examples_to_batch(outs, batched)


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------

# [U] the paper does not give the colour-jitter strength; these are the MIC / DACS defaults (strength 0.2, p 0.2).
_PAPER_JITTER = ColorJitter(0.2, 0.2, 0.2, 0.2, p=0.2)

_RELEASED_SCALE = {"cityscapes": (2048, 1024), "ade20k_150": (2048, 512), "pascal_context_59": (520, 520)}


def train_transform_preset(
    dataset: str, variant: Literal["paper", "paper_multi", "released"] = "paper"
) -> dict[str, Any]:
    """Keyword arguments of :class:`SegmentationTrainTransform` reproducing VocAlign's settings.

    * ``"released"``: ``andraghetti/VocAlign`` configs (``configs/_base_/datasets/*_384x384.py``): RandomResize
      to ``(2048, 1024)`` (Cityscapes), ``(2048, 512)`` (ADE20K), ``(520, 520)`` (PC-59) x U(0.5, 2.0), crop 384
      with ``cat_max_ratio=0.75``; flip 0.5 + PhotoMetricDistortion for ADE20K and PC-59 only (both are commented
      out in the Cityscapes config).
    * ``"paper"``: paper section 4.1: Cityscapes: 512 crops + colour jitter; ADE20K / PC-59 ("multi-dataset"):
      512 crops, flip, photometric distortion and colour jitter. The rescale is not described in the paper; the
      released one is kept. Colour-jitter strength is not given either (MIC defaults used, marked [U]).
    * ``"paper_multi"``: the paper's multi-dataset setting for every dataset (incl. Cityscapes).
    """
    name = get_dataset_info(dataset).name
    if variant not in ("paper", "paper_multi", "released"):
        raise ValueError(f"variant must be 'paper', 'paper_multi' or 'released', got {variant!r}")
    scale = _RELEASED_SCALE[name]
    base: dict[str, Any] = dict(scale=scale, ratio_range=(0.5, 2.0), cat_max_ratio=0.75)
    if variant == "released":
        if name == "cityscapes":
            return dict(base, crop_size=384, flip_prob=0.0, photometric=None, jitter=None)
        return dict(base, crop_size=384, flip_prob=0.5, photometric=PhotoMetricDistortion(), jitter=None)
    if variant == "paper" and name == "cityscapes":
        return dict(base, crop_size=512, flip_prob=0.0, photometric=None, jitter=_PAPER_JITTER)
    return dict(base, crop_size=512, flip_prob=0.5, photometric=PhotoMetricDistortion(), jitter=_PAPER_JITTER)


def make_train_transform(
    dataset: Optional[str] = None,
    variant: Literal["paper", "paper_multi", "released"] = "paper",
    **overrides: Any,
) -> SegmentationTrainTransform:
    """Build a :class:`SegmentationTrainTransform` from a preset (:func:`train_transform_preset`) and overrides.

    ``dataset=None`` starts from the class defaults (crop 512, ratio 0.5-2.0 of the original size, flip 0.5, no
    colour augmentation).
    """
    kwargs = train_transform_preset(dataset, variant) if dataset is not None else {}
    kwargs.update(overrides)
    return SegmentationTrainTransform(**kwargs)


def make_eval_transform(dataset: Optional[str] = None, **overrides: Any) -> SegmentationEvalTransform:
    """Evaluation transform of the released configs' test pipelines (image-only resize; labels untouched).

    Cityscapes: fit ``(2048, 1024)`` (no-op at native resolution); ADE20K: fit ``(2048, 512)``; PC-59: exact
    ``(520, 520)``. ``dataset=None``: no resize.
    """
    kwargs: dict[str, Any] = {}
    if dataset is not None:
        name = get_dataset_info(dataset).name
        kwargs = dict(scale=_RELEASED_SCALE[name], keep_ratio=name != "pascal_context_59")
    kwargs.update(overrides)
    return SegmentationEvalTransform(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Collate
# ---------------------------------------------------------------------------------------------------------------


def collate_fn(
    examples: Sequence[Mapping[str, Any]], ignore_index: int = IGNORE_INDEX, return_pixel_mask: bool = False
) -> dict[str, Any]:
    """Batch transformed examples for a ``DataLoader`` / ``Trainer(data_collator=...)``.

    Stacks ``pixel_values`` to ``(B, 3, H, W)`` and ``labels`` to ``(B, H, W)``. Examples of different sizes are
    padded bottom / right to the largest one (images with 0, labels with ``ignore_index``); ``return_pixel_mask``
    adds a ``(B, H, W)`` ``int64`` mask (1 = real pixel). ``labels`` is returned only if every example has one.
    Other keys are collected into lists.
    """
    if not examples:
        raise ValueError("collate_fn got an empty batch")
    pv = [e["pixel_values"] for e in examples]
    pv = [p if isinstance(p, torch.Tensor) else torch.as_tensor(np.asarray(p)) for p in pv]
    H = max(p.shape[-2] for p in pv)
    W = max(p.shape[-1] for p in pv)
    same = all(p.shape[-2:] == (H, W) for p in pv)
    if same:
        pixel_values = torch.stack(pv)
    else:
        pixel_values = pv[0].new_zeros((len(pv), pv[0].shape[0], H, W))
        for i, p in enumerate(pv):
            pixel_values[i, :, : p.shape[-2], : p.shape[-1]] = p
    batch: dict[str, Any] = {"pixel_values": pixel_values}
    if return_pixel_mask:
        pm = torch.zeros((len(pv), H, W), dtype=torch.int64)
        for i, p in enumerate(pv):
            pm[i, : p.shape[-2], : p.shape[-1]] = 1
        batch["pixel_mask"] = pm
    if all(e.get("labels") is not None for e in examples):
        labels = [torch.as_tensor(e["labels"], dtype=torch.int64) for e in examples]
        lh = max(l.shape[-2] for l in labels)
        lw = max(l.shape[-1] for l in labels)
        if all(l.shape == (lh, lw) for l in labels):
            batch["labels"] = torch.stack(labels)
        else:
            out = torch.full((len(labels), lh, lw), ignore_index, dtype=torch.int64)
            for i, l in enumerate(labels):
                out[i, : l.shape[-2], : l.shape[-1]] = l
            batch["labels"] = out
    for k in examples[0]:
        if k not in ("pixel_values", "labels") and k not in batch:
            batch[k] = [e.get(k) for e in examples]
    return batch

"""Small image / mask helpers shared by the loaders and the transforms (private)."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ..models.catseg.image_conversion import load_pil, to_rgb  # noqa: F401 (to_rgb: for the transforms)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def mask_to_array(mask: Any) -> np.ndarray:
    """Decode a segmentation mask to a 2-D integer array (no value is changed).

    Single-channel masks (``L``, ``P`` indices, ``I``, ``I;16``, ``1``) are read as is. A 3-channel mask whose
    channels are all equal is read from its first channel. A colour-coded RGB mask is ambiguous and raises
    ``ValueError`` (convert it to class indices first).
    """
    if isinstance(mask, np.ndarray):
        arr = mask
    else:
        img = load_pil(mask)
        if img.mode == "1":
            img = img.convert("L")
        arr = np.asarray(img)
    if arr.ndim == 3:
        gray = arr.shape[2] in (3, 4) and all(np.array_equal(arr[..., 0], arr[..., c]) for c in (1, 2))
        if arr.shape[2] == 1 or gray:
            arr = arr[..., 0]
        else:
            raise ValueError(
                f"mask has {arr.shape[2]} different channels (a colour-coded mask?); segmentation masks must hold "
                "one class index per pixel (mode L, P or I)"
            )
    if arr.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {arr.shape}")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.all(arr == np.round(arr)):
            raise ValueError("mask holds non-integer values")
        arr = arr.astype(np.int64)
    return arr


def array_to_mask_image(arr: np.ndarray) -> Image.Image:
    """Encode an integer mask as a PIL image: ``L`` (uint8) when values fit 0..255, else ``I`` (int32)."""
    arr = np.asarray(arr)
    if arr.size == 0 or (arr.min() >= 0 and arr.max() <= 255):
        return Image.fromarray(arr.astype(np.uint8), mode="L")
    return Image.fromarray(arr.astype(np.int32), mode="I")

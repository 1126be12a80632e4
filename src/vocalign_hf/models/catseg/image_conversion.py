"""Image decoding and conversion to 8-bit RGB, shared by the image processor and the data pipeline (one place, so
both give the same pixels; it lives beside the processor so that the Hub's remote code carries it)."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image


def load_pil(value: Any) -> Image.Image:
    """Accept what a ``datasets.Image`` column can hold (PIL image, path, ``{"bytes", "path"}`` dict, array)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if isinstance(value, (str, os.PathLike)):
        return Image.open(value)
    if isinstance(value, bytes):
        return Image.open(io.BytesIO(value))
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
    raise TypeError(f"cannot read an image from a {type(value).__name__}")


def to_rgb(image: Any, background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Convert any image to 8-bit RGB.

    * ``RGB`` is returned as is; ``L``, ``1``, ``CMYK``, ``YCbCr``, ``HSV``, ``LAB`` are converted by PIL.
    * 16/32-bit grayscale (``I``, ``I;16*``) and float (``F``) images are rescaled to 0..255 from their dtype range
      (uint16: /257; values already within 0..255 are kept), then replicated to 3 channels.
    * Images with transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry) are **alpha-composited
      over ``background``** (black by default, the same value the crop uses to pad images), so fully transparent
      pixels become ``background`` and opaque pixels keep their colour.
    * Numpy arrays ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)``, ``(H, W, 4)`` (uint8) are accepted as well.
    """
    img = load_pil(image) if not isinstance(image, np.ndarray) else _array_to_pil(image)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("I", "F") or mode.startswith("I;"):
        arr = np.asarray(img)
        if arr.dtype.kind == "f":
            arr = np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255)
        elif arr.max(initial=0) > 255:
            arr = arr / 257.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def composite_alpha_array(arr: np.ndarray) -> np.ndarray:
    """Composite an ``(H, W, 4)`` array over black, keeping its dtype and scale (the array counterpart of
    :func:`to_rgb` for images that are not 8-bit: floats with alpha in 0..1, or wider integers).

    8-bit arrays go through :func:`to_rgb` (PIL's ``alpha_composite``) so that both give the same pixels.
    """
    if arr.ndim != 3 or arr.shape[2] != 4:
        raise ValueError(f"expected an (H, W, 4) image with an alpha channel, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.asarray(to_rgb(arr))
    rgb, alpha = arr[..., :3].astype(np.float64), arr[..., 3:].astype(np.float64)
    if arr.dtype.kind == "f":
        if alpha.size and (alpha.min() < 0.0 or alpha.max() > 1.0):
            raise ValueError(
                f"a float RGBA image needs alpha in 0..1, got [{alpha.min():g}, {alpha.max():g}]; pass an 8-bit "
                "image or scale it to 0..1"
            )
        return (rgb * alpha).astype(arr.dtype)
    peak = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "iu" else 1.0
    return np.round(rgb * (alpha / peak)).astype(arr.dtype)


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        if arr.dtype == np.uint8:
            return Image.fromarray(arr, mode="L")
        if arr.dtype.kind == "f":
            return Image.fromarray(arr.astype(np.float32), mode="F")
        return Image.fromarray(arr.astype(np.int32), mode="I")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        if arr.dtype != np.uint8:
            if arr.dtype.kind == "f" and arr.max(initial=0) <= 1.0:
                arr = arr * 255.0
            arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="RGB" if arr.shape[2] == 3 else "RGBA")
    raise ValueError(f"cannot interpret an array of shape {arr.shape} as an image")

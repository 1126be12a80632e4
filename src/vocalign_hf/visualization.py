"""Pictures of predictions: a grid of panels (image | ground truth | predictions...) with a colour legend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["colorize", "segmentation_grid"]

_TITLE_HEIGHT = 22
_GAP = 4
_SWATCH = 14


def colorize(labels: np.ndarray, palette: Sequence[tuple[int, int, int]], ignore_index: int = 255) -> np.ndarray:
    """`(H, W)` class ids -> `(H, W, 3)` uint8 colours; `ignore_index` (and any id without a colour) is black."""
    colors = np.zeros((256, 3), dtype=np.uint8)
    colors[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    colors[ignore_index] = 0
    return colors[np.asarray(labels, dtype=np.int64).clip(0, 255)]


def segmentation_grid(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    class_names: Sequence[str],
    palette: Sequence[tuple[int, int, int]],
    panel_size: int = 256,
) -> Image.Image:
    """One picture of several images: a row per image, a column per panel (`(H, W, 3)` uint8 arrays), each panel
    upscaled with nearest neighbour so that its longer side is at least `panel_size`, column titles on top and a
    legend of `class_names` in their `palette` colours below."""
    if not rows or any(len(row) != len(titles) for row in rows):
        raise ValueError(f"every row needs one panel per title ({len(titles)})")
    font = ImageFont.load_default()
    h, w = rows[0][0].shape[:2]
    scale = max(1, -(-panel_size // max(h, w)))  # ceil: nearest-neighbour upscaling by an integer factor
    ph, pw = h * scale, w * scale
    width = len(titles) * (pw + _GAP) - _GAP
    per_line = max(1, width // 150)
    legend_lines = -(-len(class_names) // per_line)
    height = _TITLE_HEIGHT + len(rows) * (ph + _GAP) + legend_lines * (_SWATCH + 8) + 6
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(titles):
        draw.text((col * (pw + _GAP) + 4, 5), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        for col, panel in enumerate(row):
            tile = Image.fromarray(np.ascontiguousarray(panel)).resize((pw, ph), Image.Resampling.NEAREST)
            canvas.paste(tile, (col * (pw + _GAP), _TITLE_HEIGHT + r * (ph + _GAP)))
    top = _TITLE_HEIGHT + len(rows) * (ph + _GAP) + 4
    for i, (name, color) in enumerate(zip(class_names, palette)):
        x, y = (i % per_line) * 150 + 4, top + (i // per_line) * (_SWATCH + 8)
        draw.rectangle((x, y, x + _SWATCH, y + _SWATCH), fill=tuple(color), outline=(0, 0, 0))
        draw.text((x + _SWATCH + 6, y + 1), name, fill=(0, 0, 0), font=font)
    return canvas

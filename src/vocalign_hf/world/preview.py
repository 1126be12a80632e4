"""A PNG grid of source and target samples with their coloured masks (PIL only)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .datasets import World
from .generator import CLASSES

__all__ = ["CLASS_COLORS", "colorize_mask", "save_world_preview"]

#: One display colour per source class (target masks are drawn with the colour of the same visual class).
CLASS_COLORS = np.array(
    [
        (90, 150, 240),  # sky
        (20, 100, 30),  # tree
        (130, 220, 80),  # grass / terrain
        (150, 100, 50),  # ground (bare earth, source only)
        (128, 128, 128),  # road / "ground" in the target
        (200, 80, 60),  # building
        (240, 30, 200),  # car / automobile
        (20, 50, 150),  # water
    ],
    dtype=np.uint8,
)


def colorize_mask(label: np.ndarray, class_ids: list[int] | None = None) -> np.ndarray:
    """RGB image (H, W, 3) of a label map; `class_ids` maps label ids to source class ids (target masks);
    255 is drawn black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    ids = class_ids if class_ids is not None else list(range(len(CLASSES)))
    for label_id, source_id in enumerate(ids):
        lut[label_id] = CLASS_COLORS[source_id]
    return lut[np.asarray(label)]


def save_world_preview(world: World, path: str | os.PathLike, num_samples: int = 6, zoom: int = 3) -> Path:
    """Save a grid: one column per sample; rows = source image, source mask, target image, target mask, with a
    legend (source name -> target name per colour).

    Args:
        world: the world (uses `source_eval` and `target_eval`, falling back to the train splits when empty).
        path: the PNG to write.
        num_samples: columns.
        zoom: nearest-neighbour upscaling of each tile.
    """
    source = world.source_eval if len(world.source_eval) else world.source_train
    target = world.target_eval
    n = min(num_samples, len(source), len(target))
    if n == 0:
        raise ValueError("the world has no labeled samples to preview")
    size = world.config.image_size * zoom
    pad, label_w, legend_h = 4, 70, 16 * ((len(CLASSES) + 1) // 2) + 8
    rows = [
        ("source", [np.asarray(source[i]["image"].convert("RGB")) for i in range(n)]),
        ("source mask", [colorize_mask(np.asarray(source[i]["label"])) for i in range(n)]),
        ("target", [np.asarray(target[i]["image"].convert("RGB")) for i in range(n)]),
        ("target mask", [colorize_mask(np.asarray(target[i]["label"]), world.target_to_source) for i in range(n)]),
    ]
    width = label_w + n * (size + pad) + pad
    height = len(rows) * (size + pad) + pad + legend_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (title, tiles) in enumerate(rows):
        y = pad + r * (size + pad)
        draw.text((4, y + size // 2 - 6), title, fill=(0, 0, 0))
        for c, tile in enumerate(tiles):
            tile_img = Image.fromarray(tile).resize((size, size), Image.NEAREST)
            canvas.paste(tile_img, (label_w + c * (size + pad), y))
    y0 = len(rows) * (size + pad) + pad
    column_w = (width - 8) // 2
    for k, spec in enumerate(CLASSES):
        x, y = 8 + (k % 2) * column_w, y0 + 4 + (k // 2) * 16
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(v) for v in CLASS_COLORS[k]))
        if spec.target_name is None:
            text = f"{spec.source_name} (source only)"
        elif spec.target_name != spec.source_name:
            text = f"{spec.source_name} -> '{spec.target_name}' in the target"
        else:
            text = spec.source_name
        draw.text((x + 18, y), text, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path

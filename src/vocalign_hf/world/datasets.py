"""The world as `datasets.Dataset`s, cached on disk by config hash, plus helpers to feed it to a model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from .generator import (
    CLASSES,
    SPLITS,
    WorldConfig,
    render_split_arrays,
    source_class_names,
    target_class_names,
    target_concepts,
    target_to_source,
)

__all__ = ["World", "build_world", "dataset_to_tensors", "default_world_cache"]

_INFO_FILE = "world.json"


def default_world_cache() -> Path:
    """`$VOCALIGN_WORLD_CACHE`, else `~/.cache/vocalign_hf/world`."""
    env = os.environ.get("VOCALIGN_WORLD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vocalign_hf" / "world"


@dataclass
class World:
    """A generated world: class vocabularies, the concept file and four splits.

    Attributes:
        config: the `WorldConfig` it was generated from.
        source_class_names: the 8 source names (source label order).
        target_class_names: the 7 target names (target label order).
        target_concepts: `{target name: [concepts]}` for the renamed target classes (a VocAlign concept file).
        target_to_source: source label index of each target class.
        source_train, source_eval: `image` (PIL RGB) + `label` (PIL "L", source ids) datasets.
        target_train: `image` only (unlabeled adaptation data).
        target_eval: `image` + `label` (target ids).
        path: the cache folder, or None for an in-memory world.
        generated: True when this call rendered the images, False when they were read from the cache.
    """

    config: WorldConfig
    source_class_names: list[str]
    target_class_names: list[str]
    target_concepts: dict[str, list[str]]
    target_to_source: list[int]
    source_train: datasets.Dataset
    source_eval: datasets.Dataset
    target_train: datasets.Dataset
    target_eval: datasets.Dataset
    path: Path | None = None
    generated: bool = True

    @property
    def oracle_target_class_names(self) -> list[str]:
        """Source names of the target classes, in target order (what the target classes were called in pretraining)."""
        return [self.source_class_names[i] for i in self.target_to_source]

    @property
    def renamed_target_classes(self) -> list[str]:
        """Target class names that differ from the source name of the same class."""
        return [t for t, s in zip(self.target_class_names, self.oracle_target_class_names) if t != s]

    def split(self, name: str) -> datasets.Dataset:
        """One of "source_train", "source_eval", "target_train", "target_eval"."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {list(SPLITS)}")
        return getattr(self, name)

    def write_concepts(self, path: str | os.PathLike) -> Path:
        """Write the concept file (JSON `{target class: [concepts]}`) and return its path."""
        path = Path(path)
        path.write_text(json.dumps(self.target_concepts, indent=2) + "\n")
        return path

    def info(self) -> dict[str, Any]:
        """JSON-serialisable description (config, fingerprint, vocabularies, renames)."""
        return {
            "config": self.config.to_dict(),
            "fingerprint": self.config.fingerprint(),
            "source_class_names": self.source_class_names,
            "target_class_names": self.target_class_names,
            "target_concepts": self.target_concepts,
            "target_to_source": self.target_to_source,
            "classes": [
                {"source_name": c.source_name, "target_name": c.target_name, "kind": c.kind, "why": c.why}
                for c in CLASSES
            ],
        }


def _features(labeled: bool) -> datasets.Features:
    feats = {"image": datasets.Image()}
    if labeled:
        feats["label"] = datasets.Image()
    return datasets.Features(feats)


def _render_dataset(config: WorldConfig, split: str) -> datasets.Dataset:
    images, labels = render_split_arrays(config, split)
    labeled = split != "target_train"
    data: dict[str, list] = {"image": [Image.fromarray(a) for a in images]}
    if labeled:
        data["label"] = [Image.fromarray(a) for a in labels]
    return datasets.Dataset.from_dict(data, features=_features(labeled))


def build_world(config: WorldConfig | None = None, cache_dir: str | os.PathLike | None = None) -> World:
    """Generate the world of `config`, or load it from `cache_dir` when it was generated before.

    Args:
        config: the world (default `WorldConfig()`).
        cache_dir: parent folder of the cache; the world lives in `cache_dir/world-<fingerprint>`, written to a
            temporary folder first and moved into place with `os.replace`, so a crash never leaves a half-written
            world behind and a concurrent builder is harmless. None keeps the world in memory only.
    Returns:
        the `World` (`world.generated` tells whether images were rendered by this call).
    """
    config = config or WorldConfig()
    names = dict(
        source_class_names=source_class_names(),
        target_class_names=target_class_names(),
        target_concepts=target_concepts(),
        target_to_source=target_to_source(),
    )
    if cache_dir is None:
        splits = {split: _render_dataset(config, split) for split in SPLITS}
        return World(config=config, **names, **splits, path=None, generated=True)

    cache_dir = Path(cache_dir)
    final = cache_dir / f"world-{config.fingerprint()}"
    generated = False
    if not (final / _INFO_FILE).is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_dir))
        try:
            for split in SPLITS:
                _render_dataset(config, split).save_to_disk(str(tmp / split))
            partial = World(config=config, **names, **{s: None for s in SPLITS})  # type: ignore[arg-type]
            (tmp / _INFO_FILE).write_text(json.dumps(partial.info(), indent=2) + "\n")
            try:
                os.replace(tmp, final)
                generated = True
            except OSError:  # another process finished first: use its copy
                if not (final / _INFO_FILE).is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    splits = {split: datasets.load_from_disk(str(final / split)) for split in SPLITS}
    return World(config=config, **names, **splits, path=final, generated=generated)


def dataset_to_tensors(dataset: datasets.Dataset) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All images as a uint8 tensor (N, 3, H, W) and labels as uint8 (N, H, W) (None without a label column).

    The world is small (1500 images of 64 x 64 are 18 MB), so training loops can index tensors directly.
    """
    images = np.stack([np.asarray(im.convert("RGB")) for im in dataset["image"]])
    labels = np.stack([np.asarray(lb) for lb in dataset["label"]]) if "label" in dataset.column_names else None
    image_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return image_t, (torch.from_numpy(labels) if labels is not None else None)

"""A small procedurally generated world (source and shifted target domain, renamed classes) and a tiny CAT-Seg
pretrained on its source domain: the stand-in for COCO-Stuff pretraining and a real target dataset."""

from .preview import save_world_preview
from .datasets import World, build_world, dataset_to_tensors, default_world_cache
from .evaluation import evaluate_segmenter
from .generator import (
    CLASSES,
    ClassSpec,
    DomainShift,
    WorldConfig,
    render_scene,
    render_split_arrays,
    source_class_names,
    target_class_names,
    target_concepts,
    target_to_source,
)
from .pretrain import auto_num_threads, pretrain_settings, pretrain_settings_hash, pretrain_source_model, tiny_catseg_config

__all__ = [
    "CLASSES",
    "ClassSpec",
    "DomainShift",
    "World",
    "auto_num_threads",
    "WorldConfig",
    "build_world",
    "dataset_to_tensors",
    "default_world_cache",
    "evaluate_segmenter",
    "pretrain_settings",
    "pretrain_settings_hash",
    "pretrain_source_model",
    "render_scene",
    "save_world_preview",
    "render_split_arrays",
    "source_class_names",
    "target_class_names",
    "target_concepts",
    "target_to_source",
    "tiny_catseg_config",
]

"""VocAlign adaptation: the trainer, its arguments, adapters, and the mechanisms (masking, EMA teacher,
pseudo-labels, concepts, Top-K, LoRA)."""

from .adapters import build_model_card, load_adapted_model, push_adapter_to_hub, save_adapter
from .arguments import ABLATIONS, METHODS, VocAlignArguments
from .ema import ema_alpha, update_ema_
from .merge import merge_adapter, merge_lora, save_merged
from .lora import (
    LoRASettings,
    count_trainable,
    lora_config_for_clip,
    lora_parameter_names,
    lora_parameters,
    lora_target_regex,
)
from .masking import apply_block_mask, sample_block_mask, sample_clip_aligned_block_mask
from .pseudo_labels import entropy_loss, pseudo_labels_from_probs, weighted_cross_entropy
from .topk import gather_class_probs, select_topk_classes, topk_pseudo_labels
from .student_augmentation import StudentAugmentation
from .teacher import EMATeacher, TeacherEMACallback
from .trainer import SegmentationCollator, VocAlignTrainer, add_lora
from .vocabulary import ConceptVocabulary

__all__ = [
    "ABLATIONS",
    "METHODS",
    "SegmentationCollator",
    "StudentAugmentation",
    "VocAlignArguments",
    "VocAlignTrainer",
    "add_lora",
    "build_model_card",
    "load_adapted_model",
    "merge_adapter",
    "merge_lora",
    "save_merged",
    "push_adapter_to_hub",
    "save_adapter",
    "ConceptVocabulary",
    "EMATeacher",
    "TeacherEMACallback",
    "LoRASettings",
    "apply_block_mask",
    "count_trainable",
    "ema_alpha",
    "entropy_loss",
    "gather_class_probs",
    "lora_config_for_clip",
    "lora_parameter_names",
    "lora_parameters",
    "lora_target_regex",
    "pseudo_labels_from_probs",
    "sample_block_mask",
    "sample_clip_aligned_block_mask",
    "select_topk_classes",
    "topk_pseudo_labels",
    "update_ema_",
    "weighted_cross_entropy",
]

"""vocalign-hf: source-free domain adaptation of open-vocabulary segmentation (CAT-Seg + VocAlign) on Hugging Face."""

from .models.catseg import (
    CATSegConfig,
    CATSegForSemanticSegmentation,
    CATSegImageProcessor,
    CATSegModel,
    CATSegProcessor,
    clip_tokenizer,
)

__version__ = "0.1.0"

__all__ = [
    "CATSegConfig",
    "CATSegModel",
    "CATSegForSemanticSegmentation",
    "CATSegImageProcessor",
    "CATSegProcessor",
    "clip_tokenizer",
]

"""vocalign-hf: source-free domain adaptation of open-vocabulary segmentation (CAT-Seg + VocAlign) on Hugging Face."""

from .cpu_memory import request_huge_page_tensors

# Before any module below imports torch or makes a tensor: PyTorch reads this once (see `cpu_memory`).
request_huge_page_tensors()

from .models.catseg import (  # noqa: E402
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

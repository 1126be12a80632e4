"""vocalign-hf: source-free domain adaptation of open-vocabulary segmentation (CAT-Seg + VocAlign) on Hugging Face."""

__version__ = "0.1.0"

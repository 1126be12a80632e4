"""CAT-Seg on the transformers CLIP backbone, registered with the Auto classes when first used (and for remote code).

The folder has the shape of transformers' `models/segformer`, with what an open-vocabulary model adds:

- `configuration_catseg.py`: `CATSegConfig` (a strict dataclass, both variants);
- `modeling_catseg.py`: `CATSegPreTrainedModel`, `CATSegModel` (CLIP towers, cost volume, aggregation: returns
  `CATSegModelOutput`) and `CATSegForSemanticSegmentation` (the head: loss, the default vocabulary and its cached
  text embeddings, and the reference's sliding-window inference, which is model computation over windows and so
  a method of the head, as `generate` is of a language model's);
- `aggregation_catseg.py`: the aggregator's blocks (`CATSeg*`), kept out of the modeling file for its length;
- `text_embedding_cache.py`: `TextEmbeddingCache`, the one cache of a vocabulary's text embeddings and its
  invalidation rules (the model's `encode_vocabulary`, the pipeline, the EMA teacher, the trainer, the demo);
- `image_processing_catseg.py` (with `image_conversion.py`): `CATSegImageProcessor`, images in and
  post-processing out; `processing_catseg.py` (with `prompt_templates.py`, `class_list.py`): `CATSegProcessor`,
  images plus class names turned into prompts;
- `vocabulary_catseg.py` (with `concept_phrases.py`): the aligned vocabulary, class names plus their concepts and
  Eq. 7 in log space, which the model holds in its config and the processor builds per call; here and not in
  `adaptation/`, because a saved, merged or pushed model scores with it through the Hub's remote code;
- `convert_catseg_checkpoint/`: the official checkpoints' converter (`convert-catseg-checkpoint`; its
  `__main__.py` is the program);
- `pipeline_catseg.py`: the `zero-shot-image-segmentation` task, which transformers does not have (in-tree it
  would live in `transformers/pipelines/`); registered here because this package is where the model is.

The names below load lazily: importing the package (or its torch-free `class_list`, which the concept generator
reads) imports neither torch nor transformers. The first use of any of them imports the model files and registers
CAT-Seg with the Auto classes and the pipeline registry, as an eager import did. transformers' `_LazyModule` is not
used because importing it runs `transformers/__init__` (about 1.5 s), which the concept command must not pay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .configuration_catseg import CATSegConfig
    from .image_processing_catseg import CATSegImageProcessor
    from .modeling_catseg import CATSegForSemanticSegmentation, CATSegModel, CATSegPreTrainedModel
    from .pipeline_catseg import ZERO_SHOT_TASK, ZeroShotImageSegmentationPipeline
    from .processing_catseg import CATSegProcessor, clip_tokenizer, validate_class_names
    from .prompt_templates import PROMPT_TEMPLATE_SETS, resolve_prompt_templates

#: Public name -> the module of this folder that defines it.
_EXPORTS = {
    "CATSegConfig": "configuration_catseg",
    "CATSegModel": "modeling_catseg",
    "CATSegPreTrainedModel": "modeling_catseg",
    "CATSegForSemanticSegmentation": "modeling_catseg",
    "CATSegImageProcessor": "image_processing_catseg",
    "CATSegProcessor": "processing_catseg",
    "ZeroShotImageSegmentationPipeline": "pipeline_catseg",
    "ZERO_SHOT_TASK": "pipeline_catseg",
    "clip_tokenizer": "processing_catseg",
    "validate_class_names": "processing_catseg",
    "PROMPT_TEMPLATE_SETS": "prompt_templates",
    "resolve_prompt_templates": "prompt_templates",
}

__all__ = [
    "CATSegConfig",
    "CATSegModel",
    "CATSegPreTrainedModel",
    "CATSegForSemanticSegmentation",
    "CATSegImageProcessor",
    "CATSegProcessor",
    "ZeroShotImageSegmentationPipeline",
    "ZERO_SHOT_TASK",
    "clip_tokenizer",
    "validate_class_names",
    "PROMPT_TEMPLATE_SETS",
    "resolve_prompt_templates",
]

_registered = False


def register_auto_classes() -> None:
    """Register CAT-Seg with transformers' Auto classes and pipeline registry, once."""
    global _registered
    if _registered:
        return
    # Imported here, not at the top: the package itself stays free of torch and transformers (see the docstring).
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation, AutoProcessor

    from . import configuration_catseg, image_processing_catseg, modeling_catseg, pipeline_catseg, processing_catseg

    config, image_processor = configuration_catseg.CATSegConfig, image_processing_catseg.CATSegImageProcessor
    model, head = modeling_catseg.CATSegModel, modeling_catseg.CATSegForSemanticSegmentation
    processor = processing_catseg.CATSegProcessor
    AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModel.register(config, model, exist_ok=True)
    AutoModelForSemanticSegmentation.register(config, head, exist_ok=True)
    AutoImageProcessor.register(config, image_processor_classes={"pil": image_processor}, exist_ok=True)
    AutoProcessor.register(config, processor, exist_ok=True)
    pipeline_catseg.register_pipelines()
    # `save_pretrained` also writes an `auto_map` and copies the code files, so a saved or pushed model loads in a
    # plain transformers install: `AutoModelForSemanticSegmentation.from_pretrained(repo, trust_remote_code=True)`.
    config.register_for_auto_class()
    model.register_for_auto_class("AutoModel")
    head.register_for_auto_class("AutoModelForSemanticSegmentation")
    image_processor.register_for_auto_class("AutoImageProcessor")
    processor.register_for_auto_class("AutoProcessor")
    _registered = True


def __getattr__(name: str) -> Any:
    """Load a public name on first use (PEP 562), registering the Auto classes first."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

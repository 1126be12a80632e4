"""CAT-Seg on the transformers CLIP backbone, registered with the Auto classes on import (and for remote code).

The folder has the shape of transformers' `models/segformer`, with what an open-vocabulary model adds:

- `configuration_catseg.py`: `CATSegConfig` (a strict dataclass, both variants);
- `modeling_catseg.py`: `CATSegPreTrainedModel`, `CATSegModel` (CLIP towers, cost volume, aggregation: returns
  `CATSegModelOutput`) and `CATSegForSemanticSegmentation` (the head: loss, the default vocabulary and its cached
  text embeddings, and the reference's sliding-window inference, which is model computation over windows and so
  a method of the head, as `generate` is of a language model's);
- `aggregation_catseg.py`: the aggregator's blocks (`CATSeg*`), kept out of the modeling file for its length;
- `image_processing_catseg.py` (with `image_conversion.py`): `CATSegImageProcessor`, images in and
  post-processing out; `processing_catseg.py` (with `prompt_templates.py`, `class_list.py`): `CATSegProcessor`,
  images plus class names turned into prompts;
- `convert_catseg_checkpoint.py`: the official checkpoints' converter (`convert-catseg-checkpoint`);
- `pipeline_catseg.py`: the `zero-shot-image-segmentation` task, which transformers does not have (in-tree it
  would live in `transformers/pipelines/`); registered here because this package is where the model is.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
    AutoProcessor,
)

from .configuration_catseg import CATSegConfig
from .image_processing_catseg import CATSegImageProcessor
from .modeling_catseg import CATSegForSemanticSegmentation, CATSegModel, CATSegPreTrainedModel
from .pipeline_catseg import ZERO_SHOT_TASK, ZeroShotImageSegmentationPipeline, register_pipelines
from .processing_catseg import CATSegProcessor, clip_tokenizer, validate_class_names
from .prompt_templates import PROMPT_TEMPLATE_SETS, resolve_prompt_templates

AutoConfig.register(CATSegConfig.model_type, CATSegConfig, exist_ok=True)
AutoModel.register(CATSegConfig, CATSegModel, exist_ok=True)
AutoModelForSemanticSegmentation.register(CATSegConfig, CATSegForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(CATSegConfig, image_processor_classes={"pil": CATSegImageProcessor}, exist_ok=True)
AutoProcessor.register(CATSegConfig, CATSegProcessor, exist_ok=True)
register_pipelines()
# `save_pretrained` also writes an `auto_map` and copies the code files, so a saved or pushed model loads in a
# plain transformers install: `AutoModelForSemanticSegmentation.from_pretrained(repo, trust_remote_code=True)`.
CATSegConfig.register_for_auto_class()
CATSegModel.register_for_auto_class("AutoModel")
CATSegForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
CATSegImageProcessor.register_for_auto_class("AutoImageProcessor")
CATSegProcessor.register_for_auto_class("AutoProcessor")

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

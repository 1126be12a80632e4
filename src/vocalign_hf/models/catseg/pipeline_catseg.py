"""`transformers` pipelines for CAT-Seg.

* `pipeline("zero-shot-image-segmentation", model=...)`: a task registered here in `transformers`' pipeline registry
  (transformers has zero-shot image classification and object detection, not segmentation). The class names are
  given per call, as the other zero-shot pipelines do: `segmenter(image, candidate_labels=["road", "car"])`.
* `pipeline("image-segmentation", model=...)`: transformers' own pipeline, for a model with a default vocabulary
  (`model.set_vocabulary`). Its model check reads only the built-in model names, not those registered with
  `AutoModelForSemanticSegmentation.register`, so CAT-Seg's name is added to that list.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForSemanticSegmentation, Pipeline
from transformers.image_utils import load_image
from transformers.models.auto import modeling_auto
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_catseg import CATSegConfig
from .modeling_catseg import CATSegForSemanticSegmentation
from .processing_catseg import CATSegProcessor

ZERO_SHOT_TASK = "zero-shot-image-segmentation"


class ZeroShotImageSegmentationPipeline(Pipeline):
    """Open-vocabulary semantic segmentation: one mask per class name that some pixel is assigned to.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> import vocalign_hf  # registers the task and the CAT-Seg classes
    >>> segmenter = pipeline("zero-shot-image-segmentation", model="path/to/catseg")
    >>> segments = segmenter("street.png", candidate_labels=["road", "car", "sky"])
    >>> segments[0]["label"], segments[0]["score"], segments[0]["mask"].size
    ```

    Without `candidate_labels` the model's default vocabulary (`model.set_vocabulary`) is used.

    Returns, per image, a list of `{"label", "score", "mask"}` sorted by score: `mask` is a PIL image of the input's
    size (255 where the class wins the per-pixel argmax), `score` the class's mean softmax probability over its mask.
    """

    _load_processor = None  # loaded with the model when it is a path; otherwise built from its config
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.model.config, CATSegConfig):
            raise ValueError(
                f"{ZERO_SHOT_TASK} needs a CAT-Seg model (CATSegForSemanticSegmentation), "
                f"got {type(self.model).__name__}"
            )
        if self.processor is None:  # an in-memory model: the processor follows from its config
            self.processor = CATSegProcessor.from_config(self.model.config)
            if self.image_processor is not None:
                self.processor.image_processor = self.image_processor
            self.image_processor = self.processor.image_processor
            self.tokenizer = self.processor.tokenizer

    def __call__(self, images: Any, candidate_labels: Sequence[str] | None = None, **kwargs: Any):
        """Segment one image (PIL image, path or URL) or a list of them with the given class names.

        Args:
            images: the image(s).
            candidate_labels (`list[str]`, *optional*): the class names; default: the model's vocabulary.
            timeout (`float`, *optional*): seconds to wait when fetching an image from a URL.
        """
        if candidate_labels is not None:
            kwargs["candidate_labels"] = candidate_labels
        return super().__call__(images, **kwargs)

    def _sanitize_parameters(self, candidate_labels=None, timeout=None, **kwargs):
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected argument(s) {sorted(kwargs)}")
        preprocess = {}
        if candidate_labels is not None:
            preprocess["candidate_labels"] = candidate_labels
        if timeout is not None:
            preprocess["timeout"] = timeout
        return preprocess, {}, {}

    def _labels(self, candidate_labels: Sequence[str] | None) -> list[str]:
        if candidate_labels is not None:
            return list(candidate_labels)
        if getattr(self.model.config, "vocabulary_token_ids", None) is None:
            raise ValueError(
                "Give the class names: segmenter(image, candidate_labels=[...]) (the model has no default vocabulary)"
            )
        return [self.model.config.id2label[i] for i in range(len(self.model.config.id2label))]

    def preprocess(self, image, candidate_labels=None, timeout=None):
        image = load_image(image, timeout=timeout)
        labels = self._labels(candidate_labels)
        text = list(candidate_labels) if candidate_labels is not None else None
        inputs = self.processor(images=[image], text=text).to(self.dtype)
        inputs["target_size"] = (image.height, image.width)
        inputs["candidate_labels"] = labels
        return inputs

    def _forward(self, model_inputs):
        target_size = model_inputs.pop("target_size")
        labels = model_inputs.pop("candidate_labels")
        logits = self.model(**model_inputs).logits
        return {"logits": logits, "target_size": target_size, "candidate_labels": labels}

    def postprocess(self, model_outputs) -> list[dict[str, Any]]:
        logits = model_outputs["logits"].float()
        logits = F.interpolate(logits, size=model_outputs["target_size"], mode="bilinear", align_corners=False)
        probs = logits[0].softmax(dim=0)
        segmentation = probs.argmax(dim=0)
        segments = []
        for index in segmentation.unique().tolist():
            mask = segmentation == index
            segments.append({
                "score": float(probs[index][mask].mean()),
                "label": model_outputs["candidate_labels"][index],
                "mask": Image.fromarray(mask.numpy().astype(np.uint8) * 255, mode="L"),
            })
        return sorted(segments, key=lambda segment: -segment["score"])


def register_pipelines() -> None:
    """Register the zero-shot task and let transformers' image-segmentation pipeline accept CAT-Seg (idempotent)."""
    if ZERO_SHOT_TASK not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(
            ZERO_SHOT_TASK,
            pipeline_class=ZeroShotImageSegmentationPipeline,
            pt_model=AutoModelForSemanticSegmentation,
            type="multimodal",
        )
    # Only the image-segmentation pipeline's name check reads this; the lazy Auto mapping built on it ignores model
    # types missing from CONFIG_MAPPING_NAMES, and loading goes through AutoModelForSemanticSegmentation.register.
    modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault(
        CATSegConfig.model_type, CATSegForSemanticSegmentation.__name__
    )

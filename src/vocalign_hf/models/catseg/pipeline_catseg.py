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
import torch
from PIL import Image
from transformers import AutoModelForSemanticSegmentation, Pipeline
from transformers.image_utils import load_image
from transformers.models.auto import modeling_auto
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_catseg import CATSegConfig
from .modeling_catseg import CATSegForSemanticSegmentation
from .processing_catseg import CATSegProcessor, validate_class_names
from .vocabulary_catseg import aligned_entries

ZERO_SHOT_TASK = "zero-shot-image-segmentation"


def mean_class_probabilities(probabilities: torch.Tensor, segmentation: torch.Tensor) -> torch.Tensor:
    """(C,) each class's mean probability over the pixels it wins in `segmentation` (H, W); 0 for a class that wins
    none. `probabilities` (C, H, W) as `post_process_semantic_segmentation(..., return_segmentation_scores=True)`
    gives them."""
    means = probabilities.new_zeros(probabilities.shape[0])
    for index in segmentation.unique().tolist():
        means[index] = probabilities[index][segmentation == index].mean()
    return means


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

    Without `candidate_labels` the model's default vocabulary (`model.set_vocabulary`) is used. A class the model
    holds concepts for (`model.set_concepts`, an adapter trained with concepts) is scored with its name and its
    concepts unless the call gives `concepts=` (`{}`: the names alone).

    Returns, per image, a list of `{"label", "score", "mask"}` sorted by score: `mask` is a PIL image of the input's
    size (255 where the class wins the per-pixel argmax), `score` the class's mean probability over its mask. Masks and
    probabilities are those of `processor.post_process_semantic_segmentation(..., return_segmentation_scores=True)`:
    the logits resized to the image, their argmax, and their softmax over the classes.
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
        # transformers' batching (`batch_size` > 1) collates with the pipeline's image processor.
        self.image_processor = self.processor.image_processor
        self.tokenizer = self.processor.tokenizer

    def __call__(self, images: Any, candidate_labels: Sequence[str] | None = None, **kwargs: Any):
        """Segment one image (PIL image, path or URL) or a list of them with the given class names.

        Args:
            images: the image(s).
            candidate_labels (`list[str]`, *optional*): the class names; default: the model's vocabulary.
            concepts (`dict[str, list[str]]`, *optional*): concepts per class name (VocAlign's vocabulary
                alignment: each class scored with its name and its concepts, Eq. 7). Default: those the model holds
                (`model.set_concepts`, an adapter trained with concepts); `{}` scores the names alone.
            timeout (`float`, *optional*): seconds to wait when fetching an image from a URL.
            batch_size (`int`, *optional*): images per forward pass (transformers' pipeline batching).
        """
        if candidate_labels is not None:
            kwargs["candidate_labels"] = candidate_labels
        return super().__call__(images, **kwargs)

    def _sanitize_parameters(self, candidate_labels=None, timeout=None, concepts=None, **kwargs):
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected argument(s) {sorted(kwargs)}")
        preprocess = {} if timeout is None else {"timeout": timeout}
        # The class names are per call, not per image: they go to the forward pass and to post-processing, never
        # through the batch collation (which would treat a class list as padded per-image tokens).
        labels = {}
        if candidate_labels is not None:
            validate_class_names(candidate_labels, source="candidate_labels")  # empty or duplicate: a clear error now
            labels["candidate_labels"] = list(candidate_labels)  # the masks are labelled with the names as given
        forward = dict(labels)
        if concepts is not None:
            aligned_entries(self._labels(candidate_labels), concepts)  # a concept of no class: a clear error now
            forward["concepts"] = {name: list(items) for name, items in concepts.items()}
        return preprocess, forward, labels

    def _labels(self, candidate_labels: Sequence[str] | None) -> list[str]:
        if candidate_labels is not None:
            return list(candidate_labels)
        if getattr(self.model.config, "vocabulary_token_ids", None) is None:
            raise ValueError(
                "Give the class names: segmenter(image, candidate_labels=[...]) (the model has no default vocabulary)"
            )
        return [self.model.config.id2label[i] for i in range(len(self.model.config.id2label))]

    def _text_embeds(self, candidate_labels: list[str], concepts: dict | None) -> tuple[torch.Tensor, Any]:
        """The vocabulary's text embeddings and `entry_class_ids` (the class names, plus the given concepts or else
        those the model holds), encoded once for all the images and batches that share them
        (`model.encode_vocabulary`)."""
        if concepts is None:
            input_ids = self.processor.tokenize_classes(candidate_labels)["input_ids"].to(self.device)
            input_ids, entry_class_ids = self.model.expand_with_concepts(input_ids)
        else:
            entries, entry_class_ids = aligned_entries(candidate_labels, concepts)
            input_ids = self.processor.tokenize_classes(entries)["input_ids"].to(self.device)
        return self.model.encode_vocabulary(input_ids), entry_class_ids

    def preprocess(self, image, timeout=None):
        image = load_image(image, timeout=timeout)
        inputs = self.processor(images=[image]).to(self.dtype)
        inputs["target_size"] = (image.height, image.width)
        return inputs

    def _forward(self, model_inputs, candidate_labels=None, concepts=None):
        target_size = model_inputs.pop("target_size")
        if candidate_labels is None and concepts is None:
            self._labels(None)  # the pipeline's own error when there is no default vocabulary
            logits = self.model(**model_inputs).logits
        else:
            text_embeds, entry_class_ids = self._text_embeds(self._labels(candidate_labels), concepts)
            logits = self.model(**model_inputs, text_embeds=text_embeds, entry_class_ids=entry_class_ids).logits
        return {"logits": logits, "target_size": target_size}

    def postprocess(self, model_outputs, candidate_labels=None) -> list[dict[str, Any]]:
        labels = self._labels(candidate_labels)
        result = self.processor.post_process_semantic_segmentation(
            model_outputs["logits"].float(), target_sizes=[model_outputs["target_size"]],
            return_segmentation_scores=True,
        )[0]
        segmentation = result.segmentation
        scores = mean_class_probabilities(result.segmentation_scores, segmentation)
        segments = []
        for index in segmentation.unique().tolist():
            mask = segmentation == index
            segments.append({
                "score": float(scores[index]),
                "label": labels[index],
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

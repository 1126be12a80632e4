"""The aligned vocabulary held by the model (issue 38): class names scored with their concepts (VocAlign Eq. 7) on
every inference path: model(...), the processor, the sliding window, set_vocabulary, the pipelines, save/load."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from conftest import tiny_catseg_config
from vocalign_hf import CATSegForSemanticSegmentation
from vocalign_hf.adaptation.vocabulary import ConceptVocabulary

NAMES = ["sky", "road", "car"]
CONCEPTS = {"road": ["street", "asphalt"], "car": ["vehicle"]}


@pytest.fixture
def images():
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(3, 32, 32, generator=generator) for _ in range(2)]


def _logits(model, processor, images, **call):
    with torch.no_grad():
        return model(**processor(images=images, do_rescale=False, **call)).logits


def test_processor_concepts_give_eq7_class_probabilities(tiny_model, tiny_processor, images):
    """The model's class logits with concepts are the log of Eq. 7 (the trainer's ConceptVocabulary.aggregate of
    the entries' logits): softmax over all entries, summed per class."""
    inputs = tiny_processor(images=images, text=NAMES, concepts=CONCEPTS, do_rescale=False)
    assert inputs["entry_class_ids"].tolist() == [0, 1, 1, 1, 2, 2]
    assert inputs["input_ids"].shape[0] == 6 * tiny_model.config.num_templates
    with torch.no_grad():
        logits = tiny_model(**inputs).logits
        entries = tiny_model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                             entry_class_ids=torch.arange(6)).logits
    expected = ConceptVocabulary(NAMES, CONCEPTS).aggregate(entries, from_logits=True)
    assert logits.shape == (2, 3, 16, 16)
    torch.testing.assert_close(logits.exp(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits.softmax(dim=1), expected, atol=1e-6, rtol=1e-5)


def test_held_concepts_apply_to_class_names_and_survive_save(tiny_model, tiny_processor, images, tmp_path):
    explicit = _logits(tiny_model, tiny_processor, images, text=NAMES, concepts=CONCEPTS)
    names_only = _logits(tiny_model, tiny_processor, images, text=NAMES)
    tiny_model.set_concepts(CONCEPTS, tiny_processor)
    assert tiny_model.config.concepts == CONCEPTS
    torch.testing.assert_close(_logits(tiny_model, tiny_processor, images, text=NAMES), explicit)
    # Explicit choices win: none, or other concepts.
    torch.testing.assert_close(_logits(tiny_model, tiny_processor, images, text=NAMES, concepts={}), names_only)
    other = {"sky": ["heaven"]}
    held_other = _logits(tiny_model, tiny_processor, images, text=NAMES, concepts=other)
    assert not torch.allclose(held_other, explicit)
    # A class of the call the model holds no concepts for is scored by its name; order does not matter.
    reordered = _logits(tiny_model, tiny_processor, images, text=["car", "tree", "road"])
    assert reordered.shape[1] == 3
    tiny_model.save_pretrained(tmp_path)
    loaded = CATSegForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert loaded.config.concepts == CONCEPTS
    torch.testing.assert_close(_logits(loaded, tiny_processor, images, text=NAMES), explicit)
    tiny_model.set_concepts(None, tiny_processor)
    torch.testing.assert_close(_logits(tiny_model, tiny_processor, images, text=NAMES), names_only)


def test_default_vocabulary_and_sliding_window_use_the_concepts(tiny_model, tiny_processor, images):
    pixel_values = tiny_processor(images=images, do_rescale=False)["pixel_values"]
    explicit = _logits(tiny_model, tiny_processor, images, text=NAMES, concepts=CONCEPTS)
    tiny_model.set_vocabulary(NAMES, tiny_processor, concepts=CONCEPTS)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(pixel_values=pixel_values).logits, explicit)
        window = tiny_model.predict_sliding_window(pixel_values, kernel=16, overlap=0.5, out_res=(32, 32))
        entry_logits = tiny_model.predict_sliding_window(
            pixel_values, input_ids=tiny_processor(text=NAMES, concepts=CONCEPTS)["input_ids"],
            entry_class_ids=torch.arange(6), kernel=16, overlap=0.5, out_res=(32, 32))
    # "catseg" mode: the entries' averaged sigmoid probabilities read back as logits, then Eq. 7 (log-probabilities).
    entry_probs = entry_logits.sigmoid()
    expected = ConceptVocabulary(NAMES, CONCEPTS).aggregate(torch.logit(entry_probs.clamp(1e-6, 1 - 1e-6)))
    torch.testing.assert_close(window.exp(), expected, atol=1e-6, rtol=1e-5)


def test_mmseg_sliding_window_reduces_the_averaged_entry_logits(tiny_processor, images):
    torch.manual_seed(0)
    model = CATSegForSemanticSegmentation(tiny_catseg_config(sliding_window_mode="mmseg")).eval()
    pixel_values = tiny_processor(images=images, do_rescale=False)["pixel_values"]
    inputs = tiny_processor(text=NAMES, concepts=CONCEPTS)
    with torch.no_grad():
        scores = model.predict_sliding_window(pixel_values, **inputs, kernel=24)
        entries = model.predict_sliding_window(pixel_values, input_ids=inputs["input_ids"],
                                               entry_class_ids=torch.arange(6), kernel=24)
    torch.testing.assert_close(scores.exp(), ConceptVocabulary(NAMES, CONCEPTS).aggregate(entries), atol=1e-6,
                               rtol=1e-5)


def test_pipelines_score_with_the_concepts(tiny_model, tiny_processor):
    image = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8"))
    segmenter = pipeline("zero-shot-image-segmentation", model=tiny_model, processor=tiny_processor)

    def scores(result):
        return {segment["label"]: round(segment["score"], 5) for segment in result}

    names_only = scores(segmenter(image, candidate_labels=NAMES))
    per_call = scores(segmenter(image, candidate_labels=NAMES, concepts=CONCEPTS))
    assert per_call != names_only
    tiny_model.set_concepts(CONCEPTS, tiny_processor)
    assert scores(segmenter(image, candidate_labels=NAMES)) == per_call  # held by the model
    assert scores(segmenter(image, candidate_labels=NAMES, concepts={})) == names_only
    tiny_model.set_vocabulary(NAMES, tiny_processor)
    assert scores(segmenter(image)) == per_call
    image_segmenter = pipeline("image-segmentation", model=tiny_model, image_processor=tiny_processor.image_processor)
    labels = [segment["label"] for segment in image_segmenter(image, subtask="semantic")]
    assert set(labels) == set(per_call)


@pytest.mark.parametrize(
    ("concepts", "message"),
    [
        ({"tree": ["forest"]}, "not among the class names"),
        ({"road": ["sky"]}, "'sky' of 'road' is also the class or a concept of 'sky'"),
        ({"road": ["lane"], "car": ["Lane"]}, "is also the class or a concept of 'road'"),
        ({"road": "street"}, "must be a list of strings"),
        ({"road": [" "]}, "blank or non-string"),
    ],
)
def test_bad_concepts_are_one_clear_error(tiny_model, tiny_processor, concepts, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor(text=NAMES, concepts=concepts)
    segmenter = pipeline("zero-shot-image-segmentation", model=tiny_model, processor=tiny_processor)
    with pytest.raises(ValueError, match=message):
        segmenter(Image.new("RGB", (32, 32)), candidate_labels=NAMES, concepts=concepts)


def test_a_held_concept_that_is_a_class_of_the_call_is_refused(tiny_model, tiny_processor, images):
    tiny_model.set_concepts(CONCEPTS, tiny_processor)
    with pytest.raises(ValueError, match="scores 'road' with its concept 'street', which is also a class"):
        _logits(tiny_model, tiny_processor, images, text=["road", "street"])
    # ... and the way out the message names works.
    assert _logits(tiny_model, tiny_processor, images, text=["road", "street"], concepts={}).shape[1] == 2


def test_entry_class_ids_are_checked(tiny_model, tiny_processor, images):
    inputs = tiny_processor(images=images, text=NAMES, do_rescale=False)
    with pytest.raises(ValueError, match="class of each of the 3 vocabulary rows"):
        tiny_model(**inputs, entry_class_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="number the classes 0..N-1"):
        tiny_model(**inputs, entry_class_ids=torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="class_indices"):
        tiny_model(**inputs, entry_class_ids=torch.arange(3), class_indices=torch.tensor([[0], [1]]))

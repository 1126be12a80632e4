"""One score convention (issue 25): the model and the sliding window return class logits; post-processing, the
zero-shot pipeline and the demo return class probabilities, the softmax over the classes of the logits resized to
the image (the activation documented in `post_process_semantic_segmentation`), all consistent on the same input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import pipeline

from conftest import tiny_catseg_config
from vocalign_hf import CATSegForSemanticSegmentation
from vocalign_hf.demo import DemoSegmenter

NAMES = ["sky", "road", "car"]
CONCEPTS = {"road": ["street", "asphalt"], "car": ["vehicle"]}
SIZE = (30, 40)


@pytest.fixture
def image():
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (*SIZE, 3), dtype=np.uint8))


def _softmax_of_resized(logits, size):
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)[0].softmax(dim=0)


def test_model_logits_with_concepts_are_log_probabilities(tiny_model, tiny_processor, image):
    with torch.no_grad():
        plain = tiny_model(**tiny_processor(images=image, text=NAMES)).logits
        aligned = tiny_model(**tiny_processor(images=image, text=NAMES, concepts=CONCEPTS)).logits
    assert plain.logsumexp(dim=1).abs().max() > 1e-3  # raw logits: not normalised
    torch.testing.assert_close(aligned.logsumexp(dim=1), torch.zeros_like(aligned[:, 0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["catseg", "mmseg"])
def test_sliding_window_returns_logits_in_both_modes(tiny_processor, image, mode):
    torch.manual_seed(0)
    model = CATSegForSemanticSegmentation(tiny_catseg_config(sliding_window_mode=mode, sliding_window_stride=12)).eval()
    pixel_values = tiny_processor(images=image, do_resize=False)["pixel_values"]
    window = dict(kernel=16, overlap=0.5, out_res=(32, 32)) if mode == "catseg" else dict(kernel=16)
    with torch.no_grad():
        logits = model.predict_sliding_window(pixel_values, **tiny_processor(text=NAMES), **window)
        aligned = model.predict_sliding_window(pixel_values, **tiny_processor(text=NAMES, concepts=CONCEPTS), **window)
        if mode == "catseg":  # the reference's averaged sigmoid probabilities, which the logits read back
            text = model.get_text_embeddings(tiny_processor(text=NAMES)["input_ids"])
            probs = model._predict_sliding_window_catseg(pixel_values, text, None, 16, 0.5, (32, 32))
            torch.testing.assert_close(logits.sigmoid(), probs, atol=1e-6, rtol=1e-5)
            assert torch.equal(logits.argmax(dim=1), probs.argmax(dim=1))
    assert logits.shape == (1, 3, *SIZE) and torch.isfinite(logits).all()
    assert logits.min() < 0  # not probabilities
    torch.testing.assert_close(aligned.logsumexp(dim=1), torch.zeros_like(aligned[:, 0]), atol=1e-5, rtol=0)


def test_post_processing_gives_the_softmax_of_the_resized_logits(tiny_model, tiny_processor, image):
    with torch.no_grad():
        logits = tiny_model(**tiny_processor(images=image, text=NAMES)).logits
    maps = tiny_processor.post_process_semantic_segmentation(logits, target_sizes=[SIZE])
    scored = tiny_processor.post_process_semantic_segmentation(logits, target_sizes=[SIZE],
                                                              return_segmentation_scores=True)[0]
    expected = _softmax_of_resized(logits, SIZE)
    torch.testing.assert_close(scored.segmentation_scores, expected)
    assert not torch.allclose(scored.segmentation_scores, expected.new_tensor(0.5).expand_as(expected))
    torch.testing.assert_close(scored.segmentation_scores.sum(dim=0), torch.ones(SIZE))
    assert torch.equal(scored.segmentation, maps[0])
    assert torch.equal(scored.segmentation, scored.segmentation_scores.argmax(dim=0))
    # a per-class sigmoid would give other numbers: the activation is the documented softmax
    sigmoid = F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=False)[0].sigmoid()
    assert (scored.segmentation_scores - sigmoid).abs().max() > 1e-2


def test_sliding_window_logits_post_process_like_the_model_logits(tiny_model, tiny_processor, image):
    pixel_values = tiny_processor(images=image, do_resize=False)["pixel_values"]
    with torch.no_grad():
        logits = tiny_model.predict_sliding_window(pixel_values, **tiny_processor(text=NAMES), kernel=16,
                                                   overlap=0.5, out_res=(32, 32))
    scored = tiny_processor.post_process_semantic_segmentation(logits, return_segmentation_scores=True)[0]
    torch.testing.assert_close(scored.segmentation_scores, logits[0].softmax(dim=0))
    assert torch.equal(scored.segmentation, logits[0].argmax(dim=0))


def _expected_scores(model, processor, image, concepts=None):
    """The post-processed labels and each present class's mean probability over its pixels."""
    with torch.no_grad():
        logits = model(**processor(images=image, text=NAMES, concepts=concepts)).logits
    probs = _softmax_of_resized(logits, SIZE)
    labels = processor.post_process_semantic_segmentation(logits, target_sizes=[SIZE])[0]
    return labels, {NAMES[c]: float(probs[c][labels == c].mean()) for c in labels.unique().tolist()}


@pytest.mark.parametrize("concepts", [None, CONCEPTS])
def test_pipeline_scores_are_the_post_processed_probabilities(tiny_model, tiny_processor, image, concepts):
    labels, expected = _expected_scores(tiny_model, tiny_processor, image, concepts)
    segmenter = pipeline("zero-shot-image-segmentation", model=tiny_model, processor=tiny_processor)
    segments = segmenter(image, candidate_labels=NAMES, concepts=concepts or {})
    assert {s["label"]: s["score"] for s in segments} == pytest.approx(expected, abs=1e-6)
    for segment in segments:
        mask = torch.from_numpy(np.array(segment["mask"]) == 255)
        assert torch.equal(mask, labels == NAMES.index(segment["label"]))


def test_demo_scores_are_the_post_processed_probabilities(tiny_model, tiny_processor, image):
    labels, expected = _expected_scores(tiny_model, tiny_processor, image)
    result = DemoSegmenter(tiny_model, tiny_processor, device="cpu", bf16=False).segment(image, NAMES)
    assert np.array_equal(result.labels, labels.numpy())
    present = {NAMES[c]: float(result.scores[c]) for c in range(len(NAMES)) if result.shares[c]}
    assert present == pytest.approx(expected, abs=1e-6)
    assert all(result.scores[c] == 0 for c in range(len(NAMES)) if not result.shares[c])

"""Numerical parity of the port with the reference CAT-Seg (cvlab-kaist/CAT-Seg 6d3a188).

The fixture in tests/fixtures/catseg_reference/ was made by running the reference code on a tiny seeded random
model (see its README.md and make_fixture.py). Here its state dict goes through `convert_checkpoint` and the port
must reproduce the reference logits within 1e-4.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vocalign_hf import CATSegProcessor
from vocalign_hf.models.catseg.convert_catseg_checkpoint import (
    CheckpointConversionError,
    convert_checkpoint,
    convert_state_dict,
)

FIXTURE = Path(__file__).parent / "fixtures" / "catseg_reference"
TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    state = {k: v.float() for k, v in load_file(str(FIXTURE / "state_dict.safetensors")).items()}
    io = load_file(str(FIXTURE / "io.safetensors"))
    config = json.loads((FIXTURE / "config.json").read_text())
    return state, io, config


def build(state, config, **extra):
    overrides = dict(
        guidance_layers=config["layer_indexes"],
        clip_resolution=config["clip_resolution"][0],
        num_heads=config["predictor"]["num_heads"],
        vision_heads=config["clip"]["vision_heads"],
        text_heads=config["clip"]["transformer_heads"],
        window_size=config["predictor"]["window_sizes"],
        pooling_size=config["predictor"]["pooling_sizes"],
    )
    overrides.update(extra)
    return convert_checkpoint(state, **overrides)


@pytest.fixture(scope="module")
def port(reference):
    state, _, config = reference
    return build(state, config)


def test_tokenizer_matches_reference(reference, port):
    _, io, config = reference
    processor = CATSegProcessor.from_config(port.config)
    ids = processor.tokenize_classes(config["class_names"])["input_ids"][:, 0]
    ref = io["token_ids"]
    for row, ref_row in zip(ids, ref):
        length = int((ref_row == 49407).nonzero()[0]) + 1
        assert row[:length].tolist() == ref_row[:length].tolist()


def test_text_embeddings_match(reference, port):
    _, io, config = reference
    processor = CATSegProcessor.from_config(port.config)
    with torch.no_grad():
        text = port.get_text_embeddings(processor.tokenize_classes(config["class_names"])["input_ids"])
    assert (text - io["text_embeds"]).abs().max() <= TOL


def _pixel_values(io, port, **kwargs):
    processor = CATSegProcessor.from_config(port.config)
    return processor(images=io["image"], do_resize=False, **kwargs)["pixel_values"]


def test_direct_forward_matches(reference, port):
    state, io, config = reference
    pixel_values = _pixel_values(io, port, size_divisibility=config["size_divisibility"])
    processor = CATSegProcessor.from_config(port.config)
    inputs = processor(text=config["class_names"])
    with torch.no_grad():
        features = port.catseg.get_image_features(pixel_values)
        logits = port(pixel_values=pixel_values, input_ids=inputs["input_ids"]).logits
    dense = io["clip_features_direct"][:, 1:].transpose(1, 2).reshape(1, -1, 24, 24)
    assert (features.dense - dense).abs().max() <= TOL
    assert logits.shape == io["logits_direct"].shape
    assert (logits - io["logits_direct"]).abs().max() <= TOL
    height, width = io["probs_direct"].shape[-2:]
    probs = F.interpolate(logits.sigmoid(), size=(height, width), mode="bilinear", align_corners=False)[0]
    assert (probs - io["probs_direct"]).abs().max() <= TOL


def test_sliding_window_matches(reference, port):
    _, io, config = reference
    pixel_values = _pixel_values(io, port)
    processor = CATSegProcessor.from_config(port.config)
    ids = processor(text=config["class_names"])["input_ids"]
    logits = port.predict_sliding_window(pixel_values, input_ids=ids, output_size=io["probs_sliding"].shape[-2:])
    probs = logits.sigmoid()  # the reference returns the averaged sigmoid probabilities
    assert (probs[0] - io["probs_sliding"]).abs().max() <= TOL


def test_sliding_window_pooling_1_matches(reference):
    state, io, config = reference
    port = build(state, config, pooling_size=[1, 1])
    pixel_values = _pixel_values(io, port)
    ids = CATSegProcessor.from_config(port.config)(text=config["class_names"])["input_ids"]
    logits = port.predict_sliding_window(pixel_values, input_ids=ids, output_size=io["probs_sliding_pool1"].shape[-2:])
    probs = logits.sigmoid()
    assert (probs[0] - io["probs_sliding_pool1"]).abs().max() <= TOL


def test_class_pruning_beyond_pad_len_matches(reference):
    state, io, config = reference
    port = build(state, config, pad_len=3)
    pixel_values = _pixel_values(io, port, size_divisibility=config["size_divisibility"])
    ids = CATSegProcessor.from_config(port.config)(text=config["class_names"])["input_ids"]
    with torch.no_grad():
        logits = port(pixel_values=pixel_values, input_ids=ids).logits
    expected = io["logits_direct_pad3"]
    assert torch.equal(logits == -100, expected == -100)
    assert (logits - expected).abs().max() <= TOL


def test_converter_names_unknown_and_missing_keys(reference):
    state, _, config = reference
    extra = dict(state)
    extra["sem_seg_head.predictor.mystery.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointConversionError, match="mystery"):
        convert_state_dict(extra)
    missing = {k: v for k, v in state.items() if not k.endswith("visual.proj")}
    with pytest.raises(CheckpointConversionError, match="visual.proj"):
        convert_state_dict(missing)
    broken = {k: v for k, v in state.items() if "aggregator" not in k and "layers.1.attention.norm1.weight" not in k}
    with pytest.raises(CheckpointConversionError, match="layers.1.attention.norm1.weight"):
        build(broken, config)

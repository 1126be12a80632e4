"""CAT-Seg v1 in the detectron2 release layout (`model_final_base.pth`: R101 + ViT-B/16): conversion and parity.

tests/fixtures/catseg_v1_d2_reference/ was made by running cvlab-kaist/CAT-Seg af4fa0b (the last v1 code) with the
real detectron2 ResNet-101 (FrozenBN) on a tiny seeded model (see its README.md and make_fixture.py).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSemanticSegmentation

from vocalign_hf import CATSegProcessor
from vocalign_hf.models.catseg.convert_catseg_checkpoint import convert_checkpoint, main as convert_main

FIXTURE = Path(__file__).parent / "fixtures" / "catseg_v1_d2_reference"
TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    raw = load_file(str(FIXTURE / "state_dict.safetensors"))
    state = {k: v.float() if v.is_floating_point() else v for k, v in raw.items()}
    return state, load_file(str(FIXTURE / "io.safetensors")), json.loads((FIXTURE / "config.json").read_text())


def heads(config):
    return dict(num_heads=config["predictor"]["num_heads"], vision_heads=config["clip"]["vision_heads"],
                text_heads=config["clip"]["transformer_heads"])


@pytest.fixture(scope="module")
def port(reference):
    state, _, config = reference
    return convert_checkpoint(state, **heads(config))


@pytest.fixture(scope="module")
def processor(port):
    return CATSegProcessor.from_config(port.config)


@pytest.fixture(scope="module")
def text(reference, port, processor):
    _, io, config = reference
    with torch.no_grad():
        embeds = port.get_text_embeddings(processor.tokenize_classes(config["class_names"])["input_ids"])
    assert (embeds - io["text_embeds"]).abs().max() <= 1e-5
    return embeds


def test_release_config_is_read_from_the_checkpoint(reference, port):
    _, _, config = reference
    c = port.config
    assert c.variant == "v1" and c.sliding_window_mode == "catseg" and not c.class_mlp_adds_input
    assert c.backbone_config.depths == [3, 4, 23] and c.backbone_config.hidden_sizes == [32, 64, 128]
    assert c.num_templates == 80 and c.prompt_templates == "imagenet" and c.pooling_size == [2, 2]
    assert c.pad_len == 0 and c.decoder_guidance_dims == config["predictor"]["decoder_guidance_dims"]
    # FrozenBN has no batch counter: the port's frozen batch norms get 0.
    assert int(port.catseg.backbone.embedder.embedder.normalization.num_batches_tracked) == 0


def test_direct_forward_matches(reference, port, processor, text):
    _, io, _ = reference
    pixel_values = processor(images=io["image"], do_resize=False, size_divisibility=32)["pixel_values"]
    with torch.no_grad():
        logits = port(pixel_values=pixel_values, text_embeds=text).logits
    assert (logits - io["logits_direct"]).abs().max() <= TOL


def test_sliding_window_matches(reference, port, processor, text):
    _, io, _ = reference
    pixel_values = processor(images=io["image"], do_resize=False)["pixel_values"]
    probs = port.predict_sliding_window(pixel_values, text_embeds=text).sigmoid()  # "catseg" mode: logits
    assert (probs[0, :, ::4, ::4] - io["probs_sliding_sub4"]).abs().max() <= TOL


def test_cli_converts_the_detectron2_file(reference, port, tmp_path):
    state, _, config = reference
    checkpoint = tmp_path / "model_final_base.pth"
    torch.save({"model": state, "iteration": 80000}, checkpoint)
    convert_main([str(checkpoint), str(tmp_path / "out"), "--num-heads", str(config["predictor"]["num_heads"])])
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "out")
    expected = port.state_dict()
    assert loaded.config.variant == "v1"
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_unexpected_backbone_shapes_are_named(reference):
    from vocalign_hf.models.catseg.convert_catseg_checkpoint import CheckpointConversionError

    state, _, config = reference
    with_res5 = dict(state, **{"backbone.res5.0.conv1.weight": torch.zeros(8, 128, 1, 1)})
    with pytest.raises(CheckpointConversionError, match=r"found stages \[2, 3, 4, 5\]"):
        convert_checkpoint(with_res5, **heads(config))
    without = {k: v for k, v in state.items() if k != "backbone.res3.1.conv2.norm.running_var"}
    with pytest.raises(CheckpointConversionError, match=r"stages\.1\.layers\.1\.layer\.1\.normalization\.running_var"):
        convert_checkpoint(without, **heads(config))

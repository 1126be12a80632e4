"""CAT-Seg v1 (ResNet guidance backbone): parity with the mmsegmentation reference VocAlign adapts, and conversion.

tests/fixtures/catseg_v1_reference/ was made by running andraghetti/VocAlign 146c662 (CLIPOVCATSeg, ResNet-101
shaped backbone, CATSegAggregator, CATSegHead, EncoderDecoder.slide_inference) on a tiny seeded model (see its
README.md and make_fixture.py). Its state dict, in the key names of an mmseg checkpoint, goes through the converter;
the port must reproduce the reference within 1e-4.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForSemanticSegmentation

from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
from vocalign_hf.models.catseg.convert_catseg_checkpoint import (
    CheckpointConversionError,
    convert_checkpoint,
    convert_state_dict,
    fold_prompt_channels,
    infer_config,
    main as convert_main,
)
from vocalign_hf.models.catseg.prompt_templates import VOCALIGN_SELECT_CLIP

FIXTURE = Path(__file__).parent / "fixtures" / "catseg_v1_reference"
TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    raw = load_file(str(FIXTURE / "state_dict.safetensors"))
    state = {k: v.float() if v.is_floating_point() else v for k, v in raw.items()}
    io = load_file(str(FIXTURE / "io.safetensors"))
    config = json.loads((FIXTURE / "config.json").read_text())
    return state, io, config


def overrides(config):
    """What the checkpoint's shapes cannot tell: the tiny model's head counts and class pooling."""
    return dict(
        num_heads=config["neck"]["num_heads"],
        pooling_size=config["neck"]["pooling_size"],
        vision_heads=config["clip"]["vision_heads"],
        text_heads=config["clip"]["transformer_heads"],
    )


@pytest.fixture(scope="module")
def port(reference):
    state, _, config = reference
    return convert_checkpoint(state, **overrides(config))


@pytest.fixture(scope="module")
def processor(port):
    return CATSegProcessor.from_config(port.config)


@pytest.fixture(scope="module")
def text(reference, port, processor):
    _, _, config = reference
    with torch.no_grad():
        return port.get_text_embeddings(processor.tokenize_classes(config["class_names"])["input_ids"])


def pixels(processor, image):
    return processor(images=image, do_resize=False)["pixel_values"]


def test_config_is_read_from_the_checkpoint(reference, port):
    state, _, config = reference
    c = port.config
    assert c.variant == "v1" and c.sliding_window_mode == "mmseg" and c.pad_len == 0 and c.class_mlp_adds_input
    assert c.backbone_config.depths == [3, 4, 23]  # ResNet-101's first three stages
    assert c.backbone_config.hidden_sizes == [32, 64, 128] and c.backbone_config.embedding_size == 8
    assert c.decoder_guidance_dims == config["decode_head"]["decoder_guidance_dims"]
    assert c.appearance_guidance_dim == config["neck"]["appearance_guidance_dim"]
    assert c.templates == VOCALIGN_SELECT_CLIP
    # 80 channels in the checkpoint, 10 templates: folded.
    assert state["neck.conv1.weight"].shape[1] == 80
    assert port.catseg.aggregator.conv1.weight.shape[1] == 10


def test_tokens_and_text_embeddings_match(reference, processor, text):
    _, io, config = reference
    ids = processor.tokenize_classes(config["class_names"])["input_ids"]
    ref = io["token_ids"]
    assert ids.shape[:2] == ref.shape[:2] == (5, 10)
    for row, ref_row in zip(ids.flatten(0, 1), ref.flatten(0, 1)):
        length = int((ref_row == 49407).nonzero()[0]) + 1
        assert row[:length].tolist() == ref_row[:length].tolist()
    assert (text - io["text_embeds"]).abs().max() <= 1e-5


def test_image_features_match(reference, port, processor):
    _, io, _ = reference
    with torch.no_grad():
        features = port.catseg.get_image_features(pixels(processor, io["direct_image"]))
    assert (features.dense - io["clip_features_direct"]).abs().max() <= TOL
    stage3 = io["appearance_stage3_direct"]  # ResNet map, values up to ~120: compare relative to its scale
    assert (features.guidance[0] - stage3).abs().max() <= 1e-6 * stage3.abs().max() * 10


def test_direct_forward_matches(reference, port, processor, text):
    _, io, _ = reference
    with torch.no_grad():
        logits = port(pixel_values=pixels(processor, io["direct_image"]), text_embeds=text).logits
    assert logits.shape == io["logits_direct"].shape == (1, 5, 96, 96)
    assert (logits - io["logits_direct"]).abs().max() <= TOL


def test_mmseg_sliding_window_matches(reference, port, processor, text):
    _, io, config = reference
    image = io["sliding_image"]
    scores = port.predict_sliding_window(pixels(processor, image), text_embeds=text)
    assert scores.shape == (1, 5, *image.shape[-2:])
    step = config["sliding_subsample"]
    assert (scores[..., ::step, ::step] - io["logits_sliding_sub4"]).abs().max() <= TOL


def test_batch_keeps_each_images_guidance(reference, port, processor, text):
    """The reference pairs image i with image (i mod B)'s guidance when B > 1; the port keeps them together."""
    _, io, _ = reference
    a = pixels(processor, io["direct_image"])
    b = pixels(processor, io["sliding_image"][:, :384, :384])
    with torch.no_grad():
        both = port(pixel_values=torch.cat([a, b]), text_embeds=text).logits
        alone = [port(pixel_values=x, text_embeds=text).logits for x in (a, b)]
    assert (both - torch.cat(alone)).abs().max() <= 1e-5
    assert (alone[0] - alone[1]).abs().max() > 0.1


def test_guidance_pixel_values_feed_only_the_backbone(reference, port, processor, text):
    """VocAlign masks the student's CLIP input and gives its ResNet the unmasked image."""
    _, io, _ = reference
    image = pixels(processor, io["direct_image"])
    masked = image.clone()
    masked[..., :192, :] = 0
    with torch.no_grad():
        both_masked = port(pixel_values=masked, text_embeds=text).logits
        clip_masked = port(pixel_values=masked, text_embeds=text, guidance_pixel_values=image).logits
        clean = port(pixel_values=image, text_embeds=text).logits
        features = port.catseg.get_image_features(masked, image)
        clean_features = port.catseg.get_image_features(image)
    assert (both_masked - clip_masked).abs().max() > 1e-3
    assert (clip_masked - clean).abs().max() > 1e-3
    assert all(torch.equal(g, c) for g, c in zip(features.guidance, clean_features.guidance))


def test_backbone_batch_norm_stays_frozen_in_training_mode(reference, port, processor, text):
    _, io, _ = reference
    image = pixels(processor, io["direct_image"])
    try:
        port.train()
        assert not port.catseg.backbone.training and port.catseg.aggregator.training
        running = port.catseg.backbone.embedder.embedder.normalization.running_mean.clone()
        with torch.no_grad():
            train_logits = port(pixel_values=image, text_embeds=text).logits
        assert torch.equal(running, port.catseg.backbone.embedder.embedder.normalization.running_mean)
    finally:
        port.eval()
    with torch.no_grad():
        eval_logits = port(pixel_values=image, text_embeds=text).logits
    assert (train_logits - eval_logits).abs().max() <= 1e-6


def test_fold_prompt_channels_equals_the_reference_tiling():
    torch.manual_seed(0)
    # float64: the two convolutions are equal in exact arithmetic; in float32 their rounding (values reach ~100,
    # 3920-term sums) depends on the convolution algorithm the CPU picks, which made a 1e-4 tolerance flaky.
    weight, x = torch.randn(6, 80, 7, 7, dtype=torch.float64), torch.randn(2, 10, 12, 12, dtype=torch.float64)
    tiled = F.conv2d(x.repeat(1, 8, 1, 1), weight, padding=3)  # reference: text_feats.repeat(B, 1, 8, 1)
    folded = F.conv2d(x, fold_prompt_channels(weight, 10), padding=3)
    torch.testing.assert_close(folded, tiled, rtol=1e-10, atol=1e-9)
    assert fold_prompt_channels(weight, 80) is weight
    with pytest.raises(CheckpointConversionError, match="80 template channels.*7 templates"):
        fold_prompt_channels(weight, 7)


def test_converter_names_unknown_and_missing_keys(reference):
    state, _, config = reference
    extra = dict(state)
    extra["backbone.clip_model.visual.transformer.resblocks.0.attn.a_proj_weight_lora_q"] = torch.zeros(1, 64)
    with pytest.raises(CheckpointConversionError, match="a_proj_weight_lora_q"):
        convert_state_dict(extra)
    missing = {k: v for k, v in state.items() if k != "decode_head.decoder1.conv1.gn.weight"}
    with pytest.raises(CheckpointConversionError, match=r"decoder1\.conv\.double_conv\.1\.weight"):
        convert_checkpoint(missing, **overrides(config))
    converted = convert_state_dict(state, num_templates=10)
    assert not any("relative_position_index" in k for k in converted)  # unused buffer, dropped by design
    assert infer_config(state, **overrides(config)).variant == "v1"


def test_cli_converts_an_mmengine_checkpoint_and_round_trips(reference, port, processor, text, tmp_path):
    state, io, config = reference
    checkpoint = tmp_path / "catseg_v1.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": state}, checkpoint)
    out = tmp_path / "converted"
    convert_main([str(checkpoint), str(out), "--num-heads", "2", "--pooling-size", "2", "2"])
    # The CLI cannot know the tiny towers' head counts (it uses width // 64), so compare the aggregator, backbone
    # and decoder weights it wrote, then run a model loaded from it with the right CLIP heads.
    loaded = AutoModelForSemanticSegmentation.from_pretrained(out)
    assert isinstance(loaded, CATSegForSemanticSegmentation) and loaded.config.variant == "v1"
    reference_weights = port.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference_weights[key]), key
    loaded.config.clip_config.vision_config.num_attention_heads = config["clip"]["vision_heads"]
    loaded.config.clip_config.text_config.num_attention_heads = config["clip"]["transformer_heads"]
    rebuilt = CATSegForSemanticSegmentation(loaded.config)
    rebuilt.load_state_dict(loaded.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        logits = rebuilt(pixel_values=pixels(processor, io["direct_image"]), text_embeds=text).logits
    assert (logits - io["logits_direct"]).abs().max() <= TOL


def test_the_mmcv_ffn_residual_is_needed_for_parity(reference, processor, text):
    """Without `class_mlp_adds_input` (the detectron2 MLP) the same weights give different logits."""
    state, io, config = reference
    plain = convert_checkpoint(state, **overrides(config), class_mlp_adds_input=False)
    with torch.no_grad():
        logits = plain(pixel_values=pixels(processor, io["direct_image"]), text_embeds=text).logits
    assert (logits - io["logits_direct"]).abs().max() > 1e-2

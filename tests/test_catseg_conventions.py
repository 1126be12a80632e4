"""CAT-Seg behaves like a transformers model: image-processor flags, config validation, forward outputs, pipelines,
and a merged (peft-free) export of an adapted model."""

import json
import sys

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from PIL import Image
from transformers import pipeline
from transformers.image_utils import PILImageResampling
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING
from transformers.pipelines import base as pipeline_base
from transformers.testing_utils import CaptureLogger

from conftest import tiny_catseg_config, tiny_catseg_v1_config
from vocalign_hf import CATSegConfig, CATSegForSemanticSegmentation, CATSegImageProcessor
from vocalign_hf.data.transforms import to_pixel_values


def random_array(height, width, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


# ----------------------------------------------------------------------------------------- image processor
def test_per_call_flags_override_the_saved_ones(tiny_processor):
    processor = tiny_processor.image_processor
    image = random_array(20, 30)
    raw = torch.from_numpy(image).permute(2, 0, 1).float()
    plain = processor(image, do_resize=False, do_normalize=False)["pixel_values"][0]
    assert torch.equal(plain, raw / 255)
    unscaled = processor(image, do_resize=False, do_normalize=False, do_rescale=False)["pixel_values"][0]
    assert torch.equal(unscaled, raw)
    halved = processor(image, do_resize=False, do_normalize=False, rescale_factor=0.5)["pixel_values"][0]
    assert torch.allclose(halved, raw * 0.5)
    custom = processor(image, do_resize=False, image_mean=[0.5] * 3, image_std=[0.25] * 3)["pixel_values"][0]
    assert torch.allclose(custom, (raw / 255 - 0.5) / 0.25, atol=1e-6)
    resized = processor(image, size={"height": 8, "width": 12}, resample=PILImageResampling.NEAREST)
    assert resized["pixel_values"].shape == (1, 3, 8, 12)
    assert isinstance(processor(image, return_tensors="np")["pixel_values"], np.ndarray)
    # nothing of the above changed the processor itself
    assert processor(image)["pixel_values"].shape == (1, 3, 32, 32)


def test_saved_flags_are_honoured_after_reloading(tmp_path, tiny_processor):
    image = random_array(20, 30)
    processor = CATSegImageProcessor(do_normalize=False, do_resize=False)
    processor.save_pretrained(tmp_path)
    reloaded = CATSegImageProcessor.from_pretrained(tmp_path)
    assert reloaded.do_normalize is False and reloaded.do_resize is False
    expected = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(reloaded(image)["pixel_values"], expected)


def test_unknown_and_mistyped_arguments_are_clear_errors(tiny_processor):
    image = random_array(8, 8)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['do_normalise'\]"):
        tiny_processor.image_processor(image, do_normalise=False)
    with pytest.raises(TypeError, match="do_normalise"):  # through the processor as well
        tiny_processor(images=image, text=["a"], do_normalise=False)
    with pytest.raises(StrictDataclassError, match="do_normalize"):
        tiny_processor.image_processor(image, do_normalize="no")
    with pytest.raises(ValueError, match="resample"):
        tiny_processor.image_processor(image, resample=PILImageResampling.LANCZOS)
    with pytest.raises(ValueError, match="image_mean"):
        tiny_processor.image_processor(image, image_mean=[0.5, 0.5])


def test_float_images_on_the_0_255_scale_are_an_error_that_says_the_fix(tiny_processor):
    decoded = torch.from_numpy(random_array(20, 30)).permute(2, 0, 1)
    with pytest.raises(ValueError, match=r"values in \[0, 255\].*uint8.*divide it by 255"):
        tiny_processor.image_processor(decoded.float())
    # the suggested fixes give the uint8 image's pixels
    expected = tiny_processor.image_processor(decoded)["pixel_values"]
    assert torch.equal(tiny_processor.image_processor(decoded.float() / 255)["pixel_values"], expected)
    assert torch.equal(tiny_processor.image_processor(decoded.float().round().to(torch.uint8))["pixel_values"],
                       expected)


def test_rgba_gives_the_same_pixels_as_the_data_pipeline(tiny_processor):
    rgba = random_array(12, 16, channels=4)
    rgba[:, :8, 3] = 0  # left half transparent
    image = Image.fromarray(rgba, mode="RGBA")
    processor = tiny_processor.image_processor
    unnormalised = dict(do_resize=False, do_normalize=False)
    expected = to_pixel_values(image)  # what the training / evaluation datasets feed
    assert (expected[:, :, :8] == 0).all()  # composited over black
    for form in (image, rgba, torch.from_numpy(rgba).permute(2, 0, 1)):
        assert torch.equal(processor(form, **unnormalised)["pixel_values"][0], expected)
    with pytest.raises(ValueError, match="do_convert_rgb"):
        processor(image, do_convert_rgb=False)


# --------------------------------------------------------------------------------------------------- config
def test_config_runs_transformers_validation_and_checks_types():
    with pytest.raises(StrictDataclassError, match="output_attentions"):
        CATSegConfig(output_attentions=True, attn_implementation="sdpa")
    assert CATSegConfig(output_attentions=True, attn_implementation="eager").output_attentions
    with pytest.raises(StrictDataclassError, match=r"clip_resolution.*expected int, got str"):
        CATSegConfig(clip_resolution="384")
    with pytest.raises(StrictDataclassError, match="guidance_layers"):
        CATSegConfig(guidance_layers="3,7")
    config = CATSegConfig()
    with pytest.raises(StrictDataclassError, match="pad_len"):
        config.pad_len = 1.5  # checked on assignment too


# -------------------------------------------------------------------------------------------------- forward
def test_forward_honours_return_dict_and_output_hidden_states(tiny_model, tiny_processor):
    inputs = tiny_processor(images=[random_array(40, 50), random_array(30, 20, seed=1)], text=["a", "b", "c"])
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    with torch.no_grad():
        outputs = tiny_model(**inputs, labels=labels, output_hidden_states=True)
        as_tuple = tiny_model(**inputs, labels=labels, output_hidden_states=True, return_dict=False)
        plain = tiny_model(**inputs)
    config = tiny_model.config
    grid = config.feature_resolution
    assert plain.hidden_states is None
    assert len(outputs.hidden_states) == config.num_layers + 1  # the cost embedding, then each layer's output
    assert all(h.shape == (2, config.hidden_dim, 3, grid, grid) for h in outputs.hidden_states)
    assert not torch.equal(outputs.hidden_states[0], outputs.hidden_states[-1])
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    assert torch.equal(as_tuple[0], outputs.loss) and torch.equal(as_tuple[1], outputs.logits)
    assert all(torch.equal(a, b) for a, b in zip(as_tuple[2], outputs.hidden_states))
    assert torch.equal(plain.logits, outputs.logits)  # capturing the states changes nothing


def test_forward_rejects_what_it_cannot_do(tiny_model, tiny_processor):
    inputs = tiny_processor(images=[random_array(32, 32)], text=["a", "b"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'position_ids'"):
        tiny_model(**inputs, position_ids=torch.arange(3))
    with pytest.raises(ValueError, match="does not return attentions"):
        tiny_model(**inputs, output_attentions=True)



def test_bad_class_indices_and_target_sizes_are_clear_errors(tiny_model, tiny_processor):
    inputs = tiny_processor(images=[random_array(32, 32)] * 2, text=["a", "b", "c"])
    with torch.no_grad():
        kept = tiny_model(**inputs, class_indices=torch.tensor([[2, 0], [1, 1]])).logits
        embeds = tiny_model.get_text_embeddings(inputs["input_ids"])
        for name, value in (("input_ids", inputs["input_ids"]), ("text_embeds", embeds)):
            with pytest.raises(ValueError, match=r"class_indices \[3\] are out of range for a vocabulary of 3"):
                tiny_model(pixel_values=inputs["pixel_values"], **{name: value}, class_indices=torch.tensor([[0, 3], [1, 2]]))
        with pytest.raises(ValueError, match="class_indices has 1 rows for a batch of 2"):
            tiny_model(**inputs, class_indices=torch.tensor([[0, 1]]))
        with pytest.raises(ValueError, match="integer tensor"):
            tiny_model(**inputs, class_indices=torch.tensor([[0.0, 1.0], [1.0, 2.0]]))
    assert kept.shape[:2] == (2, 2)
    processor = tiny_processor.image_processor
    with pytest.raises(ValueError, match=r"list of \(height, width\), one per image; got \(64, 64\)"):
        processor.post_process_semantic_segmentation(kept[:1], target_sizes=(64, 64))
    assert processor.post_process_semantic_segmentation(kept[:1], target_sizes=[(64, 64)])[0].shape == (64, 64)

def test_output_hidden_states_selects_layers_by_index(tiny_model, tiny_processor):
    inputs = tiny_processor(images=[random_array(32, 32)], text=["a", "b", "c"])
    with torch.no_grad():
        every = tiny_model(**inputs, output_hidden_states=True).hidden_states
        picked = tiny_model(**inputs, output_hidden_states=[0, -1]).hidden_states
    assert len(picked) == len(every) == tiny_model.config.num_layers + 1
    assert torch.equal(picked[0], every[0]) and torch.equal(picked[-1], every[-1])
    assert all(state is None for state in picked[1:-1])


@pytest.mark.parametrize("factory", [tiny_catseg_config, tiny_catseg_v1_config])
def test_attention_implementation_is_selectable_and_eager_equals_sdpa(tiny_processor, factory):
    config = factory()
    inputs = tiny_processor(images=[random_array(config.clip_resolution, config.clip_resolution)] * 2, text=["a", "b", "c"])
    torch.manual_seed(0)
    model = CATSegForSemanticSegmentation(config).eval()
    calls = []
    window_attention = model.catseg.aggregator.layers[0].swin_block.block_2.attn  # the shifted one: with a mask
    window_attention.register_forward_hook(lambda module, args, out: calls.append(module.config._attn_implementation))
    with torch.no_grad():
        sdpa = model(**inputs).logits
        assert calls and set(calls) == {"sdpa"}
        calls.clear()
        model.set_attn_implementation("eager")
        eager = model(**inputs).logits
    assert calls and set(calls) == {"eager"}
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def test_image_features_are_a_model_output_with_the_vision_states(tiny_model, tiny_processor):
    pixel_values = tiny_processor(images=[random_array(32, 32)])["pixel_values"]
    vision = tiny_model.config.clip_config.vision_config
    with torch.no_grad():
        features = tiny_model.catseg.get_image_features(pixel_values, output_hidden_states=True)
        plain = tiny_model.catseg.get_image_features(pixel_values, return_dict=False)
    grid = tiny_model.config.feature_resolution
    assert features.last_hidden_state.shape == (1, 1 + grid * grid, vision.hidden_size)
    assert features.pooler_output.shape == (1, tiny_model.config.clip_config.projection_dim)
    assert len(features.hidden_states) == vision.num_hidden_layers + 1
    assert torch.equal(features.hidden_states[-1], features.last_hidden_state)
    assert isinstance(plain, tuple) and torch.equal(plain[0], features.last_hidden_state)


@pytest.mark.parametrize("layers", [[0, 0], [1, 0]])
def test_guidance_layers_are_used_in_layer_order_and_may_repeat(tiny_processor, layers):
    # The reference hooks its guidance layers and collects their outputs in the order the layers run.
    inputs = tiny_processor(images=[random_array(32, 32)], text=["a", "b"])
    torch.manual_seed(0)
    model = CATSegForSemanticSegmentation(tiny_catseg_config(guidance_layers=layers)).eval()
    torch.manual_seed(0)
    ordered = CATSegForSemanticSegmentation(tiny_catseg_config(guidance_layers=sorted(layers))).eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ordered(**inputs).logits)
    with pytest.raises(StrictDataclassError, match="out of range"):
        tiny_catseg_config(guidance_layers=[0, 2])  # the last of the 3 layers is the dense output layer


def test_parameters_catseg_never_uses_are_frozen(tiny_model, tiny_processor):
    frozen = {name for name, p in tiny_model.named_parameters() if not p.requires_grad}
    last = "catseg.clip.vision_model.encoder.layers.2.self_attn"
    assert frozen == {"catseg.clip.logit_scale", *(f"{last}.{p}_proj.{w}" for p in "qk" for w in ("weight", "bias"))}
    inputs = tiny_processor(images=[random_array(32, 32)], text=["a", "b"])
    tiny_model.train()
    tiny_model(**inputs, labels=torch.zeros(1, 32, 32, dtype=torch.long)).loss.backward()
    assert all(p.grad is not None for p in tiny_model.parameters() if p.requires_grad)


def test_config_keys_with_std_are_not_normalisations_and_old_configs_load(tmp_path):
    config = CATSegConfig(variant="v1", backbone_pixel_mean=[0.5, 0.5, 0.5], backbone_pixel_std=[0.2, 0.2, 0.2])
    assert config.backbone_normalization == {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}
    assert not any("_std" in key for key in config.to_dict())  # transformers reads *_std keys as init scales
    config.save_pretrained(tmp_path)
    assert CATSegConfig.from_pretrained(tmp_path).backbone_normalization == config.backbone_normalization
    with pytest.raises(StrictDataclassError, match="backbone_normalization needs 'mean' and 'std'"):
        CATSegConfig(backbone_normalization={"mean": [0.5, 0.5, 0.5]})


def test_no_transformers_attribute_is_shadowed_and_every_config_field_is_declared(tiny_model, tiny_processor):
    from transformers import PreTrainedModel

    assert type(tiny_model).loss_function is PreTrainedModel.loss_function  # the loss is `semantic_loss`
    tiny_model.set_vocabulary(["road", "sky"], tiny_processor)
    undeclared = set(tiny_model.config.to_dict()) - set(type(tiny_model.config).__dataclass_fields__)
    assert undeclared <= {"_name_or_path", "output_attentions"}, undeclared  # the two are transformers' own


def test_images_with_channels_first_or_last_in_any_container(tiny_processor):
    processor = tiny_processor.image_processor
    image = random_array(20, 30)
    expected = processor(Image.fromarray(image))["pixel_values"]
    chw, hwc = image.transpose(2, 0, 1), torch.from_numpy(image)
    for form in (chw, hwc, torch.from_numpy(chw)):
        assert torch.equal(processor(form)["pixel_values"], expected)
    assert torch.equal(processor(chw, input_data_format="channels_first")["pixel_values"], expected)
    tiny = random_array(4, 3)  # (4, 3, 3): both axes could be channels; the stated layout decides
    assert processor(tiny, do_resize=False, input_data_format="channels_last")["pixel_values"].shape == (1, 3, 4, 3)
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        processor(image, input_data_format="channels_first")


def test_post_processing_returns_segmentation_scores_as_transformers_does(tiny_processor):
    logits = torch.randn(2, 3, 8, 8)
    processor = tiny_processor.image_processor
    maps = processor.post_process_semantic_segmentation(logits, target_sizes=[(16, 16), (4, 8)])
    scored = processor.post_process_semantic_segmentation(logits, target_sizes=[(16, 16), (4, 8)],
                                                          return_segmentation_scores=True)
    assert [tuple(s.segmentation_scores.shape) for s in scored] == [(3, 16, 16), (3, 4, 8)]
    assert all(torch.equal(s.segmentation, m) for s, m in zip(scored, maps))
    assert torch.equal(scored[1].segmentation_scores.argmax(0), maps[1])  # probabilities of the resized logits
    with pytest.raises(ValueError, match="3 target sizes for a batch of 2"):
        processor.post_process_semantic_segmentation(logits, target_sizes=[(4, 4)] * 3)


def test_processor_routes_options_like_transformers_processors(tiny_processor):
    image = random_array(20, 30)
    names = ["road", "traffic light"]
    flat = tiny_processor(images=image, text=names, padding="max_length", max_length=20, do_resize=False)
    nested = tiny_processor(images=image, text=names, text_kwargs={"padding": "max_length", "max_length": 20},
                            images_kwargs={"do_resize": False})
    assert flat["input_ids"].shape == (2, 20) and flat["pixel_values"].shape == (1, 3, 20, 30)
    assert all(torch.equal(flat[key], nested[key]) for key in flat)
    as_numpy = tiny_processor(text=names, common_kwargs={"return_tensors": "np"})
    assert isinstance(as_numpy["input_ids"], np.ndarray)
    structured = tiny_processor.tokenize_classes(names)["input_ids"]
    assert torch.equal(tiny_processor(text=names)["input_ids"], structured.flatten(0, 1))
    with pytest.raises(ValueError, match="passed two times"):
        tiny_processor(text=names, text_kwargs={"padding": True}, padding="max_length")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['do_center_crop'\]"):
        tiny_processor(images=image, do_center_crop=True)


# ------------------------------------------------------------------------------------------------ pipelines
def test_zero_shot_pipeline_takes_class_names_per_call(tmp_path, tiny_model, tiny_processor):
    image = Image.fromarray(random_array(30, 40))
    tiny_model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    with CaptureLogger(pipeline_base.logger) as log:
        segmenter = pipeline("zero-shot-image-segmentation", model=str(tmp_path))
    assert "not supported" not in log.out
    for names in (["road", "car", "sky"], ["tree", "person"]):
        segments = segmenter(image, candidate_labels=names)
        with torch.no_grad():
            logits = tiny_model(**tiny_processor(images=image, text=names)).logits
        expected = tiny_processor.post_process_semantic_segmentation(logits, target_sizes=[(30, 40)])[0]
        assert {s["label"] for s in segments} == {names[i] for i in expected.unique().tolist()}
        assert [s["score"] for s in segments] == sorted((s["score"] for s in segments), reverse=True)
        for segment in segments:
            mask = np.asarray(segment["mask"]) == 255
            assert mask.shape == (30, 40)
            assert np.array_equal(mask, (expected == names.index(segment["label"])).numpy())
    with pytest.raises(ValueError, match="candidate_labels"):
        segmenter(image)  # no default vocabulary


def test_zero_shot_pipeline_batches_images_and_encodes_the_names_once(tmp_path, tiny_model, tiny_processor):
    tiny_model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    images = [Image.fromarray(random_array(20 + 3 * i, 30, seed=i)) for i in range(3)]
    names = ["road", "car", "sky"]
    segmenter = pipeline("zero-shot-image-segmentation", model=str(tmp_path))
    text_passes = []
    segmenter.model.catseg.clip.text_model.register_forward_hook(lambda *args: text_passes.append(1))

    def as_arrays(results):
        return [[(s["label"], round(s["score"], 5), np.asarray(s["mask"]).tobytes()) for s in r] for r in results]

    one_by_one = [segmenter(image, candidate_labels=names) for image in images]
    batched = segmenter(images, candidate_labels=names, batch_size=2)  # batches of 2 and 1
    assert as_arrays(batched) == as_arrays(one_by_one)
    assert [np.asarray(r[0]["mask"]).shape for r in batched] == [(20, 30), (23, 30), (26, 30)]
    assert len(text_passes) == 1  # four forward passes, one encoding of the names
    segmenter(images[:1], candidate_labels=["tree", "person"])
    assert len(text_passes) == 2  # new names: encoded again
    with torch.no_grad():  # an in-place weight update (an optimiser step) makes the cached embeddings stale
        segmenter.model.catseg.clip.text_projection.weight.mul_(-1)
    flipped = segmenter(images[0], candidate_labels=names)
    assert len(text_passes) == 3
    with torch.no_grad():
        logits = segmenter.model(**tiny_processor(images=images[0], text=names)).logits
    expected = tiny_processor.post_process_semantic_segmentation(logits, target_sizes=[(20, 30)])[0]
    assert {s["label"] for s in flipped} == {names[i] for i in expected.unique().tolist()}
    with pytest.raises(ValueError, match="candidate_labels: duplicate class name 'Car'"):
        segmenter(images[0], candidate_labels=["car", "road", "Car"])
    with pytest.raises(ValueError, match="candidate_labels"):
        segmenter(images[0], candidate_labels=[])


def test_image_segmentation_pipeline_is_clean_and_auto_mappings_intact(tiny_model, tiny_processor):
    tiny_model.set_vocabulary(["road", "car"], tiny_processor)
    with CaptureLogger(pipeline_base.logger) as log:
        segmenter = pipeline("image-segmentation", model=tiny_model, image_processor=tiny_processor.image_processor)
    assert "not supported" not in log.out
    assert {r["label"] for r in segmenter(Image.fromarray(random_array(20, 20)))} <= {"road", "car"}
    images = [Image.fromarray(random_array(20 + 3 * i, 30, seed=i)) for i in range(3)]
    masks = lambda results: [[(r["label"], np.asarray(r["mask"]).tobytes()) for r in rs] for rs in results]  # noqa: E731
    assert masks(segmenter(images, batch_size=2)) == masks([segmenter(image) for image in images])
    # registering the name for the pipeline check leaves the Auto mapping working
    assert CATSegConfig in list(MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING.keys())
    assert CATSegForSemanticSegmentation in MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING.values()
    # in-memory model, no processor given: the zero-shot pipeline builds it from the config
    zero_shot = pipeline("zero-shot-image-segmentation", model=tiny_model)
    assert {s["label"] for s in zero_shot(Image.fromarray(random_array(20, 20)))} <= {"road", "car"}


# ------------------------------------------------------------------------------------------- merged export
def test_merged_export_loads_without_peft_and_gives_the_adapted_logits(tmp_path, monkeypatch, tiny_model,
                                                                     tiny_processor):
    from peft import get_peft_model

    from vocalign_hf.adaptation import LoRASettings, load_adapted_model, lora_config_for_clip, save_adapter
    from vocalign_hf.adaptation.merge import main

    base, adapter, merged = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    tiny_model.save_pretrained(base)  # weights only, like the world's source model: the processor follows the config
    peft_model = get_peft_model(tiny_model, lora_config_for_clip(LoRASettings(layers=(0, 1))))
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): give it a real update
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    names = ["road", "car", "sky"]
    save_adapter(peft_model, adapter, class_names=names)

    inputs = tiny_processor(images=[random_array(40, 50), random_array(30, 60, seed=1)], text=names)
    adapted, _ = load_adapted_model(base, adapter)
    with torch.no_grad():
        expected = adapted(**inputs).logits
        base_logits = CATSegForSemanticSegmentation.from_pretrained(base).eval()(**inputs).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter matters

    main([str(base), str(adapter), str(merged)])
    files = {p.name for p in merged.iterdir()}
    assert "adapter_config.json" not in files
    assert {"config.json", "model.safetensors", "vocalign.json", "processor_config.json", "tokenizer.json"} <= files
    loaded = CATSegForSemanticSegmentation.from_pretrained(merged).eval()
    assert not any("lora" in key for key in loaded.state_dict())
    with torch.no_grad():
        got = loaded(**inputs).logits
        by_default = loaded(pixel_values=inputs["pixel_values"]).logits  # adapted classes = default vocabulary
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(by_default, got)
    assert json.loads((merged / "vocalign.json").read_text())["class_names"] == names

    # loading needs no peft: with peft made unimportable, the checkpoint still loads and gives the same logits
    monkeypatch.setitem(sys.modules, "peft", None)
    with torch.no_grad():
        again = CATSegForSemanticSegmentation.from_pretrained(merged).eval()(**inputs).logits
    assert torch.equal(again, got)


# ----------------------------------------------------------------------------------------- issue 25: names, dense layer
def test_flash_attention_is_declared_unsupported_with_transformers_error(tmp_path, tiny_model):
    # The shifted windows need an additive mask that flash-attention kernels cannot take (the model's docstring).
    assert tiny_model._supports_flash_attn is False and tiny_model._supports_sdpa is True
    with pytest.raises(ValueError, match="does not support Flash Attention 2"):
        tiny_model.set_attn_implementation("flash_attention_2")
    assert tiny_model.config._attn_implementation == "sdpa"
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not support Flash Attention 2"):
        CATSegForSemanticSegmentation.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


def test_checkpoints_with_the_old_mlp_key_names_load_and_are_written_as_transformers_does(tmp_path, tiny_model,
                                                                                       tiny_processor):
    from safetensors.torch import load_file, save_file

    tiny_model.save_pretrained(tmp_path / "new", save_original_format=False)
    saved = load_file(tmp_path / "new" / "model.safetensors")
    assert set(saved) == set(tiny_model.state_dict())
    assert any(".attention.mlp.0." in k for k in saved) and not any(".MLP." in k for k in saved)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    old = {k.replace(".attention.mlp.", ".attention.MLP."): v for k, v in saved.items()}
    assert sum(".attention.MLP." in k for k in old) == 4 * tiny_model.config.num_layers
    save_file(old, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})

    inputs = tiny_processor(images=[random_array(32, 32)], text=["a", "b"])
    for folder, keys in (("old", set(old)), ("new", set(saved))):
        loaded, info = CATSegForSemanticSegmentation.from_pretrained(tmp_path / folder, output_loading_info=True)
        assert not any(info.values()), info
        expected = tiny_model.state_dict()
        assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
        with torch.no_grad():
            assert torch.equal(loaded.eval()(**inputs).logits, tiny_model(**inputs).logits)
        # transformers' default (`save_original_format=True`) keeps the layout a checkpoint was loaded from
        loaded.save_pretrained(tmp_path / f"{folder}-resaved")
        assert set(load_file(tmp_path / f"{folder}-resaved" / "model.safetensors")) == keys
        loaded.save_pretrained(tmp_path / f"{folder}-current", save_original_format=False)
        assert set(load_file(tmp_path / f"{folder}-current" / "model.safetensors")) == set(saved)
    # ... and writes a new model as the conversion mapping reads it, under the old names
    tiny_model.save_pretrained(tmp_path / "default")
    assert set(load_file(tmp_path / "default" / "model.safetensors")) == set(old)


@pytest.mark.parametrize("factory", [tiny_catseg_config, tiny_catseg_v1_config])
def test_dense_clip_layer_keeps_clip_keys_and_attends_to_no_other_token(factory):
    from transformers import CLIPModel

    from vocalign_hf.models.catseg.modeling_catseg import CATSegDenseCLIPLayer

    config = factory()
    torch.manual_seed(0)
    model = CATSegForSemanticSegmentation(config).eval()
    dense = model.catseg.clip.vision_model.encoder.layers[-1]
    assert type(dense) is CATSegDenseCLIPLayer and dense.cls_residual == (config.variant != "v1")
    clip_keys = {f"catseg.clip.{key}" for key in CLIPModel(config.clip_config).state_dict()}
    assert clip_keys <= set(model.state_dict())
    tokens = torch.randn(1, 5, config.clip_config.vision_config.hidden_size)
    moved = tokens.clone()
    moved[:, 3] += 1  # a patch token: only its own output may change
    with torch.no_grad():
        changed = (dense(moved) != dense(tokens)).any(-1)[0]
        cls_moved = tokens.clone()
        cls_moved[:, 0] += 1
        cls_changed = (dense(cls_moved) != dense(tokens)).any(-1)[0]
    assert changed.tolist() == [False, False, False, True, False]
    # CVPR'24: every token's residual is the CLS token; v1: each token's own input
    assert cls_changed.tolist() == ([True] * 5 if dense.cls_residual else [True, False, False, False, False])

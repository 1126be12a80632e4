"""CAT-Seg port as a transformers model: Auto classes, save/load, class lists at call time, inputs, pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForSemanticSegmentation, AutoProcessor, pipeline

from huggingface_hub.errors import StrictDataclassError
from vocalign_hf import CATSegConfig, CATSegForSemanticSegmentation, CATSegModel, CATSegProcessor

# CATSegConfig is a strict dataclass like transformers' configs: its checks raise huggingface_hub's validation errors.
CONFIG_ERRORS = (ValueError, StrictDataclassError)


def random_image(height, width, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)


def test_save_load_round_trip_and_auto_classes(tmp_path, tiny_model, tiny_processor):
    inputs = tiny_processor(images=[random_image(40, 56)], text=["road", "car", "sky"])
    with torch.no_grad():
        expected = tiny_model(**inputs).logits
    tiny_model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CATSegConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), CATSegModel)
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(model, CATSegForSemanticSegmentation) and isinstance(processor, CATSegProcessor)
    with torch.no_grad():
        got = model(**processor(images=[random_image(40, 56)], text=["road", "car", "sky"])).logits
    assert torch.equal(expected, got)


@pytest.mark.parametrize("num_classes", [1, 3, 300])
def test_class_names_at_call_time_set_the_output_width(tiny_model, tiny_processor, num_classes):
    names = [f"class number {i}" for i in range(num_classes)]
    inputs = tiny_processor(images=[random_image(32, 32)], text=names)
    assert inputs["input_ids"].shape[0] == num_classes  # one prompt template: a row per class
    with torch.no_grad():
        logits = tiny_model(**inputs).logits
    assert logits.shape == (1, num_classes, 16, 16)
    assert torch.isfinite(logits).all()
    if num_classes > tiny_model.config.pad_len:  # beyond pad_len the reference keeps the best pad_len classes
        assert ((logits == -100).flatten(2).all(-1)).sum() == num_classes - tiny_model.config.pad_len


def test_a_class_changes_only_its_own_cost_slice_order(tiny_model, tiny_processor):
    image = tiny_processor(images=[random_image(32, 32)])["pixel_values"]
    with torch.no_grad():
        a = tiny_model(pixel_values=image, **tiny_processor(text=["road", "car", "sky"])).logits
        b = tiny_model(pixel_values=image, **tiny_processor(text=["sky", "road", "car"])).logits
    assert torch.allclose(a[:, [2, 0, 1]], b, atol=1e-5)  # permutation-equivariant over classes


@pytest.mark.parametrize(
    "names, message",
    [([], "empty"), (["road", "car", "Road"], "road"), (["road", ""], "entry 1 is blank"), ("road", "list")],
)
def test_bad_class_lists_are_clear_errors(tiny_processor, names, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tiny_processor(text=names)


def test_model_without_classes_says_how_to_give_them(tiny_model):
    with pytest.raises(ValueError, match="set_vocabulary"):
        tiny_model(pixel_values=torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("size", [(17, 23), (32, 32), (100, 37), (7, 300)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_any_image_size_and_mode(tiny_model, tiny_processor, size, mode):
    image = random_image(*size, mode=mode)
    inputs = tiny_processor(images=image, text=["road", "car"])
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        outputs = tiny_model(**inputs)
    segmentation = tiny_processor.post_process_semantic_segmentation(outputs, target_sizes=[size])[0]
    assert segmentation.shape == size and segmentation.max() <= 1


def test_unresized_inputs_not_divisible_by_the_patch_size(tiny_model, tiny_processor):
    pixel_values = tiny_processor(images=[random_image(45, 70)], do_resize=False)["pixel_values"]
    assert pixel_values.shape[-2:] == (45, 70)
    with torch.no_grad():
        logits = tiny_model(pixel_values=pixel_values, **tiny_processor(text=["a", "b"])).logits
        window_logits = tiny_model.predict_sliding_window(pixel_values, **tiny_processor(text=["a", "b"]),
                                                          output_size=(45, 70))
    assert logits.shape == (1, 2, 16, 16)
    assert window_logits.shape == (1, 2, 45, 70) and torch.isfinite(window_logits).all()


def test_grayscale_equals_its_rgb_copy(tiny_processor):
    gray = random_image(20, 20, "L")
    a = tiny_processor(images=gray)["pixel_values"]
    b = tiny_processor(images=gray.convert("RGB"))["pixel_values"]
    assert torch.equal(a, b)


def test_loss_ignores_255_and_matches_cross_entropy(tiny_model, tiny_processor):
    inputs = tiny_processor(images=[random_image(32, 32)], text=["road", "car", "sky"])
    labels = torch.randint(0, 3, (1, 32, 32))
    labels[0, :16] = 255
    outputs = tiny_model(**inputs, labels=labels)
    up = torch.nn.functional.interpolate(outputs.logits, size=(32, 32), mode="bilinear", align_corners=False)
    manual = torch.nn.functional.cross_entropy(up[0, :, 16:].unsqueeze(0), labels[:, 16:])
    assert torch.allclose(outputs.loss, manual, atol=1e-6)


def test_default_vocabulary_pipeline_and_persistence(tmp_path, tiny_model, tiny_processor):
    tiny_model.set_vocabulary(["road", "car", "sky"], tiny_processor)
    image = random_image(30, 40)
    with torch.no_grad():
        explicit = tiny_model(**tiny_processor(images=image, text=["road", "car", "sky"])).logits
        implicit = tiny_model(**tiny_processor(images=image)).logits
    assert torch.equal(explicit, implicit)
    segmenter = pipeline("image-segmentation", model=tiny_model, image_processor=tiny_processor.image_processor)
    results = segmenter(image)
    assert results and {r["label"] for r in results} <= {"road", "car", "sky"}
    assert all(r["mask"].size == (40, 30) for r in results)
    tiny_model.save_pretrained(tmp_path)
    reloaded = CATSegForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert reloaded.config.id2label == {0: "road", 1: "car", 2: "sky"}
    with torch.no_grad():
        assert torch.equal(reloaded(**tiny_processor(images=image)).logits, implicit)


def test_top_k_class_indices_select_per_image_vocabularies(tiny_model, tiny_processor):
    pixel_values = tiny_processor(images=[random_image(32, 32, seed=1), random_image(32, 32, seed=2)])["pixel_values"]
    ids = tiny_processor(text=["road", "car", "sky", "tree"])["input_ids"]
    indices = torch.tensor([[0, 2], [1, 3]])
    with torch.no_grad():
        full = tiny_model(pixel_values=pixel_values, input_ids=ids).logits
        picked = tiny_model(pixel_values=pixel_values, input_ids=ids, class_indices=indices).logits
        only = [tiny_model(pixel_values=pixel_values[i : i + 1], input_ids=ids[indices[i]]).logits for i in range(2)]
    assert picked.shape == (2, 2, 16, 16)
    assert torch.allclose(picked, torch.cat(only), atol=1e-5)
    assert not torch.allclose(picked[0], full[0, [0, 2]], atol=1e-4)  # class attention sees only the kept classes


def test_config_errors_name_the_problem():
    with pytest.raises(CONFIG_ERRORS, match="guidance_layers"):
        CATSegConfig(guidance_layers=[3, 11])
    with pytest.raises(CONFIG_ERRORS, match="template"):
        CATSegConfig(prompt_templates=["no placeholder"])
    with pytest.raises(CONFIG_ERRORS, match="loss_type"):
        CATSegConfig(loss_type="dice")


def test_v1_config_errors_name_the_problem():
    with pytest.raises(CONFIG_ERRORS, match="variant"):
        CATSegConfig(variant="v3")
    with pytest.raises(CONFIG_ERRORS, match="backbone_config is only used by variant='v1'"):
        CATSegConfig(backbone_config={"model_type": "resnet", "out_features": ["stage1", "stage2", "stage3"]})
    with pytest.raises(CONFIG_ERRORS, match="three out_features"):
        CATSegConfig(variant="v1", backbone_config={"model_type": "resnet", "out_features": ["stage2", "stage3"]})
    with pytest.raises(CONFIG_ERRORS, match="sliding_window_mode"):
        CATSegConfig(sliding_window_mode="tiles")
    default = CATSegConfig(variant="v1")  # ResNet-101 cut after stage 3, as VocAlign's configs
    assert default.backbone_config.depths == [3, 4, 23] and default.decoder_guidance_dims == [512, 256]
    assert default.appearance_guidance_dim == 1024 and default.sliding_window_mode == "mmseg"


def test_v1_round_trip_any_size_and_stride_check(tmp_path, tiny_processor):
    from conftest import tiny_catseg_v1_config

    torch.manual_seed(0)
    model = CATSegForSemanticSegmentation(tiny_catseg_v1_config()).eval()
    inputs = tiny_processor(images=[random_image(50, 70), random_image(33, 90, seed=1)], text=["road", "car"])
    with torch.no_grad():
        expected = model(**inputs).logits
    assert expected.shape == (2, 2, 32, 32)  # 4x the 8x8 CLIP grid at clip_resolution 128
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert loaded.config.variant == "v1" and type(loaded.catseg.backbone).__name__ == "ResNetBackbone"
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
    # A backbone whose deepest map is not at the CLIP patch stride cannot guide the cost volume.
    shallow = tiny_catseg_v1_config(
        backbone_config=dict(model_type="resnet", depths=[1, 1], hidden_sizes=[16, 32], embedding_size=8,
                             layer_type="bottleneck", out_features=["stem", "stage1", "stage2"])
    )
    with pytest.raises(ValueError, match="stride must equal the CLIP patch size"):
        CATSegForSemanticSegmentation(shallow)(**inputs)

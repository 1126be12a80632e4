"""Tests of the procedurally generated world and the source pretraining (tiny sizes: the whole file runs in
seconds on CPU)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
from vocalign_hf.adaptation.vocabulary import ConceptVocabulary
from vocalign_hf.metrics import BatchMeanIoU, predicted_classes
from vocalign_hf.world import (
    CLASSES,
    DomainShift,
    WorldConfig,
    build_world,
    evaluate_segmenter,
    pretrain_source_model,
    render_split_arrays,
    source_class_names,
    target_class_names,
    target_concepts,
    target_to_source,
    tiny_catseg_config,
)
from vocalign_hf.world.preview import save_world_preview

TINY = WorldConfig(seed=3, image_size=32, num_source_train=16, num_source_eval=4, num_target_train=4, num_target_eval=4)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return build_world(TINY, cache_dir=tmp_path_factory.mktemp("world-cache"))


# ------------------------------------------------------------------------------------------ generator
def test_same_seed_same_arrays_and_different_seed_differs():
    config = WorldConfig(seed=7, image_size=32, num_source_train=3, num_target_eval=3)
    for split in ("source_train", "target_eval"):
        a_img, a_lab = render_split_arrays(config, split)
        b_img, b_lab = render_split_arrays(config, split)
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_lab, b_lab)
        other = WorldConfig(seed=8, image_size=32, num_source_train=3, num_target_eval=3)
        c_img, c_lab = render_split_arrays(other, split)
        assert not np.array_equal(a_img, c_img)
        assert not np.array_equal(a_lab, c_lab)


def test_image_does_not_depend_on_split_size():
    small = render_split_arrays(WorldConfig(seed=1, image_size=32, num_source_train=2), "source_train")[0]
    large = render_split_arrays(WorldConfig(seed=1, image_size=32, num_source_train=5), "source_train")[0]
    np.testing.assert_array_equal(small, large[:2])


def test_masks_hold_valid_ids_and_every_source_class_appears():
    config = WorldConfig(seed=0, image_size=32, num_source_train=40, num_target_eval=20)
    _, source_labels = render_split_arrays(config, "source_train")
    _, target_labels = render_split_arrays(config, "target_eval")
    assert source_labels.dtype == np.uint8 and target_labels.dtype == np.uint8
    assert set(np.unique(source_labels)) == set(range(len(source_class_names())))
    assert set(np.unique(target_labels)) <= set(range(len(target_class_names())))
    assert len(np.unique(target_labels)) >= len(target_class_names()) - 1


def _class_mean_colors(images: np.ndarray, labels: np.ndarray, class_ids: list[int]) -> dict[int, np.ndarray]:
    means = {}
    for label_id, source_id in enumerate(class_ids):
        mask = labels == label_id
        if mask.sum() > 50:
            means[source_id] = images[mask].astype(np.float64).mean(0) / 255.0
    return means


def test_target_appearance_shift_is_real():
    config = WorldConfig(seed=0, image_size=32, num_source_eval=30, num_target_eval=30)
    source = _class_mean_colors(*render_split_arrays(config, "source_eval"), list(range(len(CLASSES))))
    target = _class_mean_colors(*render_split_arrays(config, "target_eval"), target_to_source())
    # the same world with the shift switched off: what sampling noise alone gives
    no_shift = WorldConfig(seed=0, image_size=32, num_source_eval=30, num_target_eval=30, shift_strength=0.0)
    plain = _class_mean_colors(*render_split_arrays(no_shift, "target_eval"), target_to_source())
    shared = sorted(set(source) & set(target) & set(plain))
    assert len(shared) >= 5
    shifted = {c: np.linalg.norm(source[c] - target[c]) for c in shared}  # L2 distance in 0..1 RGB
    noise = {c: np.linalg.norm(source[c] - plain[c]) for c in shared}
    for c in shared:  # every visual class moves further than sampling noise
        assert shifted[c] > noise[c], CLASSES[c].source_name
    assert np.mean(list(shifted.values())) > 0.12
    assert np.mean(list(shifted.values())) > 3 * np.mean(list(noise.values()))


def test_shift_strength_zero_is_no_shift():
    assert WorldConfig(shift_strength=0.0).target_shift() == DomainShift.none()
    assert WorldConfig().fingerprint() != WorldConfig(shift_strength=0.5).fingerprint()


def test_vocabulary_mismatch_and_concepts():
    source, target, concepts = source_class_names(), target_class_names(), target_concepts()
    oracle = [source[i] for i in target_to_source()]
    renamed = [t for t, s in zip(target, oracle) if t != s]
    assert len(renamed) >= 2
    assert len(target) - len(renamed) >= len(target) / 2  # at least half keep their name
    assert any(t not in source for t in renamed)  # a name never seen in pretraining
    assert any(t in source for t in renamed)  # a source word reused for another class (ambiguous)
    for t, s in zip(target, oracle):
        if t != s:
            assert s in concepts[t], f"concepts of {t!r} miss its source name {s!r}"
        else:
            assert t not in concepts
    ConceptVocabulary(target, concepts)  # the concept file is valid for the VocAlign teacher


# ----------------------------------------------------------------------------------------- datasets
def test_world_datasets_match_the_generator(tiny_world):
    assert tiny_world.generated
    assert len(tiny_world.source_train) == 16 and len(tiny_world.target_eval) == 4
    assert tiny_world.target_train.column_names == ["image"]  # unlabeled
    assert tiny_world.target_eval.column_names == ["image", "label"]
    images, labels = render_split_arrays(TINY, "target_eval")
    row = tiny_world.target_eval[2]
    np.testing.assert_array_equal(np.asarray(row["image"]), images[2])
    np.testing.assert_array_equal(np.asarray(row["label"]), labels[2])
    pairs = zip(target_class_names(), tiny_world.oracle_target_class_names)
    assert tiny_world.renamed_target_classes == [t for t, s in pairs if t != s] == ["terrain", "ground", "automobile"]


def test_cache_is_reused(tiny_world):
    path = tiny_world.path
    assert path is not None and path.name == f"world-{TINY.fingerprint()}"
    stamp = os.stat(path / "world.json").st_mtime_ns
    again = build_world(TINY, cache_dir=path.parent)
    assert not again.generated
    assert os.stat(path / "world.json").st_mtime_ns == stamp
    np.testing.assert_array_equal(
        np.asarray(again.source_train[5]["image"]), np.asarray(tiny_world.source_train[5]["image"])
    )
    assert not any(p.name.startswith(".tmp") for p in path.parent.iterdir())  # no temporary folder left over
    assert json.loads((path / "world.json").read_text())["target_concepts"] == target_concepts()


def test_preview_is_written(tiny_world, tmp_path):
    out = save_world_preview(tiny_world, tmp_path / "preview.png", num_samples=3, zoom=2)
    from PIL import Image

    with Image.open(out) as image:
        assert image.mode == "RGB" and image.width > 3 * 64 and image.height > 4 * 64


# --------------------------------------------------------------------------------------- evaluation
class _ConstantModel(torch.nn.Module):
    """Predicts class `index` everywhere (logits at a quarter of the label size, as CAT-Seg's)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def get_text_embeddings(self, input_ids):
        return torch.zeros(input_ids.shape[0], 1, 4)

    def forward(self, pixel_values, text_embeds):
        b, c = pixel_values.shape[0], text_embeds.shape[0]
        logits = torch.zeros(b, c, pixel_values.shape[-2] // 4, pixel_values.shape[-1] // 4)
        logits[:, self.index] = 1.0

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def test_evaluate_segmenter_matches_a_hand_computed_iou(tiny_world):
    processor = CATSegProcessor.from_config(tiny_catseg_config(32))
    names = tiny_world.target_class_names
    result = evaluate_segmenter(_ConstantModel(0), processor, tiny_world.target_eval, names, batch_size=3)
    labels = np.stack([np.asarray(r) for r in tiny_world.target_eval["label"]])
    expected_sky = (labels == 0).sum() / labels.size  # predicted everywhere: IoU = |sky| / |all|
    assert result["per_category_iou"][names[0]] == pytest.approx(expected_sky)
    present = len(np.unique(labels))
    assert result["mean_iou"] == pytest.approx(expected_sky / present)


class _PixelModel(torch.nn.Module):
    """Class scores from the pixels (a fixed random 1x1 convolution, pooled to a quarter of the size)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, num_classes, 1)

    def get_text_embeddings(self, input_ids):
        return torch.zeros(input_ids.shape[0], 1, 4)

    def forward(self, pixel_values, text_embeds):
        logits = torch.nn.functional.avg_pool2d(self.conv(pixel_values), 4)[:, : text_embeds.shape[0]]
        return type("Out", (), {"logits": logits})()


def test_evaluate_segmenter_scores_as_the_trainer_does(tiny_world):
    """The same logits give the same numbers as the trainer's evaluation: its `prediction_step` (classes at the
    labels' size, one row per image) feeding `BatchMeanIoU`."""
    processor = CATSegProcessor.from_config(tiny_catseg_config(32))
    names = tiny_world.target_class_names
    model = _PixelModel(len(names))
    result = evaluate_segmenter(model, processor, tiny_world.target_eval, names, batch_size=3)

    rows = tiny_world.target_eval[:]
    labels = torch.from_numpy(np.stack([np.asarray(label) for label in rows["label"]]).astype(np.int64))
    pixel_values = processor(images=[image.convert("RGB") for image in rows["image"]])["pixel_values"]
    with torch.no_grad():
        predictions = predicted_classes(model(pixel_values, torch.zeros(len(names), 1, 4)).logits, labels.shape[-2:])
    assert len(predictions.unique()) > 1  # not a constant map: the resizing and the argmax matter
    trainer = BatchMeanIoU(names)(EvalPrediction(predictions=predictions.flatten(1), label_ids=labels.flatten(1)))
    assert trainer["mean_iou"] == pytest.approx(100 * result["mean_iou"])
    for name in names:
        expected = 100 * result["per_category_iou"][name]
        assert trainer[f"iou_{name}"] == pytest.approx(expected, nan_ok=True), name


# ---------------------------------------------------------------------------------------- pretraining
def test_pretraining_runs_learns_saves_and_is_reused(tiny_world, tmp_path):
    # 40 steps: a freshly initialised CAT-Seg sits on the class-symmetric ln(C) plateau for its first steps (all
    # prompts share the template, so the text embeddings start almost identical); a handful of steps cannot move
    # the loss of a fixed batch, 40 warm-up steps at lr 1e-3 do (probe loss 2.08 -> 1.2-1.7 for seeds 0-3).
    out = tmp_path / "source-model"
    settings = dict(
        steps=40, batch_size=8, lr=1e-3, warmup_steps=40, subset_probability=0.0, seed=1, num_threads=1, progress=False
    )
    path = pretrain_source_model(tiny_world, out, **settings)
    assert path == out
    info = json.loads((out / "pretrain_info.json").read_text())
    assert info["probe_loss_before"] == pytest.approx(np.log(len(CLASSES)), abs=0.01)
    assert info["probe_loss_after"] < info["probe_loss_before"] - 0.3
    assert 0.0 <= info["source_eval_miou"] <= 1.0
    assert not any(p.name.startswith((".tmp", ".old")) for p in tmp_path.iterdir())

    model = CATSegForSemanticSegmentation.from_pretrained(out)
    processor = CATSegProcessor.from_pretrained(out)
    batch = processor(images=[tiny_world.source_eval[0]["image"]], text=tiny_world.source_class_names)
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"]).logits
    assert logits.shape == (1, len(CLASSES), 16, 16)
    assert torch.isfinite(logits).all()

    stamp = os.stat(out / "pretrain_info.json").st_mtime_ns
    pretrain_source_model(tiny_world, out, **settings)
    assert os.stat(out / "pretrain_info.json").st_mtime_ns == stamp  # same settings: not retrained
    pretrain_source_model(tiny_world, out, **{**settings, "steps": 2, "warmup_steps": 1})
    assert json.loads((out / "pretrain_info.json").read_text())["settings"]["steps"] == 2  # new settings: retrained
    assert not any(p.name.startswith((".tmp", ".old")) for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------------ shipped source model
def test_exported_source_model_keeps_world_logits_and_is_unpacked_only_for_its_settings(
    tiny_world, tmp_path, monkeypatch
):
    from vocalign_hf.world.export import export_source_model, world_token_ids
    from vocalign_hf.world.shipped import unpack_shipped_source_model

    settings = dict(steps=3, batch_size=4, warmup_steps=1, seed=2, num_threads=1, progress=False, use_shipped=False)
    model_dir = pretrain_source_model(tiny_world, tmp_path / "trained", **settings)
    archive = export_source_model(model_dir, tmp_path / "shipped.zip", tiny_world)  # raises if logits changed
    info = json.loads((model_dir / "pretrain_info.json").read_text())
    assert not unpack_shipped_source_model("another-hash", tmp_path / "unpacked", archive)
    assert unpack_shipped_source_model(info["settings_hash"], tmp_path / "unpacked", archive)

    original = CATSegForSemanticSegmentation.from_pretrained(model_dir).eval()
    shipped = CATSegForSemanticSegmentation.from_pretrained(tmp_path / "unpacked").eval()
    processor = CATSegProcessor.from_pretrained(tmp_path / "unpacked")
    names = tiny_world.target_class_names + [c for cs in tiny_world.target_concepts.values() for c in cs]
    batch = processor(images=[tiny_world.target_eval[i]["image"] for i in range(2)], text=names)
    with torch.no_grad():
        assert torch.equal(original(**batch).logits, shipped(**batch).logits)
    table = shipped.catseg.clip.text_model.embeddings.token_embedding.weight
    used = world_token_ids(tiny_world, processor)
    assert (table[used] != 0).any(dim=1).all() and int((table != 0).any(dim=1).sum()) == len(used)
    assert archive.stat().st_size < table.numel()  # far smaller than the 4-byte table alone

    # pretrain_source_model unpacks an archive made with the same settings instead of training
    from vocalign_hf.world import shipped as shipped_module

    monkeypatch.setattr(shipped_module, "SHIPPED_SOURCE_MODEL", archive)
    out = pretrain_source_model(tiny_world, tmp_path / "from_archive", **{**settings, "use_shipped": True})
    assert json.loads((out / "pretrain_info.json").read_text())["settings_hash"] == info["settings_hash"]
    unpacked = CATSegForSemanticSegmentation.from_pretrained(out).catseg.clip.text_model.embeddings.token_embedding
    assert torch.equal(unpacked.weight, table)  # unpacked, not retrained


def test_the_shipped_source_model_is_the_default_main_jobs():
    """The archive in the package carries the settings hash of the default main job's world and pretraining, so
    `accelerate launch recipes/adapt.py` unpacks it instead of pretraining. Fails when the world, the pretraining or
    the model config change: re-create it with `python -m vocalign_hf.world.export`."""
    from vocalign_hf.recipes import RecipeArguments, world_config
    from vocalign_hf.world import pretrain_settings, pretrain_settings_hash
    from vocalign_hf.world.shipped import shipped_settings_hash

    recipe = RecipeArguments()
    settings = pretrain_settings(
        steps=recipe.world_pretrain_steps, batch_size=recipe.world_pretrain_batch_size, seed=recipe.world_seed
    )
    expected = pretrain_settings_hash(world_config(recipe), tiny_catseg_config(recipe.world_image_size), settings)
    assert shipped_settings_hash() == expected


def test_pretraining_with_synonyms_trains_the_other_words_in_the_source_sense(tiny_world, tmp_path):
    """With `synonyms`, steps name a class by one of its other words half of the time, so their token rows train
    (issue 40's world of known words); without, those rows get no gradient and weight decay only shrinks them. The
    settings record the synonyms; a run without them keeps the settings hash of the shipped model (test above)."""
    from safetensors.torch import load_file
    from vocalign_hf.world.generator import SOURCE_SYNONYMS

    settings = dict(steps=12, batch_size=4, warmup_steps=2, seed=5, num_threads=1, progress=False, use_shipped=False)
    plain = pretrain_source_model(tiny_world, tmp_path / "plain", **settings)
    known = pretrain_source_model(tiny_world, tmp_path / "known", synonyms=SOURCE_SYNONYMS, **settings)
    assert json.loads((known / "pretrain_info.json").read_text())["settings"]["synonyms"]["ground"] == ["terrain", "dirt"]
    assert "synonyms" not in json.loads((plain / "pretrain_info.json").read_text())["settings"]

    processor = CATSegProcessor.from_pretrained(known)
    rows = [processor.tokenizer(w, add_special_tokens=False).input_ids[0] for ws in SOURCE_SYNONYMS.values() for w in ws]
    key = "catseg.clip.text_model.embeddings.token_embedding.weight"
    torch.manual_seed(settings["seed"])  # the initial weights pretraining starts from
    init = CATSegForSemanticSegmentation(tiny_catseg_config(tiny_world.config.image_size)).state_dict()[key][rows]
    cosine = {name: torch.nn.functional.cosine_similarity(load_file(f / "model.safetensors")[key][rows], init, dim=1)
              for name, f in (("plain", plain), ("known", known))}
    assert cosine["plain"].min() > 0.9999  # no gradient: the rows keep their direction
    assert cosine["known"].max() < cosine["plain"].min()  # every other word trained, in its source sense


def test_pretraining_is_reproducible(tiny_world, tmp_path):
    """The same world and settings give bit-identical source models (seeded init, batches, flips, vocabularies)."""
    from safetensors.torch import load_file

    settings = dict(steps=4, batch_size=4, warmup_steps=2, seed=5, num_threads=1, progress=False, use_shipped=False)
    a = load_file(pretrain_source_model(tiny_world, tmp_path / "a", **settings) / "model.safetensors")
    b = load_file(pretrain_source_model(tiny_world, tmp_path / "b", **settings) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(pretrain_source_model(tiny_world, tmp_path / "c", **{**settings, "seed": 6}) / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)

"""The recipes: config files with overrides, and a reduced run of the default main job on the built-in world."""

import importlib.util
import json
from pathlib import Path

import pytest

from vocalign_hf.errors import UsageError
from vocalign_hf.recipes import parse_recipe_args, run_adaptation

ROOT = Path(__file__).resolve().parents[1]
WORLD_CONFIG = ROOT / "recipes" / "configs" / "world.yaml"

# The main job itself (the shipped source model: no pretraining), with a 2-image overlay grid.
MAIN_JOB = ["--num_overlays", "2", "--disable_tqdm", "true", "--save_steps", "1000"]


def test_config_file_values_are_defaults_and_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dataset: cityscapes\ntop_k: null\npseudo_threshold: null\nlora_layers: [0, 1, 2, 3, 4]\n")
    recipe, args = parse_recipe_args(["--config", str(config), "--lora_rank", "1", "--output_dir", str(tmp_path)])
    assert recipe.dataset == "cityscapes"
    assert args.top_k is None and args.pseudo_threshold is None
    assert args.lora_layers == [0, 1, 2, 3, 4] and args.lora_rank == 1
    _, args = parse_recipe_args(["--config", str(config), "--output_dir", str(tmp_path), "--top_k", "7"])
    assert args.top_k == 7


def test_unknown_config_keys_are_named(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("top_kk: 3\n")
    with pytest.raises(UsageError, match="top_kk"):
        parse_recipe_args(["--config", str(config), "--output_dir", str(tmp_path)])


def test_shipped_configs_parse():
    for config in sorted((ROOT / "recipes" / "configs").glob("*.yaml")):
        recipe, args = parse_recipe_args(["--config", str(config)])
        assert args.method == "vocalign", config
        assert recipe.dataset in ("world", "cityscapes", "ade20k_150", "pascal_context_59"), config


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("world_run")
    results = run_adaptation(*parse_recipe_args(["--config", str(WORLD_CONFIG), "--output_dir", str(output), *MAIN_JOB]))
    return output, results


def test_main_job_adapts_the_world_without_labels(world_run):
    """The README's main job: the shipped source model (48.50 zero-shot on the target) gains at least 8 mIoU (the
    README quotes 48.50 -> 72.97 on this kind of machine) and no class loses more than 10 IoU points. Its student
    scores with concepts, so the source model with the same concepts is measured too (71.58)."""
    output, results = world_run
    assert results["zero_shot_miou"] == pytest.approx(48.50, abs=0.05)
    assert results["zero_shot_concepts_miou"] > results["zero_shot_miou"] + 10
    assert results["adapted_miou"] - results["zero_shot_miou"] >= 8.0, results
    for key, value in results.items():
        if key.startswith("adapted_iou_"):
            assert value - results[key.replace("adapted_", "zero_shot_")] > -10.0, key
    assert json.loads((output / "results.json").read_text()) == results
    from PIL import Image

    grid = Image.open(output / "overlays.png")
    assert grid.width >= 4 * 256 and grid.height >= 2 * 256  # 4 columns, 2 images, panels of at least 256 px
    adapter = output / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    card = (adapter / "README.md").read_text()
    assert "automobile" in card and f"{results['adapted_miou']:.2f}" in card
    assert "trained to score each class with its name **and** its concepts" in card


def test_main_job_is_reproducible(tmp_path, capsys):
    """Same command, same numbers: two runs of a shortened main job from scratch (world, augmentation, masks, data
    order) print the same mIoU and give the same per-class IoUs."""
    flags = ["--config", str(WORLD_CONFIG), *MAIN_JOB, "--max_steps", "30", "--num_overlays", "0"]
    first = run_adaptation(*parse_recipe_args(flags + ["--output_dir", str(tmp_path / "a")]))
    second = run_adaptation(*parse_recipe_args(flags + ["--output_dir", str(tmp_path / "b")]))
    assert first == second and first["adapted_miou"] != first["zero_shot_miou"]
    printed = capsys.readouterr().out
    line = (f"zero-shot mIoU {first['zero_shot_miou']:.2f} (with concepts {first['zero_shot_concepts_miou']:.2f})"
            f" -> adapted mIoU {first['adapted_miou']:.2f}")
    assert printed.count(line) == 2


def test_evaluate_recipe_reproduces_the_adapted_miou(world_run):
    output, results = world_run
    spec = importlib.util.spec_from_file_location("evaluate_recipe", ROOT / "recipes" / "evaluate.py")
    evaluate_recipe = importlib.util.module_from_spec(spec)  # not `import evaluate`: that is the HF library
    spec.loader.exec_module(evaluate_recipe)
    metrics = evaluate_recipe.main(
        ["--config", str(WORLD_CONFIG), "--output_dir", str(output), *MAIN_JOB,
         "--base_model", str(output / "source_model"), "--adapter", str(output / "adapter")]
    )
    assert metrics["eval_mean_iou"] == pytest.approx(results["adapted_miou"], abs=1e-6)


def test_main_job_runs_with_a_v1_base_model(tmp_path):
    """The recipe with a CAT-Seg v1 base model (ResNet guidance): zero-shot and adapted evaluation with mmseg's
    sliding window, a saved adapter that reloads onto the v1 base. Random weights: the numbers only have to be
    valid mIoUs here."""
    import torch
    from conftest import tiny_catseg_v1_config

    from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
    from vocalign_hf.adaptation import load_adapted_model

    torch.manual_seed(0)
    config = tiny_catseg_v1_config(sliding_window_kernel=24, sliding_window_stride=16)
    base = tmp_path / "v1_base"
    CATSegForSemanticSegmentation(config).save_pretrained(base)
    CATSegProcessor.from_config(config).save_pretrained(base)
    output = tmp_path / "run"
    flags = [
        "--config", str(WORLD_CONFIG), "--output_dir", str(output), "--base_model", str(base),
        "--world_image_size", "32", "--world_num_source_train", "8", "--world_num_target_train", "8",
        "--world_num_target_eval", "4", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--eval_sliding_window", "true", "--num_overlays", "0", "--disable_tqdm", "true", "--save_steps", "1000",
    ]
    results = run_adaptation(*parse_recipe_args(flags))
    assert 0 <= results["zero_shot_miou"] <= 100 and 0 <= results["adapted_miou"] <= 100
    adapted, info = load_adapted_model(str(base), output / "adapter")
    assert adapted.config.variant == "v1"
    assert {f"adapted_iou_{name}" for name in info["class_names"]} <= set(results)

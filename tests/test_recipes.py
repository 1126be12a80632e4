"""The recipes: config files with overrides, and a reduced run of the default main job on the built-in world."""

import importlib.util
import json
from pathlib import Path

import pytest

from vocalign_hf.recipes import parse_recipe_args, run_adaptation

ROOT = Path(__file__).resolve().parents[1]
WORLD_CONFIG = ROOT / "recipes" / "configs" / "world.yaml"

# The main job, reduced for CI: 32x32 images, fewer images and steps (the full job uses 64x64 and ~10 min).
REDUCED = [
    "--world_image_size", "32", "--world_num_source_train", "400", "--world_num_target_train", "120",
    "--world_num_target_eval", "40", "--world_pretrain_steps", "600", "--world_pretrain_batch_size", "8",
    "--max_steps", "100", "--per_device_train_batch_size", "8", "--logging_steps", "10", "--save_steps", "1000",
    "--num_overlays", "2", "--disable_tqdm", "true",
]


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
    with pytest.raises(SystemExit, match="top_kk"):
        parse_recipe_args(["--config", str(config), "--output_dir", str(tmp_path)])


def test_shipped_configs_parse():
    for config in sorted((ROOT / "recipes" / "configs").glob("*.yaml")):
        recipe, args = parse_recipe_args(["--config", str(config)])
        assert args.method == "vocalign", config
        assert recipe.dataset in ("world", "cityscapes", "ade20k_150", "pascal_context_59"), config


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("world_run")
    results = run_adaptation(*parse_recipe_args(["--config", str(WORLD_CONFIG), "--output_dir", str(output), *REDUCED]))
    return output, results


def test_main_job_adapts_the_world_without_labels(world_run):
    output, results = world_run
    assert results["adapted_miou"] > results["zero_shot_miou"], results
    assert json.loads((output / "results.json").read_text()) == results
    assert len(list((output / "overlays").glob("*.png"))) == 2
    adapter = output / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    card = (adapter / "README.md").read_text()
    assert "automobile" in card and f"{results['adapted_miou']:.2f}" in card


def test_evaluate_recipe_reproduces_the_adapted_miou(world_run):
    output, results = world_run
    spec = importlib.util.spec_from_file_location("evaluate_recipe", ROOT / "recipes" / "evaluate.py")
    evaluate_recipe = importlib.util.module_from_spec(spec)  # not `import evaluate`: that is the HF library
    spec.loader.exec_module(evaluate_recipe)
    metrics = evaluate_recipe.main(
        ["--config", str(WORLD_CONFIG), "--output_dir", str(output), *REDUCED,
         "--base_model", str(output / "source_model"), "--adapter", str(output / "adapter")]
    )
    assert metrics["eval_mean_iou"] == pytest.approx(results["adapted_miou"], abs=1e-6)

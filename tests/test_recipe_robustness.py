"""The recipes on a small custom domain with one input broken at a time (issue 17): a previous run is never
destroyed, nothing is scored silently wrong, and every input is checked before a model is loaded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_catseg_config
from PIL import Image

from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
from vocalign_hf.data.validation import DatasetValidationError, validate_segmentation_dataset
from vocalign_hf.metrics import split_absent_metrics
from vocalign_hf.atomic import atomic_write_folder
from vocalign_hf.errors import UsageError
from vocalign_hf.recipes import load_target_data, parse_recipe_args, run_adaptation, summary_line

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "recipes" / "configs"
CLASSES = ["sky", "grass", "road"]
CONCEPTS = {"sky": ["heaven"], "grass": ["lawn"]}
COLOURS = np.array([(90, 140, 230), (40, 170, 60), (120, 120, 120)], dtype=np.uint8)


def _write_pair(images: Path, masks: Path | None, name: str, seed: int, size: int = 32) -> None:
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 3 :] = 1
    mask[2 * size // 3 :, rng.integers(0, size // 2) :] = 2
    images.mkdir(parents=True, exist_ok=True)
    Image.fromarray(COLOURS[mask]).save(images / f"{name}.png")
    if masks is not None:
        masks.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask, mode="L").save(masks / f"{name}.png")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = tiny_catseg_config()
    folder = tmp_path_factory.mktemp("base") / "catseg"
    CATSegForSemanticSegmentation(config).save_pretrained(folder)
    CATSegProcessor.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture
def domain(tmp_path) -> Path:
    root = tmp_path / "domain"
    for i in range(4):
        _write_pair(root / "images", None, f"t{i}", i)
    for i in range(2):
        _write_pair(root / "val" / "images", root / "val" / "masks", f"v{i}", 10 + i)
    (root / "classes.json").write_text(json.dumps(CLASSES))
    (root / "concepts.json").write_text(json.dumps(CONCEPTS))
    return root


def flags(domain: Path, base: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--dataset", "folder", "--base_model", str(base), "--data_root", str(domain / "images"),
        "--eval_data_root", str(domain / "val" / "images"), "--eval_mask_root", str(domain / "val" / "masks"),
        "--class_names_file", str(domain / "classes.json"), "--concepts", str(domain / "concepts.json"), "--output_dir", str(output), "--crop_size", "32",
        "--max_steps", "2", "--warmup_steps", "0", "--per_device_train_batch_size", "2", "--lora_layers", "0", "1",
        "--eval_sliding_window", "false", "--num_overlays", "0", "--disable_tqdm", "true", "--save_steps", "1",
        "--use_cpu", "true", "--top_k", "null", *extra,
    ]


def run(argv: list[str]) -> dict:
    return run_adaptation(*parse_recipe_args(argv, config_dir=CONFIG_DIR))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model's weights are loaded: the checks under test must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(CATSegForSemanticSegmentation, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def finished_run(base_model, tmp_path_factory):
    """One finished tiny run (2 steps, checkpoints after each) on the custom domain."""
    root = tmp_path_factory.mktemp("finished")
    domain = root / "domain"
    for i in range(4):
        _write_pair(domain / "images", None, f"t{i}", i)
    for i in range(2):
        _write_pair(domain / "val" / "images", domain / "val" / "masks", f"v{i}", 10 + i)
    (domain / "classes.json").write_text(json.dumps(CLASSES))
    (domain / "concepts.json").write_text(json.dumps(CONCEPTS))
    output = root / "run"
    results = run(flags(domain, base_model, output))
    return domain, output, results


# ------------------------------------------------------------------------------------------- existing runs
def test_a_second_run_into_the_same_folder_is_refused_and_changes_nothing(finished_run, base_model, no_model_load):
    domain, output, results = finished_run
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match="--overwrite_output_dir") as error:
        run(flags(domain, base_model, output))
    message = str(error.value)
    assert str(output) in message and "results.json" in message and "checkpoint-2" in message
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before
    assert json.loads((output / "results.json").read_text()) == results


def test_overwrite_replaces_the_run_and_its_checkpoints(finished_run, base_model, tmp_path):
    import shutil

    domain, output, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    stale = copy / "checkpoint-7"  # a checkpoint of the previous run that the new one would not rotate away
    (copy / "checkpoint-2").rename(stale)
    results = run(flags(domain, base_model, copy, "--max_steps", "1", "--overwrite_output_dir", "true",
                        "--eval_zero_shot", "false"))
    assert not stale.exists() and sorted(p.name for p in copy.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((copy / "results.json").read_text()) == results
    info = json.loads((copy / "adapter" / "vocalign.json").read_text())
    assert info["settings"]["max_steps"] == 1 and info["class_names"] == CLASSES
    assert not [p for p in copy.iterdir() if p.name.startswith(".adapter")]  # no temporary folder left


def test_atomic_write_folder_keeps_the_old_folder_when_writing_fails(tmp_path):
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "weights").write_text("old")

    def broken(folder: Path) -> None:
        (folder / "weights").write_text("new, half written")
        raise RuntimeError("disk full")

    with pytest.raises(FileExistsError, match="exists and is not empty; nothing was written"):
        atomic_write_folder(dest, broken)  # without replace=True an existing folder is never replaced
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_folder(dest, broken, replace=True)
    assert (dest / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    atomic_write_folder(dest, lambda folder: (folder / "config").write_text("new"), replace=True)
    assert sorted(p.name for p in dest.iterdir()) == ["config"]  # the whole folder, not new files beside old ones
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ---------------------------------------------------------------------------------------------- resuming
def test_resume_checks_come_before_any_model(finished_run, base_model, no_model_load):
    domain, output, _ = finished_run
    with pytest.raises(UsageError, match=r"checkpoint-9: folder not found; .* holds checkpoint-1, checkpoint-2"):
        run(flags(domain, base_model, output, "--resume_from_checkpoint", str(output / "checkpoint-9")))
    with pytest.raises(UsageError, match=r"LoRA layers \[0, 1\] \(this run: \[0\]\)"):
        run(flags(domain, base_model, output, "--resume_from_checkpoint", "true", "--lora_layers", "0", "--max_steps", "3"))
    other = domain.parent / "other_classes.json"
    other.write_text(json.dumps(["sky", "grass", "tarmac"]))
    with pytest.raises(UsageError, match=r"class list \['sky', 'grass', 'road'\] \(this run: \['sky', 'grass', 'tarmac'\]\)"):
        run(flags(domain, base_model, output, "--resume_from_checkpoint", str(output / "checkpoint-1"),
                  "--class_names_file", str(other)))


def test_resume_continues_the_run(finished_run, base_model, tmp_path):
    import shutil

    domain, output, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    results = run(flags(domain, base_model, copy, "--resume_from_checkpoint", "true", "--max_steps", "3",
                        "--eval_zero_shot", "false"))
    state = json.loads((copy / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and json.loads((copy / "results.json").read_text()) == results


# ------------------------------------------------------------------------------------------------- files
def test_a_mask_of_another_size_is_refused_before_any_model(domain, base_model, tmp_path, no_model_load):
    mask = domain / "val" / "masks" / "v1.png"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8), mode="L").save(mask)
    with pytest.raises(UsageError, match=rf"{mask}: mask is 16x16 but its image .*v1.png is 32x32"):
        run(flags(domain, base_model, tmp_path / "out"))
    # and the evaluation transform itself never scores a mismatched pair
    from vocalign_hf.data import make_eval_transform

    with pytest.raises(ValueError, match=r"v1.png is 32x32 but its mask .*v1.png is 16x16"):
        make_eval_transform().apply(str(domain / "val" / "images" / "v1.png"), str(mask))


def test_each_bad_file_is_named_before_any_model(domain, base_model, tmp_path, no_model_load):
    truncated = domain / "images" / "t2.png"
    truncated.write_bytes(truncated.read_bytes()[:-20])  # loses the end of its pixel data
    rgb_mask = domain / "val" / "masks" / "v0.png"
    Image.fromarray(COLOURS[np.zeros((32, 32), dtype=np.uint8)]).save(rgb_mask)
    out_of_range = domain / "val" / "masks" / "v1.png"
    Image.fromarray(np.full((32, 32), 7, dtype=np.uint8), mode="L").save(out_of_range)
    with pytest.raises(UsageError) as error:
        run(flags(domain, base_model, tmp_path / "out"))
    message = str(error.value)
    assert f"{truncated}: unreadable image" in message and "training split" in message
    assert f"{rgb_mask}: unreadable mask" in message and "colour-coded" in message
    assert f"{out_of_range}: mask values [7] are not class ids 0-2 nor the ignore value 255" in message


def test_a_missing_file_is_named(tmp_path):
    import datasets

    _write_pair(tmp_path, None, "a", 0)
    ds = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / "a.png"), str(tmp_path / "gone.png")]}, features=datasets.Features({"image": datasets.Image()})
    )
    with pytest.raises(DatasetValidationError, match=rf"(?s)1 bad file.*{tmp_path / 'gone.png'}: file not found"):
        validate_segmentation_dataset(ds, split="training split")


def test_all_ignore_masks_are_refused(domain, base_model, tmp_path, no_model_load):
    for mask in (domain / "val" / "masks").glob("*.png"):
        Image.fromarray(np.full((32, 32), 255, dtype=np.uint8), mode="L").save(mask)
    with pytest.raises(UsageError, match="entirely the ignore value 255: there is no pixel to score"):
        run(flags(domain, base_model, tmp_path / "out"))


def test_metrics_without_a_valid_pixel_are_absent_not_nan():
    finite, absent = split_absent_metrics(
        {"adapted_miou": float("nan"), "zero_shot_miou": 40.0, "adapted_iou_road": float("nan"), "adapted_iou_sky": 50.0}
    )
    assert finite == {"zero_shot_miou": 40.0, "adapted_iou_sky": 50.0}
    assert "no labelled pixel" in absent["adapted_miou"] and "'road'" in absent["adapted_iou_road"]
    results = {**finite, "absent": absent}
    json.dumps(results, allow_nan=False)  # valid JSON
    line = summary_line(results)
    assert "nan" not in line and line.startswith("zero-shot mIoU 40.00 -> adapted mIoU absent (no labelled pixel")


# --------------------------------------------------------------------------------------------- arguments
def test_lora_layers_must_exist_in_both_towers(domain, base_model, tmp_path, no_model_load):
    for layers in (["0", "99"], ["99"], ["0", "2"]):  # the tiny text tower has 2 layers, the image tower 3
        with pytest.raises(UsageError, match=rf"names \[{layers[-1]}\], which the model does not have: .* text tower "
                           r"has 2 layers and its image tower 3 \(valid indices 0-1\)"):
            run(flags(domain, base_model, tmp_path / "out", "--lora_layers", *layers))


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1, got 0"),
        (["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size must be >= 1, got 0"),
        (["--max_steps", "0"], "max_steps 0 adapts nothing"),
    ],
)
def test_argument_ranges_fail_at_parse_time(domain, base_model, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe_args(flags(domain, base_model, tmp_path / "out", *extra), config_dir=CONFIG_DIR)


def test_top_k_null_on_the_command_line(domain, base_model, tmp_path):
    for value in ("null", "none", "None"):
        _, args = parse_recipe_args(flags(domain, base_model, tmp_path, "--top_k", value), config_dir=CONFIG_DIR)
        assert args.top_k is None
    _, args = parse_recipe_args(flags(domain, base_model, tmp_path, "--top_k", "4", "--pseudo_threshold", "none"))
    assert args.top_k == 4 and args.pseudo_threshold is None


def test_the_default_config_follows_the_dataset():
    cases = {
        "world": ("world.yaml", True, 150), "cityscapes": ("cityscapes.yaml", False, 40000),
        "ade20k": ("ade20k_150.yaml", False, 15000), "folder": ("custom.yaml", False, 15000),
        "some-org/my-dataset": ("custom.yaml", False, 15000),
    }
    for dataset, (config, use_cpu, max_steps) in cases.items():
        recipe, args = parse_recipe_args(["--dataset", dataset], config_dir=CONFIG_DIR)
        assert Path(recipe.config).name == config, dataset
        assert args.use_cpu is use_cpu and args.max_steps == max_steps, dataset
        assert (args.output_dir == "runs/world") is (dataset == "world"), dataset
    recipe, _ = parse_recipe_args([], config_dir=CONFIG_DIR)  # the main job: the world
    assert Path(recipe.config).name == "world.yaml" and recipe.dataset == "world"


def test_a_broken_config_file_is_named(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("top_k: 3\nlora_layers: [0, 1\nmax_steps: 5\n")
    with pytest.raises(UsageError, match=rf"{config}: not valid YAML .* at line \d+, column \d+"):
        parse_recipe_args(["--config", str(config)])


# -------------------------------------------------------------------------------------------- base model
def test_base_model_problems_are_named_before_loading(domain, base_model, finished_run, tmp_path, no_model_load,
                                                      monkeypatch):
    missing = tmp_path / "models" / "catseg-vitb-38"
    with pytest.raises(UsageError, match=rf"--base_model: folder not found: {missing}"):
        run(flags(domain, missing, tmp_path / "out"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=rf"--base_model {empty} has no config.json"):
        run(flags(domain, empty, tmp_path / "out"))
    adapter = finished_run[1] / "adapter"
    with pytest.raises(UsageError, match=rf"is a LoRA adapter folder, not a base model: pass it as --adapter {adapter}"):
        run(flags(domain, adapter, tmp_path / "out"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set and the Hub cache has no copy"):
        run(flags(domain, "no-such-org/catseg", tmp_path / "out"))


# ------------------------------------------------------------------------------------------ small images
def test_small_images_are_upscaled_not_padded_with_black(domain, caplog):
    for i, path in enumerate(sorted((domain / "images").glob("*.png"))):
        Image.fromarray(np.full((40, 48, 3), 50 + i, dtype=np.uint8)).save(path)  # no black pixel anywhere
    recipe, args = parse_recipe_args(
        ["--dataset", "folder", "--data_root", str(domain / "images"), "--eval_data_root", str(domain / "val" / "images"),
         "--eval_mask_root", str(domain / "val" / "masks"), "--class_names_file", str(domain / "classes.json")],
        config_dir=CONFIG_DIR,
    )
    with caplog.at_level(logging.WARNING):
        data = load_target_data(recipe, args.output_dir, seed=0)
    assert "smaller than the 512x512 crop (smallest 40x48)" in caplog.text and "upscaled" in caplog.text
    for index in range(len(data.train)):
        pixels = data.train[index]["pixel_values"]
        assert pixels.shape == (3, 512, 512)
        assert pixels.max(dim=0).values.min() > 0  # no padded (black) pixel


def test_subfolder_hint_names_the_recipe_flag(domain, tmp_path):
    nested = tmp_path / "nested"
    nested.mkdir()
    (domain / "images").rename(nested / "part1")
    argv = ["--dataset", "folder", "--data_root", str(nested), "--eval_data_root", str(domain / "val" / "images"),
            "--eval_mask_root", str(domain / "val" / "masks"), "--class_names_file", str(domain / "classes.json")]
    with pytest.raises(UsageError, match=r"4 in its sub-folders, e.g. part1/t0.png: pass recursive=True, or --recursive"):
        load_target_data(*_recipe_and_dir(argv))
    recipe, output = _recipe_and_dir(argv + ["--recursive", "true"])
    assert len(load_target_data(recipe, output).train) == 4


def _recipe_and_dir(argv):
    recipe, args = parse_recipe_args(argv, config_dir=CONFIG_DIR)
    return recipe, args.output_dir


def test_evaluate_recipe_checks_the_adapter_before_loading(domain, base_model, finished_run, tmp_path, no_model_load):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_recipe", ROOT / "recipes" / "evaluate.py")
    evaluate_recipe = importlib.util.module_from_spec(spec)  # not `import evaluate`: that is the HF library
    spec.loader.exec_module(evaluate_recipe)
    argv = flags(domain, base_model, tmp_path / "out")
    with pytest.raises(UsageError, match=rf"--adapter: folder not found: {tmp_path / 'run' / 'adaptr'}"):
        evaluate_recipe.main(argv + ["--adapter", str(tmp_path / "run" / "adaptr")])
    with pytest.raises(UsageError, match=r"has no adapter_config.json: .* \(it is a base model folder: pass it as --base_model\)"):
        evaluate_recipe.main(argv + ["--adapter", str(base_model)])

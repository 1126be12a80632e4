"""Issue 23: no command deletes what it did not create, and no run reports numbers it did not earn.

On the small custom domain of test_recipe_robustness: output folders that are not this library's, or that overlap
an input, are refused; an overwrite keeps the previous run until the new one has finished; a resumed run (after a
SIGKILL in the middle of a checkpoint) is bitwise the uninterrupted run; another run's checkpoint is refused;
option ranges and free space are checked before any model loads; the programs print one line, not a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_recipe_robustness import (  # noqa: F401  (fixtures)
    CONFIG_DIR,
    ROOT,
    base_model,
    domain,
    finished_run,
    flags,
    no_model_load,
    run,
)

from vocalign_hf import CATSegForSemanticSegmentation
from vocalign_hf.adaptation import merge_adapter
from vocalign_hf.errors import UsageError

# This checkout's package first (a worktree beside an editable install of another checkout tests its own code).
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
                  "PYTHONPATH": os.pathsep.join(str(p) for p in (ROOT / "src", ROOT, ROOT / "tests"))}


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ merge / adapters
def test_merge_never_deletes_a_folder_it_did_not_write(finished_run, base_model, tmp_path):
    _, output, _ = finished_run
    folder = tmp_path / "d"
    shutil.copytree(base_model, folder / "b")
    shutil.copytree(output / "adapter", folder / "a")
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)
    for target, relation in ((folder, "contains the base model"), (folder / "b", "is the base model"),
                             (folder / "a", "is the adapter"), (folder / "a" / "sub", "lies inside the adapter")):
        with pytest.raises(UsageError, match=relation):
            merge_adapter(folder / "b", folder / "a", target)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(UsageError, match=r"not written by vocalign as merged_model \(it holds thesis.tex\)"):
        merge_adapter(folder / "b", folder / "a", user)
    assert snapshot(folder) == before and (user / "thesis.tex").read_text() == "years of work"
    merged = merge_adapter(folder / "b", folder / "a", tmp_path / "merged")  # new: written
    first = snapshot(merged)
    merge_adapter(folder / "b", folder / "a", merged)  # its own earlier output: replaced whole, same content
    assert {p.name for p in snapshot(merged)} == {p.name for p in first}


def test_merge_cli_says_no_in_one_line(finished_run, base_model, tmp_path):
    _, output, _ = finished_run
    folder = tmp_path / "d"
    shutil.copytree(base_model, folder / "b")
    shutil.copytree(output / "adapter", folder / "a")
    command = [sys.executable, "-m", "vocalign_hf.adaptation.merge", str(folder / "b"), str(folder / "a"), str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: output folder {folder} contains the base model")
    verbose = subprocess.run(command + ["-v"], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "UsageError" in verbose.stderr
    assert (folder / "b" / "config.json").is_file() and (folder / "a" / "adapter_config.json").is_file()


def test_save_adapter_refuses_a_foreign_folder(finished_run, tmp_path):
    from vocalign_hf.adaptation import load_adapted_model, save_adapter

    _, output, _ = finished_run
    info = json.loads((output / "adapter" / "vocalign.json").read_text())
    model, _ = load_adapted_model(info["base_model"], output / "adapter")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2")
    with pytest.raises(UsageError, match=r"not written by vocalign as adapter \(it holds data.csv\)"):
        save_adapter(model, mine, info["class_names"])
    assert sorted(p.name for p in mine.iterdir()) == ["data.csv"]
    copy = tmp_path / "adapter"
    shutil.copytree(output / "adapter", copy)
    save_adapter(model, copy, info["class_names"])  # an adapter written here before: replaced
    assert json.loads((copy / "vocalign.json").read_text())["written_as"] == "adapter"


# ---------------------------------------------------------------------------------------------- run folders
def test_overwrite_with_a_bad_option_keeps_the_previous_run(finished_run, base_model, tmp_path, no_model_load):
    domain, output, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    before = snapshot(copy)
    with pytest.raises(UsageError, match="learning_rate must be > 0"):
        run(flags(domain, base_model, copy, "--overwrite_output_dir", "true", "--learning_rate", "-1"))
    assert snapshot(copy) == before


def test_a_failed_overwrite_puts_the_previous_run_back(finished_run, base_model, tmp_path, monkeypatch):
    from vocalign_hf.adaptation import VocAlignTrainer

    domain, output, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    before = snapshot(copy)

    def fail(self, *args, **kwargs):  # training dies before its first checkpoint (a crash, a Ctrl-C)
        assert (copy / ".previous-run" / "results.json").is_file()  # the old run is set aside, not deleted
        raise KeyboardInterrupt

    monkeypatch.setattr(VocAlignTrainer, "train", fail)
    with pytest.raises(KeyboardInterrupt):
        run(flags(domain, base_model, copy, "--overwrite_output_dir", "true", "--eval_zero_shot", "false"))
    assert snapshot(copy) == before and not (copy / ".previous-run").exists()


def test_output_folders_that_overlap_inputs_or_hold_other_files_are_refused(domain, base_model, tmp_path, no_model_load):
    for output, match in ((domain / "images", "is the --data_root"), (domain / "images" / "run", "lies inside the --data_root"),
                          (domain / "val", "contains the --eval_data_root"), (base_model / "run", "lies in the --base_model")):
        with pytest.raises(UsageError, match=match):
            run(flags(domain, base_model, output))
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"is not empty and holds no vocalign run \(notes.txt\)"):
        run(flags(domain, base_model, foreign))
    blocked = tmp_path / "a_file"
    blocked.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        run(flags(domain, base_model, blocked))
    with pytest.raises(UsageError, match=rf"--output_dir {blocked / 'run'} cannot be created: {blocked} is a file"):
        run(flags(domain, base_model, blocked / "run"))
    assert not (domain / "images" / "run").exists() and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("extra, match", [
    (["--mask_block_size", "0"], "mask_block_size must be >= 1 pixel, got 0"),
    (["--crop_size", "1"], "--crop_size must be >= 16 pixels, got 1"),
    (["--crop_size", "7"], "--crop_size must be >= 16 pixels, got 7"),
    (["--learning_rate", "-1"], r"learning_rate must be > 0 \(the paper: 5e-5\), got -1.0"),
    (["--lora_rank", "0"], "lora_rank must be >= 1, got 0"),
    (["--max_steps", "-3"], "max_steps must be >= 1, or -1 to train num_train_epochs, got -3"),
    (["--use_concepts", "true", "--concepts", ""], "--method vocalign aligns the teacher's vocabulary with concepts"),
])
def test_every_option_is_checked_before_any_model(domain, base_model, tmp_path, no_model_load, extra, match):
    with pytest.raises(UsageError, match=match):
        run(flags(domain, base_model, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_a_yaml_lora_layers_that_is_not_a_list_is_one_line(domain, base_model, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("lora_layers: 0\n")
    argv = flags(domain, base_model, tmp_path / "out")
    at = argv.index("--lora_layers")
    del argv[at : at + 3]  # the flag would override the file
    with pytest.raises(UsageError, match=r"lora_layers must be a list of layer indices, got 0 \(in YAML: lora_layers: \[0, 1\]\)"):
        run(["--config", str(config), *argv])


def test_a_full_disk_is_refused_before_training(domain, base_model, tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(real(path).total, real(path).total, 3 << 20))
    with pytest.raises(UsageError, match=r"has 3.0 MiB free, and 2 checkpoint\(s\) of .* MiB and the adapter need"):
        run(flags(domain, base_model, tmp_path / "out"))
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_adapter_and_results_are_written_before_the_overlays(domain, base_model, tmp_path, monkeypatch):
    import vocalign_hf.recipes as recipes

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recipes, "save_overlays", disk_full)
    with pytest.raises(UsageError, match=r"filled up during the run \(No space left on device; "):
        run(flags(domain, base_model, tmp_path / "out", "--max_steps", "1", "--num_overlays", "2"))
    assert (tmp_path / "out" / "results.json").is_file() and (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


# -------------------------------------------------------------------------------------------------- resuming
def test_a_resumed_run_is_the_uninterrupted_run(domain, base_model, tmp_path):
    """Killed (SIGKILL) while writing checkpoint-4, two steps after checkpoint-2: `--resume_from_checkpoint true`
    passes over the partial checkpoint-4, resumes checkpoint-2 and ends bitwise where the straight run ended (data
    order, crops and flips, colour augmentation, masks, optimiser, teacher); the record says where it resumed."""
    common = ("--max_steps", "5", "--save_steps", "2", "--learning_rate", "1e-3", "--num_overlays", "0", "--pseudo_threshold", "null")
    straight = run(flags(domain, base_model, tmp_path / "straight", *common))
    killed = tmp_path / "killed"
    argv = [sys.executable, str(ROOT / "tests" / "kill_probe.py"), "4", *flags(domain, base_model, killed, *common)]
    done = subprocess.run(argv, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600)
    assert done.returncode == -9, done.stderr[-3000:]
    assert (killed / "checkpoint-2" / "checkpoint_complete.json").is_file()
    assert (killed / "checkpoint-4").is_dir() and not (killed / "checkpoint-4" / "trainer_state.json").exists()
    resumed = run(flags(domain, base_model, killed, *common, "--resume_from_checkpoint", "true"))
    assert resumed == straight
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    teacher_a = load_file(tmp_path / "straight" / "checkpoint-4" / "teacher_lora.safetensors")
    teacher_b = load_file(killed / "checkpoint-4" / "teacher_lora.safetensors")
    assert all(torch.equal(teacher_a[k], teacher_b[k]) for k in teacher_a)
    settings = json.loads((killed / "adapter" / "vocalign.json").read_text())["settings"]
    assert settings["resumed_from"] == {"checkpoint": str(killed / "checkpoint-2"), "step": 2, "other_settings": []}
    assert settings["steps_trained"] == 5 and settings["concepts_used"] is True


def test_another_runs_checkpoint_is_refused_with_the_differences(finished_run, base_model, tmp_path, no_model_load):
    domain, output, _ = finished_run  # 2 steps, checkpoints 1 and 2
    with pytest.raises(UsageError, match=r"checkpoint-2 is at step 2, and this run stops at max_steps 1: nothing "
                                          r"would be trained"):
        run(flags(domain, base_model, tmp_path / "new", "--max_steps", "1",
                  "--resume_from_checkpoint", str(output / "checkpoint-2")))
    with pytest.raises(UsageError, match=r"mask_ratio 0.5 \(this run: 0.3\); .*learning_rate 3e-05 \(this run: 0.001\)"):
        run(flags(domain, base_model, tmp_path / "new", "--max_steps", "3", "--learning_rate", "1e-3",
                  "--mask_ratio", "0.3", "--resume_from_checkpoint", str(output / "checkpoint-2")))
    assert not (tmp_path / "new").exists()
    # A checkpoint written before a setting existed ran with the old behaviour, and is compared as such.
    older = tmp_path / "older" / "checkpoint-2"
    shutil.copytree(output / "checkpoint-2", older)
    state = json.loads((older / "vocalign.json").read_text())
    del state["settings"]["student_concepts"]
    (older / "vocalign.json").write_text(json.dumps(state))
    with pytest.raises(UsageError, match=r"student_concepts False \(this run: True\)"):
        run(flags(domain, base_model, tmp_path / "new", "--max_steps", "3", "--student_concepts", "true",
                  "--resume_from_checkpoint", str(older)))


def test_resuming_with_other_settings_on_request_is_recorded(finished_run, base_model, tmp_path):
    domain, output, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    run(flags(domain, base_model, copy, "--max_steps", "3", "--learning_rate", "1e-3", "--eval_zero_shot", "false",
              "--resume_from_checkpoint", "true", "--resume_with_other_settings", "true"))
    info = json.loads((copy / "adapter" / "vocalign.json").read_text())
    assert info["settings"]["resumed_from"]["other_settings"] == ["learning_rate 3e-05 (this run: 0.001)"]
    assert "resumed_from" in (copy / "adapter" / "README.md").read_text()


def test_recipes_print_one_line_for_a_bad_input(domain, base_model, tmp_path):
    argv = [sys.executable, str(ROOT / "recipes" / "adapt.py"), *flags(domain, base_model, tmp_path / "out", "--lora_rank", "0")]
    done = subprocess.run(argv, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: lora_rank must be >= 1, got 0"


# ------------------------------------------------------------------------------------------------- converter
def _convert(argv: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vocalign_hf.models.catseg.convert_catseg_checkpoint", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)


def test_converter_names_what_is_wrong_with_a_file(tmp_path):
    from test_hub import CONVERT_FLAGS, tiny_pth

    from vocalign_hf.models.catseg.convert_catseg_checkpoint import CheckpointConversionError, load_reference_state_dict

    good = tiny_pth(tmp_path / "model.pth")
    (tmp_path / "zero.pth").write_bytes(b"")
    (tmp_path / "page.pth").write_text("<html>404 Not Found</html>")
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = {"zero.pth": r"is empty \(0 bytes\)", "page.pth": r"is not a PyTorch checkpoint \(it starts with b'<htm'",
             "cut.pth": "is damaged or truncated"}
    for name, match in cases.items():
        with pytest.raises(CheckpointConversionError, match=match) as error:
            load_reference_state_dict(tmp_path / name)
        assert "--allow-unsafe-pickle" not in str(error.value)
    torch.save({"model": {"some.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    done = _convert([str(tmp_path / "other.pth"), str(tmp_path / "out"), *CONVERT_FLAGS])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "not a CAT-Seg checkpoint: it lacks" in done.stderr and "some.weight" in done.stderr


def test_converter_checks_its_output_folder_first(tmp_path):
    from test_hub import CONVERT_FLAGS, tiny_pth

    checkpoint = tiny_pth(tmp_path / "model.pth")
    blocked = tmp_path / "a_file"
    blocked.write_text("x")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for output, match in ((blocked, "is a file"), (mine, r"not written by vocalign as converted_model \(it holds notes.txt\)"),
                          (tmp_path, "contains the checkpoint")):
        done = _convert([str(checkpoint), str(output), *CONVERT_FLAGS])
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert re.search(match, done.stderr.strip().splitlines()[-1]), done.stderr
    assert blocked.read_text() == "x" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert _convert([str(checkpoint), str(tmp_path / "out"), *CONVERT_FLAGS]).returncode == 0
    assert _convert([str(checkpoint), str(tmp_path / "out"), *CONVERT_FLAGS]).returncode == 0  # its own: replaced
    assert json.loads((tmp_path / "out" / "vocalign.json").read_text())["written_as"] == "converted_model"


# ------------------------------------------------------------------------------------ one-line messages
def test_model_and_adapter_folders_are_checked_with_a_clear_message(finished_run, base_model, tmp_path, no_model_load):
    from vocalign_hf.recipe_checks import resolve_adapter, resolve_base_model

    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UsageError, match=r"holds a bert model, not CAT-Seg: give a folder written by convert-catseg"):
        resolve_base_model(str(other))
    broken = tmp_path / "adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(UsageError, match=rf"--adapter: {broken / 'adapter_config.json'} is not valid JSON"):
        resolve_adapter(str(broken))


def test_an_adapter_on_a_base_of_another_size_is_one_line(finished_run, tmp_path):
    from conftest import tiny_catseg_config

    from vocalign_hf import CATSegForSemanticSegmentation
    from vocalign_hf.adaptation import load_adapted_model
    from vocalign_hf.adaptation.adapters import AdapterLoadError

    _, output, _ = finished_run
    config = tiny_catseg_config()
    config.clip_config.text_config.hidden_size = config.clip_config.vision_config.hidden_size = 48
    config.clip_config.text_config.intermediate_size = config.clip_config.vision_config.intermediate_size = 96
    wider = CATSegForSemanticSegmentation(config)
    with pytest.raises(AdapterLoadError, match=r"was trained on a CAT-Seg of another size .*lora_A.default.weight: \[2, 32\] in the adapter, \[2, 48\] here") as error:
        load_adapted_model(wider, output / "adapter")
    assert len(str(error.value).splitlines()) == 1


def test_an_unreachable_hub_is_tried_once(monkeypatch):
    import time

    from huggingface_hub import constants

    from vocalign_hf.recipe_checks import resolve_base_model

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(UsageError, match=r"the Hub repo 'someone/catseg' could not be read \(ConnectError"):
        resolve_base_model("someone/catseg")
    assert time.perf_counter() - start < 5  # huggingface_hub's own retries take 23 s


def test_the_demo_names_a_missing_base_folder(tmp_path):
    from vocalign_hf.demo import DemoSetupError
    from vocalign_hf.demo.segmenter import DemoSegmenter

    with pytest.raises(DemoSetupError, match=rf"base model: folder not found: {tmp_path / 'nope'}"):  # not "Repo id must be"
        DemoSegmenter.from_pretrained(str(tmp_path / "nope"))


def test_long_class_names_are_named_when_clip_cuts_them(tiny_processor, caplog):
    name = "a very long class name " * 16
    with caplog.at_level("WARNING"):
        tokens = tiny_processor.tokenize_classes(["road", name])["input_ids"]
    assert tokens.shape[-1] == 77
    assert "1 class name(s) make prompts longer than CLIP's 77 tokens" in caplog.text and name[:40] in caplog.text


def test_class_lists_are_read_the_same_way_everywhere(domain, base_model, tmp_path, no_model_load):
    from concept_generation.classes import read_class_list

    from vocalign_hf.recipes import load_target_data

    (domain / "classes.txt").write_text("# my classes\nsky\ngrass\n\nroad\n")
    (domain / "classes.yaml").write_text("classes: [sky, grass, road]\n")
    for name in ("classes.txt", "classes.yaml", "classes.json"):
        argv = flags(domain, base_model, tmp_path / "out")
        argv[argv.index("--class_names_file") + 1] = str(domain / name)
        recipe, args = __import__("vocalign_hf.recipes", fromlist=["x"]).parse_recipe_args(argv, config_dir=CONFIG_DIR)
        assert load_target_data(recipe, args.output_dir, check_files=False).class_names == ["sky", "grass", "road"]
        assert read_class_list(str(domain / name)) == ["sky", "grass", "road"]


def test_evaluate_needs_no_training_images(finished_run, base_model, tmp_path):
    import importlib.util

    domain, output, _ = finished_run
    spec = importlib.util.spec_from_file_location("evaluate_recipe", ROOT / "recipes" / "evaluate.py")
    evaluate_recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_recipe)
    argv = flags(domain, base_model, tmp_path / "eval", "--adapter", str(output / "adapter"))
    at = argv.index("--data_root")
    del argv[at : at + 2]
    metrics = evaluate_recipe.main(argv)
    assert 0 <= metrics["eval_mean_iou"] <= 100


def test_a_damaged_checkpoint_file_is_named(finished_run, base_model, tmp_path, no_model_load):
    domain, output, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    (copy / "checkpoint-2" / "adapter_config.json").write_text("{cut off")
    with pytest.raises(UsageError, match=rf"{copy / 'checkpoint-2' / 'adapter_config.json'} is not valid JSON .*: "
                                          "the file is damaged: resume from another checkpoint"):
        run(flags(domain, base_model, copy, "--max_steps", "3", "--resume_from_checkpoint", "true"))


# ------------------------------------------------------------------- issue 39: whose folder, one run at a time
def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under `folder`: an empty folder counts too."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_a_folder_without_our_record_is_never_replaced(domain, base_model, tmp_path, no_model_load):
    from vocalign_hf.recipe_checks import set_aside_previous_run

    user = tmp_path / "uf"
    (user / "checkpoint-500").mkdir(parents=True)
    (user / "checkpoint-500" / "checkpoint_complete.json").write_text("{}")  # even one that looks complete
    (user / "results.json").write_text('{"my": "numbers"}')
    (user / "notes.txt").write_text("x")
    only_checkpoint = tmp_path / "oc"
    (only_checkpoint / "checkpoint-500").mkdir(parents=True)
    before = tree(user), tree(only_checkpoint)
    for extra in ([], ["--overwrite_output_dir", "true"], ["--resume_from_checkpoint", "true"]):
        with pytest.raises(UsageError, match=rf"--output_dir {user} holds results.json, checkpoint-500 but no "
                                              r"vocalign_run.json, so no vocalign run wrote them; .* no flag replaces"):
            run(flags(domain, base_model, user, *extra))
    with pytest.raises(UsageError, match="holds checkpoint-500 but no vocalign_run.json"):
        run(flags(domain, base_model, only_checkpoint, "--overwrite_output_dir", "true"))
    with pytest.raises(UsageError, match="but no vocalign_run.json"):  # the library itself, not only the recipe
        set_aside_previous_run(user)
    assert (tree(user), tree(only_checkpoint)) == before


def test_runs_write_their_record_first_and_an_overwrite_keeps_other_files(finished_run, base_model, tmp_path):
    domain, output, _ = finished_run
    assert json.loads((output / "vocalign_run.json").read_text())["written_by"] == "vocalign_hf recipes/adapt.py"
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    (copy / "notes.txt").write_text("mine")  # beside a run of ours: not the run's, so left where it is
    run(flags(domain, base_model, copy, "--max_steps", "1", "--overwrite_output_dir", "true", "--eval_zero_shot", "false"))
    assert (copy / "notes.txt").read_text() == "mine"
    assert not (copy / ".previous-run").exists() and not (copy / ".vocalign.lock").exists()


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds `folder`'s lock (through the library) until its stdin closes or it is killed."""
    probe = subprocess.Popen([sys.executable, str(ROOT / "tests" / "lock_probe.py"), str(folder)], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=SUBPROCESS_ENV)
    assert probe.stdout.readline().strip() == f"held {probe.pid}"
    return probe


def test_one_run_per_output_folder(finished_run, base_model, tmp_path, no_model_load, capsys):
    from vocalign_hf.errors import run_program
    from vocalign_hf.output_lock import lock_output_dir

    domain, output, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    holder = _hold_lock(copy)
    try:
        before = tree(copy)
        in_use = rf"--output_dir {copy} is in use by another run \(pid {holder.pid} on .*lock_probe.py"
        for extra in (["--overwrite_output_dir", "true"], ["--max_steps", "3", "--resume_from_checkpoint", "true"]):
            with pytest.raises(UsageError, match=in_use):
                run(flags(domain, base_model, copy, *extra))
        with pytest.raises(UsageError, match=in_use), lock_output_dir(copy):
            pass
        assert run_program(lambda argv: run(flags(domain, base_model, copy, *argv)), ["--overwrite_output_dir", "true"]) == 2
        line, = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: --output_dir {copy} is in use by another run (pid {holder.pid} on ")
        assert tree(copy) == before
    finally:
        holder.kill()  # SIGKILL: no clean-up; the OS drops the lock, the lock file stays behind
        holder.wait()
    assert (copy / ".vocalign.lock").is_file()
    with lock_output_dir(copy):  # free again
        assert json.loads((copy / ".vocalign.lock").read_text())["pid"] == os.getpid()
    assert not (copy / ".vocalign.lock").exists()


def test_a_lock_released_by_its_holder_is_taken_at_once(tmp_path):
    from vocalign_hf.output_lock import lock_output_dir

    folder = tmp_path / "new"
    holder = _hold_lock(folder)
    holder.communicate("")  # the holder ends its run: removes the lock file and the empty folder it made
    assert holder.returncode == 0 and not folder.exists()
    with pytest.raises(RuntimeError), lock_output_dir(folder):  # a run that fails before writing leaves nothing
        raise RuntimeError
    assert not folder.exists()
    with lock_output_dir(folder):
        (folder / "written").write_text("x")
    assert [p.name for p in folder.iterdir()] == ["written"]


def test_resuming_an_interrupted_overwrite_keeps_the_set_aside_run(finished_run, base_model, tmp_path, caplog):
    from vocalign_hf.recipe_checks import run_mark, set_aside_previous_run

    domain, output, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    # What a SIGKILL after the new run's first checkpoint leaves: the old run aside, the new one's mark and checkpoint.
    aside = set_aside_previous_run(copy)
    shutil.copytree(aside / "checkpoint-1", copy / "checkpoint-1")
    settings = json.loads((aside / "vocalign_run.json").read_text())
    (copy / "vocalign_run.json").write_text(json.dumps(run_mark("training", settings)))
    before = tree(aside)
    for extra in ([], ["--overwrite_output_dir", "true"]):
        with pytest.raises(UsageError, match=r"\.previous-run holds the run that an interrupted --overwrite_output_dir "
                                              r"set aside; .* --resume_from_checkpoint true to finish the interrupted "
                                              r"run: that keeps it \(delete it yourself afterwards\)"):
            run(flags(domain, base_model, copy, "--eval_zero_shot", "false", *extra))
    with caplog.at_level(logging.WARNING, logger="vocalign_hf.recipes"):
        run(flags(domain, base_model, copy, "--eval_zero_shot", "false", "--resume_from_checkpoint", "true"))
    assert tree(aside) == before and (copy / "results.json").is_file()
    assert f"{aside} (the run an interrupted --overwrite_output_dir set aside) is kept" in caplog.text


def _class_names_of(domain: Path, base_model: Path, tmp_path: Path, classes_file: Path) -> list[str]:
    from vocalign_hf.recipes import load_target_data, parse_recipe_args

    argv = flags(domain, base_model, tmp_path / "out")
    argv[argv.index("--class_names_file") + 1] = str(classes_file)
    recipe, args = parse_recipe_args(argv, config_dir=CONFIG_DIR)
    return load_target_data(recipe, args.output_dir, check_files=False).class_names


def test_class_names_are_normalised_once(domain, base_model, tmp_path, no_model_load):
    from concept_generation.classes import read_class_list

    from vocalign_hf.models.catseg import validate_class_names

    listed = domain / "classes.txt"
    listed.write_bytes("\ufeffsky\n grass \u200b\nroad\n".encode())  # Notepad's UTF-8: a BOM first
    assert _class_names_of(domain, base_model, tmp_path, listed) == ["sky", "grass", "road"]
    assert read_class_list(str(listed)) == ["sky", "grass", "road"]  # what vocalign-concepts sends to the LLM
    assert validate_class_names(["\ufeffsky", "cafe\u0301 "]) == ["sky", "caf\u00e9"]
    for twin in ("sky\u200b", "s\u200bky", "\uff53\uff4b\uff59", "SKY"):  # zero-width space, fullwidth, case
        listed.write_text(f"sky\ngrass\n{twin}\n", encoding="utf-8")
        with pytest.raises(UsageError, match=rf"classes.txt: duplicate class name {re.escape(repr(twin))} \(entry 2; "
                                              r"same as 'sky' once case, Unicode forms and invisible characters"):
            _class_names_of(domain, base_model, tmp_path, listed)
    listed.write_text("caf\u00e9\ncafe\u0301\n", encoding="utf-8")  # NFC and NFD
    with pytest.raises(UsageError, match="duplicate class name"):
        _class_names_of(domain, base_model, tmp_path, listed)


def test_a_concept_file_with_a_repeated_key_is_refused(domain, base_model, tmp_path, no_model_load):
    (domain / "concepts.json").write_text('{"sky": ["heaven"], "grass": ["lawn"], "sky": ["firmament"]}')
    with pytest.raises(UsageError, match=r"concepts.json: key 'sky' appears twice in one JSON object, and JSON would "
                                          r"keep only the last one's list: merge them into one entry"):
        run(flags(domain, base_model, tmp_path / "out"))
    (domain / "concepts.json").write_text('\ufeff{"sky": ["heaven"]}', encoding="utf-8")  # a BOM is not an error
    assert _class_names_of(domain, base_model, tmp_path, domain / "classes.json") == ["sky", "grass", "road"]


def test_a_run_that_stops_on_an_error_says_so_in_its_record(domain, base_model, tmp_path, monkeypatch):
    from vocalign_hf.adaptation import VocAlignTrainer

    def fail(self, *args, **kwargs):
        raise KeyError("lora")  # a bug, or anything else that stops the run

    monkeypatch.setattr(VocAlignTrainer, "train", fail)
    with pytest.raises(KeyError):
        run(flags(domain, base_model, tmp_path / "out", "--eval_zero_shot", "false"))
    mark = json.loads((tmp_path / "out" / "vocalign_run.json").read_text())
    assert (mark["status"], mark["error"], mark["step"]) == ("failed", "KeyError: 'lora'", 0)
    assert not (tmp_path / "out" / ".vocalign.lock").exists()


# ------------------------------------------------------- issue 39 (rest): what a resume may change, damaged files
def test_a_lora_layout_change_is_refused_even_with_other_settings(finished_run, base_model, tmp_path, no_model_load):
    domain, output, _ = finished_run  # LoRA on layers 0 1, rank 2, alpha 2
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    before = tree(copy)
    for extra in (["--lora_layers", "0"], ["--lora_rank", "4"], ["--lora_alpha", "3"], ["--lora_use_rslora", "false"]):
        with pytest.raises(UsageError, match=rf"--resume_from_checkpoint {copy / 'checkpoint-2'} has another LoRA "
                                              r"layout \(.*\), which a resume cannot change: resume with the "
                                              r"checkpoint's LoRA settings, or start a new run"):
            run(flags(domain, base_model, copy, "--max_steps", "3", "--resume_from_checkpoint", "true",
                      "--resume_with_other_settings", "true", *extra))
    assert tree(copy) == before


def _keep_trainer(monkeypatch) -> list:
    """The recipe's trainers, kept once they trained (their own `train` runs unchanged)."""
    from vocalign_hf.adaptation import VocAlignTrainer

    kept, train = [], VocAlignTrainer.train

    def train_and_keep(self, *args, **kwargs):
        kept.append(self)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(VocAlignTrainer, "train", train_and_keep)
    return kept


def test_a_resume_with_another_learning_rate_trains_with_it(finished_run, base_model, tmp_path, monkeypatch):
    domain, output, _ = finished_run  # lr 3e-05, weight decay 1e-4, constant schedule
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    kept = _keep_trainer(monkeypatch)
    run(flags(domain, base_model, copy, "--max_steps", "3", "--learning_rate", "5e-3", "--weight_decay", "0.02",
              "--eval_zero_shot", "false", "--resume_from_checkpoint", "true", "--resume_with_other_settings", "true"))
    trainer = kept[-1]
    groups = trainer.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == trainer.lr_scheduler.base_lrs == [5e-3] * len(groups)
    assert [g["lr"] for g in groups] == [5e-3] * len(groups)
    assert {g["weight_decay"] for g in groups} - {0.0} == {0.02}
    settings = json.loads((copy / "adapter" / "vocalign.json").read_text())["settings"]
    assert settings["learning_rate"] == 5e-3 and settings["weight_decay"] == 0.02
    # A later plain resume keeps the record of the forced difference.
    run(flags(domain, base_model, copy, "--max_steps", "4", "--learning_rate", "5e-3", "--weight_decay", "0.02",
              "--eval_zero_shot", "false", "--resume_from_checkpoint", "true"))
    resumed = json.loads((copy / "adapter" / "vocalign.json").read_text())["settings"]["resumed_from"]
    assert (resumed["step"], resumed["other_settings"]) == (3, [])
    assert resumed["earlier"]["step"] == 2
    assert "learning_rate 3e-05 (this run: 0.005)" in resumed["earlier"]["other_settings"]


def _evaluate_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_recipe", ROOT / "recipes" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def other_base(base_model, tmp_path) -> Path:
    """The base model's folder with other weights (one tensor changed)."""
    from safetensors.torch import save_file

    folder = tmp_path / "other_base"
    shutil.copytree(base_model, folder)
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_the_base_model_is_part_of_a_runs_identity(finished_run, base_model, other_base, tmp_path, capsys):
    from vocalign_hf.adaptation.adapters import base_model_fingerprint

    domain, output, _ = finished_run
    digest = base_model_fingerprint(base_model)["sha256"]
    assert digest == __import__("hashlib").sha256((base_model / "model.safetensors").read_bytes()).hexdigest()
    for record in (output / "checkpoint-2" / "vocalign.json", output / "vocalign_run.json"):
        assert json.loads(record.read_text())["base_model"] == {"name": str(base_model), "sha256": digest}
    assert json.loads((output / "adapter" / "vocalign.json").read_text())["base_model_sha256"] == digest
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    for extra in ([], ["--resume_with_other_settings", "true"]):
        with pytest.raises(UsageError, match=rf"--resume_from_checkpoint {copy / 'checkpoint-2'} was trained on the "
                                              rf"base model {base_model} \(sha256 {digest[:12]}\); --base_model "
                                              rf"{other_base} has other weights .*: resume on the checkpoint's base"):
            run(flags(domain, other_base, copy, "--max_steps", "3", "--resume_from_checkpoint", "true", *extra))
    argv = flags(domain, other_base, tmp_path / "eval", "--adapter", str(output / "adapter"))
    _evaluate_recipe().main(argv)
    assert (f"note: the adapter was trained on {base_model} (sha256 {digest[:12]}); {other_base} has other "
            "weights") in capsys.readouterr().out


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "teacher_lora.safetensors", "optimizer.pt",
                                  "rng_state.pth", "scheduler.pt"])
def test_a_cut_off_checkpoint_file_is_named(finished_run, base_model, tmp_path, no_model_load, name):
    domain, output, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    _cut(copy / "checkpoint-2" / name)  # its completion mark is there: the file was damaged afterwards
    with pytest.raises(UsageError, match=rf"^{copy / 'checkpoint-2' / name} is damaged \(.*\): resume from another "
                                          rf"checkpoint \(--resume_from_checkpoint {copy / 'checkpoint-1'}\), or "
                                          r"start a new run$"):
        run(flags(domain, base_model, copy, "--max_steps", "3", "--resume_from_checkpoint", "true"))


def test_a_cut_off_adapter_or_missing_folder_is_one_line(finished_run, base_model, tmp_path):
    _, output, _ = finished_run
    adapter = tmp_path / "adapter"
    shutil.copytree(output / "adapter", adapter)
    _cut(adapter / "adapter_model.safetensors")
    merge = [sys.executable, "-m", "vocalign_hf.adaptation.merge"]
    cases = [
        (merge + [str(base_model), str(adapter), str(tmp_path / "m")],
         f"error: adapter: {adapter / 'adapter_model.safetensors'} is damaged ("),
        (merge + [str(tmp_path / "nobase"), str(output / "adapter"), str(tmp_path / "m")],
         f"error: base model: folder not found: {tmp_path / 'nobase'}"),
        (merge + [str(base_model), "runs/x/adapter", str(tmp_path / "m")],
         "error: adapter: folder not found: runs/x/adapter"),
        ([sys.executable, str(ROOT / "recipes" / "evaluate.py"), *flags(output.parent / "domain", base_model,
                                                                          tmp_path / "e", "--adapter", str(adapter))],
         f"error: --adapter: {adapter / 'adapter_model.safetensors'} is damaged ("),
    ]
    for command, start in cases:
        done = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300, cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        line, = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert line.startswith(start) and "huggingface.co" not in line, line
    assert not (tmp_path / "m").exists()
    from vocalign_hf.adaptation import load_adapted_model
    from vocalign_hf.adaptation.adapters import AdapterLoadError

    with pytest.raises(AdapterLoadError, match=r"adapter_model.safetensors is damaged .*: save or download the adapter"):
        load_adapted_model(base_model, adapter)  # the library, without the recipe's checks


def test_an_unknown_dataset_name_lists_the_valid_ones(tmp_path):
    for script in ("adapt.py", "evaluate.py"):
        command = [sys.executable, str(ROOT / "recipes" / script), "--dataset", "foldr", "--output_dir", str(tmp_path / "o")]
        done = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == (
            "error: --dataset foldr is not a dataset this recipe knows (did you mean folder?): give one of world, "
            "folder, cityscapes, ade20k_150, pascal_context_59, or a Hub dataset repo id (org/name)")
    assert not (tmp_path / "o").exists()


def test_a_disk_that_fills_during_the_run_is_one_line(domain, base_model, tmp_path, monkeypatch, capsys):
    from vocalign_hf.adaptation.teacher import EMATeacher
    from vocalign_hf.errors import run_program

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")  # what writing a checkpoint on a full disk raises

    monkeypatch.setattr(EMATeacher, "save", disk_full)
    output = tmp_path / "out"
    assert run_program(lambda argv: run(flags(domain, base_model, output, *argv)), ["--eval_zero_shot", "false"]) == 2
    line, = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert re.fullmatch(rf"error: the disk of --output_dir {output} filled up during the run \(No space left on "
                        r"device; [\d.]+ MiB free now, the run needs about [\d.]+ MiB\): free some space or give "
                        r"--output_dir on another disk, then --resume_from_checkpoint true continues from the last "
                        r"complete checkpoint", line)
    assert json.loads((output / "vocalign_run.json").read_text())["status"] == "failed"


def test_the_free_space_asked_is_within_twice_what_a_run_writes(finished_run, base_model):
    from vocalign_hf.adaptation import add_lora
    from vocalign_hf.recipes import checkpoint_space_needed, parse_recipe_args

    domain, output, _ = finished_run
    _, args = parse_recipe_args(flags(domain, base_model, output), config_dir=CONFIG_DIR)
    student = add_lora(CATSegForSemanticSegmentation.from_pretrained(base_model), args)
    needed, _ = checkpoint_space_needed(student, args)
    written = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    assert written <= needed <= 2 * written, (written, needed)
    resumed, what = checkpoint_space_needed(student, args, start_step=1)  # a resume writes only what is left
    assert what.startswith("1 checkpoint(s)") and resumed < needed


def test_merge_into_a_link_to_its_earlier_output_replaces_the_target(finished_run, base_model, tmp_path):
    _, output, _ = finished_run
    target = merge_adapter(base_model, output / "adapter", tmp_path / "merged-1")
    link = tmp_path / "current"
    link.symlink_to(target, target_is_directory=True)
    first = (target / "model.safetensors").stat().st_ino
    assert merge_adapter(base_model, output / "adapter", link) == target.resolve()
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "model.safetensors").stat().st_ino != first  # the target itself was rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "merged-1"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_outside_the_run_is_one_line(capsys):
    """Pretraining, evaluate.py, merge: any program run through run_program names a full disk in one line."""
    from vocalign_hf.errors import run_program

    def write_results(argv):
        with open("/dev/full", "w") as handle:  # a real ENOSPC from the kernel, on flush
            handle.write("x" * 8192)

    assert run_program(write_results, []) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: the disk filled up (No space left on device)")
    assert "write to another disk" in err

    def save_weights(argv):  # an error that names its file also names the space left on that file's disk
        raise OSError(28, "No space left on device", str(Path.cwd() / "adapter" / "weights.safetensors"))

    assert run_program(save_weights, []) == 2
    err = capsys.readouterr().err.strip()
    assert "writing " + str(Path.cwd() / "adapter" / "weights.safetensors") in err and "MiB free on its disk now" in err

    def read_failed(argv):
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):  # other OS errors stay what they are, with their traceback
        run_program(read_failed, [])

"""The main job on two processes (`accelerate launch`, gloo on CPU): both ranks end with the same student and teacher,
the evaluation counts exactly what one process counts, masks differ between ranks, the world and the source model
are built once, and only rank 0 prints results and writes files."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
WORLD_CONFIG = ROOT / "recipes" / "configs" / "world.yaml"

# A tiny world (32 px; 11 evaluation images: uneven shards over 2 ranks, so rank 1 gets a repeated image to drop; batches of 1 so both evaluations run the same per-image computations), a source model
# pretrained for a few steps, 3 adaptation steps with the student's colour augmentation on.
TINY_JOB = [
    "--config", str(WORLD_CONFIG), "--world_image_size", "32", "--world_num_source_train", "24",
    "--world_num_target_train", "16", "--world_num_target_eval", "11", "--world_pretrain_steps", "20",
    "--world_pretrain_batch_size", "8", "--max_steps", "3", "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "1", "--warmup_steps", "1", "--student_augmentation", "true",
    "--pseudo_threshold", "0.2", "--num_overlays", "1", "--disable_tqdm", "true", "--save_steps", "3",
    "--logging_steps", "1", "--report_to", "tensorboard",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_tiny_job(tmp: Path, launcher: list[str], env: dict[str, str] | None = None):
    """The tiny job on 2 processes under `accelerate launch <launcher>`, through the probe: (output folder, each
    rank's record, stdout)."""
    output, cache, probes = tmp / "run", tmp / "world_cache", tmp / "probes"
    env = {**os.environ, **(env or {}), "VOCALIGN_WORLD_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(_free_port()),
        str(ROOT / "tests" / "multiprocess_probe.py"), str(probes), f"{output},{cache}",
        str(ROOT / "recipes" / "adapt.py"), *TINY_JOB, "--output_dir", str(output),
    ]
    done = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [torch.load(probes / f"rank{i}.pt", weights_only=False) for i in range(2)]
    return output, ranks, done.stdout


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    # `accelerate launch --cpu` starts a single process; `--multi_gpu` starts torchrun's processes, which use gloo on
    # the CPU here (the world config sets use_cpu: true).
    launcher = ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    return _launch_tiny_job(tmp_path_factory.mktemp("two_processes"), launcher)


@pytest.fixture(scope="module")
def two_process_fsdp_run(tmp_path_factory):
    """The same job with the shipped FSDP2 config. On CPU processes Accelerate would fall back to DDP (it enables
    FSDP for accelerator devices only); the probe lets it take its FSDP2 path on gloo (see `fsdp_on_cpu` there)."""
    launcher = ["--config_file", str(ROOT / "recipes" / "accelerate_configs" / "fsdp2_lora.yaml")]
    return _launch_tiny_job(tmp_path_factory.mktemp("two_processes_fsdp"), launcher, {"VOCALIGN_PROBE_CPU_FSDP": "1"})


def test_both_ranks_hold_the_same_student_and_teacher(two_process_run):
    output, ranks, _ = two_process_run
    assert [r["process_index"] for r in ranks] == [0, 1] and all(r["num_processes"] == 2 for r in ranks)
    for part in ("student", "teacher"):
        assert ranks[0][part].keys() == ranks[1][part].keys() and ranks[0][part]
        for name, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][name]), (part, name)
    moved = [n for n, v in ranks[0]["student"].items() if "lora_B" in n and v.abs().sum() > 0]
    assert moved, "training changed no LoRA weight"  # lora_B starts at zero
    assert any(not torch.equal(v, ranks[0]["teacher"][n]) for n, v in ranks[0]["student"].items())
    saved = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(ranks[0]["student"])
    for name, value in saved.items():  # peft drops the adapter name from the keys
        match = [v for n, v in ranks[0]["student"].items() if n.replace(".default", "") == name]
        assert len(match) == 1 and torch.equal(match[0], value), name


def test_two_process_evaluation_equals_one_process(two_process_run, tmp_path):
    """11 images over 2 ranks in batches of 2: Accelerate pads rank 1's last batch with image 0, which must not be
    counted. The recipe's evaluate.py on one process, with the saved adapter, gives exactly the same numbers."""
    import importlib.util

    output, _, _ = two_process_run
    results = json.loads((output / "results.json").read_text())
    spec = importlib.util.spec_from_file_location("evaluate_recipe", ROOT / "recipes" / "evaluate.py")
    evaluate_recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_recipe)
    flags = [*TINY_JOB, "--output_dir", str(tmp_path), "--base_model", str(output / "source_model")]
    # `accelerate launch` runs each CPU process with one thread; so does this evaluation, since the order of a
    # multi-threaded reduction can move a logit by an ulp and flip a pixel's argmax.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adapted = evaluate_recipe.main([*flags, "--adapter", str(output / "adapter")])
        zero_shot = evaluate_recipe.main(flags)
    finally:
        torch.set_num_threads(threads)
    assert adapted["eval_mean_iou"] == results["adapted_miou"]
    assert zero_shot["eval_mean_iou"] == results["zero_shot_miou"]
    for key, value in results.items():
        if key.startswith("adapted_iou_"):
            assert adapted[key.replace("adapted_", "eval_")] == pytest.approx(value, abs=0, nan_ok=True)
    assert adapted["eval_mean_iou"] != zero_shot["eval_mean_iou"]


def test_masks_and_augmentation_differ_between_ranks(two_process_run):
    _, ranks, _ = two_process_run
    masks = [r["masks"] for r in ranks]
    assert len(masks[0]) == len(masks[1]) == 3  # one student forward per step
    for m0, m1 in zip(*masks):
        assert 0.2 < m0.float().mean() < 0.8 and not torch.equal(m0, m1)
    views = [r["fixed_view"] for r in ranks]  # the same image, the same step: only the rank differs
    fill = ranks[0]["mask_fill"].view(1, 3, 1, 1)
    kept = ~((views[0] == fill).all(dim=1) | (views[1] == fill).all(dim=1))
    assert kept.any()
    assert (views[0] - views[1]).abs().permute(1, 0, 2, 3)[:, kept].mean() > 0.01  # different colour augmentation


def test_world_and_source_model_are_built_once(two_process_run):
    _, ranks, _ = two_process_run
    assert ranks[0]["render_calls"] == 4 and ranks[1]["render_calls"] == 0  # 4 splits, rendered by rank 0 only
    assert ranks[0]["pretrain_calls"] == 1 and ranks[1]["pretrain_calls"] == 0


def test_only_rank_zero_prints_and_writes(two_process_run):
    output, ranks, stdout = two_process_run
    # The one thing the Trainer has every rank write: its own RNG state in the checkpoint (rng_state_<rank>.pth, so
    # a resumed run draws what each rank would have drawn), creating the folder if rank 1 gets there first.
    own_rng_state = {("mkdir", str((output / "checkpoint-3").resolve())),
                     ("open", str((output / "checkpoint-3" / "rng_state_1.pth").resolve()))}
    assert [w for w in ranks[1]["writes"] if tuple(w) not in own_rng_state] == [], ranks[1]["writes"][:5]
    written = {Path(path) for _, path in ranks[0]["writes"]}
    for expected in ("results.json", "overlays.png", "adapter", "checkpoint-3/trainer_state.json",
                     "checkpoint-3/teacher_lora.safetensors", "source_model"):
        assert output.resolve() / expected in written, expected  # (renamed into place, or opened for writing)
    assert (output / "checkpoint-3" / "teacher_lora.safetensors").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (output / "runs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/zero_shot_mean_iou", "train/adapted_mean_iou"} <= tags, tags
    assert len(re.findall(r"zero-shot mIoU [\d.]+ (\(with concepts [\d.]+\) )?-> adapted mIoU", stdout)) == 1, stdout
    assert stdout.count("=== target split, adapted ===") == 1


def test_fsdp2_run_equals_the_ddp_run(two_process_run, two_process_fsdp_run):
    """FSDP2 (the shipped config, on gloo): the student and the teacher -- its second adapter on the same model -- are
    sharded alike, each rank's EMA updates its own teacher shards, and the run ends where the DDP run ends: the same
    LoRA weights within float tolerance (gradients are reduce-scattered instead of all-reduced), the same
    evaluations, the same files."""
    ddp_output, ddp, _ = two_process_run
    output, ranks, stdout = two_process_fsdp_run
    assert [r["fsdp"] for r in ranks] == [True, True] and ddp[0]["fsdp"] is False
    for name, shape in ranks[0]["teacher_local_shapes"].items():  # each rank holds half of every teacher weight
        whole = ranks[0]["teacher"][name].shape
        assert shape == (whole[0] // 2, *whole[1:]) == ranks[1]["teacher_local_shapes"][name], name
    for part in ("student", "teacher"):
        assert ranks[0][part].keys() == ranks[1][part].keys() == ddp[0][part].keys()
        for name, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][name]), (part, name)
            torch.testing.assert_close(value, ddp[0][part][name], rtol=1e-5, atol=1e-6, msg=f"{part} {name}")
    assert any(not torch.equal(v, ranks[0]["teacher"][n]) for n, v in ranks[0]["student"].items())
    results = json.loads((output / "results.json").read_text())
    assert results == json.loads((ddp_output / "results.json").read_text())  # every mIoU and IoU
    for saved in ("adapter/adapter_model.safetensors", "checkpoint-3/adapter_model.safetensors",
                  "checkpoint-3/teacher_lora.safetensors"):
        mine, theirs = load_file(str(output / saved)), load_file(str(ddp_output / saved))
        assert mine.keys() == theirs.keys(), saved
        for name, value in mine.items():
            torch.testing.assert_close(value, theirs[name], rtol=1e-5, atol=1e-6, msg=f"{saved} {name}")
    assert (output / "overlays.png").is_file() and stdout.count("=== target split, adapted ===") == 1


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {
        "single_gpu_bf16.yaml": ("NO", 1, 1), "multi_gpu_ddp.yaml": ("MULTI_GPU", 4, 1),
        "multi_node_ddp.yaml": ("MULTI_GPU", 16, 2), "fsdp2_lora.yaml": ("FSDP", 4, 1),
    }
    folder = ROOT / "recipes" / "accelerate_configs"
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(expected)
    for name, (kind, processes, machines) in expected.items():
        config = load_config_from_file(str(folder / name))
        assert (str(config.distributed_type.value), config.num_processes, config.num_machines) == (kind, processes, machines)
        assert config.mixed_precision == "bf16" and not config.use_cpu
    fsdp = load_config_from_file(str(folder / "fsdp2_lora.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"

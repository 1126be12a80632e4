"""`--bf16` on CPU (autocast works there): the teacher's forward and every evaluation path run in bfloat16, losses
stay finite and the mIoU stays close to fp32."""

import math
from pathlib import Path

import pytest
import torch
from test_trainer import make_args, make_trainer

from vocalign_hf.recipes import parse_recipe_args, run_adaptation

ROOT = Path(__file__).resolve().parents[1]


def _record_linear_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """Output dtypes of every nn.Linear call in `model` (forward hooks; nothing replaced)."""
    dtypes = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, inputs, output: dtypes.append(output.dtype))
    return dtypes


@pytest.mark.parametrize("bf16", [True, False])
def test_teacher_student_and_evaluation_run_under_autocast(bf16, tmp_path, tiny_model, tiny_processor):
    expected = torch.bfloat16 if bf16 else torch.float32
    trainer = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, bf16=bf16, max_steps=2))
    teacher = _record_linear_dtypes(trainer.teacher.model)
    student = _record_linear_dtypes(trainer.model)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
    assert teacher and set(teacher) == {expected}  # classes + concepts: the largest forward
    assert student and set(student) == {expected}
    student.clear()
    assert 0 <= trainer.evaluate()["eval_mean_iou"] <= 100
    assert student and set(student) == {expected}

    # A model that never trains is never prepared by Accelerate: zero-shot and sliding-window evaluation too.
    for sliding in (False, True):
        args = make_args(tmp_path, bf16=bf16, method="zero_shot", eval_sliding_window=sliding)
        zero_shot = make_trainer(tiny_model, tiny_processor, args)
        dtypes = _record_linear_dtypes(zero_shot.model)
        zero_shot.evaluate()
        assert dtypes and set(dtypes) == {expected}, sliding


def test_bf16_main_job_on_a_small_world_is_close_to_fp32(tmp_path):
    """The recipe with the world's shipped source model (48.50 mIoU zero-shot on the default world in fp32) on the
    first images of the world's target splits, for a few steps, in fp32 and under --bf16: the adapted model
    differs from the source model and stays within half a point of fp32 (a non-finite loss would have wrecked it).
    Finite losses are checked step by step in the test above."""
    from vocalign_hf.world.shipped import shipped_settings_hash, unpack_shipped_source_model

    base = tmp_path / "source_model"
    assert unpack_shipped_source_model(shipped_settings_hash(), base)
    flags = [
        "--config", str(ROOT / "recipes" / "configs" / "world.yaml"), "--base_model", str(base),
        "--world_num_source_train", "0", "--world_num_target_train", "32", "--world_num_target_eval", "50",
        "--max_steps", "4", "--per_device_train_batch_size", "4", "--warmup_steps", "1", "--num_overlays", "0",
        "--disable_tqdm", "true", "--save_strategy", "no",
    ]
    fp32 = run_adaptation(*parse_recipe_args([*flags, "--output_dir", str(tmp_path / "fp32")]))
    bf16 = run_adaptation(*parse_recipe_args([*flags, "--output_dir", str(tmp_path / "bf16"), "--bf16", "true"]))
    for key in ("zero_shot_miou", "adapted_miou"):
        assert math.isfinite(bf16[key]) and 30 < bf16[key] <= 100, (key, bf16[key])
        assert bf16[key] == pytest.approx(fp32[key], abs=0.5), (key, fp32[key], bf16[key])
    assert bf16["adapted_miou"] != bf16["zero_shot_miou"]  # it trained; NaN weights would collapse the mIoU
    assert bf16 != fp32  # bf16 did run: some pixel differs

"""`--bf16` on CPU (autocast works there): the student's forward and every evaluation path run in bfloat16, losses
stay finite and the mIoU stays close to fp32. The teacher's precision is its own (`teacher_dtype`)."""

import math
from pathlib import Path

import pytest
import torch
from conftest import RandomImages
from test_trainer import make_args, make_trainer

from vocalign_hf import CATSegForSemanticSegmentation
from vocalign_hf.errors import UsageError

from vocalign_hf.recipes import parse_recipe_args, run_adaptation

ROOT = Path(__file__).resolve().parents[1]


def _record_linear_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """Output dtypes of every nn.Linear call in `model` (forward hooks; nothing replaced)."""
    dtypes = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, inputs, output: dtypes.append(output.dtype))
    return dtypes


def _linear_dtypes_by_adapter(trainer) -> tuple[list[torch.dtype], list[torch.dtype]]:
    """Output dtypes of every nn.Linear call of the teacher's and of the student's forwards: they share one model,
    told apart by the adapter active during the call."""
    from vocalign_hf.adaptation.teacher import TEACHER_ADAPTER

    peft_model = trainer.teacher.student
    calls = {TEACHER_ADAPTER: [], trainer.teacher.student_adapter: []}
    for module in peft_model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(
                lambda m, inputs, output: calls[peft_model.base_model.active_adapter].append(output.dtype)
            )
    return calls[TEACHER_ADAPTER], calls[trainer.teacher.student_adapter]


@pytest.mark.parametrize("bf16", [True, False])
def test_teacher_student_and_evaluation_run_under_autocast(bf16, tmp_path, tiny_model, tiny_processor):
    expected = torch.bfloat16 if bf16 else torch.float32
    teacher_dtype = "bfloat16" if bf16 else "float32"  # the teacher's precision is its own (next test)
    trainer = make_trainer(tiny_model, tiny_processor,
                           make_args(tmp_path, bf16=bf16, max_steps=2, teacher_dtype=teacher_dtype))
    teacher, student = _linear_dtypes_by_adapter(trainer)
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


@pytest.mark.parametrize("student_bf16, teacher_dtype", [(True, "float32"), (False, "bfloat16")])
def test_the_teachers_precision_is_its_own(student_bf16, teacher_dtype, tmp_path, tiny_model, tiny_processor):
    args = make_args(tmp_path, bf16=student_bf16, max_steps=2, teacher_dtype=teacher_dtype)
    trainer = make_trainer(tiny_model, tiny_processor, args)
    teacher, student = _linear_dtypes_by_adapter(trainer)
    assert math.isfinite(trainer.train().training_loss)
    assert teacher and set(teacher) == {getattr(torch, teacher_dtype)}
    assert student and set(student) == {torch.bfloat16 if student_bf16 else torch.float32}
    # The EMA accumulates in float32: the teacher's LoRA weights are never cast.
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.float32}


def _teacher_targets(tiny_config, tiny_processor, tmp_path, teacher_dtype):
    torch.manual_seed(0)
    args = make_args(tmp_path / teacher_dtype, teacher_dtype=teacher_dtype, top_k=None)
    trainer = make_trainer(CATSegForSemanticSegmentation(tiny_config), tiny_processor, args)
    batch = trainer.data_collator([RandomImages()[i] for i in range(4)])
    teacher, _ = _linear_dtypes_by_adapter(trainer)
    _, labels, _ = trainer.teacher_targets(batch["pixel_values"])
    return labels, set(teacher)


def test_a_bfloat16_teacher_labels_like_a_float32_one(tmp_path, tiny_config, tiny_processor):
    fp32_labels, fp32_dtypes = _teacher_targets(tiny_config, tiny_processor, tmp_path, "float32")
    bf16_labels, bf16_dtypes = _teacher_targets(tiny_config, tiny_processor, tmp_path, "bfloat16")
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}  # bf16 did run
    agreement = (fp32_labels == bf16_labels).float().mean().item()
    assert agreement >= 0.95, agreement


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


def test_auto_teacher_dtype_is_bfloat16_only_on_a_cpu_with_native_bf16(tmp_path, tiny_model, tiny_processor):
    native = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    trainer = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, teacher_dtype="auto"))
    teacher, _ = _linear_dtypes_by_adapter(trainer)
    trainer.teacher_targets(torch.randn(1, 3, 32, 32))
    assert set(teacher) == {torch.bfloat16 if native else torch.float32}
    with pytest.raises(UsageError, match="teacher_dtype must be one of"):
        make_args(tmp_path, teacher_dtype="float16")


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

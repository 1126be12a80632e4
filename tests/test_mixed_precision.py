"""`--bf16` on CPU (autocast works there): the teacher's forward and every evaluation path run in bfloat16, losses
stay finite and the mIoU stays close to fp32."""

import math
from pathlib import Path

import pytest
import torch
from test_trainer import make_args, make_trainer

from vocalign_hf.recipes import parse_recipe_args

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
    teacher = _record_linear_dtypes(trainer.teacher)
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


def test_bf16_adaptation_of_the_world_is_close_to_fp32(tmp_path):
    """The world's shipped source model (48.50 mIoU zero-shot in fp32) evaluated and adapted for a few steps as the
    main job does, in fp32 and under --bf16: finite losses, mIoUs within a point."""
    from dataclasses import replace

    from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
    from vocalign_hf.adaptation import VocAlignTrainer, add_lora
    from vocalign_hf.recipes import load_target_data

    recipe, args = parse_recipe_args([
        "--config", str(ROOT / "recipes" / "configs" / "world.yaml"), "--output_dir", str(tmp_path),
        "--max_train_images", "32", "--max_eval_images", "50", "--max_steps", "4", "--per_device_train_batch_size", "4",
        "--warmup_steps", "1", "--disable_tqdm", "true", "--save_strategy", "no", "--logging_steps", "1",
    ])
    data = load_target_data(recipe, args.output_dir, seed=args.seed)
    processor = CATSegProcessor.from_pretrained(data.base_model)
    results = {}
    for bf16 in (False, True):
        run_args = replace(args, bf16=bf16)

        def trainer_for(model, method):
            return VocAlignTrainer(
                model=model, args=replace(run_args, method=method), class_names=data.class_names,
                concepts=data.concepts, processor=processor, train_dataset=data.train, eval_dataset=data.eval,
            )

        zero_shot = trainer_for(CATSegForSemanticSegmentation.from_pretrained(data.base_model), "zero_shot")
        torch.manual_seed(0)
        trainer = trainer_for(add_lora(CATSegForSemanticSegmentation.from_pretrained(data.base_model), run_args), "vocalign")
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        assert len(losses) == 4 and all(math.isfinite(v) and v > 0 for v in losses), losses
        results[bf16] = (zero_shot.evaluate()["eval_mean_iou"], trainer.evaluate()["eval_mean_iou"])
    for fp32_miou, bf16_miou in zip(results[False], results[True]):
        assert math.isfinite(bf16_miou) and bf16_miou == pytest.approx(fp32_miou, abs=1.0), results
    assert results[False] != results[True], results  # bf16 did change some predictions

"""VocAlignTrainer end to end on a tiny CAT-Seg under Accelerate (CPU): every Table 2 row, resume, adapters."""

import json
import math

import pytest
import torch
from torch.utils.data import Dataset

from vocalign_hf import CATSegForSemanticSegmentation
from vocalign_hf.adaptation import (
    ABLATIONS,
    VocAlignArguments,
    VocAlignTrainer,
    add_lora,
    load_adapted_model,
    lora_parameters,
    save_adapter,
)

CLASSES = ["road", "car", "sky"]
CONCEPTS = {"car": ["automobile", "vehicle"], "sky": ["heaven"]}


class RandomImages(Dataset):
    """Deterministic images (and labels) per index."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        return {"pixel_values": torch.rand(3, 32, 32, generator=g), "labels": torch.randint(0, 3, (32, 32), generator=g)}


def make_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=4,
        learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[], top_k=2, mask_block_size=8,
        use_cpu=True, seed=0, pseudo_threshold=0.3, lr_scheduler_type="constant", warmup_steps=1,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return VocAlignArguments(**kwargs)


def make_trainer(base, processor, args, **kwargs):
    model = add_lora(base, args) if args.method != "zero_shot" else base
    return VocAlignTrainer(
        model=model, args=args, class_names=CLASSES, concepts=CONCEPTS, processor=processor,
        train_dataset=RandomImages(), eval_dataset=RandomImages(), **kwargs,
    )


@pytest.mark.parametrize("row", list(ABLATIONS))
def test_every_table2_row_trains_only_lora(row, tmp_path, tiny_model, tiny_processor):
    args = make_args(tmp_path, **ABLATIONS[row])
    trainer = make_trainer(tiny_model, tiny_processor, args)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    if row == "zero_shot":
        with pytest.raises(RuntimeError, match="zero_shot"):
            trainer.train()
    else:
        result = trainer.train()
        assert math.isfinite(result.training_loss)
        changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
        assert changed, "no weight moved"
        assert all("lora_" in n for n in changed), sorted(changed - {n for n in changed if "lora_" in n})
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_mean_iou"] <= 100.0
    assert {f"eval_iou_{c}" for c in CLASSES} <= set(metrics)


def test_teacher_follows_student_by_ema(tmp_path, tiny_model, tiny_processor):
    args = make_args(tmp_path, max_steps=3, ema_alpha=0.99)
    trainer = make_trainer(tiny_model, tiny_processor, args)
    teacher0 = [p.clone() for p in lora_parameters(trainer.teacher)]
    trainer.train()
    student = lora_parameters(trainer.model)
    teacher = lora_parameters(trainer.teacher)
    assert not all(torch.equal(a, b) for a, b in zip(teacher, teacher0)), "teacher never updated"
    assert not all(torch.equal(a, b) for a, b in zip(teacher, student)), "teacher is a copy, not an average"
    assert all(not p.requires_grad for p in trainer.teacher.parameters())


def test_vocabulary_alignment_feeds_concepts_to_the_teacher(tmp_path, tiny_model, tiny_processor):
    trainer = make_trainer(tiny_model, tiny_processor, make_args(tmp_path))
    assert trainer.vocabulary.entries == ["road", "car", "automobile", "vehicle", "sky", "heaven"]
    probs = trainer.teacher_class_probs(torch.randn(2, 3, 32, 32))
    assert probs.shape == (2, 3, 32, 32)
    assert torch.allclose(probs.sum(1), torch.ones(2, 32, 32), atol=1e-5)
    plain = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, use_concepts=False))
    assert plain.vocabulary.entries == CLASSES


def test_warmup_schedule_starts_at_a_tenth(tmp_path, tiny_model, tiny_processor):
    args = make_args(tmp_path, max_steps=10, warmup_steps=4, learning_rate=1e-3)
    trainer = make_trainer(tiny_model, tiny_processor, args)
    trainer.create_optimizer()
    scheduler = trainer.create_scheduler(10, trainer.optimizer)
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[2] == pytest.approx(1e-4 + 0.9e-3 * 2 / 4)
    assert lrs[4] == pytest.approx(1e-3) and lrs[5] == pytest.approx(1e-3)


class _Crash(Exception):
    pass


def test_kill_and_resume_gives_the_same_weights(tmp_path, tiny_config, tiny_processor):
    from transformers import TrainerCallback

    def fresh():
        torch.manual_seed(0)
        return CATSegForSemanticSegmentation(tiny_config)

    straight = make_trainer(fresh(), tiny_processor, make_args(tmp_path / "a", max_steps=4))
    straight.train()

    class CrashAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Crash()

    args = make_args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    crashing = make_trainer(fresh(), tiny_processor, args, callbacks=[CrashAfter()])
    with pytest.raises(_Crash):
        crashing.train()
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert (checkpoint / "teacher_lora.safetensors").is_file()
    resumed = make_trainer(fresh(), tiny_processor, make_args(tmp_path / "b", max_steps=4))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for a, b in zip(lora_parameters(straight.model), lora_parameters(resumed.model)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    for a, b in zip(lora_parameters(straight.teacher), lora_parameters(resumed.teacher)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_adapter_round_trip_and_model_card(tmp_path, tiny_config, tiny_processor):
    torch.manual_seed(0)
    base = CATSegForSemanticSegmentation(tiny_config)
    base.save_pretrained(tmp_path / "base")
    trainer = make_trainer(base, tiny_processor, make_args(tmp_path / "run"))
    trainer.train()
    student = trainer.model.eval()
    folder = save_adapter(student, tmp_path / "adapter", CLASSES, CONCEPTS, metrics={"target mIoU": 42.5})
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    card = (folder / "README.md").read_text()
    assert "automobile, vehicle" in card and "42.50" in card and "| road |" in card
    info = json.loads((folder / "vocalign.json").read_text())
    assert info["class_names"] == CLASSES and info["concepts"] == CONCEPTS

    loaded, loaded_info = load_adapted_model(tmp_path / "base", folder)
    assert loaded_info["class_names"] == CLASSES
    ids = tiny_processor(text=CLASSES)["input_ids"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = student(pixel_values=x, input_ids=ids).logits
        got = loaded(pixel_values=x, input_ids=ids).logits
        plain = CATSegForSemanticSegmentation.from_pretrained(tmp_path / "base").eval()(pixel_values=x, input_ids=ids).logits
    assert torch.equal(expected, got)
    assert not torch.allclose(expected, plain), "the adapter changed nothing"


def test_sliding_window_evaluation_matches_a_manual_loop(tmp_path, tiny_model, tiny_processor):
    from vocalign_hf.metrics import StreamingMeanIoU

    args = make_args(tmp_path, method="zero_shot", eval_sliding_window=True, per_device_eval_batch_size=1)
    trainer = make_trainer(tiny_model, tiny_processor, args)
    metrics = trainer.evaluate()
    metric = StreamingMeanIoU(len(CLASSES))
    with torch.no_grad():
        text = tiny_model.get_text_embeddings(tiny_processor(text=CLASSES)["input_ids"])
        for index in range(len(RandomImages())):
            batch = trainer.data_collator([RandomImages()[index]])
            probs = tiny_model.predict_sliding_window(batch["pixel_values"], text_embeds=text, output_size=(32, 32))
            metric.update(probs.argmax(1), batch["labels"])
    assert metrics["eval_mean_iou"] == pytest.approx(100 * metric.compute()["mean_iou"], abs=1e-9)


def test_v1_model_adapts_with_an_unmasked_frozen_backbone(tmp_path, tiny_processor):
    """CAT-Seg v1: only LoRA trains; the ResNet (weights and batch-norm statistics) stays fixed and sees the
    unmasked image while CLIP sees the masked one, as in the reference."""
    from conftest import tiny_catseg_v1_config

    torch.manual_seed(0)
    base = CATSegForSemanticSegmentation(tiny_catseg_v1_config()).eval()
    args = make_args(tmp_path, mask_ratio=0.7)
    trainer = make_trainer(base, tiny_processor, args)
    student = trainer.model.base_model.model.catseg
    backbone_before = {k: v.clone() for k, v in student.backbone.state_dict().items()}
    seen = []
    student.backbone.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    batch = trainer.data_collator([RandomImages()[i] for i in range(2)])
    trainer.compute_loss(trainer.model, batch)
    assert len(seen) == 1  # the student's call (the teacher is a separate copy)
    expected = student._backbone_input(None, batch["pixel_values"])
    assert torch.allclose(seen[0], expected, atol=1e-6)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    after = student.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone_before.items())

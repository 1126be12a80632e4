"""VocAlignTrainer end to end on a tiny CAT-Seg under Accelerate (CPU): every Table 2 row, resume, adapters."""

import json
import math

import pytest
import torch
from conftest import RandomImages

from vocalign_hf import CATSegForSemanticSegmentation
from vocalign_hf.errors import UsageError
from vocalign_hf.models.catseg.pixel_normalization import denormalize_pixels
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
    if ABLATIONS[row]["method"] == "zero_shot":
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


def test_teacher_is_the_exact_ema_of_the_student(tmp_path, tiny_model, tiny_processor):
    """After step t the teacher is alpha_t * teacher + (1 - alpha_t) * student, alpha_t = min(1 - 1/(t+1), 0.99)."""
    from transformers import TrainerCallback

    students = []

    class RecordStudent(TrainerCallback):  # runs before the trainer's own EMA callback
        def on_step_end(self, args, state, control, model=None, **kwargs):
            students.append([p.detach().clone() for p in lora_parameters(model)])

    args = make_args(tmp_path, max_steps=3, ema_alpha=0.99)
    trainer = make_trainer(tiny_model, tiny_processor, args, callbacks=[RecordStudent()])
    expected = [p.detach().clone() for p in lora_parameters(trainer.teacher)]
    trainer.train()
    assert len(students) == 3
    for step, student in enumerate(students, start=1):
        alpha = min(1 - 1 / (step + 1), 0.99)  # 0.5, 2/3, 3/4
        expected = [alpha * t + (1 - alpha) * s for t, s in zip(expected, student)]
    teacher = lora_parameters(trainer.teacher)
    for got, want in zip(teacher, expected):
        assert torch.allclose(got, want, atol=1e-7, rtol=0)
    assert not all(torch.equal(t, s) for t, s in zip(teacher, students[-1])), "teacher is a copy, not an average"
    assert all(not p.requires_grad for p in trainer.teacher.parameters())


def test_teacher_text_tower_can_stay_at_the_source_weights(tmp_path, tiny_model, tiny_processor):
    from vocalign_hf.adaptation import lora_parameter_names

    trainer = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, max_steps=2, teacher_text_ema=False))
    before = {n: p.detach().clone() for n, p in trainer.teacher.named_parameters()}
    encode, calls = trainer.teacher.get_text_embeddings, []
    trainer.teacher.get_text_embeddings = lambda *a, **k: calls.append(1) or encode(*a, **k)
    trainer.teacher_class_probs(torch.randn(1, 3, 32, 32))
    trainer.train()
    after = dict(trainer.teacher.named_parameters())
    names = lora_parameter_names(trainer.teacher)
    assert all(torch.equal(after[n], before[n]) for n in names if "text_model" in n)
    assert not all(torch.equal(after[n], before[n]) for n in names if "vision_model" in n)
    assert len(calls) == 1  # the vocabulary was encoded once


def test_vocabulary_alignment_sums_entry_probabilities(tmp_path, tiny_model, tiny_processor):
    """The teacher scores every entry (classes + concepts); a class's probability is the sum of the softmax over all
    entries at its entries (Eq. 7), checked against the teacher's own entry logits by hand."""
    trainer = make_trainer(tiny_model, tiny_processor, make_args(tmp_path))
    assert trainer.vocabulary.entries == ["road", "car", "automobile", "vehicle", "sky", "heaven"]
    x = torch.randn(1, 3, 32, 32)
    probs = trainer.teacher_class_probs(x)
    with torch.no_grad():
        ids = tiny_processor(text=trainer.vocabulary.entries)["input_ids"]
        logits = trainer.teacher(pixel_values=x, input_ids=ids).logits
        logits = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    e = logits[0, :, 5, 7].double().exp().tolist()  # one pixel, by hand
    total = sum(e)
    by_hand = [e[0] / total, (e[1] + e[2] + e[3]) / total, (e[4] + e[5]) / total]
    assert probs[0, :, 5, 7].tolist() == pytest.approx(by_hand, abs=1e-5)
    plain = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, use_concepts=False))
    assert plain.vocabulary.entries == CLASSES
    with torch.no_grad():  # CAT-Seg's class attention makes logits depend on the whole vocabulary: recompute
        logits = plain.teacher(pixel_values=x, input_ids=tiny_processor(text=CLASSES)["input_ids"]).logits
        logits = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    e = logits[0, :, 5, 7].double().exp().tolist()
    assert plain.teacher_class_probs(x)[0, :, 5, 7].tolist() == pytest.approx([v / sum(e) for v in e], abs=1e-5)


def test_concept_guard_weighs_down_a_concept_in_the_teachers_pseudo_labels_only(tmp_path, tiny_model, tiny_processor):
    """With `concept_log_weights` the teacher's Eq. 7 multiplies that concept's probability by exp(log-weight); the
    student's vocabulary (what the adapted model scores with) stays unweighted."""
    args = make_args(tmp_path, student_concepts=True)
    guarded = make_trainer(tiny_model, tiny_processor, args, concept_log_weights={"car": {"vehicle": -1.5}})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ids = tiny_processor(text=guarded.vocabulary.entries)["input_ids"]
        logits = guarded.teacher(pixel_values=x, input_ids=ids).logits
        logits = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    e = logits[0, :, 5, 7].double().exp().tolist()
    e[3] *= math.exp(-1.5)  # "vehicle"
    total = sum(e)
    by_hand = [e[0] / total, (e[1] + e[2] + e[3]) / total, (e[4] + e[5]) / total]
    assert guarded.teacher_class_probs(x)[0, :, 5, 7].tolist() == pytest.approx(by_hand, abs=1e-5)
    assert guarded.student_vocabulary.entry_log_weights is None
    assert guarded.run_record()["teacher_concept_log_weights"] == {"car": {"vehicle": -1.5}}


def _record_forward_inputs(module):
    """Record the keyword arguments of every call of `module` (a forward pre-hook; nothing is replaced)."""
    calls = []
    module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    return calls


def _student_and_teacher_calls(trainer, batch):
    student_calls = _record_forward_inputs(trainer.model)
    teacher_calls = _record_forward_inputs(trainer.teacher.model)
    loss = trainer.compute_loss(trainer.model, batch)
    return student_calls[0], teacher_calls[0], loss


def _batch(trainer, count=2):
    return trainer.data_collator([RandomImages()[i] for i in range(count)])


def test_student_sees_the_masked_view_and_the_teacher_the_clean_image(tmp_path, tiny_model, tiny_processor):
    masked = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, student_augmentation=False, mask_ratio=0.5))
    batch = _batch(masked)
    student, teacher, _ = _student_and_teacher_calls(masked, batch)
    assert torch.equal(teacher["pixel_values"], batch["pixel_values"])
    x = student["pixel_values"]
    fill = torch.tensor(masked._mask_fill).view(1, 3, 1, 1)
    hidden = (x == fill).all(dim=1)  # (B, H, W): pixels replaced by black
    kept = (x == batch["pixel_values"]).all(dim=1)
    assert (hidden | kept).all() and 0.2 < hidden.float().mean() < 0.8
    blocks = hidden.view(2, 4, 8, 4, 8)  # 8-pixel blocks: all hidden or all kept
    assert (blocks.all(dim=(2, 4)) | (~blocks).all(dim=(2, 4))).all()

    unmasked = make_trainer(
        tiny_model, tiny_processor, make_args(tmp_path, student_augmentation=False, use_masking=False)
    )
    student, _, _ = _student_and_teacher_calls(unmasked, batch)
    assert torch.equal(student["pixel_values"], batch["pixel_values"])


def test_student_only_augmentation_reaches_the_student_not_the_teacher(tmp_path, tiny_model, tiny_processor):
    trainer = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, use_masking=False))
    batch = _batch(trainer)
    student, teacher, _ = _student_and_teacher_calls(trainer, batch)
    assert torch.equal(teacher["pixel_values"], batch["pixel_values"])
    view = denormalize_pixels(student["pixel_values"])  # the tiny processor normalises with CLIP's mean and std
    assert view.min() >= -1e-5 and view.max() <= 1 + 1e-5  # a valid image in 0..1 ...
    assert (view - denormalize_pixels(batch["pixel_values"])).abs().mean() > 0.02  # ... that is not the clean one


def test_top_k_and_concepts_change_what_the_student_is_trained_on(tmp_path, tiny_model, tiny_processor):
    def trainer_with(**overrides):
        args = make_args(tmp_path, student_augmentation=False, use_masking=False, pseudo_threshold=None, **overrides)
        return make_trainer(tiny_model, tiny_processor, args)

    full = trainer_with(top_k=None)
    batch = _batch(full)
    student, _, loss = _student_and_teacher_calls(full, batch)
    assert student["class_indices"].tolist() == [[0, 1, 2]] * 2
    pruned = trainer_with(top_k=2)
    student, _, _ = _student_and_teacher_calls(pruned, batch)
    assert student["class_indices"].shape == (2, 2)
    indices, _, _ = pruned.teacher_targets(batch["pixel_values"])
    assert torch.equal(student["class_indices"], indices)

    # The loss is the weighted cross-entropy against the teacher's targets, which concepts change.
    indices, labels, weight = full.teacher_targets(batch["pixel_values"])
    with torch.no_grad():
        logits = full.model(pixel_values=batch["pixel_values"], input_ids=full._class_tokens, class_indices=indices).logits
    from vocalign_hf.adaptation.pseudo_labels import weighted_cross_entropy

    assert float(loss) == pytest.approx(float(weighted_cross_entropy(logits, labels, weight)), rel=1e-5)
    _, plain_labels, _ = trainer_with(top_k=None, use_concepts=False).teacher_targets(batch["pixel_values"])
    assert not torch.equal(labels, plain_labels)


def test_a_student_with_concepts_scores_the_kept_classes_entries(tmp_path, tiny_model, tiny_processor):
    """student_concepts: the student's cost volume holds the entries of the classes Top-K keeps, its loss is the
    cross-entropy of their summed probabilities (Eq. 7) against the teacher's targets, and evaluation scores the
    classes the same way."""
    args = make_args(tmp_path, student_augmentation=False, use_masking=False, pseudo_threshold=None, top_k=2,
                     student_concepts=True)
    trainer = make_trainer(tiny_model, tiny_processor, args)
    batch = _batch(trainer)
    student, _, loss = _student_and_teacher_calls(trainer, batch)
    indices, labels, weight = trainer.teacher_targets(batch["pixel_values"])
    entries, positions = trainer.vocabulary.entries_of(indices)
    assert torch.equal(student["class_indices"], entries) and entries.shape[1] > indices.shape[1]
    assert torch.equal(student["input_ids"], trainer._entry_tokens)
    with torch.no_grad():
        logits = trainer.model(pixel_values=batch["pixel_values"], input_ids=trainer._entry_tokens,
                               class_indices=entries).logits
    logits = torch.nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    probs = [torch.softmax(logits[i, positions[i] >= 0], 0) for i in range(2)]
    class_probs = torch.stack([torch.stack([p[positions[i][positions[i] >= 0] == k].sum(0) for k in range(2)])
                               for i, p in enumerate(probs)])
    by_hand = torch.nn.functional.nll_loss(class_probs.log(), labels)
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-4)
    text_lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n and "text" in n}
    trainer.train()
    moved = dict(trainer.model.named_parameters())
    assert any(not torch.equal(moved[n], before) for n, before in text_lora.items())  # the concepts' text trains

    # Evaluation: the model's class log-probabilities (Eq. 7: entry probabilities summed per class, whole vocabulary).
    with torch.no_grad():
        text = trainer.model.get_text_embeddings(trainer._entry_tokens)
        scores = trainer.class_scores(batch["pixel_values"], text=text)
        entry_logits = trainer.model(pixel_values=batch["pixel_values"], text_embeds=text,
                                     entry_class_ids=torch.arange(len(text))).logits
    assert torch.allclose(scores.exp(), trainer.vocabulary.aggregate(entry_logits), atol=1e-6)
    plain = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, top_k=2))
    assert torch.equal(plain._student_tokens, plain._class_tokens)
    with pytest.raises(UsageError, match="use_concepts"):
        make_args(tmp_path, student_concepts=True, use_concepts=False)


def test_confident_pixels_only_ignores_the_unsure_ones(tmp_path, tiny_model, tiny_processor):
    args = make_args(tmp_path, top_k=None, pseudo_threshold=0.5, confident_pixels_only=True)
    trainer = make_trainer(tiny_model, tiny_processor, args)
    x = _batch(trainer)["pixel_values"]
    _, labels, weight = trainer.teacher_targets(x)
    confident = trainer.teacher_class_probs(x).max(dim=1).values >= 0.5
    assert float(weight) == 1.0 and 0 < confident.float().mean() < 1
    assert torch.equal(labels == 255, ~confident)


def test_masks_and_augmentation_are_seeded_per_step_and_rank(tmp_path, tiny_model, tiny_processor):
    from vocalign_hf.adaptation.trainer import step_seed

    seeds = {step_seed(0, rank, step, micro) for rank in range(2) for step in range(3) for micro in range(2)}
    assert len(seeds) == 12 and step_seed(0, 1, 2, 0) == step_seed(0, 1, 2, 0)
    views = []
    for _ in range(2):
        trainer = make_trainer(tiny_model, tiny_processor, make_args(tmp_path))
        batch = _batch(trainer)
        views.append([trainer.student_view(batch["pixel_values"]) for _ in range(2)])  # two micro-batches
    assert torch.equal(views[0][0], views[1][0]) and torch.equal(views[0][1], views[1][1])
    assert not torch.equal(views[0][0], views[0][1])


def test_loss_is_scaled_under_gradient_accumulation(tmp_path, tiny_config, tiny_processor):
    """Two accumulated micro-batches of the same images give the gradient of one batch, not twice it."""
    grads = {}
    for steps in (1, 2):
        torch.manual_seed(0)
        args = make_args(tmp_path / str(steps), gradient_accumulation_steps=steps, student_augmentation=False,
                         use_masking=False)
        trainer = make_trainer(CATSegForSemanticSegmentation(tiny_config), tiny_processor, args)
        trainer.current_gradient_accumulation_steps = steps
        batch = _batch(trainer)
        for _ in range(steps):
            trainer.training_step(trainer.model, batch)
        grads[steps] = [p.grad.clone() for p in lora_parameters(trainer.model) if p.grad is not None]
    for one, accumulated in zip(grads[1], grads[2]):
        assert torch.allclose(one, accumulated, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads[1])


class _RecordingTrainer(VocAlignTrainer):
    """Notes each micro-batch's loss and pseudo-label weight, to compare the logs with (the logging is untouched)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_losses, self.micro_weights = [], []

    def teacher_targets(self, pixel_values):
        indices, labels, weight = super().teacher_targets(pixel_values)
        self.micro_weights.append(float(weight))
        return indices, labels, weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.micro_losses.append(float(loss.detach()))
        return loss


def test_logged_loss_and_pseudo_weight_are_the_means_of_the_micro_batches(tmp_path, tiny_model, tiny_processor):
    """Logged every 2 steps of 2 accumulated micro-batches: each log is the mean of its 4 micro-batches, as when
    every value was read on the host; between logs the recorded sums stay tensors (no read per micro-batch)."""
    from transformers import TrainerCallback

    pending = []

    class SeeSums(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            pending.append(dict(trainer._log_sums))

    args = make_args(tmp_path, max_steps=4, gradient_accumulation_steps=2, logging_steps=2, pseudo_threshold=0.5)
    trainer = _RecordingTrainer(
        model=add_lora(tiny_model, args), args=args, class_names=CLASSES, concepts=CONCEPTS,
        processor=tiny_processor, train_dataset=RandomImages(), callbacks=[SeeSums()],
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    assert len(trainer.micro_losses) == len(trainer.micro_weights) == 8
    assert len(set(trainer.micro_weights)) > 1, "equal weights would not tell a mean from a single value"
    for entry, start in zip(logs, (0, 4)):
        losses, weights = trainer.micro_losses[start:start + 4], trainer.micro_weights[start:start + 4]
        assert entry["loss"] == pytest.approx(sum(losses) / 4, rel=1e-5)
        assert entry["pseudo_weight"] == round(sum(weights) / 4, 4)  # the previous float arithmetic, exactly
    sums = [step["pseudo_weight"] for step in pending if step]
    assert sums and all(isinstance(total, torch.Tensor) and not total.requires_grad for total in sums)


def test_lora_learning_rate_multiplier(tmp_path, tiny_model, tiny_processor):
    args = make_args(tmp_path, learning_rate=1e-3, lora_lr_multiplier=0.1, warmup_steps=0)
    trainer = make_trainer(tiny_model, tiny_processor, args)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    groups = [g for g in trainer.optimizer.param_groups if g["params"]]
    assert groups and all(g["lr"] == pytest.approx(1e-4) for g in groups)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-4)
    assert make_args(tmp_path).max_grad_norm == 0.0  # no clipping, as released


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
            logits = tiny_model.predict_sliding_window(batch["pixel_values"], text_embeds=text, output_size=(32, 32))
            metric.update(logits.argmax(1), batch["labels"])
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
    clip_inputs = _record_forward_inputs(trainer.model)
    batch = trainer.data_collator([RandomImages()[i] for i in range(2)])
    trainer.compute_loss(trainer.model, batch)
    assert len(seen) == 2  # the teacher's call, then the student's (the teacher shares the student's model)
    expected = student._backbone_input(None, batch["pixel_values"])
    assert torch.allclose(seen[1], expected, atol=1e-6)
    fill = torch.tensor(trainer._mask_fill).view(1, 3, 1, 1)
    hidden = (clip_inputs[0]["pixel_values"] == fill).all(dim=1).float().mean()
    assert 0.5 < hidden < 0.9  # CLIP's input is masked with black (ratio 0.7), the ResNet's is not
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    after = student.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone_before.items())


def test_checkpoints_carry_the_processor_and_vocalign_settings(tmp_path, tiny_model, tiny_processor):
    from vocalign_hf import CATSegProcessor

    args = make_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    make_trainer(tiny_model, tiny_processor, args).train()
    checkpoint = tmp_path / "checkpoint-1"
    assert (checkpoint / "teacher_lora.safetensors").is_file()
    assert json.loads((checkpoint / "vocalign.json").read_text())["class_names"] == CLASSES
    loaded = CATSegProcessor.from_pretrained(checkpoint)
    assert torch.equal(loaded.tokenize_classes(CLASSES)["input_ids"], tiny_processor.tokenize_classes(CLASSES)["input_ids"])


def test_a_checkpoint_from_before_teacher_dtype_resumes_as_float32(tmp_path, tiny_model, tiny_processor):
    """Checkpoints written before `teacher_dtype` existed ran a float32 teacher (under --bf16 the run's autocast):
    they resume with the default and are refused, with the difference named, with another choice."""
    args = make_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    make_trainer(tiny_model, tiny_processor, args).train()
    record = tmp_path / "checkpoint-1" / "vocalign.json"
    state = json.loads(record.read_text())
    assert state["settings"].pop("teacher_dtype") == "float32"
    record.write_text(json.dumps(state))
    other = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, max_steps=2, teacher_dtype="bfloat16"))
    with pytest.raises(UsageError, match=r"teacher_dtype 'float32' \(this run: 'bfloat16'\)"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    resumed = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, max_steps=2))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.state.global_step == 2


def test_resuming_without_the_teacher_file_is_refused(tmp_path, tiny_model, tiny_processor):
    args = make_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    make_trainer(tiny_model, tiny_processor, args).train()
    (tmp_path / "checkpoint-1" / "teacher_lora.safetensors").unlink()
    resumed = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, max_steps=2))
    with pytest.raises(UsageError, match="not a complete VocAlign checkpoint: teacher_lora.safetensors missing"):
        resumed.train(resume_from_checkpoint=True)  # True: the last checkpoint of output_dir


def test_evaluation_during_training_drives_early_stopping_and_the_best_model(tmp_path, tiny_model, tiny_processor):
    """evaluate() runs the callbacks' on_evaluate (EarlyStoppingCallback stops after one evaluation that does not
    beat the best by 1000 points) and its mean_iou selects the best checkpoint (load_best_model_at_end)."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    seen = []

    class Record(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(dict(metrics))

    args = make_args(
        tmp_path, max_steps=6, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
        metric_for_best_model="mean_iou", greater_is_better=True, load_best_model_at_end=True,
    )
    stopper = EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=1000.0)
    trainer = make_trainer(tiny_model, tiny_processor, args, callbacks=[stopper, Record()])
    trainer.train()
    assert trainer.state.global_step == 2 and len(seen) == 2  # stopped after the second evaluation
    for metrics in seen:
        assert metrics["eval_runtime"] > 0 and metrics["eval_samples_per_second"] > 0
        assert metrics["eval_steps_per_second"] > 0 and 0 <= metrics["eval_mean_iou"] <= 100
    best = max(range(2), key=lambda i: seen[i]["eval_mean_iou"])
    assert trainer.state.best_metric == seen[best]["eval_mean_iou"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best + 1}")
    logged = [entry for entry in trainer.state.log_history if "eval_mean_iou" in entry]
    assert [entry["eval_mean_iou"] for entry in logged] == [m["eval_mean_iou"] for m in seen]


def test_evaluation_runs_through_the_trainers_own_loop(tmp_path, tiny_model, tiny_processor):
    """evaluate() is Trainer.evaluate: its loop fires on_prediction_step per batch and hands each batch's class maps
    to compute_metrics (compute_result on the last only: nothing is kept), then on_evaluate with speed metrics.
    Keeping every map instead (batch_eval_metrics=False) gives the same numbers."""
    from transformers import TrainerCallback

    events = []

    class Record(TrainerCallback):
        def on_prediction_step(self, args, state, control, **kwargs):
            events.append("prediction_step")

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            events.append("evaluate")

    args = make_args(tmp_path, method="zero_shot", per_device_eval_batch_size=3)
    trainer = make_trainer(tiny_model, tiny_processor, args, callbacks=[Record()])
    metric, calls = trainer.compute_metrics, []

    def spy(eval_pred, compute_result):
        calls.append((tuple(eval_pred.predictions.shape), compute_result))
        return metric(eval_pred, compute_result)

    trainer.compute_metrics = spy
    metrics = trainer.evaluate()
    assert events == ["prediction_step"] * 3 + ["evaluate"]  # 8 images in batches of 3
    assert calls == [((3, 32 * 32), False), ((3, 32 * 32), False), ((2, 32 * 32), True)]
    assert metrics["eval_runtime"] > 0 and metrics["eval_samples_per_second"] > 0 and metrics["eval_steps_per_second"] > 0
    assert "eval_loss" not in metrics and "road" in trainer.last_eval_table
    kept = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, method="zero_shot", batch_eval_metrics=False))
    kept_metrics = kept.evaluate()
    assert [kept_metrics[k] for k in metrics if "iou" in k] == [v for k, v in metrics.items() if "iou" in k]


def test_evaluate_accepts_a_dict_of_datasets(tmp_path, tiny_model, tiny_processor):
    from torch.utils.data import Subset

    trainer = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, method="zero_shot"))
    first, second = Subset(RandomImages(), range(3)), Subset(RandomImages(), range(3, 8))
    metrics = trainer.evaluate({"first": first, "second": second})
    assert metrics["eval_first_mean_iou"] == trainer.evaluate(first)["eval_mean_iou"]
    assert metrics["eval_second_mean_iou"] == trainer.evaluate(second)["eval_mean_iou"]
    assert metrics["eval_first_mean_iou"] != metrics["eval_second_mean_iou"]
    assert {"eval_first_runtime", "eval_second_samples_per_second", "eval_second_iou_sky"} <= set(metrics)
    named = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, method="zero_shot"))
    named.eval_dataset = {"a": first, "b": second}  # the trainer's own dict: evaluated by name
    named_metrics = named.evaluate(metric_key_prefix="test")
    assert named_metrics["test_a_mean_iou"] == metrics["eval_first_mean_iou"]
    assert named_metrics["test_b_mean_iou"] == metrics["eval_second_mean_iou"]


@pytest.mark.parametrize(
    "kind, kwargs",
    [("cosine_with_min_lr", {"min_lr_rate": 0.2}), ("linear", {}), ("cosine_with_restarts", {"num_cycles": 2}),
     ("polynomial", {"power": 2.0, "lr_end": 1e-5})],
)
def test_schedules_after_the_warmup_follow_get_scheduler(kind, kwargs, tmp_path, tiny_model, tiny_processor):
    """After the warm-up, the learning rate is transformers' `kind` schedule (with lr_scheduler_kwargs) over the
    remaining steps."""
    from transformers import get_scheduler

    args = make_args(tmp_path, max_steps=12, warmup_steps=4, learning_rate=1e-3, lr_scheduler_type=kind,
                     lr_scheduler_kwargs=kwargs)
    trainer = make_trainer(tiny_model, tiny_processor, args)
    trainer.create_optimizer()
    scheduler = trainer.create_scheduler(12, trainer.optimizer)
    reference_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    reference = get_scheduler(kind, reference_optimizer, num_warmup_steps=0, num_training_steps=8,
                              scheduler_specific_kwargs=kwargs)
    lrs, expected = [], []
    for step in range(12):
        lrs.append(scheduler.get_last_lr()[0])
        if step >= 4:
            expected.append(reference.get_last_lr()[0])
            reference_optimizer.step()
            reference.step()
        trainer.optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4)  # the warm-up still starts at warmup_start_factor
    assert lrs[4:] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert len(set(round(lr, 12) for lr in lrs[4:])) > 2  # it does decay


def test_unsupported_schedules_are_rejected(tmp_path, tiny_model, tiny_processor):
    args = make_args(tmp_path, lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps", eval_steps=1,
                     metric_for_best_model="mean_iou")
    trainer = make_trainer(tiny_model, tiny_processor, args)
    trainer.create_optimizer()
    with pytest.raises(ValueError, match="reduce_lr_on_plateau"):
        trainer.create_scheduler(4, trainer.optimizer)


def test_report_to_tensorboard_writes_training_and_evaluation_scalars(tmp_path, tiny_model, tiny_processor, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = make_args(tmp_path, max_steps=2, report_to=["tensorboard"], eval_strategy="steps", eval_steps=2)
    trainer = make_trainer(tiny_model, tiny_processor, args)
    trainer.train()
    events = sorted((tmp_path / "runs").rglob("events.out.tfevents.*"))  # <output_dir>/runs/<date>_<host>
    assert events
    tags = set()
    for event in events:
        accumulator = EventAccumulator(str(event))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
        if "eval/mean_iou" in accumulator.Tags()["scalars"]:
            value = accumulator.Scalars("eval/mean_iou")[-1].value
            assert value == pytest.approx(trainer.state.log_history[-2]["eval_mean_iou"], abs=1e-4)
    assert {"train/loss", "train/learning_rate", "train/pseudo_weight", "eval/mean_iou", "eval/runtime"} <= tags

    # A trainer that only evaluates (the recipes' zero-shot run) logs under its output_dir too, not ./runs.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = make_args(tmp_path / "zero_shot", method="zero_shot", report_to=["tensorboard"])
    make_trainer(tiny_model, tiny_processor, args).evaluate()
    assert list((tmp_path / "zero_shot" / "runs").rglob("events.out.tfevents.*")) and not list(cwd.rglob("*"))

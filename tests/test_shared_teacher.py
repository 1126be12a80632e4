"""The EMA teacher as a second, frozen peft adapter on the student's own model (issue 26): the same pseudo-labels
as a deep-copied teacher, bitwise; no leak of its adapter, eval mode or frozen flags into the student; nothing of it
in the optimiser or in the student's saved adapter."""

import copy
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import CONCEPTS, CLASSES, make_args, make_trainer

from vocalign_hf.adaptation import lora_parameter_names, save_adapter
from vocalign_hf.adaptation.teacher import TEACHER_ADAPTER


def _deep_copied_teacher(trainer):
    """The teacher as it was before issue 26: a deep copy of the student whose LoRA weights are the teacher's."""
    reference = copy.deepcopy(trainer.model)
    reference.delete_adapter(TEACHER_ADAPTER)
    weights = dict(reference.named_parameters())
    with torch.no_grad():
        for name, weight in trainer.teacher.named_parameters():
            weights[name].copy_(weight)
    return reference.eval().requires_grad_(False)


def _state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            model.active_adapter)


def test_pseudo_labels_equal_a_deep_copied_teachers_bitwise(tmp_path, tiny_model, tiny_processor):
    trainer = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, max_steps=3))
    trainer.train()  # the teacher is now an average, neither the student nor its start
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    trainer.model.train()  # as during training: the teacher must run in eval mode all the same
    before = _state(trainer.model)
    logits, shared = trainer.teacher.vocabulary_logits(x), trainer.teacher_targets(x)
    assert _state(trainer.model) == before

    reference = _deep_copied_teacher(trainer)

    def reference_logits(pixel_values):
        with torch.no_grad():
            text = reference.get_text_embeddings(trainer._entry_tokens)
            return reference(pixel_values=pixel_values, text_embeds=text).logits

    assert torch.equal(logits, reference_logits(x))
    with torch.no_grad():  # the student's own logits differ: the comparison can tell the two adapters apart
        text = trainer.model.get_text_embeddings(trainer._entry_tokens)
        assert not torch.equal(logits, trainer.model.eval()(pixel_values=x, text_embeds=text).logits)
    trainer.teacher.vocabulary_logits = reference_logits
    for got, want in zip(shared, trainer.teacher_targets(x)):
        assert torch.equal(got, want)


def test_the_teachers_adapter_never_leaks_into_the_student(tmp_path, tiny_model, tiny_processor):
    trainer = make_trainer(tiny_model, tiny_processor, make_args(tmp_path, max_steps=2))
    trainer.model.train()
    before = _state(trainer.model)
    with pytest.raises(Exception):
        trainer.teacher(pixel_values=torch.randn(1, 3, 32, 32))  # neither input_ids nor text_embeds: fails inside
    assert _state(trainer.model) == before and trainer.model.active_adapter == "default"

    trainer.train()
    teacher = {id(p) for p in trainer.teacher.parameters()}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert teacher and not teacher & optimised
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    student = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert student == set(lora_parameter_names(trainer.teacher)) and all(".default." in n for n in student)


def test_checkpoints_and_adapters_hold_the_student_only(tmp_path, tiny_model, tiny_processor):
    trainer = make_trainer(tiny_model, tiny_processor, make_args(tmp_path / "run", max_steps=2, save_strategy="steps",
                                                                 save_steps=2))
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert not (checkpoint / TEACHER_ADAPTER).exists()
    saved_teacher = load_file(checkpoint / "teacher_lora.safetensors")
    assert saved_teacher.keys() == set(lora_parameter_names(trainer.teacher))  # the student's names
    folder = save_adapter(trainer.model, tmp_path / "adapter", CLASSES, CONCEPTS)
    assert not (folder / TEACHER_ADAPTER).exists()
    weights = load_file(folder / "adapter_model.safetensors")
    assert len(weights) == len(saved_teacher) and not any(TEACHER_ADAPTER in k for k in weights)
    assert TEACHER_ADAPTER in trainer.model.peft_config  # saving hid it from peft only while it wrote

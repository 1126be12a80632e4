"""The EMA teacher (VocAlign Sec. 3.2; the split follows MIC's ``teacher_module.py`` beside its masking module).

[`EMATeacher`] owns everything about the teacher: its weights, their exponential moving average of the student's
LoRA weights (alpha warm-up ``min(1 - 1/(t+1), alpha)``, [`~vocalign_hf.adaptation.ema.ema_alpha`]), the text
embeddings of its vocabulary (encoded once per EMA update, or once in all when its text tower does not follow the
student), and its checkpoint file. The trainer asks it for logits and tells it when a step ended
([`TeacherEMACallback`]).

The checkpoint file (`teacher_lora.safetensors`) holds the teacher's LoRA weights under the *student's* parameter
names, so that a teacher weight and the student weight it follows share a name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..atomic import atomic_write_file
from .ema import ema_alpha, update_ema_
from .lora import lora_parameter_names

__all__ = ["EMATeacher", "TeacherEMACallback"]


class EMATeacher:
    """A frozen teacher whose LoRA weights follow the student's by EMA.

    Args:
        student: the LoRA-wrapped student (a `PeftModel`), before or after `accelerator.prepare` unwrapped.
        entry_tokens: the token ids of the teacher's vocabulary (classes + concepts), `(N_entries, L)`.
        alpha: the EMA momentum (paper: 0.99).
        text_follows_student: the text tower's LoRA weights follow the student too (paper); if not, they stay at
            their initial values and the vocabulary is encoded once.
        autocast: a context-manager factory the forward runs under (`accelerator.autocast`: `--bf16` / `--fp16`).
    """

    def __init__(
        self,
        student: nn.Module,
        entry_tokens: torch.Tensor,
        alpha: float = 0.99,
        text_follows_student: bool = True,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.student = student
        self.model = copy.deepcopy(student).eval()
        self.model.requires_grad_(False)
        self.entry_tokens = entry_tokens
        self.alpha = alpha
        self.text_follows_student = text_follows_student
        self.autocast = autocast
        self.encoded_vocabulary: torch.Tensor | None = None  # the vocabulary's text embeddings, while valid
        self._ema_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    # ------------------------------------------------------------------------------------------ weights
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The teacher's weights, under the names of the student weights they mirror."""
        return self.model.named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self.named_parameters())

    @torch.no_grad()
    def update(self, step: int) -> None:
        """EMA of the LoRA weights after optimiser step `step`: alpha_t = min(1 - 1/(t+1), alpha) (the released
        code's warm-up). Without `text_follows_student` only the image tower's LoRA weights move."""
        if self._ema_pairs is None:  # the same parameter objects every step: pair them once
            student = dict(self.student.named_parameters())
            teacher = dict(self.named_parameters())
            names = [n for n in lora_parameter_names(self) if self.text_follows_student or "text_model" not in n]
            self._ema_pairs = ([teacher[n] for n in names], [student[n] for n in names])
        update_ema_(*self._ema_pairs, ema_alpha(step, self.alpha))
        if self.text_follows_student:  # its text LoRA weights moved: the vocabulary's embeddings are stale
            self.encoded_vocabulary = None

    # ------------------------------------------------------------------------------------------ forward
    @torch.no_grad()
    def __call__(self, **inputs: Any):
        """The teacher's forward (no gradients): the model's output for `inputs`."""
        return self.model(**inputs)

    @torch.no_grad()
    def get_text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_embeddings(input_ids)

    @torch.no_grad()
    def vocabulary_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The teacher's logits over its whole vocabulary `(B, N_entries, h, w)`, under `autocast` (the teacher
        is outside what `accelerator.prepare` wrapped, so the mixed-precision forward needs its own)."""
        self.model.to(pixel_values.device)
        with self.autocast():
            text = self.encoded_vocabulary
            if text is None or text.device != pixel_values.device:
                # Once per EMA update (`update` drops it when the text tower follows the student), or once in all;
                # gradient accumulation reuses it.
                text = self.get_text_embeddings(self.entry_tokens.to(pixel_values.device))
                self.encoded_vocabulary = text
            return self.model(pixel_values=pixel_values, text_embeds=text).logits

    # -------------------------------------------------------------------------------------- checkpoints
    def save(self, path: str | Path) -> None:
        """Write the teacher's LoRA weights atomically (tmp file + rename)."""
        from safetensors.torch import save_file

        tensors = {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if "lora_" in n}
        atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp)))

    def load(self, path: str | Path) -> None:
        """Read the teacher's LoRA weights written by [`save`]."""
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        params = dict(self.named_parameters())
        missing = sorted(n for n in params if "lora_" in n and n not in tensors)
        if missing:
            raise ValueError(f"Teacher checkpoint {path} lacks {missing[:5]} (and {max(len(missing) - 5, 0)} more)")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        self.encoded_vocabulary = None


class TeacherEMACallback(TrainerCallback):
    """Moves the teacher's LoRA weights towards the student's after every optimiser step."""

    def __init__(self, teacher: EMATeacher) -> None:
        self.teacher = teacher

    def on_step_end(self, args, state, control, **kwargs):
        self.teacher.update(state.global_step)

"""The EMA teacher (VocAlign Sec. 3.2; the split follows MIC's ``teacher_module.py`` beside its masking module).

[`EMATeacher`] owns everything about the teacher: its weights, their exponential moving average of the student's
LoRA weights (alpha warm-up ``min(1 - 1/(t+1), alpha)``, [`~vocalign_hf.adaptation.ema.ema_alpha`]), the text
embeddings of its vocabulary (encoded once per EMA update, or once in all when its text tower does not follow the
student), and its checkpoint file. The trainer asks it for logits and tells it when a step ended
([`TeacherEMACallback`]).

The teacher differs from the student only in its LoRA weights, so it shares the student's frozen base: its weights
are a second peft adapter (`"teacher"`, the student's `LoraConfig`) on the student's own model, frozen, and its
forward switches the active adapter to it and back (the model in eval mode meanwhile). That saves a whole copy of the
base model (0.6 GB in fp32 at CAT-Seg-B). A student without LoRA (every weight trained) gets a deep copy instead.

Its precision is its own (`teacher_dtype`): its no-grad forward runs in float32 or under bfloat16 autocast,
whatever the student's `--bf16` / `--fp16`; its weights stay float32, so the EMA accumulates in float32. "auto"
picks bfloat16 where the hardware computes it natively ([`resolve_teacher_dtype`]): there the teacher's forward,
the largest part of a step, is faster; elsewhere bfloat16 is emulated and slower than float32.

Under FSDP2 (Accelerate's `fsdp_version: 2`, `recipes/accelerate_configs/fsdp2_lora.yaml`) `fully_shard` of the
student shards the teacher's adapter with it, exactly alike: a teacher weight and the student weight it follows have
one shape and are both sharded along their first dimension over the same ranks, so [`EMATeacher.update`] runs on
each rank's local shards with no communication (DINOv2 / DINOv3 update their EMA teachers that way). The teacher then
computes through the peft model, the root of the sharding, with its text encoding registered as an FSDP forward
([`~vocalign_hf.adaptation.sharding.register_forward_methods`]), and encodes its vocabulary at every forward (see
[`vocabulary_logits`]); its checkpoint gathers the shards on every rank ([`lora_weights`]) and is the same file.

The checkpoint file (`teacher_lora.safetensors`) holds the teacher's LoRA weights under the *student's* parameter
names (`...lora_A.default.weight`), so that a teacher weight and the student weight it follows share a name, and
checkpoints written when the teacher was a deep copy load as they are. peft's own saving leaves the teacher out
([`EMATeacher.hidden_from_peft`]): adapter folders and checkpoints hold the student only, as before.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from ..atomic import atomic_write_file
from ..models.catseg.text_embedding_cache import TextEmbeddingCache
from .ema import ema_alpha, update_ema_
from .lora import TEACHER_ADAPTER, _is_lora_name, lora_parameter_names
from .sharding import full, is_sharded, local, register_forward_methods, same_sharding

__all__ = ["EMATeacher", "TeacherEMACallback", "TEACHER_ADAPTER", "TEACHER_DTYPES", "resolve_teacher_dtype"]

TEACHER_DTYPES = ("auto", "float32", "bfloat16")
#: /proc/cpuinfo flags of CPUs that compute bfloat16 natively (AVX512-BF16, AMX); without them it is emulated.
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is no such file, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA device with bf16 (Ampere and later), a CPU with
    AVX512-BF16 or AMX. Emulated bf16 is slower than float32, so it does not count."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch without the argument
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_flags() & NATIVE_BF16_CPU_FLAGS)
    return False


def resolve_teacher_dtype(choice: str, device: torch.device | str) -> torch.dtype:
    """The dtype of the teacher's forward for `teacher_dtype` `choice` on `device`: "auto" is bfloat16 where
    [`has_native_bf16`], float32 elsewhere."""
    if choice not in TEACHER_DTYPES:
        raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {choice!r}")
    if choice == "auto":
        return torch.bfloat16 if has_native_bf16(torch.device(device)) else torch.float32
    return getattr(torch, choice)


class EMATeacher:
    """A frozen teacher whose LoRA weights follow the student's by EMA.

    Args:
        student: the LoRA-wrapped student (a `PeftModel`), before or after `accelerator.prepare` unwrapped.
        entry_tokens: the token ids of the teacher's vocabulary (classes + concepts), `(N_entries, L)`.
        alpha: the EMA momentum (paper: 0.99).
        text_follows_student: the text tower's LoRA weights follow the student too (paper); if not, they stay at
            their initial values and the vocabulary is encoded once.
        dtype: "float32", "bfloat16" or "auto" ([`resolve_teacher_dtype`], on the device of the first batch): the
            precision of the teacher's forward, independent of the student's.
    """

    def __init__(
        self,
        student: nn.Module,
        entry_tokens: torch.Tensor,
        alpha: float = 0.99,
        text_follows_student: bool = True,
        dtype: str = "float32",
    ) -> None:
        self.student = student
        self._peft = student if isinstance(student, PeftModel) else None
        self._switched = False
        if self._peft is not None:
            self.student_adapter = self._peft.active_adapter
            self.model = self._add_teacher_adapter(self._peft)
        else:  # every weight trains: nothing to share
            self.model = copy.deepcopy(student).eval()
            self.model.requires_grad_(False)
        self.entry_tokens = entry_tokens
        self.alpha = alpha
        self.text_follows_student = text_follows_student
        if dtype not in TEACHER_DTYPES:  # here, not at the first step
            raise ValueError(f"dtype must be one of {TEACHER_DTYPES}, got {dtype!r}")
        self.dtype_choice = dtype
        self.compute_dtype: torch.dtype | None = None  # resolved on the first batch's device
        self.text_cache = TextEmbeddingCache()  # the vocabulary's text embeddings, while the teacher's text weights stay
        self._ema_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._ema_pairs_sharded = False  # whether the pairs were taken from an FSDP-sharded model

    def _add_teacher_adapter(self, student) -> nn.Module:
        """Add the teacher's adapter to `student` (its config, the student's LoRA weights, frozen); return the
        model whose forward the teacher runs (the base model with both adapters injected)."""
        if TEACHER_ADAPTER not in student.peft_config:  # else a second trainer on this model: it starts anew too
            config = copy.deepcopy(student.peft_config[self.student_adapter])
            student.add_adapter(TEACHER_ADAPTER, config)  # inactive, frozen by peft; frozen here too, explicitly
        student_weights = dict(student.named_parameters())
        with torch.no_grad():
            for name, weight in self.named_parameters():
                weight.requires_grad_(False)
                weight.copy_(student_weights[name])
        return student.get_base_model()

    # ------------------------------------------------------------------------------------------ weights
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The teacher's weights, under the names of the student weights they mirror (its LoRA weights when it
        shares the student's base, every weight of its copy otherwise)."""
        if self._peft is None:
            yield from self.model.named_parameters()
            return
        own, student = f".{TEACHER_ADAPTER}.", f".{self.student_adapter}."
        for name, weight in self._peft.named_parameters():
            if _is_lora_name(name) and own in name:
                yield student.join(name.rsplit(own, 1)), weight

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self.named_parameters())

    @property
    def sharded(self) -> bool:
        """Whether the shared model is FSDP-sharded (`fully_shard`, by Accelerate's FSDP2): the teacher's weights
        are then sharded exactly like the student's, being on the same modules."""
        return self._peft is not None and is_sharded(self._peft)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """EMA of the LoRA weights after optimiser step `step`: alpha_t = min(1 - 1/(t+1), alpha) (the released
        code's warm-up). Without `text_follows_student` only the image tower's LoRA weights move.

        Under FSDP each rank updates its own shards, with no communication (as DINOv2 / DINOv3 update their EMA
        teachers): a teacher weight and the student weight it follows have one shape and one placement (sharded
        along the first dimension over the same ranks), so their local shards hold the same elements."""
        if self._ema_pairs is None or self._ema_pairs_sharded != self.sharded:  # pair the parameter objects once
            # (FSDP replaces them by sharded ones when it shards the model; outside a forward they stay those)
            student = dict(self.student.named_parameters())
            teacher = dict(self.named_parameters())
            names = [n for n in lora_parameter_names(self) if self.text_follows_student or "text_model" not in n]
            for name in names:
                if not same_sharding(teacher[name], student[name]):
                    raise RuntimeError(f"The teacher's {name} is not sharded like the student's: "
                                       f"{type(teacher[name]).__name__} vs {type(student[name]).__name__}")
            self._ema_pairs = ([teacher[n] for n in names], [student[n] for n in names])
            self._ema_pairs_sharded = self.sharded
        teacher, student = self._ema_pairs
        update_ema_(list(map(local, teacher)), list(map(local, student)), ema_alpha(step, self.alpha))

    # ------------------------------------------------------------------------------------------ forward
    @contextmanager
    def active(self) -> Iterator[None]:
        """Within: the shared model computes with the teacher's adapter, in eval mode. On leaving (also on an
        error) the student's adapter, each module's train/eval mode and the student's `requires_grad` flags are
        what they were. Re-entrant (the vocabulary is encoded inside the teacher's forward)."""
        if self._peft is None or self._switched:
            yield
            return
        modes = [(module, module.training) for module in self.model.modules()]
        trainable = [(weight, weight.requires_grad) for weight in self._peft.parameters()]
        self._switched = True
        try:
            self._peft.base_model.set_adapter(TEACHER_ADAPTER, inference_mode=True)
            self.model.eval()
            yield
        finally:
            self._peft.base_model.set_adapter(self.student_adapter)
            for module, mode in modes:
                module.training = mode
            for weight, flag in trainable:  # set_adapter makes the whole student adapter trainable: restore exactly
                weight.requires_grad_(flag)
            self._switched = False

    def _computing_model(self) -> nn.Module:
        """What the teacher calls: the base model with both adapters; under FSDP the peft model around it, the root
        of the sharding, whose forward (and text encoding, registered as a forward) gathers the weights."""
        if self.sharded:
            register_forward_methods(self._peft)
            return self._peft
        return self.model

    @torch.no_grad()
    def __call__(self, **inputs: Any):
        """The teacher's forward (no gradients): the model's output for `inputs`."""
        with self.active():
            return self._computing_model()(**inputs)

    @torch.no_grad()
    def get_text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        with self.active():
            return self._computing_model().get_text_embeddings(input_ids)

    def precision(self, device: torch.device) -> torch.autocast:
        """The autocast context of the teacher's forward on `device`: bfloat16, or disabled (float32) -- also inside
        a student's `--bf16` / `--fp16` autocast, so that the teacher's precision is its own."""
        if self.compute_dtype is None:
            self.compute_dtype = resolve_teacher_dtype(self.dtype_choice, device)
        bf16 = self.compute_dtype == torch.bfloat16
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    @torch.no_grad()
    def vocabulary_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The teacher's logits over its whole vocabulary `(B, N_entries, h, w)`, in its own [`precision`] (the
        logits of a bfloat16 forward are bfloat16)."""
        if self._peft is None:
            self.model.to(pixel_values.device)  # a copy made before the Trainer placed the student
        tokens = self.entry_tokens.to(pixel_values.device)
        with self.active(), self.precision(pixel_values.device):
            if self.sharded:  # every forward: the cache's validity check reads storage FSDP reallocates rank by rank
                text = self.get_text_embeddings(tokens)
            else:  # encoded once per EMA update of the text weights (or once in all when they stay); gradient
                # accumulation reuses it
                text = self.text_cache.get_or_encode(self.model.catseg.text_tower, tokens, self.get_text_embeddings)
            return self._computing_model()(pixel_values=pixel_values, text_embeds=text).logits

    @contextmanager
    def hidden_from_peft(self) -> Iterator[None]:
        """Within: peft does not know the teacher's adapter, so that `save_pretrained` (the Trainer's checkpoints
        and final model) writes the student only; the teacher has its own file ([`save`])."""
        if self._peft is None:
            yield
            return
        configs = self._peft.peft_config
        teacher = configs.pop(TEACHER_ADAPTER)
        try:
            yield
        finally:
            configs[TEACHER_ADAPTER] = teacher

    # -------------------------------------------------------------------------------------- checkpoints
    def lora_weights(self) -> dict[str, torch.Tensor]:
        """The teacher's LoRA weights, whole, on the CPU, under the student's names. Under FSDP the shards are
        gathered: every rank must call it."""
        return {n: full(p.detach()).cpu().contiguous() for n, p in self.named_parameters() if "lora_" in n}

    def save(self, path: str | Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write the teacher's LoRA weights atomically (tmp file + rename): `weights` ([`lora_weights`], gathered
        by every rank under FSDP), by default read here."""
        tensors = self.lora_weights() if weights is None else weights
        atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp)))

    def load(self, path: str | Path) -> None:
        """Read the teacher's LoRA weights written by [`save`] (under FSDP every rank reads the file and keeps its
        own shards)."""
        tensors = load_file(str(path))
        params = dict(self.named_parameters())
        missing = sorted(n for n in params if "lora_" in n and n not in tensors)
        if missing:
            raise ValueError(f"Teacher checkpoint {path} lacks {missing[:5]} (and {max(len(missing) - 5, 0)} more)")
        with torch.no_grad():
            for name, value in tensors.items():
                weight = params[name]
                if local(weight) is not weight:  # a DTensor: this rank's part of the file's whole weight
                    from torch.distributed.tensor import distribute_tensor  # only here: torch may lack distributed

                    value = distribute_tensor(value.to(local(weight).device), weight.device_mesh, weight.placements,
                                              src_data_rank=None)
                weight.copy_(value)


class TeacherEMACallback(TrainerCallback):
    """Moves the teacher's LoRA weights towards the student's after every optimiser step."""

    def __init__(self, teacher: EMATeacher) -> None:
        self.teacher = teacher

    def on_step_end(self, args, state, control, **kwargs):
        self.teacher.update(state.global_step)

"""`VocAlignTrainer`: source-free adaptation of CAT-Seg as a `transformers.Trainer` (runs under Accelerate).

One training step (paper Sec. 3, Eq. 3-7):

1. the EMA **teacher** sees the clean target image with the *aligned* vocabulary (classes + concepts), a softmax
   over all entries, and each class's entries summed back to it (Eq. 7);
2. **Top-K**: per image the K classes with the highest mean teacher probability are kept, the pseudo-label is the
   argmax over them and the weight q the share of confident pixels (Eq. 3-4, as the released code);
3. the **student** sees the block-masked image (Eq. 5-6) -- by default a strongly colour-augmented view of it, as
   the released code (`student_augmentation`) -- with only the K selected class names in its cost volume and
   learns `q * CE(student, pseudo-label)`;
4. after the optimiser step the teacher's LoRA weights follow the student's by EMA.

The teacher is an [`~vocalign_hf.adaptation.teacher.EMATeacher`]: a second, frozen LoRA adapter on the student's
own model (its weights, EMA, vocabulary embeddings and checkpoint file are its own).

Only the LoRA weights (peft, q/k/v of the first CLIP layers of both towers) are trained. The student is what is
evaluated and saved, as in the reference.

Randomness: block masks and the student's augmentation come from a generator seeded per optimisation step from
`(args.seed, process index, global step, micro-batch)`; the training data's order and each example's crop, flip
and colours come from `(data seed, epoch, position)` ([`~vocalign_hf.data.sampling.ResumableSampler`]). So ranks
differ, every run of a command is reproducible, and a resumed run draws exactly what the uninterrupted run drew.

Checkpoints hold what the Trainer saves (adapter, processor, optimiser, RNG and trainer state), `vocalign.json`
(class list, concepts, the run's settings) and the teacher's LoRA weights (`teacher_lora.safetensors`), then,
last, `checkpoint_complete.json` (written by a callback's `on_save`, which runs once the Trainer has written the
whole folder). transformers writes a checkpoint file by file in its final folder; a folder without that last file
is an interrupted save, which `resume_from_checkpoint=True` passes over for the last complete one.
`train(resume_from_checkpoint=...)` refuses a checkpoint of another run (other settings, or already at
`max_steps`) with the differences named, and restores the teacher too.

Under `--bf16` / `--fp16` every evaluation path runs under `accelerator.autocast()`, as the student's forward does
once Accelerate prepared it. The teacher's forward has its own precision, `teacher_dtype` (float32 by default, also
under `--bf16`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback, get_scheduler
# `Trainer` loads transformers.integrations anyway; the optional `tensorboard` package itself is imported only when
# a `TensorBoardCallback` is made (`report_to="tensorboard"`), by transformers.
from transformers.integrations import TensorBoardCallback
from transformers.integrations.integration_utils import default_logdir
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..atomic import atomic_write_json, atomic_write_text, read_json_object
from ..errors import UsageError
from ..data import collate_fn
from ..data.sampling import KeyedDataset, ResumableSampler, draw_key
from ..metrics import BatchMeanIoU, predicted_classes
from ..models.catseg import CATSegForSemanticSegmentation, CATSegProcessor, validate_class_names
from ..models.catseg.pixel_normalization import denormalize_pixels, normalize_pixels
from .adapters import CARD_FILE, base_model_fingerprint, base_model_reference, build_model_card
from .arguments import VocAlignArguments
from .checkpoints import (
    CHECKPOINT_COMPLETE,
    TEACHER_WEIGHTS,
    VOCALIGN_STATE,
    check_same_run,
    last_complete_checkpoint,
    run_settings,
)
from .lora import LoRASettings, lora_config_for_clip
from .masking import apply_block_mask, sample_block_mask, sample_clip_aligned_block_mask
from .pseudo_labels import entropy_loss, weighted_cross_entropy
from .sharding import full, is_sharded, register_forward_methods, vectorize_scalar_parameters
from .student_augmentation import StudentAugmentation
from .teacher import EMATeacher, TeacherEMACallback
from .topk import gather_class_probs, topk_pseudo_labels
from .vocabulary import ConceptVocabulary

logger = logging.get_logger(__name__)



def step_seed(seed: int, rank: int, step: int, micro_batch: int) -> int:
    """The seed of one micro-batch's random draws (masks, student augmentation): a hash of all four numbers, so
    ranks and steps get independent streams and a resumed run redraws exactly what the straight run drew."""
    return draw_key(seed, rank, step, micro_batch)


class SegmentationCollator:
    """Batches transformed examples with [`vocalign_hf.data.collate_fn`] (0..1 `pixel_values`, optional `labels`,
    padding to the largest image), then applies the model's CLIP normalisation."""

    def __init__(self, image_mean: Sequence[float], image_std: Sequence[float]) -> None:
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_fn(examples)
        out = {"pixel_values": normalize_pixels(batch["pixel_values"].float(), self.image_mean, self.image_std)}
        if "labels" in batch:
            out["labels"] = batch["labels"]
        return out


def add_lora(model: CATSegForSemanticSegmentation, args: VocAlignArguments) -> PeftModel:
    """Wrap a CAT-Seg model with LoRA on q/k/v of `args.lora_layers` of both CLIP towers; freeze the rest."""
    settings = LoRASettings(
        rank=args.lora_rank, alpha=args.lora_alpha, layers=tuple(args.lora_layers), use_rslora=args.lora_use_rslora
    )
    return get_peft_model(model, lora_config_for_clip(settings))


class _CheckpointCompletionCallback(TrainerCallback):
    """Finishes every checkpoint folder the Trainer saves (`on_save` runs once `checkpoint-<step>` is written): the
    teacher's LoRA weights, so that a resumed run continues with the same teacher, then the completion mark."""

    def __init__(self, trainer: "VocAlignTrainer") -> None:
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        # Every rank: under FSDP the teacher's weights are gathered from all ranks' shards.
        teacher = self.trainer.teacher.lora_weights() if self.trainer.teacher is not None else None
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():  # e.g. a hyper-parameter search trial's run folder
            logger.warning(f"{folder} does not exist: the teacher's weights are not saved with this checkpoint")
            return
        if self.trainer.teacher is not None:
            self.trainer.teacher.save(folder / TEACHER_WEIGHTS, teacher)
        atomic_write_json(folder / CHECKPOINT_COMPLETE, {"global_step": state.global_step})


class _OutputDirTensorBoard(TensorBoardCallback):
    """transformers' `TensorBoardCallback`, writing under `<output_dir>/runs/<date>_<host>` also when the first log
    comes before `on_train_begin` (where the callback picks that folder): an evaluation without training would
    otherwise write to `./runs` of the working directory. transformers 5 has no `logging_dir` argument any more;
    its only other setting, `TENSORBOARD_LOGGING_DIR`, is read from the environment when the callback is made."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.logging_dir is None and state.is_world_process_zero:
            self.logging_dir = os.path.join(args.output_dir, default_logdir())
        return super().on_log(args, state, control, logs=logs, **kwargs)


class VocAlignTrainer(Trainer):
    """Adapts a LoRA-wrapped CAT-Seg student to unlabeled target images with an EMA teacher.

    Args:
        model: a `PeftModel` around [`CATSegForSemanticSegmentation`] (see [`add_lora`]); for `method="zero_shot"`
            a plain model works too.
        args: [`VocAlignArguments`].
        class_names: the target classes.
        concepts: `{class: [concept, ...]}` for vocabulary alignment (ignored when `args.use_concepts` is False).
        concept_log_weights: `{class: {concept: log-weight}}` added to those concepts' logits in the teacher's
            pseudo-labels only (extension: the concept guard, `adaptation.concept_audit.guard_concepts`); the student
            and the adapted model score with Eq. 7 unweighted.
        processor: the model's [`CATSegProcessor`] (tokenises the class and concept prompts, normalises images).
        train_dataset / eval_dataset: datasets yielding `pixel_values` (3, H, W) in 0..1 (and `labels` (H, W) for
            evaluation); the collator normalises them.
        compute_metrics: by default the student's mIoU and per-class IoUs (`<prefix>_mean_iou`, `<prefix>_iou_<class>`,
            NaN for a class absent from prediction and reference), streamed batch by batch; the per-class table of
            the last evaluation is `last_eval_table`.
    """

    # compute_loss returns a per-micro-batch mean (it does not use num_items_in_batch): the Trainer must divide it by
    # the gradient-accumulation steps. Said explicitly, since the Trainer otherwise guesses it from the model's
    # forward signature (it skips the division for a forward that takes **kwargs).
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PeftModel | CATSegForSemanticSegmentation,
        args: VocAlignArguments,
        class_names: Sequence[str],
        processor: CATSegProcessor,
        concepts: Mapping[str, Sequence[str]] | None = None,
        data_collator=None,
        concept_log_weights: Mapping[str, Mapping[str, float]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.class_names = validate_class_names(class_names)
        self.concepts = {k: list(v) for k, v in (concepts or {}).items()}
        self.processor = processor
        image_processor = processor.image_processor
        collator = data_collator or SegmentationCollator(image_processor.image_mean, image_processor.image_std)
        # The processor is the Trainer's `processing_class`: every checkpoint carries it (as `save_pretrained` does).
        kwargs.setdefault("processing_class", processor)
        # The default metric: the student's mIoU, streamed batch by batch (see `prediction_step`).
        self._mean_iou = BatchMeanIoU(self.class_names, ignore_index=255)
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = self._mean_iou
        super().__init__(model=model, args=args, data_collator=collator, **kwargs)
        if self.is_fsdp_enabled:  # before Accelerate shards the model (at the first evaluation or training)
            vectorize_scalar_parameters(self.model)
        args.check_concepts(self.concepts)
        self.vocabulary = (
            ConceptVocabulary(self.class_names, self.concepts, include_class_names=args.include_class_names)
            if args.use_concepts and self.concepts
            else ConceptVocabulary.identity(self.class_names)
        )
        self.concept_log_weights = {k: dict(v) for k, v in (concept_log_weights or {}).items() if v}
        # The pseudo-labels' vocabulary: the aligned one, with the guarded concepts weighed down.
        self.teacher_vocabulary = (
            self.vocabulary.with_log_weights(self.concept_log_weights) if self.concept_log_weights else self.vocabulary
        )
        self._class_tokens = processor.tokenize_classes(self.class_names)["input_ids"]
        self._entry_tokens = processor.tokenize_classes(self.vocabulary.entries)["input_ids"]
        # What the student scores its classes with: their names (the paper), or the teacher's aligned vocabulary.
        self.student_vocabulary = (
            self.vocabulary if args.student_concepts else ConceptVocabulary.identity(self.class_names)
        )
        self._student_tokens = self._entry_tokens if args.student_concepts else self._class_tokens
        # Masked pixels become black: 0 in 0..1 space is -mean/std after normalisation.
        self._pixel_stats = (tuple(image_processor.image_mean), tuple(image_processor.image_std))
        self._mask_fill = normalize_pixels(torch.zeros(3, 1, 1), *self._pixel_stats).flatten().tolist()
        self.student_augmentation = StudentAugmentation() if args.student_augmentation else None
        self._rng_step, self._rng_micro = -1, 0
        self._has_guidance_backbone = getattr(self.model.config, "variant", "cvpr24") == "v1"
        self.teacher: EMATeacher | None = None
        if args.method in ("vocalign", "teacher_student"):
            self.teacher = EMATeacher(
                self.model, self._entry_tokens, alpha=args.ema_alpha, text_follows_student=args.teacher_text_ema,
                dtype=args.teacher_dtype,
            )
            self.add_callback(TeacherEMACallback(self.teacher))
        self.add_callback(_CheckpointCompletionCallback(self))
        self.resumed_from: dict[str, Any] | None = None
        self._base_model: dict[str, Any] | None = None
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_count = 0
        self._place_tensorboard_logs()

    def _place_tensorboard_logs(self) -> None:
        """Swap the TensorBoard callback that `report_to` added for [`_OutputDirTensorBoard`] (a trainer that only
        evaluates logs under `output_dir` too). One given a folder (`TENSORBOARD_LOGGING_DIR`) or a writer is kept."""
        for callback in list(self.callback_handler.callbacks):
            if type(callback) is TensorBoardCallback and callback.logging_dir is None and callback.tb_writer is None:
                self.callback_handler.remove_callback(callback)
                self.add_callback(_OutputDirTensorBoard())

    # ------------------------------------------------------------------------------------------ teacher
    @torch.no_grad()
    def teacher_class_probs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Teacher probabilities over the target classes (B, Nc, H, W) at the input resolution (Eq. 7)."""
        logits = self.teacher.vocabulary_logits(pixel_values)
        logits = F.interpolate(logits.float(), size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        return self.teacher_vocabulary.aggregate(logits, from_logits=True, reduce=self.args.concept_reduce)

    @torch.no_grad()
    def teacher_targets(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the student is trained on (Eq. 3-4 after Top-K): the classes kept per image `(B, K)`, the
        pseudo-labels `(B, H, W)` as positions among them, and the confidence weight q."""
        class_probs = self.teacher_class_probs(pixel_values)
        top_k = self.args.top_k if self.args.top_k is not None else len(self.class_names)
        tau = self.args.pseudo_threshold
        indices, labels, weight = topk_pseudo_labels(class_probs, top_k, tau, mass=self.args.top_k_mass)
        if self.args.confident_pixels_only and tau is not None:
            confidence = gather_class_probs(class_probs, indices).max(dim=1).values
            labels = labels.masked_fill(confidence < tau, 255)
            weight = torch.ones_like(weight)
        return indices, labels, weight

    # --------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        pixel_values = inputs["pixel_values"]
        device = pixel_values.device
        class_tokens = self._class_tokens.to(device)
        if self.args.method == "min_entropy":
            names_only = torch.arange(len(self.class_names), device=device)  # not concepts the base may hold
            logits = model(pixel_values=pixel_values, input_ids=class_tokens, entry_class_ids=names_only).logits
            loss = entropy_loss(logits.float())
            return (loss, {"logits": logits}) if return_outputs else loss
        if self.args.method == "zero_shot":
            raise RuntimeError("method='zero_shot' does not train; call evaluate() instead of train().")

        indices, pseudo_labels, weight = self.teacher_targets(pixel_values)
        student_input = self.student_view(pixel_values)
        # Text is encoded inside the forward (LoRA sits in the text tower too); pruned classes never enter the
        # student's cost volume. A v1 model's ResNet sees the unmasked image, as in the reference (only CLIP's
        # input is masked there).
        guidance = {"guidance_pixel_values": pixel_values} if self._has_guidance_backbone else {}
        if not self.args.student_concepts:
            logits = model(pixel_values=student_input, input_ids=class_tokens, class_indices=indices, **guidance).logits
            loss = weighted_cross_entropy(logits.float(), pseudo_labels, weight)
        else:  # the kept classes' entries enter the cost volume; their probabilities are summed per class (Eq. 7)
            entries, positions = self.student_vocabulary.entries_of(indices)
            logits = model(pixel_values=student_input, input_ids=self._entry_tokens.to(device), class_indices=entries,
                           **guidance).logits
            logits = F.interpolate(logits.float(), size=pseudo_labels.shape[-2:], mode="bilinear", align_corners=False)
            log_probs = self.student_vocabulary.log_class_probs(logits, positions, indices.shape[1])
            loss = weighted_cross_entropy(log_probs, pseudo_labels, weight)
        self._record(pseudo_weight=weight)  # the loss itself the Trainer logs (its own on-device sum)
        return (loss, {"logits": logits}) if return_outputs else loss

    def step_generator(self) -> torch.Generator:
        """A CPU generator for this micro-batch's random draws, seeded from (seed, rank, global step, micro-batch)."""
        step = self.state.global_step
        self._rng_step, self._rng_micro = step, (self._rng_micro + 1 if step == self._rng_step else 0)
        return torch.Generator().manual_seed(step_seed(self.args.seed, self.args.process_index, step, self._rng_micro))

    @torch.no_grad()
    def student_view(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the student's CLIP sees: the (normalised) batch, colour-augmented if `student_augmentation`, then
        block-masked if `use_masking` (masked pixels black, as in the released code)."""
        if self.student_augmentation is None and not self.args.use_masking:
            return pixel_values
        generator = self.step_generator()
        view = pixel_values
        if self.student_augmentation is not None:
            image = denormalize_pixels(view, *self._pixel_stats).clamp(0, 1)
            view = normalize_pixels(self.student_augmentation(image, generator), *self._pixel_stats)
        if self.args.use_masking:
            b, _, h, w = view.shape
            size, ratio = self.args.mask_block_size, self.args.mask_ratio
            if self.args.mask_space == "clip":
                canvas = self.accelerator.unwrap_model(self.model).config.clip_resolution
                mask = sample_clip_aligned_block_mask(b, h, w, size, ratio, canvas, generator)
            else:
                mask = sample_block_mask(b, h, w, size, ratio, generator)
            view = apply_block_mask(view, mask.to(view.device), fill=self._mask_fill)
        return view

    def _record(self, **values: torch.Tensor) -> None:
        """Add this micro-batch's scalars to the sums logged at the next logging step. They stay on the device,
        detached: reading one here (`.item()`) would make the host wait for the GPU on every micro-batch. Summed
        in order in float64 (float32 on MPS, which lacks it): the same arithmetic as a sum of Python floats."""
        for key, value in values.items():
            value = value.detach().to(_log_sum_dtype(value.device))
            total = self._log_sums.get(key)
            self._log_sums[key] = value if total is None else total + value
        self._log_count += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """[`Trainer.log`]; a training log (it has "loss") gets the means of the recorded values since the last
        one, read from the device here, once per logging step."""
        if self._log_count and "loss" in logs:
            for key, total in self._log_sums.items():
                logs[key] = round(total.item() / self._log_count, 4)
            self._log_sums, self._log_count = {}, 0
        super().log(logs, *args, **kwargs)

    # ---------------------------------------------------------------------------------------- schedule
    def create_optimizer(self, model=None):
        """The Trainer's AdamW, with the LoRA weights' learning rate scaled by `lora_lr_multiplier` (the released
        code's lr_mult of 0.1 on `backbone.clip_model`)."""
        if self.optimizer is not None:
            return self.optimizer
        optimizer = super().create_optimizer(model)
        lora = {id(p) for n, p in self.model.named_parameters() if "lora_" in n}
        for group in optimizer.param_groups:
            if all(id(p) in lora for p in group["params"]):
                group["lr"] *= self.args.lora_lr_multiplier
        # This run's own values: a resumed checkpoint's optimiser state brings the old run's (see below).
        self._group_settings = [{"lr": g["lr"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        return optimizer

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """[`Trainer._load_optimizer_and_scheduler`], then this run's learning rates and weight decay in place of
        the checkpoint's (they differ only under `resume_with_other_settings`, which the record lists): the
        optimiser's moments and the schedule's step are the checkpoint's, its base rates this run's."""
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler, own_settings = self.lr_scheduler, getattr(self, "_group_settings", None)
        if checkpoint is None or own_settings is None or not isinstance(scheduler, LambdaLR) or self.is_deepspeed_enabled:
            return  # no checkpoint, or an optimiser / scheduler the caller made
        for index, (group, own) in enumerate(zip(self.optimizer.param_groups, own_settings)):
            group["initial_lr"] = scheduler.base_lrs[index] = own["lr"]
            group["weight_decay"] = own["weight_decay"]
            group["lr"] = own["lr"] * scheduler.lr_lambdas[index](scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Linear warm-up from `learning_rate * warmup_start_factor` (5e-6 -> 5e-5 over 500 steps in the paper),
        then `lr_scheduler_type` with `lr_scheduler_kwargs`, as transformers' `get_scheduler` builds it for the
        remaining steps (`constant` as the paper, `linear`, `cosine`, `cosine_with_min_lr`, `polynomial`, ...).

        Schedules that are not a function of the step (`reduce_lr_on_plateau`, `greedy`) are rejected."""
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        optimizer = optimizer or self.optimizer
        warmup = self.args.get_warmup_steps(num_training_steps)
        after = _schedule_after_warmup(
            self.args.lr_scheduler_type, max(num_training_steps - warmup, 1), optimizer.defaults["lr"],
            self.args.lr_scheduler_kwargs,
        )
        start = self.args.warmup_start_factor

        def factor(step: int) -> float:
            if step < warmup:
                return start + (1.0 - start) * step / max(warmup, 1)
            return after(step - warmup)

        self.lr_scheduler = LambdaLR(optimizer, factor)
        return self.lr_scheduler

    # ------------------------------------------------------------------------------------- checkpoints
    def get_train_dataloader(self):
        """[`Trainer.get_train_dataloader`] over a [`ResumableSampler`]: the order and each example's augmentation
        are functions of `(data seed, epoch, position)`, so a resumed run draws what the uninterrupted run drew
        (the Trainer's own sampler and a transform's own random stream would restart on resume)."""
        dataset = self.train_dataset
        strategy = str(getattr(self.args.train_sampling_strategy, "value", self.args.train_sampling_strategy))
        if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or strategy not in (
            "random", "sequential"
        ):  # length-grouped or rebalanced batches: the Trainer's own samplers
            return super().get_train_dataloader()
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        shuffle = strategy != "sequential"
        # `_get_dataloader` is the Trainer's own builder (collator, workers, pinning, Accelerate); only the sampler
        # and the dataset's indexing differ.
        return self._get_dataloader(
            dataset=KeyedDataset(dataset), description="Training", batch_size=self._train_batch_size,
            sampler_fn=lambda data: ResumableSampler(len(data), seed, shuffle=shuffle), is_training=True,
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """[`Trainer.train`]. `resume_from_checkpoint=True` takes the last *complete* checkpoint of `output_dir`; a
        checkpoint of another run (other classes, concepts, LoRA layout or settings, see
        [`~vocalign_hf.adaptation.checkpoints.checkpoint_differences`]) or one already at `max_steps` is refused
        (`resume_with_other_settings=True`: continued with a warning, and the record says so). Resuming restores the
        teacher from `teacher_lora.safetensors`.

        Why an override: `Trainer.train` resolves `True` with `trainer_utils.get_last_checkpoint`, the highest-numbered
        `checkpoint-*` folder whether or not its save finished, and no callback receives the checkpoint path (the run
        checks and the teacher need it before the Trainer loads the student)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise UsageError(f"resume_from_checkpoint=True: no complete checkpoint-* in {self.args.output_dir}")
        if resume_from_checkpoint:
            self.resumed_from = self._check_resume(Path(resume_from_checkpoint))
        if resume_from_checkpoint and self.teacher is not None:
            self.teacher.load(Path(resume_from_checkpoint) / TEACHER_WEIGHTS)
        return super().train(
            resume_from_checkpoint=str(resume_from_checkpoint) if resume_from_checkpoint else None, trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval, **kwargs,
        )

    def _check_resume(self, checkpoint: Path) -> dict[str, Any]:
        """Where this run resumes from and what it changed; `earlier`: the checkpoint's own resume, if it had one, so
        that a difference forced once stays in the record of every later resume."""
        diffs, step = check_same_run(
            checkpoint, class_names=self.class_names, concepts=self.concepts, settings=self.run_settings(),
            needs_teacher=self.teacher is not None, allow_other_settings=self.args.resume_with_other_settings,
            base_model=self.base_model_record(),
        )
        resumed = {"checkpoint": str(checkpoint), "step": step, "other_settings": diffs}
        earlier = read_json_object(checkpoint / VOCALIGN_STATE).get("resumed_from")
        return {**resumed, "earlier": earlier} if earlier else resumed

    def run_settings(self) -> dict[str, Any]:
        """The settings that make this run what it is: a checkpoint's must equal them to be resumed."""
        return run_settings(self.args)

    def base_model_record(self) -> dict[str, Any]:
        """The base model this run adapts: its name and the sha256 of its weights files (read once; None for a
        model built in memory). A checkpoint is resumed only on the same weights."""
        if self._base_model is None:
            self._base_model = base_model_fingerprint(getattr(self.model.config, "_name_or_path", None) or None)
        return self._base_model

    def run_record(self) -> dict[str, Any]:
        """What this run really did, for `vocalign.json` and the model card: steps trained, where it resumed from,
        whether the teacher's vocabulary had concepts."""
        record = {
            "steps_trained": self.state.global_step,
            "concepts_used": list(self.vocabulary.entries) != list(self.class_names),
            "teacher_concept_log_weights": self.concept_log_weights,
            "base_model": self.base_model_record(),
        }
        if self.resumed_from is not None:
            record["resumed_from"] = self.resumed_from
        return record

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """[`Trainer.save_model`] (model, processor, training arguments), plus `vocalign.json`: the class list,
        concepts, the run's settings and what it did so far."""
        with self.teacher.hidden_from_peft() if self.teacher is not None else contextlib.nullcontext():
            if self.is_fsdp_enabled and is_sharded(self.model) and isinstance(self.model, PeftModel):
                self._save_sharded_adapter(output_dir)
            else:
                super().save_model(output_dir, _internal_call=_internal_call)  # the student's adapter only
        if self.args.should_save:
            info = {
                "class_names": self.class_names,
                "concepts": self.concepts,
                "settings": self.run_settings(),
                **self.run_record(),
            }
            atomic_write_json(Path(output_dir or self.args.output_dir) / VOCALIGN_STATE, info)

    def _save_sharded_adapter(self, output_dir: str | None) -> None:
        """The Trainer's save under FSDP for a peft model: every rank gathers the LoRA weights (the adapter is all
        that is saved), then the main process writes them as `Trainer._save` does.

        Why not the Trainer's own: with FSDP2 it gathers the whole model's state to rank 0 with Accelerate's
        `get_state_dict`, then peft's `save_pretrained` gathers the sharded weights again, on rank 0 alone: a
        collective the other ranks do not join (gloo aborts with "Received data size doesn't match expected size",
        NCCL hangs)."""
        weights = {name: full(value).detach().cpu() for name, value in self.model.state_dict().items()
                   if "lora_" in name}  # the same names in the same order on every rank
        self._save(output_dir or self.args.output_dir, state_dict=weights)

    def adaptation_settings(self) -> dict[str, Any]:
        """The settings of this run that an adapter's model card and `vocalign.json` record, and what it did."""
        return {**self.run_settings(), **self.run_record()}

    def create_model_card(self, model_name: str | None = None, dataset: str | list[str] | None = None, **kwargs) -> None:
        """Write the adapter's own card ([`build_model_card`]: base model, target classes and concepts, the mIoUs
        this trainer measured, the settings, a usage snippet) as `README.md` in `output_dir`, so that
        `trainer.push_to_hub()` publishes the same card as the recipes. A model without LoRA (every weight trained)
        keeps the Trainer's own card; extra arguments of the Trainer's card (tags, language, ...) are ignored."""
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PeftModel):
            return super().create_model_card(model_name=model_name, dataset=dataset, **kwargs)
        if not self.is_world_process_zero():
            return None
        peft_config = model.peft_config[model.active_adapter]
        base_model = peft_config.base_model_name_or_path or "catseg"
        _, commit = base_model_reference(base_model, peft_config.revision)
        metrics: dict[str, float] = {}
        for entry in self.state.log_history:  # the latest mIoU of each evaluation prefix ("eval", "adapted", ...)
            for key, value in entry.items():
                if key.endswith("_mean_iou"):
                    metrics[f"target mIoU ({key[: -len('_mean_iou')].replace('_', '-')})"] = value
        card = build_model_card(
            base_model, self.class_names, self.concepts, metrics, dataset if isinstance(dataset, str) else None,
            self.adaptation_settings(), repo_id=self.hub_model_id, base_model_revision=commit,
        )
        atomic_write_text(Path(self.args.output_dir) / CARD_FILE, str(card))
        return None

    # -------------------------------------------------------------------------------------- evaluation
    # `evaluate()` and `predict()` are the Trainer's own: its loop calls `prediction_step` per batch, pads and gathers
    # the class maps across processes (dropping the repeats Accelerate adds to even out the shards) and, with
    # `batch_eval_metrics` (on by default), hands each gathered batch to `compute_metrics`: a streaming confusion
    # matrix ([`BatchMeanIoU`]), so no logit map is kept.
    def evaluation_loop(self, *args, **kwargs):
        """[`Trainer.evaluation_loop`], with a fresh metric."""
        self._mean_iou.reset()
        return super().evaluation_loop(*args, **kwargs)

    @torch.no_grad()
    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """The student's class per pixel (argmax of [`class_scores`], at the labels' size) and the labels, each image
        flattened to a row `(B, H*W)` so that the loop can pad and gather images of any size; no loss."""
        if prediction_loss_only:
            return None, None, None
        pixel_values = inputs["pixel_values"].to(self.args.device)
        labels = inputs.get("labels")
        size = labels.shape[-2:] if labels is not None else pixel_values.shape[-2:]
        predictions = predicted_classes(self.class_scores(pixel_values, size), size)
        return None, predictions.flatten(1), None if labels is None else labels.to(self.args.device).flatten(1)

    @property
    def last_eval_table(self) -> str | None:
        """The per-class table (IoU, accuracy, pixel counts) of the last evaluation with the default metric."""
        return self._mean_iou.table

    @torch.no_grad()
    def class_scores(self, pixel_values: torch.Tensor, output_size=None, text: torch.Tensor | None = None):
        """The student's class scores `(B, N_c, h, w)`, whose argmax is its prediction: over its vocabulary's
        entries, summed per class (Eq. 7) when it scores with concepts; sliding windows if `eval_sliding_window`.
        `text`: the student vocabulary's embeddings; by default encoded once while the student's text weights stay
        (`model.encode_vocabulary`)."""
        model = self.accelerator.unwrap_model(self.model)
        register_forward_methods(model)  # under FSDP: the text encoding and sliding window gather the weights too
        # The model's own scoring of an aligned vocabulary, as a user's model(...) or pipeline(...) computes it.
        entry_class_ids = self.student_vocabulary.entry_to_class.to(pixel_values.device)
        with self.accelerator.autocast():
            if text is None:
                tokens = self._student_tokens.to(pixel_values.device)
                # Not from the cache under FSDP: it tells a valid encoding by the weights' storage, which FSDP
                # frees and reallocates rank by rank, so the ranks could disagree and one skip the text tower's
                # gathers that the others run.
                text = model.get_text_embeddings(tokens) if is_sharded(model) else model.encode_vocabulary(tokens)
            if self.args.eval_sliding_window:
                return model.predict_sliding_window(pixel_values, text_embeds=text, output_size=output_size,
                                                    entry_class_ids=entry_class_ids)
            return model(pixel_values=pixel_values, text_embeds=text, entry_class_ids=entry_class_ids).logits


def _log_sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for the logged sums, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _schedule_after_warmup(
    kind: Any, num_steps: int, learning_rate: float, kwargs: Mapping[str, Any] | None
):
    """The learning-rate factor of transformers' `kind` schedule over `num_steps` steps without warm-up, as a
    function of the step (`get_scheduler` applied to a throw-away optimizer, so the real one is left untouched).

    Why a throw-away optimiser: transformers 5.25 has no warm-up that starts above 0 (every `get_*_with_warmup`
    starts at 0, and `constant` ignores `num_warmup_steps`), and its schedules are public only as
    `get_scheduler(name, optimizer, ...)`, a `LambdaLR` that sets the given optimiser's rates (the factor functions
    `_get_*_lr_lambda` are private). The public alternative, torch's `SequentialLR` of a warm-up `LambdaLR` and
    `get_scheduler`'s on the real optimiser, changes `scheduler.pt` (checkpoints written before could no longer be
    resumed) and would make `_load_optimizer_and_scheduler` read `SequentialLR`'s private `_schedulers`."""
    name = str(getattr(kind, "value", kind))
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    scheduler = get_scheduler(
        name, probe, num_warmup_steps=0, num_training_steps=num_steps, scheduler_specific_kwargs=dict(kwargs or {})
    )
    if not isinstance(scheduler, LambdaLR) or len(scheduler.lr_lambdas) != 1:
        raise ValueError(
            f"lr_scheduler_type={name!r} is not supported by VocAlignTrainer: its warm-up needs a schedule that is a "
            "function of the step (constant, linear, cosine, cosine_with_restarts, cosine_with_min_lr, polynomial, "
            "inverse_sqrt, warmup_stable_decay, ...)"
        )
    return scheduler.lr_lambdas[0]

"""Training arguments of VocAlign, as a `transformers.TrainingArguments` subclass, and the paper's ablation rows."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.utils import logging

from ..errors import UsageError
from .teacher import TEACHER_DTYPES

logger = logging.get_logger(__name__)

METHODS = ("vocalign", "teacher_student", "min_entropy", "zero_shot")

# The rows of Table 2 (left) of the paper, as switches of one trainer. Each adapting row sets the switches of this
# library's extensions to the paper's behaviour, so that a config's own choices (e.g. the world's) never leak into
# a paper row; the last rows add the extensions one at a time on top of full VocAlign.
_PAPER = {"teacher_text_ema": True, "top_k_mass": None}
_VOCALIGN = {"method": "vocalign", "use_masking": True, "use_concepts": True}
_ADAPTIVE = {**_VOCALIGN, "teacher_text_ema": False, "top_k": None, "top_k_mass": 0.99}
_ROWS: dict[str, dict] = {
    "zero_shot": {"method": "zero_shot"},
    # Not a paper row: the source model scored with the aligned vocabulary, no adaptation (the baseline of the
    # student_concepts extension, and the teacher's first pseudo-labels).
    "zero_shot_concepts": {"method": "zero_shot", "use_concepts": True, "student_concepts": True},
    "min_entropy": {"method": "min_entropy"},
    "teacher_student": {"method": "teacher_student", "use_masking": False, "use_concepts": False, "top_k": None, **_PAPER},
    "masking": {"method": "teacher_student", "use_masking": True, "use_concepts": False, "top_k": None, **_PAPER},
    "vocab_alignment": {**_VOCALIGN, "top_k": None, **_PAPER},
    "topk": {**_VOCALIGN, **_PAPER},
    "frozen_teacher_text": {**_VOCALIGN, "teacher_text_ema": False, "top_k_mass": None},
    "adaptive_topk": _ADAPTIVE,
    "student_concepts": {**_ADAPTIVE, "student_concepts": True},
    # The concept guard (issue 40) on top of the main job's settings: the teacher weighs down a concept that takes
    # another class's confident pixels while its own class is read by name (adaptation/concept_audit.py).
    "concept_guard": {**_ADAPTIVE, "student_concepts": True, "concept_guard": True},
    # The paper's names-only student (adaptive_topk) with the guarded teacher.
    "names_concept_guard": {**_ADAPTIVE, "concept_guard": True},
}
# Every row but the student_concepts ones scores the student with the class names alone, and only the concept_guard
# rows guard the concepts, whatever the config says.
ABLATIONS: dict[str, dict] = {
    row: {"student_concepts": False, "concept_guard": False, **changes} for row, changes in _ROWS.items()
}


@dataclass
class VocAlignArguments(TrainingArguments):
    """`TrainingArguments` plus the VocAlign knobs. Defaults follow the paper's Cityscapes setting (Sec. 4.1);
    where the released code (andraghetti/VocAlign, `configs/vocalign/cityscapes.py`) differs, the help says so.

    `method`:
      * `vocalign` - EMA teacher pseudo-labels (with concepts if `use_concepts`), masked student, Top-K, LoRA;
      * `teacher_student` - the same loop; with `use_masking=False, use_concepts=False, top_k=None` it is the
        paper's plain teacher-student baseline;
      * `min_entropy` - entropy minimisation of the student's predictions on the LoRA weights (no teacher);
      * `zero_shot` - no training (evaluation only).
    """

    method: str = field(default="vocalign", metadata={"help": f"one of {METHODS}"})
    ema_alpha: float = field(default=0.99, metadata={"help": "teacher EMA momentum alpha (paper and code: 0.99)"})
    teacher_text_ema: bool = field(
        default=True,
        metadata={
            "help": "the teacher's text-tower LoRA follows the student by EMA (paper, released). False (extension): "
            "it stays at the source weights, so the concepts keep the meaning the source model gave them while "
            "the student's LoRA adapts the class names; the teacher's vocabulary is then encoded once"
        },
    )
    teacher_dtype: str = field(
        default="float32",
        metadata={
            "help": "precision of the teacher's no-grad forward, its own whatever --bf16 / --fp16 say: float32, "
            "bfloat16 (autocast; its LoRA weights and their EMA stay float32), or auto: bfloat16 where the hardware "
            "computes it natively (CUDA devices with bf16; CPUs whose /proc/cpuinfo flags include avx512_bf16 or "
            "amx_bf16), float32 elsewhere (emulated bf16 is slower than float32)"
        },
    )
    pseudo_threshold: float | None = field(
        default=0.968,
        metadata={
            "help": "tau of Eq. 4: the loss weight q is the share of pixels whose teacher confidence is >= tau. "
            "None gives q = 1, which is what the released code effectively trains with (its decode head drops "
            "the weight)."
        },
    )
    confident_pixels_only: bool = field(
        default=False,
        metadata={
            "help": "extension: pixels whose teacher confidence is under tau are left out of the loss (ignored) "
            "instead of weighting the whole loss by the confident share q"
        },
    )
    use_masking: bool = field(default=True, metadata={"help": "block-mask the student's input (Eq. 5-6)"})
    mask_ratio: float = field(default=0.7, metadata={"help": "mask ratio r: 0.7 Cityscapes, 0.5 multi-dataset"})
    mask_block_size: int = field(default=16, metadata={"help": "mask block size b in pixels (released code: 16)"})
    mask_space: str = field(
        default="clip",
        metadata={
            "help": "'clip': b is measured on the CLIP input (blocks cover whole ViT patches whatever the crop size); "
            "'input': in the training crop's own pixels (the released code; identical at its 384 crops)"
        },
    )
    student_augmentation: bool = field(
        default=True,
        metadata={
            "help": "the student's (masked) CLIP input is a strongly colour-augmented view: ColorJitter(0.5, 0.5, "
            "0.5, 0.25), grayscale p 0.2, blur p 0.5; the teacher sees the clean image (released jitter_aug=True; "
            "not in the paper)"
        },
    )
    use_concepts: bool = field(default=True, metadata={"help": "vocabulary alignment of the teacher (Eq. 7)"})
    concept_reduce: str = field(
        default="sum",
        metadata={
            "help": "how a class's entries are combined: 'sum' of their probabilities (Eq. 7) or 'max' "
            "(extension: the best entry, renormalised over the classes)"
        },
    )
    student_concepts: bool = field(
        default=False,
        metadata={
            "help": "extension (False: the paper): the student, too, scores each class with its name plus its "
            "concepts (Eq. 7), in training and evaluation; its adapter is then used with those concepts. A target "
            "name the source model never learnt no longer has to be learnt from scratch by the text LoRA"
        },
    )
    include_class_names: bool = field(
        default=True, metadata={"help": "the teacher vocabulary keeps each class name beside its concepts"}
    )
    concept_guard: bool = field(
        default=False,
        metadata={
            "help": "extension (false: the paper): before adapting, audit the concepts on the target images and weigh "
            "down, in the teacher's pseudo-labels, each one that takes over 0.3 of the pixels the class names "
            "alone confidently give another class while its own class is read by name (adaptation/concept_audit.py)"
        },
    )
    top_k: int | None = field(
        default=15,
        metadata={"help": "classes per image in the student's cost volume (paper: 15 CS, 50 / 35 multi; code: 19 CS)"},
    )
    top_k_mass: float | None = field(
        default=None,
        metadata={
            "help": "extension beyond the paper (None: off): K adapts to the teacher, the fewest top classes whose "
            "mean probability reaches this share in every image of the batch, at most top_k"
        },
    )
    lora_rank: int = field(default=2, metadata={"help": "LoRA rank (paper 2; released Cityscapes config 1)"})
    lora_alpha: float = field(default=2.0, metadata={"help": "LoRA alpha (paper 2; released Cityscapes config 1)"})
    lora_layers: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3],
        metadata={"help": "CLIP layers with LoRA in both towers (paper 0-3; released code 0-4)"},
    )
    lora_use_rslora: bool = field(
        default=True, metadata={"help": "scale LoRA by alpha/sqrt(rank) as the released code does"}
    )
    lora_lr_multiplier: float = field(
        default=1.0,
        metadata={
            "help": "the LoRA weights train at learning_rate x this (paper: 1, i.e. 5e-5 on Cityscapes; released: "
            "0.1 through lr_mult of backbone.clip_model, i.e. 5e-6)"
        },
    )
    lr_scheduler_type: str = field(
        default="constant",
        metadata={"help": "after the warm-up: constant (paper); released: cosine between iterations 500 and 3000"},
    )
    warmup_steps: int = field(
        default=500, metadata={"help": "linear warm-up steps (paper: 500, from 5e-6; released: 100 from 1 %%)"}
    )
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "gradient clipping norm; 0 = none (released code; the paper gives none)"}
    )
    weight_decay: float = field(
        default=1e-4, metadata={"help": "AdamW weight decay (released code: 1e-4; the paper does not give it)"}
    )
    eval_sliding_window: bool = field(
        default=False,
        metadata={
            "help": "evaluate with the model's sliding-window inference (CVPR'24: 384 windows on a 640 canvas; "
            "v1: mmseg's 384 crops at the image's own size, as VocAlign evaluates)"
        },
    )
    batch_eval_metrics: bool = field(
        default=True,
        metadata={
            "help": "stream the evaluation: each batch's class maps go into the mIoU's confusion matrix and are "
            "dropped (False: the Trainer keeps every map until the end; same numbers)"
        },
    )
    warmup_start_factor: float = field(
        default=0.1, metadata={"help": "linear warm-up starts at learning_rate * factor (5e-6 -> 5e-5 in the paper)"}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "replace a previous run in output_dir (its checkpoints, adapter, results); without it the recipes "
            "refuse to write into a folder that holds one (the flag transformers' TrainingArguments had up to v4)"
        },
    )

    remove_unused_columns: bool = field(
        default=False, metadata={"help": "always False for VocAlign (its transforms read the datasets' columns)"}
    )
    resume_with_other_settings: bool = field(
        default=False,
        metadata={
            "help": "continue a checkpoint whose class list, concepts or settings differ from this run's (refused "
            "by default, with the differences named); a warning names them and the adapter's record lists them"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise UsageError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 <= self.ema_alpha <= 1.0:
            raise UsageError(f"ema_alpha must be in [0, 1], got {self.ema_alpha}")
        if self.pseudo_threshold is not None and not 0.0 <= self.pseudo_threshold <= 1.0:
            raise UsageError(f"pseudo_threshold must be in [0, 1] or None, got {self.pseudo_threshold}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UsageError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.concept_reduce not in ("sum", "max"):
            raise UsageError(f"concept_reduce must be 'sum' or 'max', got {self.concept_reduce!r}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise UsageError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}")
        if self.mask_space not in ("clip", "input"):
            raise UsageError(f"mask_space must be 'clip' or 'input', got {self.mask_space!r}")
        if self.lora_lr_multiplier <= 0:
            raise UsageError(f"lora_lr_multiplier must be > 0, got {self.lora_lr_multiplier}")
        if self.top_k_mass is not None and not 0.0 < self.top_k_mass <= 1.0:
            raise UsageError(f"top_k_mass must be in (0, 1] or None, got {self.top_k_mass}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"top_k must be >= 1 or None, got {self.top_k}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._check_ranges()
        if self.student_concepts and not self.use_concepts:
            raise UsageError("student_concepts scores the student with the concepts too: it needs use_concepts=True")
        if self.max_steps == 0 and self.method != "zero_shot":
            raise UsageError(
                "max_steps 0 adapts nothing: give max_steps >= 1 (or -1 to train num_train_epochs), or "
                "method='zero_shot' to only evaluate"
            )
        if self.remove_unused_columns:  # the datasets' columns are read by the transforms, not by forward()
            logger.warning("remove_unused_columns=True is ignored: VocAlignTrainer needs every column of its datasets "
                           "(the images arrive as dict batches it builds itself)")
            self.remove_unused_columns = False

    def check_concepts(self, concepts) -> None:
        """Vocabulary alignment needs concepts: refuse a teacher method with `use_concepts` and none (checked by
        the recipes before any model loads, and by the trainer).

        Raises:
            UsageError: naming both ways out.
        """
        if self.use_concepts and not concepts and self.method in ("vocalign", "teacher_student"):
            raise UsageError(
                f"--method {self.method} aligns the teacher's vocabulary with concepts, and this run has none: pass "
                "--concepts <shipped set or JSON file> (vocalign-concepts writes one; VocAlignTrainer(concepts=...)),"
                " or --use_concepts false to adapt without vocabulary alignment"
            )

    def _check_ranges(self) -> None:
        """The numeric options the paper's method needs in a range, checked here so that a bad value stops a run
        before any model loads (not at its first step)."""
        if isinstance(self.lora_layers, int) or not all(isinstance(i, int) for i in self.lora_layers):
            raise UsageError(
                f"lora_layers must be a list of layer indices, got {self.lora_layers!r} (in YAML: lora_layers: [0, 1])"
            )
        checks = [
            ("mask_block_size", self.mask_block_size >= 1, ">= 1 pixel"),
            ("lora_rank", self.lora_rank >= 1, ">= 1"),
            ("lora_alpha", self.lora_alpha > 0, "> 0"),
            ("max_steps", self.max_steps == -1 or self.max_steps >= 0, ">= 1, or -1 to train num_train_epochs"),
            ("warmup_start_factor", 0.0 <= self.warmup_start_factor <= 1.0, "in [0, 1]"),
        ]
        if self.method != "zero_shot":
            checks.append(("learning_rate", self.learning_rate > 0, "> 0 (the paper: 5e-5)"))
            if self.max_steps == -1:
                checks.append(("num_train_epochs", self.num_train_epochs > 0, "> 0 when max_steps is -1"))
        for name, ok, wanted in checks:
            if not ok:
                raise UsageError(f"{name} must be {wanted}, got {getattr(self, name)}")

"""What a VocAlign checkpoint folder holds, which one a resume takes, and whether it belongs to this run.

A `checkpoint-<step>` folder holds what the Trainer writes (adapter, optimiser, scheduler, RNG and trainer state),
`vocalign.json` (class list, concepts and the run's settings, written by `VocAlignTrainer.save_model`), the
teacher's LoRA weights, and, written last, `checkpoint_complete.json`. A folder without that last file was cut off
while saving (a kill, a full disk): "resume from the last checkpoint" passes over it, with a warning.

Resuming continues *the same run*. A checkpoint is refused, with each difference named, when its LoRA layout,
class list, concepts or training settings differ from this run's (`resume_with_other_settings` lets the settings
and classes differ, never the LoRA layout: the weights would not fit), or when its step is already at or past
`max_steps` (there is nothing left to train: the "result" would be the other run's weights). `max_steps` itself may
grow: the run is extended, and the record says from where.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import read_json_object
from ..errors import UsageError
from ..file_checks import damaged_files

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_COMPLETE",
    "TEACHER_WEIGHTS",
    "VOCALIGN_STATE",
    "check_same_run",
    "checkpoint_differences",
    "checkpoint_folders",
    "is_complete",
    "last_complete_checkpoint",
    "run_settings",
]

TEACHER_WEIGHTS = "teacher_lora.safetensors"
VOCALIGN_STATE = "vocalign.json"
CHECKPOINT_COMPLETE = "checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


#: The arguments that make a run what it is (recorded in `vocalign.json` and the card, compared on resume).
RUN_SETTINGS = (
    "method", "top_k", "top_k_mass", "use_masking", "mask_ratio", "mask_block_size", "mask_space",
    "student_augmentation", "use_concepts", "student_concepts", "concept_guard", "concept_reduce", "include_class_names",
    "pseudo_threshold", "confident_pixels_only", "ema_alpha", "teacher_text_ema", "teacher_dtype", "lora_rank", "lora_alpha", "lora_layers",
    "lora_use_rslora", "learning_rate", "lora_lr_multiplier", "lr_scheduler_type", "warmup_steps",
    "warmup_start_factor", "weight_decay", "max_grad_norm", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_steps", "seed", "data_seed",
)

#: What shapes the LoRA weights a checkpoint holds (settings, and `adapter_config.json` keys): never changed on resume.
LORA_LAYOUT = frozenset({
    "lora_rank", "lora_alpha", "lora_layers", "lora_use_rslora", "r", "target_modules", "use_rslora",
})

#: Settings added to `RUN_SETTINGS` after checkpoints began recording them, with the value every older run had.
SETTINGS_ADDED_LATER = {"student_concepts": False, "concept_guard": False, "teacher_dtype": "float32"}


def run_settings(args: Any) -> dict[str, Any]:
    """The `RUN_SETTINGS` of a `VocAlignArguments`, as JSON values."""
    values = {key: getattr(args, key) for key in RUN_SETTINGS}
    values["lr_scheduler_type"] = str(getattr(values["lr_scheduler_type"], "value", values["lr_scheduler_type"]))
    values["lora_layers"] = list(values["lora_layers"])
    return values


def checkpoint_folders(folder: str | Path) -> list[Path]:
    """The `checkpoint-<step>` folders of a run folder, by step."""
    folder = Path(folder)
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def is_complete(checkpoint: str | Path) -> bool:
    """The checkpoint was written to the end: its completion mark exists, or, for a checkpoint written before the
    mark existed (its `vocalign.json` has no `settings`), the Trainer's state, which it wrote last."""
    folder = Path(checkpoint)
    if (folder / CHECKPOINT_COMPLETE).is_file():
        return True
    try:
        legacy = "settings" not in read_json_object(folder / VOCALIGN_STATE)
    except (OSError, ValueError):
        return False
    return legacy and (folder / "trainer_state.json").is_file()


def last_complete_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder; newer interrupted ones are named in a warning."""
    checkpoints = checkpoint_folders(folder)
    for checkpoint in reversed(checkpoints):
        if is_complete(checkpoint):
            return checkpoint
        logger.warning("%s was interrupted while saving (no %s): passed over", checkpoint, CHECKPOINT_COMPLETE)
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except ValueError as error:
        raise UsageError(f"{error}: resume from another checkpoint") from None


def _check_intact(folder: Path) -> None:
    """Refuse a checkpoint whose weights, optimiser, scheduler or RNG file was cut off, naming the file."""
    damaged = damaged_files(folder)
    if damaged:
        path, problem = damaged[0]
        earlier = [p for p in checkpoint_folders(folder.parent) if p != folder and is_complete(p)]
        other = f" (--resume_from_checkpoint {earlier[-1]})" if earlier else ""
        raise UsageError(f"{path} is damaged ({problem}): resume from another checkpoint{other}, or start a new run")


def _layers_of(target_modules: Any) -> list[int] | None:
    match = re.search(r"layers\\\.\(\?:([\d|]+)\)", str(target_modules))
    return [int(i) for i in match.group(1).split("|")] if match else None


def checkpoint_differences(
    checkpoint: str | Path,
    *,
    class_names: Sequence[str],
    settings: Mapping[str, Any],
    concepts: Mapping[str, Sequence[str]] | None = None,
    expected_lora: Mapping[str, Any] | None = None,
    needs_teacher: bool = False,
) -> tuple[list[str], int]:
    """How `checkpoint` differs from this run, and its step.

    Args:
        class_names / concepts / settings: this run's (settings as [`run_settings`]; `max_steps`
            in it is compared with the checkpoint's step, not with the checkpoint's own `max_steps`).
        expected_lora: `r`, `lora_alpha`, `target_modules` (and optionally `use_rslora`) of this run's LoRA.
        needs_teacher: the method keeps an EMA teacher, whose weights the checkpoint must hold.

    Raises:
        UsageError: the folder lacks a file a checkpoint must hold, or the step is at or past `max_steps`.

    Returns:
        One line per difference (empty: the same run), and the checkpoint's global step.
    """
    diffs, step = _differences(checkpoint, class_names, settings, concepts, expected_lora, needs_teacher)
    return [line for _, line in diffs], step


def _differences(checkpoint, class_names, settings, concepts, expected_lora, needs_teacher):
    """[`checkpoint_differences`], each line with the key it is about."""
    folder = Path(checkpoint)
    required = ["trainer_state.json", "adapter_config.json", VOCALIGN_STATE]
    required += [TEACHER_WEIGHTS] if needs_teacher else []
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise UsageError(
            f"--resume_from_checkpoint {folder} is not a complete VocAlign checkpoint: {', '.join(missing)} missing"
        )
    _check_intact(folder)
    step = int(_read_json(folder / "trainer_state.json").get("global_step", 0))
    max_steps = settings.get("max_steps")
    if max_steps is not None and max_steps > 0 and step >= max_steps:
        raise UsageError(
            f"--resume_from_checkpoint {folder} is at step {step}, and this run stops at max_steps {max_steps}: "
            f"nothing would be trained. Pass --max_steps above {step} to extend that run, or start a new run"
        )
    diffs = []
    saved = _read_json(folder / "adapter_config.json")
    for key, value in (expected_lora or {}).items():
        if key == "target_modules" and saved.get(key) != value:
            have, want = _layers_of(saved.get(key)), _layers_of(value)
            diffs.append((key, f"LoRA layers {have if have is not None else saved.get(key)} (this run: {want})"))
        elif key != "target_modules" and saved.get(key) != value:
            diffs.append((key, f"{key} {saved.get(key)} (this run: {value})"))
    state = _read_json(folder / VOCALIGN_STATE)
    if list(state.get("class_names", [])) != list(class_names):
        diffs.append(("class_names", f"class list {state.get('class_names')} (this run: {list(class_names)})"))
    if concepts is not None and "concepts" in state and state["concepts"] != {k: list(v) for k, v in concepts.items()}:
        diffs.append(("concepts", "concepts (the checkpoint's vocalign.json lists other concepts than this run's)"))
    recorded = state.get("settings", state)  # checkpoints written before `settings` kept a few keys at the top
    if "settings" in state:  # a setting added since the checkpoint was written: it ran with the old behaviour
        recorded = {**SETTINGS_ADDED_LATER, **recorded}
    for key, value in settings.items():
        if key != "max_steps" and key in recorded and _normal(recorded[key]) != _normal(value):
            diffs.append((key, f"{key} {recorded[key]!r} (this run: {value!r})"))
    return diffs, step


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_same_base(checkpoint: str | Path, base_model: Mapping[str, Any] | None) -> None:
    """Refuse a checkpoint trained on other base weights than `base_model` ([`base_model_fingerprint`]'s record);
    a checkpoint or base without a hash (written before it was recorded, built in memory) is not compared."""
    trained = _read_json(Path(checkpoint) / VOCALIGN_STATE).get("base_model") or {}
    if not base_model or not trained.get("sha256") or not base_model.get("sha256"):
        return
    if trained["sha256"] != base_model["sha256"]:
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint} was trained on the base model {trained.get('name')} (sha256 "
            f"{trained['sha256'][:12]}); --base_model {base_model.get('name')} has other weights (sha256 "
            f"{base_model['sha256'][:12]}): resume on the checkpoint's base model, or start a new run"
        )


def check_same_run(
    checkpoint: str | Path, *, allow_other_settings: bool = False, **expected: Any
) -> tuple[list[str], int]:
    """[`checkpoint_differences`] (`expected`: its keyword arguments, and `base_model`: this run's
    [`~vocalign_hf.adaptation.adapters.base_model_fingerprint`]), refused unless `allow_other_settings`, which
    only warns; another LoRA layout or other base weights are refused whatever the flag. Used by the recipes before
    any model loads and by `VocAlignTrainer.train`.

    Raises:
        UsageError: the checkpoint is incomplete, at `max_steps`, of another base model or LoRA layout, or of
            another run (each difference named).

    Returns:
        The differences (empty: the same run) and the checkpoint's step.
    """
    keyed, step = _differences(
        checkpoint, expected["class_names"], expected["settings"], expected.get("concepts"),
        expected.get("expected_lora"), expected.get("needs_teacher", False),
    )
    _check_same_base(checkpoint, expected.get("base_model"))
    layout = [line for key, line in keyed if key in LORA_LAYOUT]
    if layout:
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint} has another LoRA layout ({'; '.join(dict.fromkeys(layout))}), "
            "which a resume cannot change: resume with the checkpoint's LoRA settings, or start a new run"
        )
    diffs = [line for _, line in keyed]
    if diffs and not allow_other_settings:
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint} was trained with {'; '.join(diffs)}: resume with that run's "
            "settings (--lora_layers, --lora_rank, --lora_alpha, class list, ...), start a new run, or pass "
            "--resume_with_other_settings true to continue it anyway (the adapter's record then lists the differences)"
        )
    if diffs:
        logger.warning("resuming %s with other settings: %s", checkpoint, "; ".join(diffs))
    return diffs, step

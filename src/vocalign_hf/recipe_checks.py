"""Checks the recipes run before any model is loaded or any evaluation starts, and the writes that must never
destroy a previous run.

Everything here fails with a `SystemExit` whose message names the problem, the offending value or file, and what
to pass instead: the recipes are command-line programs, and a user should read one line, not a traceback.

* the output folder: a previous run is kept unless `--overwrite_output_dir` or `--resume_from_checkpoint` says
  otherwise (:func:`check_output_dir`), and the adapter folder is replaced as a whole (:func:`vocalign_hf.atomic.atomic_write_folder`, in :func:`save_adapter`);
* the base model: a local folder with a `config.json`, an adapter folder given by mistake, or a Hub id tried once
  and honouring `HF_HUB_OFFLINE` (:func:`resolve_base_model`);
* the LoRA layers exist in the model's CLIP towers (:func:`check_lora_layers`);
* a resume checkpoint exists and matches this run's LoRA layout and class list (:func:`check_resume_checkpoint`);
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "RUN_ARTIFACTS",
    "check_lora_layers",
    "check_output_dir",
    "check_resume_checkpoint",
    "find_run_artifacts",
    "resolve_adapter",
    "resolve_base_model",
    "resolve_resume_checkpoint",
]

#: What a finished or interrupted run leaves in its output folder (besides `checkpoint-*` folders).
RUN_ARTIFACTS: tuple[str, ...] = ("results.json", "adapter", "overlays.png")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ------------------------------------------------------------------------------------------------- output folder
def _checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def find_run_artifacts(output_dir: str | os.PathLike) -> list[str]:
    """Names of a previous run's outputs in `output_dir` (results, adapter, overlays, `checkpoint-*`), in order.

    The world's cached source model (`source_model/`) is not a run output: runs share and reuse it.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [name for name in RUN_ARTIFACTS if (folder / name).exists()]
    return found + [p.name for p in _checkpoints(folder)]


def check_output_dir(output_dir: str | os.PathLike, *, overwrite: bool, resuming: bool) -> None:
    """Refuse to write into a folder that holds a previous run, unless told to replace it or to resume it.

    With `overwrite`, the previous run's `checkpoint-*` folders are deleted first, so that checkpoint rotation and
    "resume from the last checkpoint" never mix two runs; its adapter, results and overlays are replaced when the
    new run writes its own.

    Raises:
        SystemExit: `output_dir` holds a previous run and neither `overwrite` nor `resuming` is set.
    """
    folder = Path(output_dir)
    found = find_run_artifacts(folder)
    if not found or resuming:
        return
    if not overwrite:
        checkpoints = [name for name in found if name.startswith("checkpoint-")]
        resume = f", --resume_from_checkpoint {folder / checkpoints[-1]} to continue it" if checkpoints else ""
        raise SystemExit(
            f"{folder} already holds a run ({', '.join(found)}); nothing was changed. Pass --output_dir <a new "
            f"folder> to keep it{resume}, or --overwrite_output_dir true to replace it."
        )
    for checkpoint in _checkpoints(folder):
        logger.warning("--overwrite_output_dir: deleting the previous run's %s", checkpoint)
        shutil.rmtree(checkpoint)


# --------------------------------------------------------------------------------------------------- base model
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _folder_hint(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f" (its parent {parent} does not exist either)"
    close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir() if p.is_dir()], n=3)
    return f" (similar folders in {parent}: {', '.join(close)})" if close else ""


def _check_model_folder(folder: Path, flag: str) -> None:
    if (folder / "config.json").is_file():
        return
    if (folder / "adapter_config.json").is_file():
        raise SystemExit(
            f"{flag} {folder} is a LoRA adapter folder, not a base model: pass it as --adapter {folder} and the "
            f"CAT-Seg it was trained on as {flag} (its adapter_config.json names it)"
        )
    raise SystemExit(
        f"{flag} {folder} has no config.json: give a folder written by save_pretrained / convert-catseg-checkpoint"
    )


def _check_adapter_folder(folder: Path, flag: str) -> None:
    if (folder / "adapter_config.json").is_file():
        return
    hint = " (it is a base model folder: pass it as --base_model)" if (folder / "config.json").is_file() else ""
    raise SystemExit(f"{flag} {folder} has no adapter_config.json: give an adapter folder written by adapt.py{hint}")


def resolve_base_model(name: str, flag: str = "--base_model") -> str:
    """Check `name` as a local model folder or a Hub repo id before anything is loaded, and return it.

    A name that exists locally must be a model folder (with `config.json`; an adapter folder is pointed at
    `--adapter`). A name that does not exist and cannot be a Hub id (`org/name`), or that starts like a path
    (`./`, `/`, `~`) or whose first part is an existing local folder, is reported as a missing folder at once. Any
    other name is looked up once on the Hub (or only in the cache when `HF_HUB_OFFLINE` is set), and the message
    says what was tried.

    Raises:
        SystemExit: the folder or repo cannot be used.
    """
    return _resolve(name, flag, _check_model_folder, "config.json")


def resolve_adapter(name: str, flag: str = "--adapter") -> str:
    """As :func:`resolve_base_model`, for a VocAlign adapter (a folder with `adapter_config.json`, or a Hub id)."""
    return _resolve(name, flag, _check_adapter_folder, "adapter_config.json")


def _resolve(name: str, flag: str, check_folder: Callable[[Path, str], None], hub_file: str) -> str:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SystemExit(f"{flag} {name} is a file; give a folder (save_pretrained output) or a Hub id")
        check_folder(path, flag)
        return name
    path_like = name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name
    first = name.split("/", 1)[0]
    if path_like or not _REPO_ID.match(name) or Path(first).is_dir():
        raise SystemExit(f"{flag}: folder not found: {name} (resolved to {path.resolve()}){_folder_hint(path)}")
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, hub_file), str):
        return name
    if constants.HF_HUB_OFFLINE:
        raise SystemExit(
            f"{flag} {name}: no local folder {path.resolve()}, and HF_HUB_OFFLINE is set and the Hub cache has no "
            "copy of this repo; download it once with network, or give a local folder"
        )
    try:
        hf_hub_download(name, hub_file)
    except Exception as exc:  # any Hub failure: say what was tried, once, instead of retrying every file
        raise SystemExit(
            f"{flag} {name}: no local folder {path.resolve()}, and the Hub repo {name!r} could not be read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Check the path, or set HF_HUB_OFFLINE=1 "
            "to use the Hub cache only"
        ) from None
    return name


# ------------------------------------------------------------------------------------------------- LoRA layers
def _clip_layer_counts(config: Any) -> dict[str, int]:
    clip = config.clip_config
    return {"text": clip.text_config.num_hidden_layers, "vision": clip.vision_config.num_hidden_layers}


def check_lora_layers(layers: Sequence[int], config: Any) -> None:
    """Every LoRA layer index must exist in both CLIP towers of the model whose `CATSegConfig` is `config`.

    Raises:
        SystemExit: an index is negative, repeated or beyond the smaller tower (the message gives the counts).
    """
    counts = _clip_layer_counts(config)
    top = min(counts.values())
    layers = list(layers)
    repeated = sorted({i for i in layers if layers.count(i) > 1})
    bad = [i for i in layers if not 0 <= i < top]
    if not layers or bad or repeated:
        problem = (
            "is empty" if not layers else f"repeats {repeated}" if repeated and not bad
            else f"names {bad}, which the model does not have"
        )
        raise SystemExit(
            f"--lora_layers {' '.join(map(str, layers))} {problem}: LoRA goes into both CLIP towers, and this "
            f"model's text tower has {counts['text']} layers and its image tower {counts['vision']} (valid indices "
            f"0-{top - 1})"
        )


# ------------------------------------------------------------------------------------------ resume checkpoints
def resolve_resume_checkpoint(value: str | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder `--resume_from_checkpoint` names: a path, or `true` / `last` for the newest
    `checkpoint-*` in `output_dir`.

    Raises:
        SystemExit: the folder does not exist, or `true` finds no checkpoint.
    """
    if value is None or str(value).lower() in ("", "false", "none", "null"):
        return None
    if str(value).lower() in ("true", "last"):
        checkpoints = _checkpoints(Path(output_dir))
        if not checkpoints:
            raise SystemExit(f"--resume_from_checkpoint {value}: no checkpoint-* folder in {output_dir}")
        return str(checkpoints[-1])
    folder = Path(value).expanduser()
    if not folder.is_dir():
        found = [p.name for p in _checkpoints(folder.parent)]
        known = f"; {folder.parent} holds {', '.join(found)}" if found else ""
        raise SystemExit(f"--resume_from_checkpoint {value}: folder not found{known}")
    return str(folder)


def _layers_of(target_modules: Any) -> list[int] | None:
    match = re.search(r"layers\\\.\(\?:([\d|]+)\)", str(target_modules))
    return [int(i) for i in match.group(1).split("|")] if match else None


def check_resume_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    expected_lora: Mapping[str, Any],
    class_names: Sequence[str],
    needs_teacher: bool,
    teacher_file: str = "teacher_lora.safetensors",
    state_file: str = "vocalign.json",
) -> None:
    """A `checkpoint-*` folder must hold a complete Trainer checkpoint whose LoRA layout (`adapter_config.json`)
    and class list (`vocalign.json`) are this run's.

    Args:
        checkpoint: the folder.
        expected_lora: `r`, `lora_alpha`, `target_modules` (and optionally `use_rslora`) of this run's LoRA.
        class_names: this run's classes, in order.
        needs_teacher: the method keeps an EMA teacher, whose weights the checkpoint must hold.

    Raises:
        SystemExit: naming the missing file or each setting that differs.
    """
    folder = Path(checkpoint)
    required = ["trainer_state.json", "adapter_config.json", state_file] + ([teacher_file] if needs_teacher else [])
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise SystemExit(
            f"--resume_from_checkpoint {folder} is not a complete VocAlign checkpoint: {', '.join(missing)} missing"
        )
    saved = json.loads((folder / "adapter_config.json").read_text())
    diffs = []
    for key, value in expected_lora.items():
        if key == "target_modules":
            have, want = _layers_of(saved.get(key)), _layers_of(value)
            if saved.get(key) != value:
                diffs.append(f"LoRA layers {have if have is not None else saved.get(key)} (this run: {want})")
        elif saved.get(key) != value:
            diffs.append(f"{key} {saved.get(key)} (this run: {value})")
    state = json.loads((folder / state_file).read_text())
    if list(state.get("class_names", [])) != list(class_names):
        diffs.append(f"class list {state.get('class_names')} (this run: {list(class_names)})")
    if diffs:
        raise SystemExit(
            f"--resume_from_checkpoint {folder} was trained with {'; '.join(diffs)}: resume with that run's "
            "settings (--lora_layers, --lora_rank, --lora_alpha, class list), or start a new run"
        )

"""Checks the recipes run before any model is loaded or any evaluation starts, and the writes that must never
destroy a previous run.

Everything here fails with a [`~vocalign_hf.errors.UsageError`] whose message names the problem, the offending value
or file, and what to pass instead: the recipes show it as one line, not a traceback.

* the output folder: a previous run is kept unless `--overwrite_output_dir` or `--resume_from_checkpoint` says
  otherwise, and a non-empty folder without the run's own record (`RUN_MARK`, written by the run at its start) is
  refused whatever the flags (:func:`check_output_dir`); an overwritten run is only set aside until the new one has
  finished (:func:`set_aside_previous_run`, :func:`finish_replacing`), and a resumed run keeps what an interrupted
  overwrite set aside; the disk must hold the checkpoints the run will write (:func:`check_free_space`);
* the base model and the adapter: a local folder with a `config.json`, an adapter folder given by mistake, or a Hub
  id tried once and honouring `HF_HUB_OFFLINE` (:func:`resolve_base_model`, defined in `model_sources`);
* the LoRA layers exist in the model's CLIP towers (:func:`check_lora_layers`);
* a resume checkpoint is complete, before `max_steps`, and matches this run's LoRA layout, class list, concepts and
  settings (:func:`check_resume_checkpoint`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .adaptation.checkpoints import (
    check_same_run,
    checkpoint_folders,
    is_complete,
    last_complete_checkpoint,
)
from .atomic import read_json_object
from .errors import UsageError
from .model_sources import resolve_adapter, resolve_base_model  # noqa: F401 (part of the recipes' checks)
from .output_lock import LOCK_FILE

logger = logging.getLogger(__name__)

__all__ = [
    "PREVIOUS_RUN",
    "RUN_ARTIFACTS",
    "RUN_MARK",
    "check_free_space",
    "check_lora_layers",
    "check_output_dir",
    "check_output_path",
    "is_run_folder",
    "run_mark",
    "check_resume_checkpoint",
    "finish_replacing",
    "set_aside_previous_run",
    "find_run_artifacts",
    "resolve_adapter",
    "resolve_base_model",
    "resolve_resume_checkpoint",
]

#: Written by the recipe into its output folder once every input is checked, before any other output of the run:
#: the one record that the folder holds a vocalign run. Without it nothing in a folder is replaced.
RUN_MARK = "vocalign_run.json"
#: What a finished or interrupted run leaves in its output folder (besides `checkpoint-*` folders).
RUN_ARTIFACTS: tuple[str, ...] = (RUN_MARK, "results.json", "adapter", "overlays.png")
#: Where `--overwrite_output_dir` keeps the previous run until the new one has written its results.
PREVIOUS_RUN = ".previous-run"
#: `written_by` of a run's mark.
MARK_WRITER = "vocalign_hf recipes/adapt.py"
#: Shared between runs, never a run output: the world's cached source model, TensorBoard's logs; and the lock.
_SHARED = ("source_model", "runs", LOCK_FILE)


# ------------------------------------------------------------------------------------------------- output folder
def find_run_artifacts(output_dir: str | os.PathLike) -> list[str]:
    """Names of a previous run's outputs in `output_dir` (its mark, results, adapter, overlays, `checkpoint-*`).

    The world's cached source model (`source_model/`) is not a run output: runs share and reuse it. A name alone
    does not make a folder a run's: see [`is_run_folder`].
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [name for name in RUN_ARTIFACTS if (folder / name).exists()]
    return found + [p.name for p in checkpoint_folders(folder)]


def run_mark(status: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The content of a run's `RUN_MARK`: written by the run at its start, before anything else of it."""
    return {"written_by": MARK_WRITER, "status": status, **settings}


def is_run_folder(output_dir: str | os.PathLike) -> bool:
    """`output_dir` holds this tool's record that a run of it wrote there (a readable `RUN_MARK` with a status;
    marks of runs before `written_by` existed have the status alone)."""
    try:
        return "status" in read_json_object(Path(output_dir) / RUN_MARK)
    except (OSError, ValueError):
        return False


def _not_ours(folder: Path, found: Sequence[str]) -> UsageError:
    return UsageError(
        f"--output_dir {folder} holds {', '.join(found[:5])}{' ...' if len(found) > 5 else ''} but no {RUN_MARK}, "
        "so no vocalign run wrote them; nothing was changed, and no flag replaces or resumes them. Give a new or "
        "empty folder, or move those files away yourself"
    )


def check_output_dir(output_dir: str | os.PathLike, *, overwrite: bool, resuming: bool) -> None:
    """Refuse to write into a folder that holds a previous run, unless told to replace it or to resume it, and
    into a non-empty folder that this tool's own record (`RUN_MARK`) does not claim, whatever the flags. Changes
    nothing: a replaced run is only set aside, later, by [`set_aside_previous_run`], once every input has been
    checked. Call it holding the folder's lock ([`~vocalign_hf.output_lock.lock_output_dir`]).

    Raises:
        UsageError: `output_dir` is a file; holds a previous run and neither `overwrite` nor `resuming` is set; holds
            a run set aside by an interrupted overwrite and is not resumed; or holds files that no run of this tool
            wrote (whatever the flags).
    """
    folder = check_output_path(output_dir)
    aside = folder / PREVIOUS_RUN
    if aside.exists() and not resuming:
        resume = (" Pass --resume_from_checkpoint true to finish the interrupted run: that keeps it (delete it "
                  "yourself afterwards);" if checkpoint_folders(folder) else "")
        raise UsageError(
            f"{aside} holds the run that an interrupted --overwrite_output_dir set aside; nothing was changed.{resume} "
            "Move it back or delete it yourself, or pass --output_dir <a new folder>"
        )
    found = find_run_artifacts(folder)
    if found and not is_run_folder(folder):
        raise _not_ours(folder, found)
    if not found:
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in _SHARED) if folder.is_dir() else []
        if foreign:
            raise UsageError(
                f"--output_dir {folder} is not empty and holds no vocalign run ({', '.join(foreign[:5])}"
                f"{' ...' if len(foreign) > 5 else ''}); nothing was changed. Give a new or empty folder"
            )
        return
    if resuming or overwrite:
        return
    checkpoints = [name for name in found if name.startswith("checkpoint-")]
    resume = f", --resume_from_checkpoint {folder / checkpoints[-1]} to continue it" if checkpoints else ""
    raise UsageError(
        f"{folder} already holds a run ({', '.join(found)}); nothing was changed. Pass --output_dir <a new "
        f"folder> to keep it{resume}, or --overwrite_output_dir true to replace it."
    )


def check_output_path(output_dir: str | os.PathLike) -> Path:
    """`output_dir` is a folder, or can be made one, by this user; returns it. Reads its contents not at all.

    Raises:
        UsageError: it is a file, lies under a file, or its nearest existing folder is not writable.
    """
    folder = Path(output_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--output_dir {folder} is a file; give a folder (new, or a previous run's)")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--output_dir {folder} cannot be created: {existing} is a file; give another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {folder}: {existing} is not writable by this user; give another folder")
    return folder


def set_aside_previous_run(output_dir: str | os.PathLike) -> Path | None:
    """Move a previous run's outputs into `<output_dir>/.previous-run` (renames: nothing is copied or deleted), so
    that the new run's checkpoints never mix with the old ones. [`finish_replacing`] deletes them once the new run
    has written its results, or puts them back if it failed before writing a checkpoint of its own. Other files in
    the folder stay where they are.

    Raises:
        UsageError: the outputs are not a run's of this tool (no `RUN_MARK`): nothing is moved.
    """
    folder = Path(output_dir)
    found = find_run_artifacts(folder)
    if not found:
        return None
    if not is_run_folder(folder):
        raise _not_ours(folder, found)
    aside = folder / PREVIOUS_RUN
    aside.mkdir()
    for name in found:
        os.replace(folder / name, aside / name)
    logger.warning("--overwrite_output_dir: the previous run (%s) is kept in %s until this one has finished",
                   ", ".join(found), aside)
    return aside


def finish_replacing(output_dir: str | os.PathLike, *, succeeded: bool) -> None:
    """End an overwrite: delete the set-aside run once the new one succeeded; after a failure put it back, unless
    the new run already wrote checkpoints (then both stay, and the warning says where)."""
    folder = Path(output_dir)
    aside = folder / PREVIOUS_RUN
    if not aside.is_dir():
        return
    if succeeded:
        shutil.rmtree(aside)
        return
    if checkpoint_folders(folder):
        logger.warning("this run failed after writing checkpoints; the run it was replacing is still in %s", aside)
        return
    for entry in sorted(aside.iterdir()):
        target = folder / entry.name
        if target.is_dir():  # the failed run's own partial output of the same name
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(entry, target)
    aside.rmdir()
    logger.warning("this run failed: the previous run in %s was put back as it was", folder)


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse to start when the file system of `folder` has less than `needed` bytes free.

    Raises:
        UsageError: naming the free and the needed space.
    """
    probe = Path(folder).expanduser().resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UsageError(
            f"{probe} has {free / 2**20:.1f} MiB free, and {what} need about {needed / 2**20:.1f} MiB: free some "
            "space, pass --output_dir on another disk, or keep fewer checkpoints (--save_total_limit, --save_steps)"
        )


# ------------------------------------------------------------------------------------------------- LoRA layers
def _clip_layer_counts(config: Any) -> dict[str, int]:
    clip = config.clip_config
    return {"text": clip.text_config.num_hidden_layers, "vision": clip.vision_config.num_hidden_layers}


def check_lora_layers(layers: Sequence[int], config: Any) -> None:
    """Every LoRA layer index must exist in both CLIP towers of the model whose `CATSegConfig` is `config`.

    Raises:
        UsageError: an index is negative, repeated or beyond the smaller tower (the message gives the counts).
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
        raise UsageError(
            f"--lora_layers {' '.join(map(str, layers))} {problem}: LoRA goes into both CLIP towers, and this "
            f"model's text tower has {counts['text']} layers and its image tower {counts['vision']} (valid indices "
            f"0-{top - 1})"
        )


# ------------------------------------------------------------------------------------------ resume checkpoints
def resolve_resume_checkpoint(value: str | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder `--resume_from_checkpoint` names: a path, or `true` / `last` for the newest complete
    `checkpoint-*` in `output_dir` (an interrupted save is passed over, with a warning).

    Raises:
        UsageError: the folder does not exist or was interrupted while saving, or `true` finds no checkpoint.
    """
    if value is None or str(value).lower() in ("", "false", "none", "null"):
        return None
    if str(value).lower() in ("true", "last"):
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise UsageError(f"--resume_from_checkpoint {value}: no complete checkpoint-* folder in {output_dir}")
        return str(checkpoint)
    folder = Path(value).expanduser()
    if not folder.is_dir():
        found = [p.name for p in checkpoint_folders(folder.parent)]
        known = f"; {folder.parent} holds {', '.join(found)}" if found else ""
        raise UsageError(f"--resume_from_checkpoint {value}: folder not found{known}")
    if not is_complete(folder):
        last = last_complete_checkpoint(folder.parent)
        hint = f"; {last} is the last complete one" if last else ""
        raise UsageError(f"--resume_from_checkpoint {value} was interrupted while saving (it has no "
                         f"checkpoint_complete.json){hint}")
    return str(folder)


def check_resume_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    expected_lora: Mapping[str, Any],
    class_names: Sequence[str],
    needs_teacher: bool,
    settings: Mapping[str, Any] | None = None,
    concepts: Mapping[str, Sequence[str]] | None = None,
    allow_other_settings: bool = False,
    base_model: Mapping[str, Any] | None = None,
) -> None:
    """A `checkpoint-*` folder must hold a complete checkpoint of this run: its base model's weights (`base_model`:
    [`~vocalign_hf.adaptation.adapters.base_model_fingerprint`]), LoRA layout, class list, concepts and settings,
    at a step before `max_steps` ([`~vocalign_hf.adaptation.checkpoints.check_same_run`]).

    Raises:
        UsageError: naming the missing file, the step, or each setting that differs.
    """
    check_same_run(
        Path(checkpoint), class_names=class_names, settings=settings or {}, concepts=concepts,
        expected_lora=expected_lora, needs_teacher=needs_teacher, allow_other_settings=allow_other_settings,
        base_model=base_model,
    )

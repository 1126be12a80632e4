"""Adapted LoRA weights as standard peft adapters: save (with class list, concepts, the base model's Hub id and
commit, and a model card), load onto a CAT-Seg base, and push to the Hub."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import (
    CommitOperationAdd,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    hf_hub_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from peft import PeftModel

from ..atomic import atomic_write_json, atomic_write_text, read_json_object
from ..file_checks import damaged_files
from ..outputs import write_output_folder
from ..data.hub import hub_dataset_id
from ..models.catseg import CATSegForSemanticSegmentation, CATSegProcessor

logger = logging.getLogger(__name__)

VOCALIGN_FILE = "vocalign.json"
CARD_FILE = "README.md"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_hub_repo_id(name_or_path: str | os.PathLike | None) -> bool:
    """True for an `org/name` string that is not an existing local path."""
    return bool(name_or_path) and not Path(name_or_path).exists() and bool(_REPO_ID.fullmatch(str(name_or_path)))


def base_model_reference(name_or_path: str | None, revision: str | None = None) -> tuple[str | None, str | None]:
    """The Hub repo id and commit sha of a base model loaded from `name_or_path` (at `revision`).

    The commit is read from the local Hub cache (the snapshot that `from_pretrained` just used), so it costs no
    request and works offline. A local folder gives `(None, None)`; an uncached repo gives `(repo_id, None)`.
    """
    if not is_hub_repo_id(name_or_path):
        return None, None
    repo_id = str(name_or_path)
    if revision and _COMMIT.fullmatch(revision):
        return repo_id, revision
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision or "main")
    commit = Path(cached).parent.name if isinstance(cached, str) else None
    return repo_id, commit if commit and _COMMIT.fullmatch(commit) else None


_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def _weights_folder(name_or_path: str | os.PathLike | None, revision: str | None = None) -> Path | None:
    """The local folder that holds a base model's weights: its own folder, or the Hub cache's snapshot of it (of
    `revision`, default the main branch's)."""
    if not name_or_path:
        return None
    if Path(name_or_path).expanduser().is_dir():
        return Path(name_or_path).expanduser()
    if not is_hub_repo_id(name_or_path):
        return None
    cached = try_to_load_from_cache(str(name_or_path), "config.json", revision=revision)
    return Path(cached).parent if isinstance(cached, str) else None


def base_model_fingerprint(name_or_path: str | os.PathLike | None, revision: str | None = None) -> dict[str, Any]:
    """A base model's name and the sha256 of its weights (its `*.safetensors`, else `pytorch_model*.bin`, in name
    order; None when its files are not on this machine): what makes two runs' base models the same."""
    folder = _weights_folder(name_or_path, revision)
    files = sorted({p for pattern in _WEIGHT_FILES for p in folder.glob(pattern)}) if folder else []
    files = [p for p in files if p.suffix == ".safetensors"] or files
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return {"name": str(name_or_path) if name_or_path else None, "sha256": _files_sha256(key) if files else None}


@functools.lru_cache(maxsize=8)
def _files_sha256(files: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the files' bytes (one file: that file's own sha256); cached by path, size and modification time,
    so each base model is read once per process."""
    digest = hashlib.sha256()
    for path, _, _ in files:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def other_base_note(
    info: Mapping[str, Any], base_name_or_path: str | os.PathLike | None, revision: str | None = None
) -> str | None:
    """A line saying that an adapter (its `vocalign.json` content) was trained on a base model whose weights differ
    from those of `base_name_or_path` (at `revision` for a Hub id); None when they are the same or cannot be
    compared."""
    trained = info.get("base_model_sha256")
    loaded = base_model_fingerprint(base_name_or_path, revision)["sha256"]
    if not trained or not loaded or trained == loaded:
        return None
    return (f"the adapter was trained on {info.get('base_model')} (sha256 {trained[:12]}); {base_name_or_path} has "
            f"other weights (sha256 {loaded[:12]}): its scores may differ from the adapter's model card. Load it onto "
            "the base it was trained on")


def _metric_value(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _card_metadata(
    metrics: Mapping[str, Any], hub_base: str | None, dataset: str | None, dataset_id: str | None, model_name: str
) -> ModelCardData:
    """The card's YAML metadata: base model, tags, dataset, and the measured metrics as a `model-index`."""
    eval_results = [
        EvalResult(
            task_type="image-segmentation", task_name="Semantic segmentation (target domain)",
            dataset_type=dataset_id or (dataset or "target"), dataset_name=dataset or "target domain",
            metric_type="mean_iou", metric_name=key, metric_value=round(value, 2),
        )
        for key, raw in metrics.items()
        if (value := _metric_value(raw)) is not None
    ]
    return ModelCardData(
        library_name="peft",
        base_model=hub_base,
        pipeline_tag="image-segmentation",
        tags=["vocalign", "catseg", "open-vocabulary-segmentation", "source-free-domain-adaptation", "lora"],
        datasets=[dataset_id] if dataset_id else None,
        model_name=model_name,
        eval_results=eval_results or None,
    )


def _vocabulary_note(settings: Mapping[str, Any] | None) -> str:
    """The card's note on how an adapter trained with `student_concepts` scores classes ("" for the others)."""
    return (
        "\nThis adapter was trained to score each class with its name **and** its concepts (`student_concepts`), "
        "and the model loaded below does so when given only the class names (VocAlign's Eq. 7: a softmax over "
        "every entry of the table, summed per class; the concepts are kept in the model's config, also by "
        "`vocalign-merge`). `load_adapted_model(..., concepts={})` or `processor(..., concepts={})` scores the class "
        "names alone.\n" if (settings or {}).get("student_concepts") else "")


def _base_model_text(base_model: str, hub_base: str | None, base_model_revision: str | None) -> str:
    """The card's description of the base model: a Hub link (and commit), or how to publish a local folder."""
    if hub_base:
        return f"[`{hub_base}`](https://huggingface.co/{hub_base})" + (
            f" at commit `{base_model_revision}`" if base_model_revision else "")
    return (f"the local folder `{base_model}` (not on the Hub: publish it, e.g. with "
            "`convert-catseg-checkpoint ... --push-to-hub`, and pass its repo id as `--base_model`)")


def _card_content(
    card_yaml: str, *, base_model: str, base_text: str, target_data: str, where: str, revision_arg: str,
    concept_rows: str, vocabulary_note: str, metric_rows: str, settings_text: str,
) -> str:
    """The card's text: the YAML metadata, then the usage, class, metric and settings sections."""
    return f"""---
{card_yaml}
---

# VocAlign LoRA adapter for `{base_model}`

A LoRA adapter made with [vocalign-hf](https://pypi.org/project/vocalign-hf/): source-free adaptation of the
open-vocabulary segmenter CAT-Seg to an unlabeled target domain (VocAlign, BMVC 2025).

Base model: {base_text}. Target data: {target_data}.

## Use

```python
from vocalign_hf.adaptation import load_adapted_model
model, info = load_adapted_model("{base_model}", "{where}")   # info: class names, concepts, settings
```

or with plain peft (the base model's code comes with it: `trust_remote_code=True` loads it without vocalign-hf):

```python
from peft import PeftModel
from transformers import AutoModelForSemanticSegmentation
base = AutoModelForSemanticSegmentation.from_pretrained("{base_model}"{revision_arg}, trust_remote_code=True)
model = PeftModel.from_pretrained(base, "{where}")
```

## Target classes and concepts

| class | concepts (teacher vocabulary during adaptation) |
|---|---|
{concept_rows}
{vocabulary_note}
## Measured mIoU

| metric | value |
|---|---|
{metric_rows}

## Adaptation settings

```json
{settings_text}
```
"""


def build_model_card(
    base_model: str,
    class_names: Sequence[str],
    concepts: Mapping[str, Sequence[str]] | None = None,
    metrics: Mapping[str, float] | None = None,
    dataset: str | None = None,
    settings: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    base_model_revision: str | None = None,
) -> ModelCard:
    """The adapter's model card: base model (as a Hub id in the metadata), target classes and concepts, the
    measured mIoU as a `model-index`, the adaptation settings, and a usage snippet for `repo_id` (the Hub repo the
    card is pushed to; the local folder before that).

    Args:
        base_model: Hub repo id or local folder of the CAT-Seg base model. Only a Hub id goes into `base_model:`.
        metrics: name -> value (percent), e.g. `{"target mIoU (adapted)": 68.4, "target mIoU (zero-shot)": 48.5}`.
        dataset: the target dataset's name or Hub repo id; known names map to their Hub repo (`datasets:`).
        base_model_revision: the base model's commit the adapter was trained on.
    """
    metrics = dict(metrics or {})
    hub_base = str(base_model) if is_hub_repo_id(base_model) else None
    dataset_id = hub_dataset_id(dataset)
    card_data = _card_metadata(metrics, hub_base, dataset, dataset_id, repo_id or "vocalign-adapter")
    rows = "\n".join(f"| {k} | {v:.2f} |" for k, v in metrics.items() if _metric_value(v) is not None)
    return ModelCard(_card_content(
        card_data.to_yaml(),
        base_model=base_model,
        base_text=_base_model_text(base_model, hub_base, base_model_revision),
        target_data=f"`{dataset_id}`" if dataset_id else f"`{dataset or 'unknown'}`",
        where=repo_id or "<folder of this adapter>",
        revision_arg=f', revision="{base_model_revision}"' if base_model_revision else "",
        concept_rows="\n".join(f"| {c} | {', '.join((concepts or {}).get(c, [])) or '-'} |" for c in class_names),
        vocabulary_note=_vocabulary_note(settings),
        metric_rows=rows or "| (not measured) | - |",
        settings_text=json.dumps(dict(settings or {}), indent=2, default=str),
    ))


def save_adapter(
    model: PeftModel,
    output_dir: str | os.PathLike,
    class_names: Sequence[str],
    concepts: Mapping[str, Sequence[str]] | None = None,
    metrics: Mapping[str, float] | None = None,
    settings: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Save the LoRA adapter (peft format: `adapter_config.json` + `adapter_model.safetensors`), `vocalign.json`
    (class list, concepts, settings, metrics, the base model's Hub id and commit) and a model card `README.md`.

    When the base model came from the Hub, its commit goes into peft's `revision` field too, so
    `AutoPeftModel`-style loading picks the same base weights. The folder is written whole and renamed into place,
    so readers never see new weights beside an old class list. An existing `output_dir` is replaced only if it is
    empty or an adapter written here before; any other folder, or the base model's own, is refused
    ([`~vocalign_hf.outputs.write_output_folder`]).

    `state_dict`: the model's LoRA weights, whole, when the model is FSDP-sharded (gathered by every rank; this
    function then runs on the main process alone).
    """
    peft_config = model.peft_config[model.active_adapter]
    base_model = peft_config.base_model_name_or_path or "catseg"
    repo_id, commit = base_model_reference(base_model, peft_config.revision)
    if commit is not None:
        peft_config.revision = commit
    info = {
        "written_as": "adapter",
        "base_model": base_model,
        "base_model_repo_id": repo_id,
        "base_model_revision": commit,
        "base_model_sha256": base_model_fingerprint(base_model)["sha256"],
        "dataset": dataset,
        "class_names": list(class_names),
        "concepts": {k: list(v) for k, v in (concepts or {}).items()},
        "metrics": dict(metrics or {}),
        "settings": dict(settings or {}),
    }
    card = build_model_card(base_model, class_names, concepts, metrics, dataset, settings,
                            base_model_revision=commit)

    def write(folder: Path) -> None:
        # The active adapter only: a trainer's model also carries its EMA teacher's adapter.
        extra = {} if state_dict is None else {"state_dict": dict(state_dict)}
        model.save_pretrained(str(folder), selected_adapters=[model.active_adapter], **extra)
        atomic_write_json(folder / VOCALIGN_FILE, info)
        atomic_write_text(folder / CARD_FILE, str(card))

    # Written whole, then renamed into place: a crash never leaves new weights beside an old class list. Only an
    # earlier adapter is replaced, never a folder of the user's or the base model's own.
    return write_output_folder(output_dir, "adapter", write, inputs=[("base model", base_model)])


class AdapterLoadError(OSError):
    """An adapter that could not be fetched from the Hub; the message names the repo, the revision and the cause."""


def _hub_failure(adapter: str, revision: str | None, error: Exception) -> AdapterLoadError:
    chain, cause = [], error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    http = next((e for e in chain if isinstance(e, HfHubHTTPError)), error)
    lines = [line.strip() for line in str(http).splitlines()]
    boilerplate = ("For more", "Please make sure", "If you are trying")  # the client's generic advice
    summary = " ".join(line for line in lines if line and not line.startswith(boilerplate))[:600]
    status = getattr(getattr(http, "response", None), "status_code", None)
    if isinstance(http, RepositoryNotFoundError):
        hint = "Check the repo id, and that your token (HF_TOKEN) can see it if it is private."
    elif status in (401, 403):
        hint = "Check your token (HF_TOKEN or `hf auth login`)."
    elif status is not None and status >= 500:
        hint = "The Hub failed to answer; retry later (files already in the local cache load with HF_HUB_OFFLINE=1)."
    elif constants.HF_HUB_OFFLINE:
        hint = "HF_HUB_OFFLINE is set and the adapter is not in the local cache."
    else:
        hint = ""
    at = f" at revision {revision!r}" if revision else ""
    return AdapterLoadError(
        f"Could not load the VocAlign adapter {adapter!r}{at} from the Hub ({constants.ENDPOINT}): "
        f"{summary} {hint}".strip()
    )


def _read_adapter_info(adapter: str | os.PathLike, revision: str | None, **hub_kwargs: Any) -> dict[str, Any]:
    """`vocalign.json` of a local or Hub adapter ({} if it has none). For a Hub adapter, its `adapter_config.json`
    is fetched first, so that a missing repo, a refused token or a server error is reported here, clearly, rather
    than as peft's generic "Can't find adapter_config.json"."""
    local = Path(adapter) / VOCALIGN_FILE
    if local.is_file():
        return _read_json_file(local)
    if Path(adapter).exists():
        return {}
    try:
        hf_hub_download(str(adapter), "adapter_config.json", revision=revision, **hub_kwargs)
        try:
            path = hf_hub_download(str(adapter), VOCALIGN_FILE, revision=revision, **hub_kwargs)
        except EntryNotFoundError:
            return {}
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise _hub_failure(str(adapter), revision, error) from error
    return _read_json_file(Path(path))


def _read_json_file(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except ValueError as error:
        raise AdapterLoadError(f"{error}; the adapter folder is damaged") from None


def _check_adapter_files(adapter: str | os.PathLike) -> None:
    """Refuse a local adapter folder whose weights were cut off, naming the file."""
    damaged = damaged_files(adapter) if Path(adapter).is_dir() else []
    if damaged:
        path, problem = damaged[0]
        raise AdapterLoadError(f"{path} is damaged ({problem}): save or download the adapter again")


def _warn_if_other_base(
    info: Mapping[str, Any], base: CATSegForSemanticSegmentation, base_revision: str | None
) -> None:
    """Warn when the adapter was trained on another base model (weights, repo id or commit) than the one it is
    loaded onto."""
    note = other_base_note(info, getattr(base.config, "_name_or_path", None), base_revision)
    if note:
        logger.warning("%s", note[0].upper() + note[1:] + ".")
    trained_id, trained_commit = info.get("base_model_repo_id"), info.get("base_model_revision")
    if trained_id is None:
        return
    loaded_id, loaded_commit = base_model_reference(getattr(base.config, "_name_or_path", None), base_revision)
    trained = f"{trained_id}@{trained_commit}" if trained_commit else trained_id
    if loaded_id is None:
        logger.warning(
            "The adapter was trained on %s; it is loaded onto %r, which cannot be checked against it.",
            trained, getattr(base.config, "_name_or_path", None) or "a model built in memory",
        )
    elif loaded_id != trained_id or (trained_commit and loaded_commit and loaded_commit != trained_commit):
        logger.warning(
            "The adapter was trained on %s but is loaded onto %s: results may differ from its model card. Load "
            "the base with revision=%r to get the weights it was trained on.",
            trained, f"{loaded_id}@{loaded_commit}" if loaded_commit else loaded_id, trained_commit,
        )


def load_adapted_model(
    base_model: str | os.PathLike | CATSegForSemanticSegmentation,
    adapter: str | os.PathLike,
    adapter_revision: str | None = None,
    concepts: Mapping[str, Sequence[str]] | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[PeftModel, dict[str, Any]]:
    """Load a VocAlign adapter (a local folder or a Hub repo id) onto a CAT-Seg base model.

    Args:
        base_model: a CAT-Seg model, or its folder / Hub repo id (loaded with `from_pretrained_kwargs`, e.g.
            `revision=` for the base's commit).
        adapter: the adapter's folder or Hub repo id.
        adapter_revision: branch, tag or commit of the adapter repo.
        concepts: the concepts the model scores its classes with (`model.set_concepts`). Default: as the adapter
            was trained, its own concepts for an adapter trained with `student_concepts`, none for the others;
            `{}` scores the class names alone.

    Returns the `PeftModel` (in eval mode) and the adapter's `vocalign.json` content (class names, concepts, the
    base model it was trained on, ...), or an empty dict if the adapter has none. Logs a warning when the base
    model differs (repo id or commit) from the one the adapter was trained on.
    """
    base_revision = from_pretrained_kwargs.get("revision")
    if not isinstance(base_model, CATSegForSemanticSegmentation):
        base_model = CATSegForSemanticSegmentation.from_pretrained(base_model, **from_pretrained_kwargs)
    hub_kwargs = {k: from_pretrained_kwargs[k] for k in ("token", "cache_dir") if k in from_pretrained_kwargs}
    info = _read_adapter_info(adapter, adapter_revision, **hub_kwargs)
    _check_adapter_files(adapter)
    _warn_if_other_base(info, base_model, base_revision)
    try:
        model = PeftModel.from_pretrained(base_model, str(adapter), revision=adapter_revision, **hub_kwargs)
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:  # e.g. the weights' download failed
        raise _hub_failure(str(adapter), adapter_revision, error) from error
    except RuntimeError as error:
        if "size mismatch" not in str(error):
            raise
        # peft's message lists every mismatching tensor; one is enough to say what is wrong.
        found = re.search(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[[\d, ]*\])\) from "
                          r"checkpoint, the shape in current model is torch.Size\((\[[\d, ]*\])\)", str(error))
        detail = f"{found.group(1)}: {found.group(2)} in the adapter, {found.group(3)} here" if found else "size mismatch"
        raise AdapterLoadError(
            f"the adapter {str(adapter)!r} was trained on a CAT-Seg of another size than "
            f"{getattr(base_model.config, '_name_or_path', None) or 'this base model'!r} ({detail}); load it onto "
            f"the base its vocalign.json names ({info.get('base_model', 'unknown')})"
        ) from None
    if concepts is None:
        concepts = adapter_scoring(info, info.get("class_names") or [])[1]
    base_model.set_concepts(concepts, CATSegProcessor.from_config(base_model.config))
    return model.eval(), info


def adapter_scoring(info: Mapping[str, Any], class_names: Sequence[str]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """How an adapter's model scores `class_names`, from its `vocalign.json` content: the `VocAlignArguments`
    changes and the concepts. An adapter trained with `student_concepts` scores each class with its name and its
    concepts (those of the given classes it has); any other adapter, with the class names alone."""
    settings = info.get("settings") or {}
    if not settings.get("student_concepts"):
        return {"student_concepts": False}, {}
    concepts = {name: list(items) for name, items in (info.get("concepts") or {}).items() if name in class_names}
    changes = {"student_concepts": bool(concepts), "use_concepts": bool(concepts),
               "include_class_names": settings.get("include_class_names", True)}
    return changes, concepts


def push_adapter_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload VocAlign adapter",
) -> str:
    """Upload a folder written by [`save_adapter`] (adapter, `vocalign.json`, model card) to a Hub model repo, as
    one commit. The card is rewritten for `repo_id` (its usage snippet names the repo); the folder is unchanged.

    Returns the commit sha.
    """
    folder = Path(folder)
    for required in ("adapter_config.json", VOCALIGN_FILE, CARD_FILE):
        if not (folder / required).is_file():
            raise FileNotFoundError(f"{folder / required} is missing: save the adapter with save_adapter() first")
    info = json.loads((folder / VOCALIGN_FILE).read_text())
    if info.get("base_model_repo_id") is None:
        logger.warning(
            "The adapter's base model %r is not a Hub repo: the card on %s has no `base_model`, and users must "
            "get the base weights elsewhere. Publish the base model and adapt it by its repo id to link them.",
            info.get("base_model"), repo_id,
        )
    card = build_model_card(
        info.get("base_model") or "catseg", info["class_names"], info.get("concepts"), info.get("metrics"),
        info.get("dataset"), info.get("settings"), repo_id=repo_id, base_model_revision=info.get("base_model_revision"),
    )
    operations = [CommitOperationAdd(CARD_FILE, str(card).encode())]
    operations += [
        CommitOperationAdd(path.relative_to(folder).as_posix(), str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != CARD_FILE and not path.relative_to(folder).as_posix().startswith(".")
    ]
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.create_commit(repo_id, operations=operations, commit_message=commit_message)
    return commit.oid


def adapter_push_target(push_adapter_to_hub: str | None, args: Any) -> dict[str, Any] | None:
    """The one way the recipes publish: the adapter folder (with its card) pushed once, after training.

    The Trainer's own flags map onto it: `--push_to_hub --hub_model_id org/name` gives the same repo as
    `--push_adapter_to_hub org/name` (with `--hub_private_repo` and `--hub_token` honoured); anything that would
    make them differ is an error raised before training. The caller turns the Trainer's own push off.

    Returns `push_adapter_to_hub`'s keyword arguments (`repo_id`, `private`, `token`), or None when nothing is pushed.

    Raises:
        ValueError: `--push_to_hub` without a repo id, two different repo ids, a checkpoint `--hub_strategy` or a
            `--hub_revision` (the adapter is pushed once, to the main branch).
    """
    trainer_repo = None
    if getattr(args, "push_to_hub", False):
        strategy = getattr(getattr(args, "hub_strategy", None), "value", getattr(args, "hub_strategy", None))
        if strategy not in (None, "every_save", "end"):
            raise ValueError(
                f"--hub_strategy {strategy} pushes training checkpoints, which the recipes do not publish: the "
                "adapter is pushed once after training, with its model card. Drop --hub_strategy."
            )
        if getattr(args, "hub_revision", None):
            raise ValueError("--hub_revision is not supported: the adapter is pushed to the repo's main branch.")
        trainer_repo = getattr(args, "hub_model_id", None)
        if trainer_repo is None and push_adapter_to_hub is None:
            raise ValueError(
                "--push_to_hub needs a repo: pass --hub_model_id org/name or --push_adapter_to_hub org/name"
            )
    if trainer_repo and push_adapter_to_hub and trainer_repo != push_adapter_to_hub:
        raise ValueError(
            f"--hub_model_id {trainer_repo} and --push_adapter_to_hub {push_adapter_to_hub} name different repos: "
            "give one of them"
        )
    repo_id = push_adapter_to_hub or trainer_repo
    if repo_id is None:
        return None
    if not _REPO_ID.fullmatch(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repo id (expected 'org/name')")
    return {"repo_id": repo_id, "private": bool(getattr(args, "hub_private_repo", False)),
            "token": getattr(args, "hub_token", None)}

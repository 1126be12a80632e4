"""Adapted LoRA weights as standard peft adapters: save (with class list, concepts and a model card), load onto a
CAT-Seg base, and push to the Hub."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel

from ..atomic import atomic_write_json, atomic_write_text
from ..models.catseg import CATSegForSemanticSegmentation

VOCALIGN_FILE = "vocalign.json"


def build_model_card(
    base_model: str,
    class_names: Sequence[str],
    concepts: Mapping[str, Sequence[str]] | None = None,
    metrics: Mapping[str, float] | None = None,
    dataset: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> ModelCard:
    """A model card listing the base model, target classes, concepts and the measured mIoU."""
    metrics = dict(metrics or {})
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_model,
        pipeline_tag="image-segmentation",
        tags=["vocalign", "catseg", "open-vocabulary-segmentation", "source-free-domain-adaptation", "lora"],
        datasets=[dataset] if dataset else None,
    )
    rows = "\n".join(f"| {k} | {v:.2f} |" for k, v in metrics.items() if isinstance(v, (int, float)))
    concept_rows = "\n".join(f"| {c} | {', '.join((concepts or {}).get(c, [])) or '-'} |" for c in class_names)
    settings_text = json.dumps(dict(settings or {}), indent=2)
    content = f"""---
{card_data.to_yaml()}
---

# VocAlign LoRA adapter for `{base_model}`

A LoRA adapter made with [vocalign-hf](https://pypi.org/project/vocalign-hf/): source-free adaptation of the
open-vocabulary segmenter CAT-Seg to an unlabeled target domain (VocAlign, BMVC 2025).

## Use

```python
from vocalign_hf.adaptation import load_adapted_model
model, info = load_adapted_model("{base_model}", "<this repo id>")
```

## Target classes and concepts

| class | concepts (teacher vocabulary during adaptation) |
|---|---|
{concept_rows}

## Measured mIoU

| metric | value |
|---|---|
{rows or "| (not measured) | - |"}

## Adaptation settings

```json
{settings_text}
```
"""
    return ModelCard(content)


def save_adapter(
    model: PeftModel,
    output_dir: str | os.PathLike,
    class_names: Sequence[str],
    concepts: Mapping[str, Sequence[str]] | None = None,
    metrics: Mapping[str, float] | None = None,
    settings: Mapping[str, Any] | None = None,
    dataset: str | None = None,
) -> Path:
    """Save the LoRA adapter (peft format: `adapter_config.json` + `adapter_model.safetensors`), `vocalign.json`
    (class list, concepts, settings, metrics) and a model card `README.md`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    base_model = model.peft_config[model.active_adapter].base_model_name_or_path or "catseg"
    info = {
        "base_model": base_model,
        "class_names": list(class_names),
        "concepts": {k: list(v) for k, v in (concepts or {}).items()},
        "metrics": dict(metrics or {}),
        "settings": dict(settings or {}),
    }
    atomic_write_json(output_dir / VOCALIGN_FILE, info)
    card = build_model_card(base_model, class_names, concepts, metrics, dataset, settings)
    atomic_write_text(output_dir / "README.md", str(card))
    return output_dir


def load_adapted_model(
    base_model: str | os.PathLike | CATSegForSemanticSegmentation,
    adapter: str | os.PathLike,
    **from_pretrained_kwargs: Any,
) -> tuple[PeftModel, dict[str, Any]]:
    """Load a VocAlign adapter (a local folder or a Hub repo id) onto a CAT-Seg base model.

    Returns the `PeftModel` (in eval mode) and the adapter's `vocalign.json` content (class names, concepts, ...),
    or an empty dict if the adapter has none.
    """
    if not isinstance(base_model, CATSegForSemanticSegmentation):
        base_model = CATSegForSemanticSegmentation.from_pretrained(base_model, **from_pretrained_kwargs)
    model = PeftModel.from_pretrained(base_model, str(adapter))
    info: dict[str, Any] = {}
    local = Path(adapter) / VOCALIGN_FILE
    if local.is_file():
        info = json.loads(local.read_text())
    elif not Path(adapter).exists():
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            info = json.loads(Path(hf_hub_download(str(adapter), VOCALIGN_FILE)).read_text())
        except EntryNotFoundError:
            info = {}
    return model.eval(), info


def push_adapter_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a folder written by [`save_adapter`] (adapter, `vocalign.json`, model card) to a Hub model repo."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    for required in ("adapter_config.json", VOCALIGN_FILE, "README.md"):
        if not (folder / required).is_file():
            raise FileNotFoundError(f"{folder / required} is missing: save the adapter with save_adapter() first")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload VocAlign adapter")
    return str(info)

"""Fold a VocAlign LoRA adapter into its CAT-Seg base: a plain checkpoint that loads without peft.

`merge_adapter(base, adapter, output_dir)` (or the `vocalign-merge` command) loads the adapter onto the base model,
merges the LoRA updates into the CLIP projection weights (`peft`'s `merge_and_unload`) and writes a standard
`save_pretrained` folder: config, weights, the processor, and the adapter's `vocalign.json`. The adapted class names
become the checkpoint's default vocabulary, so `pipeline("image-segmentation", model=output_dir)` segments them
without further arguments. `CATSegForSemanticSegmentation.from_pretrained(output_dir)` then gives the adapted model's
logits.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peft import PeftModel

from ...atomic import atomic_write_json
from ...errors import run_program
from ...model_sources import resolve_adapter, resolve_base_model
from ...outputs import check_not_overlapping, check_replaceable, write_output_folder
from ...models.catseg import CATSegForSemanticSegmentation, CATSegProcessor
from ..adapters import VOCALIGN_FILE, AdapterLoadError, load_adapted_model


def merge_lora(model: PeftModel) -> CATSegForSemanticSegmentation:
    """The base model with the adapter's LoRA updates added to its weights (the `PeftModel` is consumed)."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a peft PeftModel wrapping a CAT-Seg model, got {type(model).__name__}")
    merged = model.merge_and_unload()
    if not isinstance(merged, CATSegForSemanticSegmentation):
        raise TypeError(f"the adapter's base is a {type(merged).__name__}, not a CATSegForSemanticSegmentation")
    return merged.eval()


def save_merged(
    model: PeftModel | CATSegForSemanticSegmentation,
    output_dir: str | os.PathLike,
    processor: CATSegProcessor | None = None,
    class_names: Sequence[str] | None = None,
    info: dict[str, Any] | None = None,
    inputs: Sequence[tuple[str, Any]] = (),
) -> Path:
    """Write a merged (or already plain) CAT-Seg model as a `save_pretrained` folder, written whole.

    An existing `output_dir` is replaced only if it is empty or a merged model written here before; a folder of the
    user's, or one that is, holds or lies inside one of `inputs` (`(name, path)` pairs), is refused
    ([`~vocalign_hf.outputs.write_output_folder`]).

    Args:
        model: a `PeftModel` (merged here) or a plain [`CATSegForSemanticSegmentation`].
        output_dir: the checkpoint folder; written next to it first and moved in place, so a failure leaves any
            previous checkpoint there untouched.
        processor: saved with the model (default: built from the model's config with the bundled CLIP tokenizer).
        class_names: made the checkpoint's default vocabulary (`model.set_vocabulary`).
        info: written as `vocalign.json` (class names, concepts, settings, metrics of the adaptation).
    """
    merged = merge_lora(model) if isinstance(model, PeftModel) else model.eval()
    processor = processor if processor is not None else CATSegProcessor.from_config(merged.config)
    if class_names:
        merged.set_vocabulary(list(class_names), processor)

    def write(folder: Path) -> None:
        merged.save_pretrained(folder)
        processor.save_pretrained(folder)
        atomic_write_json(folder / VOCALIGN_FILE, {**(info or {}), "written_as": "merged_model"})

    return write_output_folder(output_dir, "merged_model", write, inputs=inputs)


def merge_adapter(
    base_model: str | os.PathLike,
    adapter: str | os.PathLike,
    output_dir: str | os.PathLike,
    **from_pretrained_kwargs: Any,
) -> Path:
    """Load `adapter` (folder or Hub id written by `save_adapter`) onto `base_model` and save the merged checkpoint.

    The processor comes from the base model's folder when it has one, and the adapter's class names become the
    default vocabulary. Returns `output_dir`.
    """
    resolve_base_model(str(base_model), "base model")  # a missing or damaged folder named as such, not as a Hub id
    resolve_adapter(str(adapter), "adapter")
    inputs = [("base model", base_model), ("adapter", adapter)]
    check_not_overlapping(output_dir, inputs, "output folder")  # before anything is loaded
    check_replaceable(output_dir, "merged_model")
    model, info = load_adapted_model(base_model, adapter, **from_pretrained_kwargs)
    try:
        processor = CATSegProcessor.from_pretrained(base_model)
    except (OSError, ValueError):  # a weights-only base: rebuild the processor from the config
        processor = None
    info = {k: v for k, v in info.items() if k != "written_as"}
    return save_merged(model, output_dir, processor=processor, class_names=info.get("class_names"), info=info,
                       inputs=inputs)


def main(argv: Sequence[str] | None = None) -> None:
    """`vocalign-merge BASE ADAPTER OUTPUT`: write the adapted model as a plain CAT-Seg checkpoint."""
    parser = argparse.ArgumentParser(
        prog="vocalign-merge",
        description="Merge a VocAlign LoRA adapter into its CAT-Seg base model and save a plain checkpoint "
        "(loads with CATSegForSemanticSegmentation.from_pretrained, no peft needed).",
    )
    parser.add_argument("base_model", help="base CAT-Seg model: folder or Hub id")
    parser.add_argument("adapter", help="adapter folder or Hub id (written by save_adapter / recipes/adapt.py)")
    parser.add_argument(
        "output_dir", help="folder for the merged checkpoint: new, empty, or an earlier vocalign-merge output (then "
        "replaced once the new one is complete); never one of the inputs or a folder of yours")
    args = parser.parse_args(argv)
    output = merge_adapter(args.base_model, args.adapter, args.output_dir)
    info_file = output / VOCALIGN_FILE
    classes = json.loads(info_file.read_text()).get("class_names", []) if info_file.is_file() else []
    print(f"merged checkpoint written to {output} ({len(classes)} classes in its default vocabulary)")


def cli() -> int:
    """The `vocalign-merge` console script: a bad input is one line and exit status 2 (`-v`: the traceback)."""
    return run_program(main, extra_errors=(AdapterLoadError,))

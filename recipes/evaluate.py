"""Evaluate a CAT-Seg base model, or a base model with a VocAlign adapter, on a labelled target split.

    python recipes/evaluate.py                                                  # the built-in world, zero-shot
    accelerate launch recipes/evaluate.py --dataset cityscapes \
        --base_model your-org/catseg-vitb-384 --adapter runs/cityscapes/adapter

    python recipes/evaluate.py --base_model runs/world/source_model --score_with_concepts true   # concepts, no training

The config follows `--dataset` as in `adapt.py` (or `--config`). Every image and mask is checked before the model
is loaded. Prints mIoU and the per-class table (student / adapted model when an adapter is given). A model scores
as it holds (`model.config.concepts`: an adapter trained with concepts, a merged folder) unless
`--score_with_concepts true` (the `--concepts` of the dataset) or `false` (the class names alone) says otherwise.
"""

from __future__ import annotations

import os

# Huge pages for large CPU tensors (see vocalign_hf.cpu_memory): set before the imports that make the first tensor.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor  # noqa: E402
from vocalign_hf.adaptation import VocAlignTrainer, load_adapted_model  # noqa: E402
from vocalign_hf.adaptation.adapters import AdapterLoadError, other_base_note  # noqa: E402
from vocalign_hf.errors import UsageError, run_program  # noqa: E402
from vocalign_hf.metrics import split_absent_metrics  # noqa: E402
from vocalign_hf.recipe_checks import resolve_adapter, resolve_base_model  # noqa: E402
from vocalign_hf.recipes import load_target_data, parse_recipe_args  # noqa: E402

CONFIG_DIR = Path(__file__).parent / "configs"


def main(argv: list[str] | None = None) -> dict[str, float]:
    recipe, args = parse_recipe_args(argv, config_dir=CONFIG_DIR)
    # Every input is checked before a model is loaded: the model folders or Hub ids, then every image and mask.
    if recipe.base_model:
        resolve_base_model(recipe.base_model)
    if recipe.adapter:
        resolve_adapter(recipe.adapter)
    data = load_target_data(recipe, args.output_dir, progress=False if args.disable_tqdm else None, with_train=False)
    if data.base_model is None:
        raise UsageError("--base_model is required (a converted CAT-Seg folder or Hub id)")
    base_model = resolve_base_model(data.base_model)
    processor = CATSegProcessor.from_pretrained(base_model)
    if recipe.score_with_concepts and not data.concepts:
        raise UsageError("--score_with_concepts true needs concepts: give --concepts (a shipped set or a JSON file)")
    # By default a model scores as it holds (a merged adapted model: with its concepts) and an adapter as it was
    # trained (with its concepts when trained with `student_concepts`); --score_with_concepts says otherwise.
    if recipe.adapter:
        model, info = load_adapted_model(base_model, recipe.adapter)
        if note := other_base_note(info, base_model):
            print(f"note: {note}")
        if info.get("class_names") and info["class_names"] != data.class_names:
            print(f"note: the adapter was trained for {info['class_names']}; evaluating {data.class_names}")
    else:
        model = CATSegForSemanticSegmentation.from_pretrained(base_model)
    held = {name: items for name, items in (model.config.concepts or {}).items() if name in data.class_names}
    concepts = {True: data.concepts, False: {}, None: held}[recipe.score_with_concepts]
    scoring = {"student_concepts": bool(concepts), "use_concepts": bool(concepts)}
    trainer = VocAlignTrainer(
        model=model, args=replace(args, method="zero_shot", **scoring), class_names=data.class_names,
        concepts=concepts, processor=processor, eval_dataset=data.eval,
    )
    metrics, absent = split_absent_metrics(trainer.evaluate(metric_key_prefix="eval"))
    if trainer.is_world_process_zero():
        print(trainer.last_eval_table)
        if "eval_mean_iou" in metrics:
            print(f"mIoU {metrics['eval_mean_iou']:.2f}")
        else:
            print(f"mIoU absent: {absent['eval_mean_iou']}")
    return metrics


if __name__ == "__main__":
    if status := run_program(main, extra_errors=(AdapterLoadError,)):
        raise SystemExit(status)

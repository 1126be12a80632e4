"""Evaluate a CAT-Seg base model, or a base model with a VocAlign adapter, on a labelled target split.

    python recipes/evaluate.py                                                  # the built-in world, zero-shot
    accelerate launch recipes/evaluate.py --config recipes/configs/cityscapes.yaml \
        --base_model your-org/catseg-vitb-384 --adapter runs/cityscapes/adapter

Prints mIoU and the per-class table (student / adapted model when an adapter is given).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
from vocalign_hf.adaptation import VocAlignTrainer, load_adapted_model
from vocalign_hf.recipes import load_target_data, parse_recipe_args

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "world.yaml"


def main(argv: list[str] | None = None) -> dict[str, float]:
    recipe, args = parse_recipe_args(argv, default_config=DEFAULT_CONFIG)
    data = load_target_data(recipe, args.output_dir)
    if data.base_model is None:
        raise SystemExit("--base_model is required (a converted CAT-Seg folder or Hub id)")
    processor = CATSegProcessor.from_pretrained(data.base_model)
    if recipe.adapter:
        model, info = load_adapted_model(data.base_model, recipe.adapter)
        if info.get("class_names") and info["class_names"] != data.class_names:
            print(f"note: the adapter was trained for {info['class_names']}; evaluating {data.class_names}")
    else:
        model = CATSegForSemanticSegmentation.from_pretrained(data.base_model)
    trainer = VocAlignTrainer(
        model=model, args=replace(args, method="zero_shot"), class_names=data.class_names,
        processor=processor, eval_dataset=data.eval,
    )
    metrics = trainer.evaluate(metric_key_prefix="eval")
    if trainer.is_world_process_zero():
        print(trainer.last_eval_table)
        print(f"mIoU {metrics['eval_mean_iou']:.2f}")
    return metrics


if __name__ == "__main__":
    main()

"""Adapt CAT-Seg to unlabeled target images with VocAlign.

    accelerate launch recipes/adapt.py                                   # built-in world, ~2 min on 2 CPU cores
    accelerate launch recipes/adapt.py --config recipes/configs/cityscapes.yaml --base_model your-org/catseg-vitb-384
    accelerate launch recipes/adapt.py --top_k 3 --output_dir runs/k3    # flags override the config file

Every `VocAlignArguments` / `TrainingArguments` field is a flag (`--resume_from_checkpoint runs/x/checkpoint-500`,
`--report_to tensorboard`, `--bf16`, ...). Prints zero-shot and adapted mIoU with per-class tables, writes overlays
and the adapter (peft format, with the class list, concepts and a model card) to `<output_dir>/adapter`.
"""

from pathlib import Path

from vocalign_hf.recipes import parse_recipe_args, run_adaptation

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "world.yaml"

if __name__ == "__main__":
    run_adaptation(*parse_recipe_args(default_config=DEFAULT_CONFIG))

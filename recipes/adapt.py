"""Adapt CAT-Seg to unlabeled target images with VocAlign.

    accelerate launch recipes/adapt.py                                   # built-in world, ~2 min on 2 CPU cores
    accelerate launch recipes/adapt.py --dataset cityscapes --base_model your-org/catseg-vitb-384
    accelerate launch recipes/adapt.py --top_k 3 --output_dir runs/k3    # flags override the config file

Without `--config`, the config follows `--dataset`: `configs/world.yaml` for the built-in world (the default),
`configs/<dataset>.yaml` for cityscapes, ade20k_150 and pascal_context_59, and `configs/custom.yaml` (the paper's
settings) for `--dataset folder` or a Hub dataset. Every `VocAlignArguments` / `TrainingArguments` field is a flag
(`--resume_from_checkpoint runs/x/checkpoint-500`, `--report_to tensorboard`, `--bf16`, ...). A folder that holds a
previous run is never overwritten without `--overwrite_output_dir true`. Prints zero-shot and adapted mIoU with
per-class tables, writes overlays and the adapter (peft format, with the class list, concepts and a model card) to
`<output_dir>/adapter`.
"""

import os

# Huge pages for large CPU tensors (see vocalign_hf.cpu_memory; measured in docs/performance.md). PyTorch reads this
# once, at the first tensor, which importing transformers makes: so it is set before any other import.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from pathlib import Path  # noqa: E402

from vocalign_hf.errors import run_program  # noqa: E402
from vocalign_hf.recipes import parse_recipe_args, run_adaptation  # noqa: E402

CONFIG_DIR = Path(__file__).parent / "configs"


def main(argv: list[str] | None = None) -> dict:
    recipe, args = parse_recipe_args(argv, config_dir=CONFIG_DIR)
    if args.process_index == 0:
        print(f"config: {recipe.config} (dataset {recipe.dataset}, output {args.output_dir})")
    return run_adaptation(recipe, args)


if __name__ == "__main__":
    # A bad input: one line and exit status 2 (-v or VOCALIGN_TRACEBACK=1: the traceback). Success returns normally,
    # so that a caller running this file (runpy, a probe) goes on.
    if status := run_program(main):
        raise SystemExit(status)

"""Shared pieces of the `recipes/` scripts: arguments, config files with command-line overrides, target data,
overlays. The scripts themselves stay short; this module is importable and tested."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from transformers import HfArgumentParser

from .adaptation import VocAlignArguments, VocAlignTrainer, add_lora, push_adapter_to_hub, save_adapter
from .models.catseg import CATSegForSemanticSegmentation, CATSegProcessor
from .visualization import colorize, segmentation_grid
from .data import (
    get_dataset_info,
    load_cityscapes,
    load_class_names,
    load_hub_dataset,
    load_image_folder,
    make_eval_transform,
    make_train_transform,
    make_palette,
)


@dataclass
class RecipeArguments:
    """What to adapt, on which data. `dataset: world` (the default) needs nothing else."""

    dataset: str = field(
        default="world",
        metadata={"help": "world | cityscapes | ade20k_150 | pascal_context_59 | folder | a Hub dataset repo id"},
    )
    base_model: str | None = field(
        default=None, metadata={"help": "converted CAT-Seg (folder or Hub id); world: pretrained on the fly"}
    )
    data_root: str | None = field(default=None, metadata={"help": "Cityscapes root, or the image folder"})
    eval_data_root: str | None = field(default=None, metadata={"help": "folder dataset: labelled eval images"})
    eval_mask_root: str | None = field(default=None, metadata={"help": "folder dataset: masks of the eval images"})
    hub_source: str | None = field(
        default=None, metadata={"help": "load the named dataset from the Hub instead of local files"}
    )
    train_split: str = "train"
    eval_split: str = "validation"
    class_names_file: str | None = field(default=None, metadata={"help": "JSON class list (custom datasets)"})
    concepts: str | None = field(
        default=None, metadata={"help": "shipped concept set (cityscapes, ade20k_150, pascal_context_59) or JSON path"}
    )
    augmentation: str = field(default="paper", metadata={"help": "paper | paper_multi | released"})
    crop_size: int | None = field(default=None, metadata={"help": "override the preset crop size"})
    max_train_images: int | None = None
    max_eval_images: int | None = None
    eval_zero_shot: bool = field(default=True, metadata={"help": "also evaluate the unadapted model"})
    num_overlays: int = field(default=6, metadata={"help": "evaluation images in the overlay grid (overlays.png)"})
    push_adapter_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id for the adapter"})
    adapter: str | None = field(default=None, metadata={"help": "evaluate.py: a VocAlign adapter (folder or Hub id)"})
    world_seed: int = 0
    world_image_size: int = 64
    world_num_source_train: int = 1500
    world_num_target_train: int = 400
    world_num_target_eval: int = 100
    world_pretrain_steps: int = 700
    world_pretrain_batch_size: int = 16
    world_source_model_dir: str | None = field(
        default=None,
        metadata={"help": "where the world's source model is pretrained or unpacked (default <output_dir>/source_model)"},
    )
    world_pretrain_threads: int = field(
        default=1, metadata={"help": "torch threads for pretraining; fixed so the source model is reproducible"}
    )


def parse_recipe_args(
    argv: list[str] | None = None, default_config: str | Path | None = None
) -> tuple[RecipeArguments, VocAlignArguments]:
    """Parse `--config file.yaml` (or `default_config`) and command-line flags; flags override the file.

    Values from the file (YAML or JSON, keys = argument names) become the parser's defaults, so `null` in a file
    sets an optional argument to None (e.g. `pseudo_threshold: null`, `top_k: null`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = default_config
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise SystemExit("--config needs a path to a YAML or JSON file")
        config_path = argv[at + 1]
        del argv[at : at + 2]
    parser = HfArgumentParser((RecipeArguments, VocAlignArguments))
    if config_path is not None:
        values = load_config_file(Path(config_path))
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"Unknown keys in {config_path}: {unknown}")
        parser.set_defaults(**values)
        for action in parser._actions:  # a value from the file satisfies a required argument
            if action.dest in values:
                action.required = False
    recipe, training = parser.parse_args_into_dataclasses(args=argv)
    return recipe, training


def load_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(f"Config file not found: {path}")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise SystemExit(f"{path} must hold a mapping of argument names to values, got {type(data).__name__}")
    return data


@dataclass
class TargetData:
    """Unlabeled adaptation images, a labelled evaluation split, the class list, concepts and a palette."""

    train: Any
    eval: Any
    class_names: list[str]
    concepts: dict[str, list[str]]
    palette: list[tuple[int, int, int]]
    base_model: str | None = None


def load_target_data(recipe: RecipeArguments, output_dir: str, seed: int = 0) -> TargetData:
    """Assemble the target data of a recipe (the built-in world pretrains its own base model if none is given).

    The training augmentation is seeded with `seed` (and the process rank, see `SegmentationTrainTransform`).
    """
    if recipe.dataset == "world":
        return _world_data(recipe, output_dir, seed)
    from concept_generation import load_concepts

    if recipe.dataset == "folder":
        if not recipe.data_root or not recipe.class_names_file:
            raise SystemExit("dataset=folder needs --data_root (images) and --class_names_file")
        class_names = load_class_names(recipe.class_names_file)
        train = load_image_folder(recipe.data_root)
        if not recipe.eval_data_root or not recipe.eval_mask_root:
            raise SystemExit("dataset=folder needs --eval_data_root and --eval_mask_root to measure mIoU")
        evaluation = load_image_folder(recipe.eval_data_root, recipe.eval_mask_root)
        palette = list(make_palette(len(class_names)))
        name = None
    else:
        info = get_dataset_info(recipe.dataset)
        name, class_names, palette = info.name, list(info.class_names), list(info.palette)
        if recipe.hub_source or recipe.data_root is None:
            source = recipe.hub_source or recipe.dataset
            train = load_hub_dataset(source, recipe.train_split, with_labels=False)
            evaluation = load_hub_dataset(source, recipe.eval_split)
        elif name == "cityscapes":
            train = load_cityscapes(recipe.data_root, recipe.train_split, with_labels=False)
            evaluation = load_cityscapes(recipe.data_root, "val" if recipe.eval_split == "validation" else recipe.eval_split)
        else:
            raise SystemExit(f"Local files for {recipe.dataset}: use dataset=folder with its images and masks")
    concepts = load_concepts(recipe.concepts, class_names=class_names) if recipe.concepts else {}
    concepts = {k: v for k, v in concepts.items() if v}
    train = _limit(train, recipe.max_train_images)
    evaluation = _limit(evaluation, recipe.max_eval_images)
    overrides = {"crop_size": recipe.crop_size, "seed": seed} if recipe.crop_size else {"seed": seed}
    train = train.with_transform(make_train_transform(name, recipe.augmentation, **overrides) if name else make_train_transform(**overrides))
    evaluation = evaluation.with_transform(make_eval_transform(name))
    return TargetData(train, evaluation, class_names, concepts, palette, recipe.base_model)


def _limit(dataset, count: int | None):
    return dataset.select(range(min(count, len(dataset)))) if count else dataset


def world_config(recipe: RecipeArguments):
    """The `WorldConfig` of a recipe's `world_*` arguments."""
    from .world import WorldConfig

    return WorldConfig(
        seed=recipe.world_seed,
        image_size=recipe.world_image_size,
        num_source_train=recipe.world_num_source_train,
        num_target_train=recipe.world_num_target_train,
        num_target_eval=recipe.world_num_target_eval,
    )


def _world_data(recipe: RecipeArguments, output_dir: str, seed: int) -> TargetData:
    from accelerate import PartialState

    from .world import build_world, default_world_cache, pretrain_source_model

    # One process renders the world in memory; several share it through the on-disk cache (`VOCALIGN_WORLD_CACHE`),
    # written by the process that gets here first (see `run_adaptation`) and read by the others.
    cache = default_world_cache() if PartialState().num_processes > 1 else None
    world = build_world(world_config(recipe), cache_dir=cache)
    base = recipe.base_model
    if base is None:  # the shipped model for the default world, else pretrained once and reused (settings hash)
        base = recipe.world_source_model_dir or str(Path(output_dir) / "source_model")
        pretrain_source_model(
            world, base, steps=recipe.world_pretrain_steps, batch_size=recipe.world_pretrain_batch_size,
            seed=recipe.world_seed, num_threads=recipe.world_pretrain_threads,
        )
    size = world.config.image_size
    train = _limit(world.target_train, recipe.max_train_images).with_transform(
        make_train_transform(crop_size=size, ratio_range=(0.75, 1.5), flip_prob=0.5, seed=seed)
    )
    evaluation = _limit(world.target_eval, recipe.max_eval_images).with_transform(make_eval_transform())
    return TargetData(
        train, evaluation, list(world.target_class_names), dict(world.target_concepts),
        list(make_palette(len(world.target_class_names))), base,
    )


def save_overlays(
    models: list,
    input_ids: torch.Tensor,
    collator,
    dataset,
    class_names: list[str],
    palette: list[tuple[int, int, int]],
    path: Path,
    count: int,
    titles: tuple[str, ...] = ("zero-shot", "adapted"),
) -> Path | None:
    """Write one PNG grid of `count` evaluation images: image | ground truth | the prediction of each model (e.g.
    zero-shot, adapted), panels upscaled to at least 256 px, with a legend of the class names."""
    count = min(count, len(dataset))
    if count <= 0:
        return None
    device = next(models[0].parameters()).device
    rows = []
    for index in range(count):
        batch = collator([dataset[index]])
        labels = batch["labels"][0].numpy()
        image = (batch["pixel_values"][0] * collator.std[0] + collator.mean[0]).clamp(0, 1)
        row = [(image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), colorize(labels, palette)]
        for model in models:
            with torch.no_grad():
                logits = model(pixel_values=batch["pixel_values"].to(device), input_ids=input_ids.to(device)).logits
            logits = torch.nn.functional.interpolate(logits, size=labels.shape, mode="bilinear", align_corners=False)
            row.append(colorize(logits[0].argmax(0).cpu().numpy(), palette))
        rows.append(row)
    grid = segmentation_grid(rows, ("image", "ground truth", *titles), class_names, palette)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def run_adaptation(recipe: RecipeArguments, args: VocAlignArguments) -> dict[str, float]:
    """The main job: zero-shot evaluation, VocAlign adaptation, evaluation of the adapted student, a per-class
    report, overlays, and the adapter (with class list, concepts and model card) in `<output_dir>/adapter`.

    Returns `{"zero_shot_miou": ..., "adapted_miou": ...}` plus per-class IoUs (`adapted_iou_<class>`, percent),
    also written to `<output_dir>/results.json`.
    """
    from dataclasses import replace

    from transformers import set_seed

    set_seed(args.seed)
    # Several processes: the (local) main process builds the data first -- renders and caches the world, pretrains
    # or unpacks its source model, prepares datasets -- and the others then read what it wrote.
    with args.main_process_first(desc="target data"):
        data = load_target_data(recipe, args.output_dir, seed=args.seed)
    if data.base_model is None:
        raise SystemExit("--base_model is required (a converted CAT-Seg folder or Hub id)")
    processor = CATSegProcessor.from_pretrained(data.base_model)

    def trainer_for(model, method: str) -> VocAlignTrainer:
        return VocAlignTrainer(
            model=model, args=args if method == args.method else replace(args, method=method),
            class_names=data.class_names, concepts=data.concepts, processor=processor,
            train_dataset=data.train, eval_dataset=data.eval,
        )

    results: dict[str, float] = {}
    tables: dict[str, str] = {}
    zero_shot_model = CATSegForSemanticSegmentation.from_pretrained(data.base_model)
    if recipe.eval_zero_shot or args.method == "zero_shot":
        zero_shot = trainer_for(zero_shot_model, "zero_shot")
        metrics = zero_shot.evaluate(metric_key_prefix="zero_shot")
        results["zero_shot_miou"] = metrics["zero_shot_mean_iou"]
        results.update({k: v for k, v in metrics.items() if k.startswith("zero_shot_iou_")})
        tables["zero-shot"] = zero_shot.last_eval_table
    if args.method == "zero_shot":
        if zero_shot.is_world_process_zero():
            print(tables["zero-shot"])
        return results

    set_seed(args.seed)
    student = add_lora(CATSegForSemanticSegmentation.from_pretrained(data.base_model), args)
    trainer = trainer_for(student, args.method)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = trainer.evaluate(metric_key_prefix="adapted")
    results["adapted_miou"] = metrics["adapted_mean_iou"]
    results.update({k: v for k, v in metrics.items() if k.startswith("adapted_iou_")})
    tables["adapted"] = trainer.last_eval_table
    if not trainer.is_world_process_zero():
        return results

    for name, table in tables.items():
        print(f"\n=== target split, {name} ===\n{table}")
    line = f"adapted mIoU {results['adapted_miou']:.2f}"
    if "zero_shot_miou" in results:
        gain = results["adapted_miou"] - results["zero_shot_miou"]
        line = f"zero-shot mIoU {results['zero_shot_miou']:.2f} -> {line} ({gain:+.2f})"
    print("\n" + line)
    output = Path(args.output_dir)
    tokens = processor.tokenize_classes(data.class_names)["input_ids"]
    overlays = save_overlays(
        [zero_shot_model.eval(), trainer.model.eval()], tokens, trainer.data_collator, data.eval, data.class_names,
        data.palette, output / "overlays.png", recipe.num_overlays,
    )
    if overlays:
        print(f"overlays (image | ground truth | zero-shot | adapted): {overlays}")
    settings = {key: getattr(args, key) for key in (
        "method", "top_k", "use_masking", "mask_ratio", "mask_block_size", "use_concepts", "pseudo_threshold",
        "ema_alpha", "lora_rank", "lora_alpha", "lora_layers", "learning_rate", "max_steps", "seed")}
    metrics = {"target mIoU (adapted)": results["adapted_miou"]}
    if "zero_shot_miou" in results:
        metrics["target mIoU (zero-shot)"] = results["zero_shot_miou"]
    folder = save_adapter(trainer.model, output / "adapter", data.class_names, data.concepts, metrics, settings,
                          dataset=recipe.dataset)
    (output / "results.json").write_text(json.dumps(results, indent=2))
    print(f"adapter saved to {folder}")
    if recipe.push_adapter_to_hub:
        push_adapter_to_hub(folder, recipe.push_adapter_to_hub)
    return results

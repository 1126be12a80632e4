"""Shared pieces of the `recipes/` scripts: arguments, config files with command-line overrides, target data,
overlays. The scripts themselves stay short; this module is importable and tested."""

from __future__ import annotations

import difflib
import errno
import json
import logging
import math
import shutil
import sys
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import PartialState
from concept_generation import load_concepts
from transformers import HfArgumentParser, set_seed

from .atomic import atomic_write_file, atomic_write_json, atomic_write_text, read_json_object
from .errors import UsageError
from .adaptation import ConceptVocabulary, VocAlignArguments, VocAlignTrainer, add_lora, push_adapter_to_hub, save_adapter
from .adaptation.adapters import adapter_push_target, base_model_fingerprint
from .adaptation.concept_audit import audit_concepts, format_audit, guard_concepts
from .adaptation.checkpoints import run_settings
from .adaptation.lora import LoRASettings, lora_config_for_clip
from .adaptation.sharding import full, is_sharded
from .outputs import check_not_overlapping
from .recipe_checks import (
    PREVIOUS_RUN,
    RUN_MARK,
    check_free_space,
    check_lora_layers,
    check_output_dir,
    check_output_path,
    check_resume_checkpoint,
    finish_replacing,
    resolve_base_model,
    resolve_resume_checkpoint,
    run_mark,
    set_aside_previous_run,
)
from .output_lock import lock_output_dir
from .metrics import split_absent_metrics
from .models.catseg import CATSegConfig, CATSegForSemanticSegmentation, CATSegProcessor
from .models.catseg.pixel_normalization import denormalize_pixels
from .visualization import colorize, segmentation_grid
from .world import WorldConfig, build_world, default_world_cache, pretrain_source_model
from .world.generator import SOURCE_SYNONYMS
from .world.pretrain import PRETRAIN_BATCH_SIZE, PRETRAIN_STEPS, PRETRAIN_THREADS
from .data import (
    get_dataset_info,
    known_dataset_names,
    load_cityscapes,
    load_class_names,
    load_hub_dataset,
    load_image_folder,
    make_eval_transform,
    make_train_transform,
    make_palette,
    train_transform_preset,
)
from .data.validation import DatasetValidationError, validate_segmentation_dataset

logger = logging.getLogger(__name__)

#: Datasets with a config of their own in `recipes/configs/<name>.yaml`; any other (`folder`, a Hub repo id)
#: uses `custom.yaml`, the paper's settings.
DATASET_CONFIGS = ("world", "cityscapes", "ade20k_150", "pascal_context_59")


@dataclass
class RecipeArguments:
    """What to adapt, on which data. `dataset: world` (the default) needs nothing else."""

    config: str | None = field(
        default=None,
        metadata={
            "help": "YAML/JSON file of argument values (flags override it); default: recipes/configs/<dataset>.yaml "
            "for world, cityscapes, ade20k_150, pascal_context_59, else recipes/configs/custom.yaml"
        },
    )
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
    recursive: bool = field(default=False, metadata={"help": "folder dataset: also read images in sub-folders"})
    hub_source: str | None = field(
        default=None, metadata={"help": "load the named dataset from the Hub instead of local files"}
    )
    train_split: str = "train"
    eval_split: str = "validation"
    class_names_file: str | None = field(
        default=None, metadata={"help": "class list file, .json / .yaml / .txt (custom datasets)"}
    )
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
    concept_audit_images: int = field(
        default=256, metadata={"help": "unlabeled target images the concept audit reads before adapting (0: none)"}
    )
    score_with_concepts: bool | None = field(
        default=None,
        metadata={"help": "evaluate.py: score each class with its name and the --concepts (vocabulary alignment, "
                  "no training needed): true, false (the class names alone), or unset (as the model holds or the "
                  "adapter was trained)"},
    )
    # The built-in world's defaults are the world's own (`WorldConfig`, `world.pretrain`): the shipped source model's.
    world_seed: int = WorldConfig.seed
    world_image_size: int = WorldConfig.image_size
    world_num_source_train: int = WorldConfig.num_source_train
    world_num_target_train: int = WorldConfig.num_target_train
    world_num_target_eval: int = WorldConfig.num_target_eval
    world_pretrain_steps: int = PRETRAIN_STEPS
    world_pretrain_batch_size: int = PRETRAIN_BATCH_SIZE
    world_source_synonyms: bool = field(
        default=False,
        metadata={"help": "pretrain the source model on other words for its classes too (world.SOURCE_SYNONYMS): "
                          "every target name and concept is then a word it knows, in the source's sense"},
    )
    world_source_model_dir: str | None = field(
        default=None,
        metadata={"help": "where the world's source model is pretrained or unpacked (default <output_dir>/source_model)"},
    )
    world_pretrain_threads: int = field(
        default=PRETRAIN_THREADS, metadata={"help": "torch threads for pretraining; fixed so the source model is reproducible"}
    )


def parse_recipe_args(
    argv: list[str] | None = None,
    default_config: str | Path | None = None,
    config_dir: str | Path | None = None,
) -> tuple[RecipeArguments, VocAlignArguments]:
    """Parse `--config file.yaml` (or the default config) and command-line flags; flags override the file.

    Without `--config`, the config is `default_config` if given, else the one of `--dataset` in `config_dir`
    (`<dataset>.yaml` for the datasets of `DATASET_CONFIGS`, `custom.yaml` for a folder or Hub dataset). The path
    used is recorded in `recipe.config`.

    Values from the file (YAML or JSON, keys = argument names) become the parser's defaults, so `null` in a file
    sets an optional argument to None (e.g. `pseudo_threshold: null`, `top_k: null`); on the command line,
    `--top_k null` (or `none`) does the same.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = _pop_flag(argv, "--config")
    if config_path is None:
        config_path = default_config
        if config_path is None and config_dir is not None:
            config_path = default_config_for(_peek_flag(argv, "--dataset") or "world", config_dir)
    parser = HfArgumentParser((RecipeArguments, VocAlignArguments))
    _accept_null_on_command_line(parser)
    if config_path is not None:
        values = load_config_file(Path(config_path))
        known = {action.dest for action in parser._actions} - {"config"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"Unknown keys in {config_path}: {unknown}")
        parser.set_defaults(**values)
        for action in parser._actions:  # a value from the file satisfies a required argument
            if action.dest in values:
                action.required = False
    try:
        recipe, training = parser.parse_args_into_dataclasses(args=argv)
    except UsageError:
        raise
    except (ValueError, TypeError) as error:  # TrainingArguments' own checks: a bad flag value, not a bug
        raise UsageError(str(error).strip().splitlines()[0]) from error
    recipe.config = None if config_path is None else str(config_path)
    return recipe, training


def default_config_for(dataset: str, config_dir: str | Path) -> Path:
    """The config a recipe uses for `dataset` when no `--config` is given: the world's settings apply only to the
    world; a known dataset has its own; a folder or Hub dataset gets the paper's (`custom.yaml`)."""
    name = dataset
    if dataset not in ("world", "folder"):
        try:
            name = get_dataset_info(dataset).name
        except ValueError:  # a Hub repo id
            name = "custom"
    return Path(config_dir) / f"{name if name in DATASET_CONFIGS else 'custom'}.yaml"


def _pop_flag(argv: list[str], flag: str) -> str | None:
    """Remove `flag value` / `flag=value` from `argv` and return the value."""
    for at, item in enumerate(argv):
        if item == flag:
            if at + 1 >= len(argv):
                raise UsageError(f"{flag} needs a value")
            value = argv[at + 1]
            del argv[at : at + 2]
            return value
        if item.startswith(flag + "="):
            del argv[at]
            return item.split("=", 1)[1]
    return None


def _peek_flag(argv: list[str], flag: str) -> str | None:
    return _pop_flag(list(argv), flag)


def _accept_null_on_command_line(parser: HfArgumentParser) -> None:
    """Let `--top_k null` / `none` set an optional number of our dataclasses to None, as `top_k: null` does in a
    config file (argparse would call `int("null")`)."""
    nullable = set()
    for cls in (RecipeArguments, VocAlignArguments):
        for name, hint in typing.get_type_hints(cls).items():
            args = typing.get_args(hint)
            if type(None) in args and any(a in (int, float) for a in args) and name in cls.__dataclass_fields__:
                nullable.add(name)
    for action in parser._actions:
        if action.dest in nullable and callable(action.type):
            action.type = _nullable(action.type)


def _nullable(convert):
    def parse(text: str):
        return None if text.strip().lower() in ("null", "none") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its error messages
    return parse


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON config file; errors name the file (and the line, for a syntax error)."""
    if not path.is_file():
        raise UsageError(f"Config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UsageError(f"{path}: not valid YAML ({problem}{where})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of argument names to values, got {type(data).__name__}")
    if "config" in data:
        raise UsageError(f"{path}: a config file cannot name another config (key 'config')")
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


def load_target_data(
    recipe: RecipeArguments, output_dir: str, seed: int = 0, *, check_files: bool = True, progress: bool | None = None,
    with_train: bool = True,
) -> TargetData:
    """Assemble the target data of a recipe (the built-in world pretrains its own base model if none is given).

    With `check_files`, every image and mask is checked before anything else happens
    (:func:`~vocalign_hf.data.validation.validate_segmentation_dataset`): a bad file stops the recipe here, with
    its name, and not in the middle of training. The training augmentation is seeded with `seed` (and the process
    rank, see `SegmentationTrainTransform`). Without `with_train` (evaluation only) a folder dataset needs no
    `--data_root` and `train` is None.
    """
    check_dataset_name(recipe.dataset)
    if recipe.dataset == "world":
        return _world_data(recipe, output_dir, seed, check_files, progress)
    if recipe.dataset == "folder":
        if (with_train and not recipe.data_root) or not recipe.class_names_file:
            needs = "--data_root (images) and --class_names_file" if with_train else "--class_names_file"
            raise UsageError(f"dataset=folder needs {needs}")
        class_names = load_class_names(recipe.class_names_file)
        if not recipe.eval_data_root or not recipe.eval_mask_root:
            raise UsageError("dataset=folder needs --eval_data_root and --eval_mask_root to measure mIoU")
        try:
            train = load_image_folder(recipe.data_root, recursive=recipe.recursive) if with_train else None
            evaluation = load_image_folder(recipe.eval_data_root, recipe.eval_mask_root, recursive=recipe.recursive)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        palette = list(make_palette(len(class_names)))
        name = None
    else:
        info = get_dataset_info(recipe.dataset)
        name, class_names, palette = info.name, list(info.class_names), list(info.palette)
        if recipe.hub_source or recipe.data_root is None:
            source = recipe.hub_source or recipe.dataset
            train = load_hub_dataset(source, recipe.train_split, with_labels=False) if with_train else None
            evaluation = load_hub_dataset(source, recipe.eval_split)
        elif name == "cityscapes":
            train = load_cityscapes(recipe.data_root, recipe.train_split, with_labels=False) if with_train else None
            evaluation = load_cityscapes(recipe.data_root, "val" if recipe.eval_split == "validation" else recipe.eval_split)
        else:
            raise UsageError(f"Local files for {recipe.dataset}: use dataset=folder with its images and masks")
    try:
        concepts = load_concepts(recipe.concepts, class_names=class_names) if recipe.concepts else {}
    except ValueError as error:  # a missing or malformed concept file, or concepts of other classes
        raise UsageError(str(error)) from None
    concepts = {k: v for k, v in concepts.items() if v}
    train = _limit(train, recipe.max_train_images) if train is not None else None
    evaluation = _limit(evaluation, recipe.max_eval_images)
    train_kwargs = dict(train_transform_preset(name or "ade20k_150", recipe.augmentation), seed=seed)
    if recipe.crop_size:
        train_kwargs["crop_size"] = recipe.crop_size
    if name is None:  # a folder: the paper's multi-dataset pipeline, short side rescaled to the crop x U(0.5, 2)
        crop = train_kwargs["crop_size"] if isinstance(train_kwargs["crop_size"], int) else min(train_kwargs["crop_size"])
        train_kwargs.update(scale=(4 * crop, crop), small_image="upscale")
    if check_files:
        where = f" ({recipe.data_root})" if recipe.data_root else ""
        eval_where = f" ({recipe.eval_data_root}, masks {recipe.eval_mask_root})" if recipe.eval_data_root else where
        splits = [(train, f"training split{where}", None)] if train is not None else []
        reports = _check_splits(*splits, (evaluation, f"evaluation split{eval_where}", len(class_names)),
                                progress=progress)
        if train is not None:
            _warn_small_images(reports[0].min_size, train_kwargs)
    if train is not None:
        train = train.with_transform(make_train_transform(**train_kwargs))
    evaluation = evaluation.with_transform(make_eval_transform(name))
    return TargetData(train, evaluation, class_names, concepts, palette, recipe.base_model)


def _check_splits(*splits: tuple[Any, str, int | None], progress: bool | None):
    """Check every file of each `(dataset, name, num_classes)`; one UsageError lists the problems of all splits.
    Returns the reports, in order."""
    reports, problems = [], []
    for dataset, split, num_classes in splits:
        try:
            reports.append(validate_segmentation_dataset(dataset, split=split, num_classes=num_classes, progress=progress))
        except DatasetValidationError as exc:
            problems.append(str(exc))
    if problems:
        raise UsageError("\n".join(problems))
    return reports


def _warn_small_images(min_size: tuple[int, int] | None, train_kwargs: dict[str, Any]) -> None:
    """Say when training images are smaller than the crop, and what the transform does with them."""
    crop = train_kwargs.get("crop_size")
    if min_size is None or crop is None:
        return
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
    if min_size[0] >= crop_h and min_size[1] >= crop_w:
        return
    if train_kwargs.get("small_image") == "upscale":
        what = "they are upscaled to cover each crop (no padding)"
    else:
        what = "after the preset's rescale, crops of smaller images are padded with black (ignored by the loss)"
    fix = (f"--crop_size {min(min_size)} trains at their own size" if min(min_size) >= MIN_CROP_SIZE
           else f"they are under the smallest crop ({MIN_CROP_SIZE} px) and are upscaled whatever the crop size")
    logger.warning(
        "training images are smaller than the %sx%s crop (smallest %sx%s): %s; %s", crop_h, crop_w, min_size[0],
        min_size[1], what, fix,
    )


def _limit(dataset, count: int | None):
    return dataset.select(range(min(count, len(dataset)))) if count else dataset


def world_config(recipe: RecipeArguments) -> WorldConfig:
    """The `WorldConfig` of a recipe's `world_*` arguments."""
    return WorldConfig(
        seed=recipe.world_seed,
        image_size=recipe.world_image_size,
        num_source_train=recipe.world_num_source_train,
        num_target_train=recipe.world_num_target_train,
        num_target_eval=recipe.world_num_target_eval,
    )


def _world_data(
    recipe: RecipeArguments, output_dir: str, seed: int, check_files: bool = True, progress: bool | None = None
) -> TargetData:
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
            synonyms=SOURCE_SYNONYMS if recipe.world_source_synonyms else None,
        )
    size = world.config.image_size
    train = _limit(world.target_train, recipe.max_train_images)
    evaluation = _limit(world.target_eval, recipe.max_eval_images)
    if check_files:
        _check_splits(
            (train, "world's target training split", None),
            (evaluation, "world's target evaluation split", len(world.target_class_names)), progress=progress,
        )
    train = train.with_transform(make_train_transform(crop_size=size, ratio_range=(0.75, 1.5), flip_prob=0.5, seed=seed))
    evaluation = evaluation.with_transform(make_eval_transform())
    return TargetData(
        train, evaluation, list(world.target_class_names), dict(world.target_concepts),
        list(make_palette(len(world.target_class_names))), base,
    )


def save_overlays(
    predictors: list,
    collator,
    dataset,
    class_names: list[str],
    palette: list[tuple[int, int, int]],
    path: Path,
    count: int,
    titles: tuple[str, ...] = ("zero-shot", "adapted"),
) -> Path | None:
    """Write one PNG grid of `count` evaluation images: image | ground truth | the prediction of each predictor
    (e.g. zero-shot, adapted: a function of the pixel values giving class scores), panels upscaled to at least
    256 px, with a legend of the class names."""
    grid = overlay_grid(predictors, collator, dataset, class_names, palette, count, titles)
    return None if grid is None else atomic_write_file(path, lambda tmp: grid.save(tmp, format="PNG"))


def overlay_grid(predictors: list, collator, dataset, class_names, palette, count: int,
                 titles: tuple[str, ...] = ("zero-shot", "adapted")):
    """The image [`save_overlays`] writes (None for `count` 0)."""
    count = min(count, len(dataset))
    if count <= 0:
        return None
    rows = []
    for index in range(count):
        batch = collator([dataset[index]])
        labels = batch["labels"][0].numpy()
        image = denormalize_pixels(batch["pixel_values"][0], collator.image_mean, collator.image_std).clamp(0, 1)
        row = [(image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), colorize(labels, palette)]
        for predict in predictors:
            with torch.no_grad():
                logits = predict(batch["pixel_values"])
            logits = torch.nn.functional.interpolate(logits, size=labels.shape, mode="bilinear", align_corners=False)
            row.append(colorize(logits[0].argmax(0).cpu().numpy(), palette))
        rows.append(row)
    return segmentation_grid(rows, ("image", "ground truth", *titles), class_names, palette)


#: The smallest training crop: two ViT-B/16 patches a side, and one 16-pixel mask block.
MIN_CROP_SIZE = 16


def check_recipe_args(recipe: RecipeArguments) -> None:
    """The recipe's own numeric options, before anything is read or loaded.

    Raises:
        UsageError: naming the option, its value and the valid range.
    """
    checks = [
        ("crop_size", recipe.crop_size is None or recipe.crop_size >= MIN_CROP_SIZE, f">= {MIN_CROP_SIZE} pixels"),
        ("num_overlays", recipe.num_overlays >= 0, ">= 0"),
        ("max_train_images", recipe.max_train_images is None or recipe.max_train_images >= 1, ">= 1 (or null)"),
        ("max_eval_images", recipe.max_eval_images is None or recipe.max_eval_images >= 1, ">= 1 (or null)"),
        ("world_image_size", recipe.world_image_size >= MIN_CROP_SIZE, f">= {MIN_CROP_SIZE} pixels"),
        ("world_pretrain_steps", recipe.world_pretrain_steps >= 1, ">= 1"),
        ("world_pretrain_batch_size", recipe.world_pretrain_batch_size >= 1, ">= 1"),
        ("world_pretrain_threads", recipe.world_pretrain_threads >= 1, ">= 1"),
        ("world_num_source_train", recipe.world_num_source_train >= 0, ">= 0 (0: the base model is given)"),
        ("world_num_target_train", recipe.world_num_target_train >= 1, ">= 1"),
        ("world_num_target_eval", recipe.world_num_target_eval >= 1, ">= 1"),
    ]
    for name, ok, wanted in checks:
        if not ok:
            raise UsageError(f"--{name} must be {wanted}, got {getattr(recipe, name)}")
    check_dataset_name(recipe.dataset)


def check_dataset_name(dataset: str) -> None:
    """`--dataset` is `world`, `folder`, a known dataset (or alias) or a Hub dataset repo id (`org/name`).

    Raises:
        UsageError: naming the valid choices, and the closest one.
    """
    if dataset in ("world", "folder") or "/" in dataset:
        return
    try:
        get_dataset_info(dataset)
    except ValueError:
        valid = ["world", "folder", *known_dataset_names()]
        close = difflib.get_close_matches(dataset.lower(), valid, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"--dataset {dataset} is not a dataset this recipe knows{hint}: give one of "
                         f"{', '.join(valid)}, or a Hub dataset repo id (org/name)") from None


def check_run_inputs(data: TargetData, args: VocAlignArguments, resume: str | None = None) -> None:
    """The model-side checks of a run, before any weights are loaded: the base model folder or Hub id, the LoRA
    layers against its CLIP towers, concepts for vocabulary alignment, and a resume checkpoint against this run."""
    if data.base_model is None:
        raise UsageError("--base_model is required (a converted CAT-Seg folder or Hub id)")
    data.base_model = resolve_base_model(data.base_model)
    if args.method == "zero_shot":
        return
    check_lora_layers(args.lora_layers, CATSegConfig.from_pretrained(data.base_model))
    args.check_concepts(data.concepts)
    if resume is not None:
        lora = lora_config_for_clip(LoRASettings(
            rank=args.lora_rank, alpha=args.lora_alpha, layers=tuple(args.lora_layers), use_rslora=args.lora_use_rslora))
        expected = {"r": lora.r, "lora_alpha": lora.lora_alpha, "target_modules": lora.target_modules,
                    "use_rslora": lora.use_rslora}
        settings = run_settings(args)
        check_resume_checkpoint(resume, expected_lora=expected, class_names=data.class_names,
                                needs_teacher=args.method in ("vocalign", "teacher_student"), settings=settings,
                                concepts=data.concepts, allow_other_settings=args.resume_with_other_settings,
                                base_model=base_model_fingerprint(data.base_model))


def check_run_folders(recipe: RecipeArguments, args: VocAlignArguments) -> str | None:
    """The output folder's path and the resume checkpoint, before anything else is read: returns the checkpoint to
    resume. What the folder holds is checked by [`check_output_dir`], under the folder's lock.

    The output may neither be, contain nor lie inside an input folder (the next run would train on its overlays),
    nor lie inside the base model's folder."""
    resume = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    inputs = [("--data_root", recipe.data_root), ("--eval_data_root", recipe.eval_data_root),
              ("--eval_mask_root", recipe.eval_mask_root)]
    check_not_overlapping(args.output_dir, inputs, "--output_dir")
    if recipe.base_model and Path(recipe.base_model).expanduser().is_dir():
        base, output = Path(recipe.base_model).expanduser().resolve(), Path(args.output_dir).expanduser().resolve()
        if output == base or output.is_relative_to(base):
            raise UsageError(f"--output_dir {args.output_dir} lies in the --base_model folder {recipe.base_model}: "
                             "give a folder outside it")
    if args.method != "zero_shot":  # the zero-shot evaluation writes nothing
        check_output_path(args.output_dir)
    return resume


def _resumes_in_place(resume: str | None, output_dir: str) -> bool:
    return resume is not None and Path(resume).resolve().parent == Path(output_dir).resolve()


#: What a checkpoint and a run write besides the LoRA weights: the processor (CLIP's tokenizer.json, 3.5 MiB), the
#: small state files; and once per run the overlays and results.
PROCESSOR_BYTES = 4 << 20
RUN_EXTRA_BYTES = 1 << 20


def checkpoint_space_needed(model: torch.nn.Module, args: VocAlignArguments, start_step: int = 0) -> tuple[int, str]:
    """Bytes the run's checkpoints and adapter will take at their peak (with a quarter more as margin), and a
    description for the message: per checkpoint the trainable (LoRA) weights, AdamW's two moments, the teacher's
    copy and the processor's files; the checkpoints still to be written after `start_step` (a resume), as many as
    are kept at once (rotation deletes the oldest only after writing the newest)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    checkpoint = 4 * trainable + PROCESSOR_BYTES
    count = 0
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    if strategy == "steps" and args.max_steps > 0:
        every = max(int(args.save_steps), 1)
        count = max(0, args.max_steps // every - start_step // every)
    elif strategy != "no":
        count = max(1, int(math.ceil(args.num_train_epochs)))
    if args.save_total_limit:
        count = min(count, args.save_total_limit + 1)
    needed = int(1.25 * (count * checkpoint + trainable + RUN_EXTRA_BYTES))
    return needed, f"{count} checkpoint(s) of {checkpoint / 2**20:.1f} MiB and the adapter"


def _disk_full(error: BaseException, output: Path, needed: int) -> UsageError | None:
    """A full disk during the run, as one line naming the folder and the space the run needs."""
    if not isinstance(error, OSError) or error.errno != errno.ENOSPC:
        return None
    probe = output if output.exists() else output.parent
    free = shutil.disk_usage(probe).free if probe.exists() else 0
    return UsageError(
        f"the disk of --output_dir {output} filled up during the run ({error.strerror or error}; {free / 2**20:.1f} "
        f"MiB free now, the run needs about {needed / 2**20:.1f} MiB): free some space or give --output_dir on another "
        "disk, then --resume_from_checkpoint true continues from the last complete checkpoint"
    )


#: The training-free scorings a user gets without adapting: the class names alone, and with their concepts.
TRAINING_FREE = ("zero_shot_miou", "zero_shot_concepts_miou")


def best_training_free(results: dict[str, Any]) -> str | None:
    """The key of the strongest training-free mIoU in `results` (the baseline the gain is quoted against)."""
    measured = [key for key in TRAINING_FREE if key in results]
    return max(measured, key=lambda key: results[key]) if measured else None


def summary_line(results: dict[str, Any]) -> str:
    """`zero-shot mIoU a (with concepts c) -> adapted mIoU b (+d over the best without training; class names alone
    e)`, saying why a value is absent instead of printing nan."""
    absent = results.get("absent", {})

    def value(key: str) -> str:
        return f"{results[key]:.2f}" if key in results else f"absent ({absent.get(key, 'not measured')})"

    line = f"adapted mIoU {value('adapted_miou')}"
    baseline = best_training_free(results)
    notes = []
    if baseline and "adapted_miou" in results:
        against = "the best without training" if "zero_shot_concepts_miou" in results else "zero-shot"
        notes.append(f"{results['adapted_miou'] - results[baseline]:+.2f} over {against}")
    if "adapted_names_miou" in results or "adapted_names_miou" in absent:
        notes.append(f"class names alone {value('adapted_names_miou')}")
    line += f" ({'; '.join(notes)})" if notes else ""
    if "zero_shot_miou" in results or "zero_shot_miou" in absent:
        concepts = f" (with concepts {value('zero_shot_concepts_miou')})" if "zero_shot_concepts_miou" in results else ""
        line = f"zero-shot mIoU {value('zero_shot_miou')}{concepts} -> {line}"
    return line


#: The run's headline mIoUs on the target split, as the adapter's card names them.
RESULT_TITLES = {
    "adapted_miou": "target mIoU (adapted)",
    "adapted_names_miou": "target mIoU (adapted, class names alone)",
    "zero_shot_miou": "target mIoU (zero-shot)",
    "zero_shot_concepts_miou": "target mIoU (zero-shot, with concepts)",
}


def run_adaptation(recipe: RecipeArguments, args: VocAlignArguments) -> dict[str, float]:
    """The main job: zero-shot evaluation, VocAlign adaptation, evaluation of the adapted student, a per-class
    report, the adapter (with class list, concepts and model card) in `<output_dir>/adapter`, then overlays.

    Returns `{"zero_shot_miou": ..., "adapted_miou": ...}` plus per-class IoUs (`adapted_iou_<class>`, percent),
    also written to `<output_dir>/results.json`. A metric without a value (no valid pixel) is left out and listed
    under `"absent"` with the reason, never written as NaN.

    Every input is checked first (output folder, resume checkpoint, base model, every image and mask, LoRA layers,
    free space): a problem raises a `UsageError` naming it before any model is loaded or anything is written. A
    previous run in `output_dir` is kept unless `--overwrite_output_dir` (it is then set aside, and deleted only
    once this run has written its results) or a resume from one of its checkpoints says otherwise; files that no
    run of this tool wrote are never replaced. One run at a time writes into a folder: the main process holds its
    lock ([`~vocalign_hf.output_lock.lock_output_dir`]) from before the folder is read until the run ends.
    """
    # One push path: the Trainer's --push_to_hub/--hub_model_id map onto the adapter push below (or fail now).
    push = adapter_push_target(recipe.push_adapter_to_hub, args)
    if args.push_to_hub:
        args = replace(args, push_to_hub=False)
    check_recipe_args(recipe)
    resume = check_run_folders(recipe, args)
    if args.method == "zero_shot":  # writes nothing
        return _adapt(recipe, args, resume, push)
    resuming = _resumes_in_place(resume, args.output_dir)
    if args.process_index != 0:  # only the main process writes; it holds the lock
        check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, resuming=resuming)
        return _adapt(recipe, args, resume, push)
    with lock_output_dir(args.output_dir):
        check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, resuming=resuming)
        return _adapt(recipe, args, resume, push)


def _adapt(recipe: RecipeArguments, args: VocAlignArguments, resume: str | None, push: dict | None) -> dict[str, Any]:
    """[`run_adaptation`] once the output folder is checked (and locked)."""
    set_seed(args.seed)
    if recipe.base_model:  # before the data checks, which can take a while on a large split
        resolve_base_model(recipe.base_model)
    # Several processes: the (local) main process builds the data first -- renders and caches the world, pretrains
    # or unpacks its source model, prepares datasets -- and the others then read what it wrote.
    with args.main_process_first(desc="target data"):
        data = load_target_data(recipe, args.output_dir, seed=args.seed, progress=False if args.disable_tqdm else None)
    check_run_inputs(data, args, resume)
    processor = CATSegProcessor.from_pretrained(data.base_model)

    def trainer_for(model, method: str, concept_log_weights=None, **changes: Any) -> VocAlignTrainer:
        return VocAlignTrainer(
            model=model, args=args if method == args.method else replace(args, method=method, **changes),
            class_names=data.class_names, concepts=data.concepts, processor=processor,
            train_dataset=data.train, eval_dataset=data.eval, concept_log_weights=concept_log_weights,
        )

    results: dict[str, Any] = {}
    tables: dict[str, str] = {}
    zero_shot_model = CATSegForSemanticSegmentation.from_pretrained(data.base_model)
    if recipe.eval_zero_shot or args.method == "zero_shot":
        # Two training-free baselines: the class names alone, and with their concepts (vocabulary alignment without
        # training, the strongest thing a user gets for free). The gain is quoted against the better one.
        zero_shot = trainer_for(zero_shot_model, "zero_shot", student_concepts=False)
        tables["zero-shot"] = _evaluate_into(results, zero_shot, "zero_shot")
        if data.concepts:
            with_concepts = trainer_for(zero_shot_model, "zero_shot", student_concepts=True, use_concepts=True)
            tables["zero-shot with concepts"] = _evaluate_into(results, with_concepts, "zero_shot_concepts")
    if args.method == "zero_shot":
        results, absent = split_absent_metrics(results)
        if zero_shot.is_world_process_zero():
            print(tables["zero-shot"])
        return {**results, "absent": absent} if absent else results

    guard = _audit_concepts(recipe, args, data, zero_shot_model, processor)
    set_seed(args.seed)
    student = add_lora(CATSegForSemanticSegmentation.from_pretrained(data.base_model), args)
    start_step = int(read_json_object(Path(resume) / "trainer_state.json").get("global_step", 0)) if resume else 0
    needed, what = checkpoint_space_needed(student, args, start_step)
    check_free_space(args.output_dir, needed, what)
    trainer = trainer_for(student, args.method, concept_log_weights=guard)
    replacing = args.overwrite_output_dir and not _resumes_in_place(resume, args.output_dir)
    _mark_training(trainer, args, replacing)
    try:
        trainer.train(resume_from_checkpoint=resume)
        tables["adapted"] = _evaluate_into(results, trainer, "adapted")
        if args.student_concepts:  # the paper's deployment: concepts only during adaptation
            names_only = trainer_for(trainer.model, "zero_shot", student_concepts=False)
            tables["adapted, class names alone"] = _evaluate_into(results, names_only, "adapted_names")
        # The adapted model scores as it was evaluated, also as a user's model(...) or pipeline(...) calls it.
        trainer.model.get_base_model().set_concepts(data.concepts if args.student_concepts else None, processor)
        results, absent = split_absent_metrics(results)  # NaN (no valid pixel) is reported as absent, with the reason
        if absent:
            results["absent"] = absent
        sharded = None
        if is_sharded(trainer.model):  # FSDP: the adapter's weights and the overlays' forwards need every rank
            sharded = _sharded_export(recipe, data, processor, trainer, zero_shot_model)
        if trainer.is_world_process_zero():
            _export_run(recipe, data, processor, trainer, zero_shot_model, results, tables, push, replacing, sharded)
    except BaseException as error:
        if trainer.is_world_process_zero():
            _mark_stopped(Path(args.output_dir), trainer, error)
            if replacing:  # puts the previous run back, its mark included, if this one wrote no checkpoint
                finish_replacing(args.output_dir, succeeded=False)
        full = _disk_full(error, Path(args.output_dir), needed)
        if full is not None:
            raise full from error
        raise
    return results


def _mark_training(trainer: VocAlignTrainer, args: VocAlignArguments, replacing: bool) -> None:
    """Before the first step: set the run being replaced aside (`--overwrite_output_dir`), and mark the folder as
    this run's, in training (`vocalign_run.json`). Main process only; the others wait for it."""
    with args.main_process_first(local=False, desc="setting the previous run aside"):
        if not trainer.is_world_process_zero():
            return
        if replacing:
            set_aside_previous_run(args.output_dir)
        elif (Path(args.output_dir) / PREVIOUS_RUN).exists():  # resuming a run that was replacing another
            logger.warning("%s (the run an interrupted --overwrite_output_dir set aside) is kept: this resumed run "
                           "never deletes it; delete it yourself once you no longer need it",
                           Path(args.output_dir) / PREVIOUS_RUN)
        record = {**trainer.run_settings(), "base_model": trainer.base_model_record()}
        atomic_write_json(Path(args.output_dir) / RUN_MARK, run_mark("training", record))


def _audit_concepts(recipe, args, data: TargetData, model, processor) -> dict[str, dict[str, float]]:
    """Print which pixels each concept wins on the unlabeled target images, and from which class (see
    `adaptation.concept_audit`); with `--concept_guard`, return the teacher's log-weights of the concepts that take
    another class (else none). The audit reads the source model in eval mode on the first training images, without
    augmentation: a resumed run computes the same weights."""
    if not (data.concepts and args.use_concepts and args.include_class_names and recipe.concept_audit_images):
        return {}
    rows = data.train.with_format(None) if hasattr(data.train, "with_format") else None
    if rows is None or "image" not in rows.column_names:
        logger.warning("concept audit skipped: the training split has no 'image' column")
        return {}
    images = rows.select(range(min(recipe.concept_audit_images, len(rows))))["image"]
    vocabulary = ConceptVocabulary(data.class_names, data.concepts)
    audit = audit_concepts(model.eval(), processor, [image.convert("RGB") for image in images], vocabulary)
    if args.process_index == 0:
        print(f"\n=== concepts on {len(images)} unlabeled target images ===\n{format_audit(audit, 0.5)}")
    if not args.concept_guard:
        return {}
    weights, guarded = guard_concepts(audit)
    if args.process_index == 0:
        print("concept guard: the teacher weighs down " + (", ".join(
            f"{row.concept} ({row.class_name}: takes {row.victim_share:.0%} of {row.victim})" for row in guarded)
            or "no concept"))
    return weights


def _mark_stopped(output: Path, trainer: VocAlignTrainer, error: BaseException) -> None:
    """Record in the run's mark that it stopped on `error`, and at which step; a mark that cannot be written (a full
    disk) must not hide the error itself."""
    status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    mark = run_mark(status, {**trainer.run_settings(), "error": reason, "step": trainer.state.global_step})
    try:
        atomic_write_json(output / RUN_MARK, mark)
    except OSError as failure:
        logger.warning("could not record the failure in %s (%s)", output / RUN_MARK, failure)


def _evaluate_into(results: dict[str, Any], trainer: VocAlignTrainer, prefix: str) -> str:
    """Evaluate, put `<prefix>_miou` and the per-class IoUs into `results`, and return the per-class table."""
    metrics = trainer.evaluate(metric_key_prefix=prefix)
    results[f"{prefix}_miou"] = metrics[f"{prefix}_mean_iou"]
    results.update({k: v for k, v in metrics.items() if k.startswith(f"{prefix}_iou_")})
    return trainer.last_eval_table


def _overlay_predictors(processor, trainer, zero_shot_model, class_names) -> list:
    tokens = processor.tokenize_classes(class_names)["input_ids"]
    device = trainer.args.device
    trainer.model.eval()
    return [lambda x: zero_shot_model.eval()(pixel_values=x.to(device), input_ids=tokens.to(device)).logits,
            lambda x: trainer.class_scores(x.to(device))]


def _sharded_export(recipe, data, processor, trainer, zero_shot_model) -> dict[str, Any]:
    """What [`_export_run`] computes with the models, computed by every rank when they are FSDP-sharded (gathering
    a weight and a forward are collectives): the student's LoRA weights, whole, and the overlay image."""
    weights = {name: full(value).detach().cpu() for name, value in trainer.model.state_dict().items()
               if "lora_" in name}  # the same names in the same order on every rank
    predictors = _overlay_predictors(processor, trainer, zero_shot_model, data.class_names)
    grid = overlay_grid(predictors, trainer.data_collator, data.eval, data.class_names, data.palette,
                        recipe.num_overlays)
    return {"adapter_weights": weights, "overlay_grid": grid}


def _export_run(recipe, data, processor, trainer, zero_shot_model, results, tables, push, replacing,
                sharded: dict[str, Any] | None = None) -> None:
    """Print the tables, then write what matters first: the adapter and `results.json`; then the overlays; then
    mark the run finished, delete the run this one replaced (`replacing`: it set one aside), and push. `sharded`:
    what [`_sharded_export`] computed on every rank when the models are FSDP-sharded."""
    args = trainer.args
    for name, table in tables.items():
        print(f"\n=== target split, {name} ===\n{table}")
    print("\n" + summary_line(results))
    output = Path(args.output_dir)
    settings = trainer.adaptation_settings()
    metrics = {title: results[key] for key, title in RESULT_TITLES.items() if key in results}
    # save_adapter writes the folder whole and renames it into place: never new weights beside an old class list.
    folder = save_adapter(trainer.model, output / "adapter", data.class_names, data.concepts, metrics, settings,
                          dataset=recipe.hub_source or recipe.dataset,
                          state_dict=sharded["adapter_weights"] if sharded else None)
    atomic_write_text(output / "results.json", json.dumps(results, indent=2, allow_nan=False))
    print(f"adapter saved to {folder}")
    if sharded:
        grid = sharded["overlay_grid"]
        overlays = None if grid is None else atomic_write_file(
            output / "overlays.png", lambda tmp: grid.save(tmp, format="PNG"))
    else:
        predictors = _overlay_predictors(processor, trainer, zero_shot_model, data.class_names)
        overlays = save_overlays(predictors, trainer.data_collator, data.eval, data.class_names, data.palette,
                                 output / "overlays.png", recipe.num_overlays)
    if overlays:
        print(f"overlays (image | ground truth | zero-shot | adapted): {overlays}")
    atomic_write_json(output / RUN_MARK, run_mark("finished", settings))
    if replacing:
        finish_replacing(output, succeeded=True)
    if push is not None:
        sha = push_adapter_to_hub(folder, **push)
        print(f"adapter pushed to {push['repo_id']} (commit {sha})")

"""'Pretraining' of a tiny CAT-Seg on the world's source domain: the stand-in for the COCO-Stuff checkpoint.

All parameters (both CLIP towers and the aggregator) are trained from scratch with the softmax cross-entropy of
`CATSegForSemanticSegmentation`. To make the text tower read class *names* instead of learning class positions,
every step uses a random order and (half of the time) a random subset of the source names; labels are remapped to
that order and pixels of left-out classes are ignored (255). Each step also adds a few *distractor* names
(`DISTRACTOR_WORDS`, everyday nouns that label nothing in the world) whose pixels never occur, so the model learns
that a name which is not one of its classes should score low everywhere -- as real CAT-Seg pretraining, where
most of the 171 COCO-Stuff names are absent from any given image. The text tower knows the eight source names;
any other word (the target's "terrain", "automobile", ...) was never trained.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write_folder, atomic_write_json
from ..models.catseg import CATSegConfig, CATSegForSemanticSegmentation, CATSegProcessor
from ..models.catseg.pixel_normalization import normalize_pixels
from .datasets import World, dataset_to_tensors
from .evaluation import evaluate_segmenter
from .generator import WorldConfig
from .shipped import unpack_shipped_source_model
from .source_folder import INFO_FILE, check_source_model_folder

__all__ = [
    "DISTRACTOR_WORDS",
    "PRETRAIN_VERSION",
    "auto_num_threads",
    "pretrain_settings",
    "pretrain_settings_hash",
    "pretrain_source_model",
    "tiny_catseg_config",
]

#: Bumped when the training procedure changes, so that old checkpoints are not reused.
PRETRAIN_VERSION = 2

#: Names of things absent from the world, added to the vocabulary during pretraining (never any target class name
#: or concept: those must stay unseen).
DISTRACTOR_WORDS: tuple[str, ...] = (
    "piano", "giraffe", "umbrella", "laptop", "banana", "guitar", "elephant", "teapot", "pillow", "zebra",
    "scissors", "violin", "pizza", "lamp", "kite", "clock", "sofa", "penguin", "candle", "bottle",
    "carpet", "spoon", "helmet", "rabbit", "mirror", "cactus", "ladder", "kettle", "balloon", "sandwich",
    "whale", "bucket", "crown", "glove", "anchor", "drum", "feather", "basket", "tiger", "wallet",
)
#: The default world's pretraining, as the shipped source model was made (the recipes' `world_pretrain_*` defaults).
PRETRAIN_STEPS = 700
PRETRAIN_BATCH_SIZE = 16
PRETRAIN_THREADS = 1  # fixed, so that the source model is reproducible


def tiny_catseg_config(image_size: int = 64) -> CATSegConfig:
    """A small CAT-Seg for `image_size` images: ViT with 8-pixel patches (4 layers, width 96), a 2-layer text
    tower of width 64, projection 64, aggregator width 32. About 3.9M parameters, 3.2M of them the CLIP token
    embedding table (the real 49408-token BPE vocabulary is kept so that any word can be tokenised)."""
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of the patch size 8, got {image_size}")
    grid = image_size // 8
    window = 4 if grid % 4 == 0 and grid > 4 else grid
    return CATSegConfig(
        clip_config=dict(
            text_config=dict(
                hidden_size=64,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=2,
                vocab_size=49408,
                max_position_embeddings=77,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            ),
            vision_config=dict(
                hidden_size=96,
                intermediate_size=384,
                num_hidden_layers=4,
                num_attention_heads=4,
                image_size=image_size,
                patch_size=8,
            ),
            projection_dim=64,
        ),
        clip_resolution=image_size,
        guidance_layers=[1, 2],
        prompt_templates="single",
        text_guidance_proj_dim=32,
        appearance_guidance_proj_dim=32,
        decoder_dims=[32, 16],
        decoder_guidance_dims=[32, 16],
        decoder_guidance_proj_dims=[16, 8],
        hidden_dim=32,
        num_heads=2,
        window_size=window,
        pooling_size=[2, 2],
        pad_len=0,
    )


def auto_num_threads(max_threads: int = 2) -> int:
    """`max_threads` when the machine looks idle (1-minute load average below 1), else 1 (see
    `pretrain_source_model`)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        load = 0.0
    return max(1, min(max_threads, cores)) if load < 1.0 else 1


def pretrain_settings(
    steps: int = PRETRAIN_STEPS,
    batch_size: int = PRETRAIN_BATCH_SIZE,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup_steps: int = 50,
    subset_probability: float = 0.5,
    min_classes: int = 2,
    max_distractors: int = 4,
    seed: int = 0,
    synonyms: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """The training settings of `pretrain_source_model` as recorded in `pretrain_info.json` (and hashed)."""
    settings = dict(
        steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
        subset_probability=subset_probability, min_classes=min_classes, max_distractors=max_distractors, seed=seed,
        augment="hflip", distractor_words=list(DISTRACTOR_WORDS),
    )
    if synonyms:  # only when given, so that the source model made before this option keeps its settings hash
        settings["synonyms"] = {name: list(words) for name, words in sorted(synonyms.items())}
    return settings


#: Config fields that only set the vocabulary a trained model scores with (added after the shipped model was made).
CALL_VOCABULARY_FIELDS = ("concepts", "concept_token_ids")


def pretrain_settings_hash(world_config: WorldConfig, model_config: CATSegConfig, settings: dict[str, Any]) -> str:
    """Hash of the world, the model config and the training settings (the reuse key of a checkpoint)."""
    payload = {
        "world": world_config.fingerprint(),
        "model": model_config.to_dict(),
        "settings": settings,
        "version": PRETRAIN_VERSION,
    }
    payload["model"].pop("transformers_version", None)
    for field in CALL_VOCABULARY_FIELDS:  # what a call scores with by default, not what pretraining makes
        payload["model"].pop(field, None)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _finished_info(output_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((output_dir / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def pretrain_source_model(
    world: World,
    output_dir: str | os.PathLike,
    steps: int = PRETRAIN_STEPS,
    batch_size: int = PRETRAIN_BATCH_SIZE,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup_steps: int = 50,
    subset_probability: float = 0.5,
    min_classes: int = 2,
    max_distractors: int = 4,
    seed: int = 0,
    synonyms: dict[str, tuple[str, ...]] | None = None,
    model_config: CATSegConfig | None = None,
    num_threads: int | str | None = "auto",
    progress: bool = True,
    force: bool = False,
    use_shipped: bool = True,
) -> Path:
    """Train a CAT-Seg from scratch on `world.source_train` with the source class names and save it.

    Reuses `output_dir` without training when its `pretrain_info.json` carries the same settings hash (same
    world, model config and training settings), unless `force`.

    Args:
        world: the world (see `build_world`).
        output_dir: where the model, the processor and `pretrain_info.json` go; written to a temporary sibling
            folder and moved into place with `os.replace`.
        steps, batch_size, lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to 0.
        subset_probability: chance that a step uses a random subset (of `min_classes` to all but one classes) of
            the source names instead of all of them; the order is always shuffled.
        max_distractors: each step adds 0..`max_distractors` names from `DISTRACTOR_WORDS` (no pixels) at random
            positions of the vocabulary; 0 disables them.
        seed: seeds the model initialisation and every random draw of training.
        synonyms: other words for source classes, `{source name: (word, ...)}` (e.g. `SOURCE_SYNONYMS`): each step
            names such a class by one of its other words half of the time, so that the text tower trains on them
            in the source sense (web text names a thing in several ways). None: every class by its name alone.
        model_config: default `tiny_catseg_config(world.config.image_size)`.
        num_threads: `torch.set_num_threads` during training (restored afterwards). "auto" (default): 2 threads
            when the machine is otherwise idle (1-minute load average < 1 and at least 2 cores), else 1 -- on a
            small shared machine, OpenMP threads competing with another busy process slow a step down ~10x,
            while one thread stays near full speed. None leaves the setting alone.
        progress: show a tqdm bar.
        force: retrain even if a matching checkpoint exists.
        use_shipped: when the settings hash equals that of the source model shipped with the package (the
            default world and recipe settings, see `vocalign_hf.world.shipped`), unpack it instead of training.
    Returns:
        `output_dir` as a `Path`. `pretrain_info.json` holds the settings hash, settings, the loss of a fixed
        probe batch before and after training, the mean training loss of the last steps, the source-eval mIoU and
        the wall time.
    """
    output_dir = Path(output_dir)
    model_config = model_config or tiny_catseg_config(world.config.image_size)
    settings = pretrain_settings(
        steps, batch_size, lr, weight_decay, warmup_steps, subset_probability, min_classes, max_distractors, seed,
        synonyms,
    )
    settings_hash = pretrain_settings_hash(world.config, model_config, settings)
    info = _finished_info(output_dir)
    if not force and info is not None and info.get("settings_hash") == settings_hash:
        return output_dir
    if not force and use_shipped:
        if unpack_shipped_source_model(settings_hash, output_dir):
            return output_dir

    previous_threads = torch.get_num_threads()
    if num_threads == "auto":
        num_threads = auto_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    try:
        info = _train(world, output_dir, model_config, settings, settings_hash, progress)
    finally:
        torch.set_num_threads(previous_threads)
    return output_dir


def _other_word_rows(names: list[str], synonyms: dict[str, list[str]], first_row: int) -> dict[int, list[int]]:
    """`{class id: [token-table rows of its other words]}`, the words laid out from `first_row` in class order."""
    rows, row = {}, first_row
    for class_id, name in enumerate(names):
        count = len(synonyms.get(name, []))
        if count:
            rows[class_id] = list(range(row, row + count))
        row += count
    return rows


def _train(
    world: World,
    output_dir: Path,
    model_config: CATSegConfig,
    settings: dict[str, Any],
    settings_hash: str,
    progress: bool,
) -> dict[str, Any]:
    start_time = time.perf_counter()
    torch.manual_seed(settings["seed"])
    generator = torch.Generator().manual_seed(settings["seed"])
    model = CATSegForSemanticSegmentation(model_config)
    processor = CATSegProcessor.from_config(model_config)
    names = world.source_class_names
    num_classes = len(names)
    forbidden = {w.lower() for w in world.target_class_names} | {
        c.lower() for concepts in world.target_concepts.values() for c in concepts
    } | {n.lower() for n in names}
    synonyms = settings.get("synonyms") or {}
    words = [w for name in names for w in synonyms.get(name, [])]
    forbidden |= {w.lower() for w in words}
    distractors = [w for w in DISTRACTOR_WORDS if w.lower() not in forbidden]
    # Rows: the class names, the distractors, then every class's other words (after the names and distractors, so
    # that a run without synonyms tokenises exactly as before).
    all_ids = processor.tokenize_classes(names + distractors + words)["input_ids"]  # (C + D + S, P, L)
    other_words = _other_word_rows(names, synonyms, num_classes + len(distractors))

    images_u8, labels_u8 = dataset_to_tensors(world.source_train)
    stats = processor.image_processor.image_mean, processor.image_processor.image_std
    pixel_values = normalize_pixels(images_u8.float() / 255.0, *stats)  # the processor's normalisation, done once
    if pixel_values.shape[-1] != model_config.clip_resolution:
        raise ValueError("world.image_size must equal the model's clip_resolution")
    labels_all = labels_u8.long()
    n = pixel_values.shape[0]
    probe = torch.arange(min(settings["batch_size"], n))

    def probe_loss() -> float:
        model.eval()
        with torch.no_grad():
            out = model(pixel_values=pixel_values[probe], input_ids=all_ids[:num_classes], labels=labels_all[probe])
        model.train()
        return float(out.loss)

    loss_before = probe_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    total, warmup = settings["steps"], settings["warmup_steps"]

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(total), desc="pretrain (source)", disable=not progress, mininterval=2.0)
    for _ in bar:
        index = torch.randint(n, (settings["batch_size"],), generator=generator)
        x, y = pixel_values[index], labels_all[index]
        flip = torch.rand(len(index), generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y = torch.where(flip.view(-1, 1, 1), y.flip(-1), y)
        order = torch.randperm(num_classes, generator=generator)
        if torch.rand(1, generator=generator).item() < settings["subset_probability"]:
            k = int(torch.randint(settings["min_classes"], num_classes, (1,), generator=generator))
            order = order[:k]
        if not (y.unsqueeze(-1) == order).any():  # the subset misses every class of the batch: use all classes
            order = torch.randperm(num_classes, generator=generator)
        num_distractors = int(torch.randint(settings["max_distractors"] + 1, (1,), generator=generator))
        if num_distractors and distractors:
            extra = num_classes + torch.randperm(len(distractors), generator=generator)[:num_distractors]
            vocabulary = torch.cat([order, extra])[torch.randperm(len(order) + len(extra), generator=generator)]
        else:
            vocabulary = order
        lut = torch.full((256,), 255, dtype=torch.long)  # source id -> position in this step's vocabulary
        is_class = vocabulary < num_classes
        lut[vocabulary[is_class]] = torch.nonzero(is_class).squeeze(1)
        rows = vocabulary
        if other_words:  # half of the time a class with other words is named by one of them
            rows = vocabulary.clone()
            for position in torch.nonzero(is_class).squeeze(1).tolist():
                choices = other_words.get(int(vocabulary[position]))
                if choices and torch.rand(1, generator=generator).item() < 0.5:
                    rows[position] = choices[int(torch.randint(len(choices), (1,), generator=generator))]
        loss = model(pixel_values=x, input_ids=all_ids[rows], labels=lut[y]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    bar.close()
    train_seconds = time.perf_counter() - start_time

    loss_after = probe_loss()
    source_eval = world.source_eval if len(world.source_eval) else world.source_train.select(range(min(100, n)))
    metrics = evaluate_segmenter(model, processor, source_eval, names)
    tail = losses[-50:] or [float("nan")]
    info = {
        "settings_hash": settings_hash,
        "world_fingerprint": world.config.fingerprint(),
        "settings": settings,
        "source_class_names": names,
        "probe_loss_before": loss_before,
        "probe_loss_after": loss_after,
        "final_loss": sum(tail) / len(tail),
        "source_eval_miou": metrics["mean_iou"],
        "source_eval_per_class_iou": metrics["per_category_iou"],
        "train_seconds": train_seconds,
        "torch_threads": torch.get_num_threads(),
    }

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        atomic_write_json(folder / INFO_FILE, info)

    atomic_write_folder(output_dir, write, replace=check_source_model_folder(output_dir))
    return info

"""The demo's inference, free of any UI library: a base CAT-Seg and an optional VocAlign adapter segment one image
with a typed class list, side by side.

The fast path: the adapter is merged into its copy of the base model once (no LoRA hooks at inference), the image
is prepared once for both models, every vocabulary (class list, plus the adapter's concepts on the adapted side) is
encoded once and kept in a small cache, and on a GPU with bf16 support the forward runs under bf16 autocast.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..adaptation import load_adapted_model, merge_lora
from ..class_names import name_key, validate_class_names
from ..atomic import atomic_write_file
from ..data import make_palette
from ..errors import UsageError
from ..recipe_checks import resolve_base_model
from ..models.catseg import CATSegForSemanticSegmentation, CATSegProcessor
from ..models.catseg.concept_phrases import ConceptOwners
from ..models.catseg.pipeline_catseg import mean_class_probabilities
from ..models.catseg.vocabulary_catseg import aligned_entries
from ..visualization import colorize
from ..world import (
    WorldConfig,
    pretrain_settings,
    pretrain_settings_hash,
    render_split_arrays,
    tiny_catseg_config,
)
from ..world.datasets import default_world_cache
from ..world.shipped import unpack_shipped_source_model

__all__ = [
    "DEFAULT_ADAPTER",
    "DemoInputError",
    "DemoSegmenter",
    "DemoSetupError",
    "MAX_CLASSES",
    "MAX_PIXELS",
    "SegmentationResult",
    "display_size",
    "load_image",
    "load_merged_adapter",
    "overlay",
    "parse_class_list",
    "resize_for_display",
    "world_example_images",
    "class_palette",
    "world_source_model",
]

#: Largest image the demo accepts (16.8 megapixels, 4096 x 4096); checked from the file header before decoding.
MAX_PIXELS = 4096 * 4096
#: Most classes in one list (the logits are upsampled to the display size per class).
MAX_CLASSES = 64
#: The main job's adapter (`accelerate launch recipes/adapt.py` writes it), relative to the working directory.
DEFAULT_ADAPTER = os.path.join("runs", "world", "adapter")
#: The main job unpacks the world's source model here; reused when present and matching the shipped one.
_MAIN_JOB_SOURCE_MODEL = os.path.join("runs", "world", "source_model")
_MIN_DISPLAY, _MAX_DISPLAY = 384, 1024


class DemoInputError(ValueError):
    """Something wrong with what the user gave (image, class list); the message is meant to be shown as is."""


class DemoSetupError(RuntimeError):
    """A model or adapter that cannot be loaded; the message says what is missing and how to get it."""


# ----------------------------------------------------------------------------------------------------- inputs
def parse_class_list(text: str | None) -> list[str]:
    """Comma- (or newline-) separated class names -> a validated list; empty pieces ("a, b,") are skipped.

    Raises:
        DemoInputError: no name at all, a duplicate name, or more than `MAX_CLASSES` names.
    """
    pieces = [piece.strip() for piece in (text or "").replace("\n", ",").split(",")]
    pieces = [piece for piece in pieces if piece]
    if not pieces:
        raise DemoInputError("The class list is empty: type class names separated by commas, e.g. sky, tree, road.")
    if len(pieces) > MAX_CLASSES:
        raise DemoInputError(f"{len(pieces)} class names given; the demo takes at most {MAX_CLASSES}.")
    try:
        return validate_class_names(pieces, source="class list")
    except (TypeError, ValueError) as error:
        raise DemoInputError(str(error)) from None


def load_image(path: str | os.PathLike, name: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an uploaded image as RGB (EXIF rotation applied), refusing files that are not images or too large.

    The size is read from the header, so an oversized image is refused before it is decoded.

    Args:
        path: the file.
        name: how to call it in messages (the uploaded file's original name); default the file name.
        max_pixels: the largest width x height accepted.
    Raises:
        DemoInputError: missing, unreadable, truncated or oversized image (the message names the file).
    """
    path = Path(path)
    name = name or path.name
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise DemoInputError(f"{name}: the file is missing.") from None
    except Image.DecompressionBombError as error:
        raise DemoInputError(f"{name} is too large: {error}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise DemoInputError(f"{name} is not a readable image (use PNG, JPEG, WebP, BMP, TIFF or GIF).") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise DemoInputError(
            f"{name} is {width} x {height} pixels ({width * height / 1e6:.1f} megapixels); the demo takes images of "
            f"at most {max_pixels / 1e6:.1f} megapixels: downscale it first."
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as error:
        raise DemoInputError(f"{name} could not be decoded ({error}).") from None
    return image.convert("RGB")


def display_size(width: int, height: int) -> tuple[int, int]:
    """The (width, height) results are drawn at: small images are enlarged by an integer factor so that the
    longer side is at least 384 (nearest neighbour: the pixels the model saw stay visible), large ones shrunk so
    that it is at most 1024."""
    longest = max(width, height)
    if longest < _MIN_DISPLAY:
        factor = math.ceil(_MIN_DISPLAY / longest)
        return width * factor, height * factor
    if longest > _MAX_DISPLAY:
        scale = _MAX_DISPLAY / longest
        return max(1, round(width * scale)), max(1, round(height * scale))
    return width, height


def resize_for_display(image: Image.Image) -> Image.Image:
    """`image` at [`display_size`]."""
    size = display_size(*image.size)
    if size == image.size:
        return image
    enlarge = size[0] > image.size[0]
    return image.resize(size, Image.Resampling.NEAREST if enlarge else Image.Resampling.LANCZOS)


def overlay(
    image: Image.Image, labels: np.ndarray, palette: Sequence[tuple[int, int, int]], opacity: float = 0.6
) -> Image.Image:
    """The segmentation drawn over `image` (same size as `labels`): `opacity` 1 shows the class colours alone."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    colours = colorize(labels, palette).astype(np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if base.shape[:2] != labels.shape:
        raise ValueError(f"image is {base.shape[1]} x {base.shape[0]} but labels are {labels.shape[1]} x {labels.shape[0]}")
    blended = (1.0 - opacity) * base + opacity * colours
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------------- models
@dataclass
class SegmentationResult:
    """One model's answer for one image.

    Attributes:
        labels: `(H, W)` class indices at the display size.
        shares: `(num_classes,)` fraction of the pixels given to each class.
        entries: the prompts scored: the class names, plus concepts when the adapter's were added.
        concepts: the concepts added per class (empty without).
        seconds: wall time of the forward and post-processing.
        scores: `(num_classes,)` each class's mean probability over its pixels (0 without any), as the
            zero-shot pipeline's `score`: the softmax over the classes that `post_process_semantic_segmentation`
            returns with the labels.
    """

    labels: np.ndarray
    shares: np.ndarray
    entries: list[str]
    concepts: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    scores: np.ndarray | None = None


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _auto_bf16(device: torch.device) -> bool:
    """bf16 where it helps: CUDA GPUs with bf16 support. CPUs without native bf16 (no AVX512-BF16/AMX, like this
    project's machines) emulate it and run slower than fp32, so CPU inference stays fp32."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


class DemoSegmenter:
    """A base CAT-Seg (zero-shot) and, optionally, the same base with a VocAlign adapter merged in (adapted).

    Args:
        base_model: the zero-shot model.
        processor: its [`CATSegProcessor`].
        adapted_model: the adapted model (a plain CAT-Seg with the LoRA weights merged), or None.
        adapter_info: the adapter's `vocalign.json` content (`class_names`, `concepts`, ...).
        base_name, adapter_name: how the models are named in the UI.
        device: default CUDA when available, else CPU.
        bf16: run the forward under bf16 autocast; None: on CUDA GPUs that support it.
    """

    def __init__(
        self,
        base_model: CATSegForSemanticSegmentation,
        processor: CATSegProcessor,
        adapted_model: CATSegForSemanticSegmentation | None = None,
        adapter_info: Mapping[str, Any] | None = None,
        base_name: str = "base model",
        adapter_name: str | None = None,
        device: str | torch.device | None = None,
        bf16: bool | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else _default_device()
        self.bf16 = _auto_bf16(self.device) if bf16 is None else bool(bf16)
        self.base_model = base_model.to(self.device).eval()
        self.adapted_model = adapted_model.to(self.device).eval() if adapted_model is not None else None
        self.processor = processor
        self.adapter_info = dict(adapter_info or {})
        self.base_name = base_name
        self.adapter_name = adapter_name
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls, base_model: str | os.PathLike, adapter: str | os.PathLike | None = None, **kwargs: Any
    ) -> "DemoSegmenter":
        """Load a base model (folder or Hub id) and optionally an adapter (folder or Hub id) onto a copy of it.

        Raises:
            DemoSetupError: the base model or the adapter cannot be loaded (the message names it and says why).
        """
        base_name = str(base_model)
        try:  # a missing folder is named as one, not as a malformed Hub id
            resolve_base_model(base_name, flag="base model")
        except UsageError as error:
            raise DemoSetupError(f"Could not load the base model {base_name!r}: {error}") from None
        try:
            model = CATSegForSemanticSegmentation.from_pretrained(base_name)
            processor = CATSegProcessor.from_pretrained(base_name)
        except Exception as error:  # any loading failure becomes one message naming the model
            raise DemoSetupError(f"Could not load the base model {base_name!r}: {_first_line(error)}") from error
        segmenter = cls(model, processor, base_name=base_name, **kwargs)
        if adapter:
            segmenter.attach_adapter(*load_merged_adapter(base_name, adapter), name=str(adapter))
        return segmenter

    def attach_adapter(
        self, adapted_model: CATSegForSemanticSegmentation, adapter_info: Mapping[str, Any], name: str
    ) -> None:
        """Use `adapted_model` (the base with the adapter merged in) as the adapted side."""
        self.adapted_model = adapted_model.to(self.device).eval()
        self.adapter_info = dict(adapter_info or {})
        self.adapter_name = name

    # ------------------------------------------------------------------------------------------- vocabulary
    @property
    def has_adapter(self) -> bool:
        return self.adapted_model is not None

    @property
    def adapter_class_names(self) -> list[str]:
        """The classes the adapter was made for (empty if it does not say)."""
        return list(self.adapter_info.get("class_names") or [])

    def adapter_concepts(self, class_names: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
        """The adapter's concepts for the classes of `class_names` it knows (names compared ignoring case).

        A concept that collides with another listed class (the one check, `ConceptOwners`: equal to its name or to a
        concept already kept for it, or a plural, article or spacing form of one) is left out; those are returned
        second, as "concept (class)".
        """
        # Dropped, not raised (as `aligned_entries` would): the adapter's concepts were checked against the adapter's
        # own class list, and a class the demo's user adds may collide with one; that is no error of the user's, and
        # the page shows what was left out.
        known = {name_key(name): list(concepts) for name, concepts in (self.adapter_info.get("concepts") or {}).items()}
        owners = ConceptOwners(class_names)
        concepts: dict[str, list[str]] = {}
        dropped: list[str] = []
        for name in class_names:
            kept: list[str] = []
            seen = {name_key(name)}
            for concept in known.get(name_key(name), []):
                if owners.collision(concept, name) is not None:
                    dropped.append(f"{concept} ({name})")
                elif name_key(concept) not in seen:  # a repeat within the class, or its own name: nothing to add
                    seen.add(name_key(concept))
                    owners.claim(concept, name)
                    kept.append(concept)
            if kept:
                concepts[name] = kept
        return concepts, dropped

    def text_embeddings(self, which: str, entries: Sequence[str]) -> torch.Tensor:
        """The text embeddings of `entries` for the "zero-shot" or "adapted" model, encoded once per list (the
        model's `encode_vocabulary`)."""
        tokens = self.processor.tokenize_classes(list(entries))
        with torch.inference_mode(), self._autocast():
            return self._model(which).encode_vocabulary(tokens["input_ids"].to(self.device))

    def _model(self, which: str) -> CATSegForSemanticSegmentation:
        if which == "zero-shot":
            return self.base_model
        if which == "adapted":
            if self.adapted_model is None:
                raise DemoSetupError("No adapter is loaded.")
            return self.adapted_model
        raise ValueError(f"which must be 'zero-shot' or 'adapted', got {which!r}")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    # ------------------------------------------------------------------------------------------- inference
    def prepare(self, image: Image.Image) -> torch.Tensor:
        """`pixel_values` (1, 3, h, w) of one image, shared by both models."""
        return self.processor(images=image)["pixel_values"].to(self.device)

    def segment(
        self,
        image: Image.Image | torch.Tensor,
        class_names: Sequence[str],
        which: str = "zero-shot",
        use_concepts: bool | None = None,
        output_size: tuple[int, int] | None = None,
    ) -> SegmentationResult:
        """Segment one image (a PIL image, or `pixel_values` from [`prepare`]) with `class_names`.

        Args:
            which: "zero-shot" (the base model) or "adapted" (the adapter's model).
            use_concepts: whether the adapter's concepts join their classes, each class's probability the sum over
                its name and concepts (VocAlign's Eq. 7, computed by the model as `pipeline(...)` does). Default:
                on the adapted side, off on the zero-shot side (`True` there: vocabulary alignment without training).
            output_size: (height, width) of the returned labels; default the image's size (PIL) or the logits'.
        """
        start = time.perf_counter()
        class_names = list(class_names)
        use_concepts = which == "adapted" if use_concepts is None else use_concepts
        concepts = self.adapter_concepts(class_names)[0] if use_concepts else {}
        entries, entry_class_ids = aligned_entries(class_names, concepts)
        if isinstance(image, Image.Image):
            output_size = output_size or (image.height, image.width)
            pixel_values = self.prepare(image)
        else:
            pixel_values = image.to(self.device)
        model = self._model(which)
        with self._lock:  # one forward at a time; the models' text caches are not thread-safe
            text_embeds = self.text_embeddings(which, entries)
            with torch.inference_mode(), self._autocast():
                logits = model(pixel_values=pixel_values, text_embeds=text_embeds,
                               entry_class_ids=entry_class_ids.to(self.device)).logits.float()
        sizes = [output_size] if output_size is not None else None
        result = self.processor.post_process_semantic_segmentation(logits, target_sizes=sizes,
                                                                   return_segmentation_scores=True)[0]
        scores = mean_class_probabilities(result.segmentation_scores, result.segmentation).cpu().numpy()
        labels = result.segmentation.cpu().numpy()
        shares = np.bincount(labels.ravel(), minlength=len(class_names)) / labels.size
        return SegmentationResult(labels, shares, list(entries), concepts, time.perf_counter() - start, scores)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not text.startswith((".", "~"))


def load_merged_adapter(
    base_model: str | os.PathLike, adapter: str | os.PathLike
) -> tuple[CATSegForSemanticSegmentation, dict[str, Any]]:
    """Load `adapter` onto a fresh copy of `base_model` and merge the LoRA weights into it (plain CAT-Seg, no
    adapter hooks at inference). Returns the merged model and the adapter's `vocalign.json` content.

    Raises:
        DemoSetupError: no such folder (for the main job's default place, with the command that makes it), or the
            adapter does not load onto this base model.
    """
    adapter = str(adapter)
    if not Path(adapter).exists() and not _looks_like_hub_id(adapter):
        hint = " Make it with `accelerate launch recipes/adapt.py` (the main job, about 2 minutes on CPU)." if (
            Path(adapter) == Path(DEFAULT_ADAPTER)) else ""
        raise DemoSetupError(f"No adapter at {adapter} yet.{hint}")
    if Path(adapter).is_dir() and not (Path(adapter) / "adapter_config.json").is_file():
        raise DemoSetupError(f"{adapter} is not a peft adapter folder (it has no adapter_config.json).")
    try:
        model, info = load_adapted_model(str(base_model), adapter)
        merged = merge_lora(model)
    except Exception as error:  # any loading failure becomes one message naming the adapter
        raise DemoSetupError(f"Could not load the adapter {adapter!r} onto {str(base_model)!r}: {_first_line(error)}") from error
    return merged.eval(), info


# ----------------------------------------------------------------------------------------------------- the world
def world_source_model(output_dir: str | os.PathLike | None = None) -> Path:
    """The built-in world's source model (the one the main job starts from), with no download and no training.

    Returns (as an absolute path) `runs/world/source_model` when the main job left it there, else unpacks the model shipped with the
    package into `output_dir` (default `~/.cache/vocalign_hf/demo/source_model`) once.
    """
    config = WorldConfig()  # the default world, the main job's
    settings = pretrain_settings(seed=config.seed)
    settings_hash = pretrain_settings_hash(config, tiny_catseg_config(config.image_size), settings)
    target = Path(output_dir) if output_dir else default_world_cache().parent / "demo" / "source_model"
    for candidate in (Path(_MAIN_JOB_SOURCE_MODEL), target):
        if _settings_hash(candidate) == settings_hash:
            return candidate.resolve()
    if not unpack_shipped_source_model(settings_hash, target):
        raise DemoSetupError(
            "The world's shipped source model is missing from the package or does not match the recipe's settings; "
            "run `accelerate launch recipes/adapt.py` once to pretrain it, then pass --base_model runs/world/source_model."
        )
    return target.resolve()


def _settings_hash(folder: Path) -> str | None:
    try:
        return json.loads((folder / "pretrain_info.json").read_text())["settings_hash"]
    except (OSError, ValueError, KeyError):
        return None


def world_example_images(output_dir: str | os.PathLike, count: int = 4) -> list[Path]:
    """The first `count` images of the default world's target evaluation split as PNG files (rendered, not
    downloaded; written once)."""
    output_dir = Path(output_dir)
    paths = [output_dir / f"world_target_{index}.png" for index in range(count)]
    if all(path.is_file() for path in paths):
        return paths
    images, _ = render_split_arrays(WorldConfig(), "target_eval", limit=count)
    for array, path in zip(images, paths):
        atomic_write_file(path, lambda tmp, array=array: Image.fromarray(array).save(tmp, format="PNG"))
    return paths


def class_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """The colours of a class list: the recipes' `make_palette`, so the demo matches the main job's overlays."""
    return list(make_palette(num_classes))

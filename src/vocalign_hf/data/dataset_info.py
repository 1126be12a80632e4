"""Class names, ignore index, palettes and label encodings of the datasets VocAlign is evaluated on.

Everything dataset-specific lives here, in one place:

* **Cityscapes** (19 "train-id" classes). Raw ``*_gtFine_labelIds.png`` masks hold the 34 Cityscapes label ids
  (0..33, plus -1 for the licence plate); :data:`CITYSCAPES_LABEL_ID_TO_TRAIN_ID` is the table of the official
  ``cityscapesScripts/helpers/labels.py`` (unmapped ids -> 255).
* **ADE20K-150** (SceneParse150). Raw masks hold ``0 = other`` and ``1..150``; the "reduce labels" shift maps
  ``0 -> 255`` and ``k -> k - 1``.
* **PASCAL-Context-59**. Masks converted with the mmseg / Detail-API script hold ``0 = background`` and ``1..59``
  (reduce labels as for ADE). Masks written by CAT-Seg's ``prepare_pascal_context_59.py`` already hold
  ``0..58`` with background ``255``: use ``get_dataset_info("pascal_context_59").without_reduce_labels()`` for them.

All label conversions are vectorised look-up tables (:func:`map_label_ids`, :func:`reduce_labels`,
:meth:`DatasetInfo.convert_label`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from ..class_names import validate_class_names

__all__ = [
    "IGNORE_INDEX",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "CITYSCAPES_LABEL_ID_TO_TRAIN_ID",
    "ADE20K_150_CLASSES",
    "ADE20K_150_PALETTE",
    "PASCAL_CONTEXT_59_CLASSES",
    "PASCAL_CONTEXT_59_PALETTE",
    "DatasetInfo",
    "get_dataset_info",
    "known_dataset_names",
    "make_palette",
    "map_label_ids",
    "reduce_labels",
]

#: Label value that losses and metrics skip. Shared by all datasets in this library.
IGNORE_INDEX: int = 255

# ---------------------------------------------------------------------------------------------------------------
# Cityscapes
# ---------------------------------------------------------------------------------------------------------------

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128),  # road
    (244, 35, 232),  # sidewalk
    (70, 70, 70),  # building
    (102, 102, 156),  # wall
    (190, 153, 153),  # fence
    (153, 153, 153),  # pole
    (250, 170, 30),  # traffic light
    (220, 220, 0),  # traffic sign
    (107, 142, 35),  # vegetation
    (152, 251, 152),  # terrain
    (70, 130, 180),  # sky
    (220, 20, 60),  # person
    (255, 0, 0),  # rider
    (0, 0, 142),  # car
    (0, 0, 70),  # truck
    (0, 60, 100),  # bus
    (0, 80, 100),  # train
    (0, 0, 230),  # motorcycle
    (119, 11, 32),  # bicycle
)

#: labelId -> trainId, as in ``cityscapesScripts/helpers/labels.py`` (trainId 255 / -1 -> ignore 255).
CITYSCAPES_LABEL_ID_TO_TRAIN_ID: Mapping[int, int] = {
    0: 255,  # unlabeled
    1: 255,  # ego vehicle
    2: 255,  # rectification border
    3: 255,  # out of roi
    4: 255,  # static
    5: 255,  # dynamic
    6: 255,  # ground
    7: 0,  # road
    8: 1,  # sidewalk
    9: 255,  # parking
    10: 255,  # rail track
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    14: 255,  # guard rail
    15: 255,  # bridge
    16: 255,  # tunnel
    17: 5,  # pole
    18: 255,  # polegroup
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    29: 255,  # caravan
    30: 255,  # trailer
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
    -1: 255,  # license plate
}

# ---------------------------------------------------------------------------------------------------------------
# ADE20K-150 (SceneParse150), standard order (index k = raw annotation value k + 1)
# ---------------------------------------------------------------------------------------------------------------

ADE20K_150_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

ADE20K_150_PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip

# ---------------------------------------------------------------------------------------------------------------
# PASCAL-Context-59 (the 59 most frequent classes of the 459, in the order of their original ids, i.e. alphabetical,
# as in the mmseg ``PascalContextDataset59`` and CAT-Seg pc59 lists)
# ---------------------------------------------------------------------------------------------------------------

PASCAL_CONTEXT_59_CLASSES: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground",
    "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant",
    "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table",
    "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)  # fmt: skip

#: The mmseg PASCAL-Context-59 palette is the ADE palette shifted by one entry.
PASCAL_CONTEXT_59_PALETTE: tuple[tuple[int, int, int], ...] = ADE20K_150_PALETTE[1:60]


# ---------------------------------------------------------------------------------------------------------------
# Label conversion helpers
# ---------------------------------------------------------------------------------------------------------------


def _as_int_array(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype.kind == "b":
        return mask.astype(np.int64)
    if mask.dtype.kind not in "iu":
        if mask.dtype.kind == "f" and np.all(np.isfinite(mask)) and np.all(mask == np.round(mask)):
            return mask.astype(np.int64)
        raise TypeError(f"segmentation masks must hold integers, got dtype {mask.dtype}")
    return mask


def map_label_ids(
    mask: np.ndarray, mapping: Mapping[int, int], ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Map raw label ids to training ids with a vectorised look-up table.

    Args:
        mask: integer array of raw ids (any shape).
        mapping: raw id -> training id. Ids absent from ``mapping`` (including values outside the table, e.g. a
            16-bit mask with large values) become ``ignore_index``. Negative keys are accepted and applied to
            negative values of signed masks.
        ignore_index: value for unmapped ids.

    Returns:
        ``np.uint8`` array when every output value fits in a byte, ``np.int64`` otherwise, same shape as ``mask``.
    """
    mask = _as_int_array(mask)
    values = list(mapping.values()) + [ignore_index]
    out_dtype = np.uint8 if min(values) >= 0 and max(values) <= 255 else np.int64
    offset = max(0, -min(min(mapping.keys(), default=0), 0))
    size = max(max(mapping.keys(), default=0) + 1, 256) + offset
    lut = np.full(size, ignore_index, dtype=out_dtype)
    for raw, train in mapping.items():
        lut[raw + offset] = train
    idx = mask.astype(np.int64) + offset
    valid = (idx >= 0) & (idx < size)
    if valid.all():
        return lut[idx]
    out = np.full(mask.shape, ignore_index, dtype=out_dtype)
    out[valid] = lut[idx[valid]]
    return out


def reduce_labels(mask: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """The ADE20K / PASCAL-Context "reduce labels" shift: ``0 -> ignore_index``, ``k -> k - 1``.

    ``ignore_index`` itself stays ``ignore_index`` (as in mmseg's ``reduce_zero_label``), so reducing is safe on
    masks that already contain ignore pixels.
    """
    mask = _as_int_array(mask)
    out = mask.astype(np.int64) - 1
    out[mask == 0] = ignore_index
    out[mask == ignore_index] = ignore_index
    if out.size and out.min() >= 0 and out.max() <= 255:
        return out.astype(np.uint8)
    return out


def make_palette(num_classes: int, seed: int = 0) -> tuple[tuple[int, int, int], ...]:
    """A deterministic palette of ``num_classes`` distinct, non-black RGB colours (for custom datasets)."""
    rng = np.random.default_rng(seed)
    colours: list[tuple[int, int, int]] = []
    seen = {(0, 0, 0)}
    while len(colours) < num_classes:
        c = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if c not in seen:
            seen.add(c)
            colours.append(c)  # type: ignore[arg-type]
    return tuple(colours)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# DatasetInfo
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """Everything a loader, a metric or a visualiser needs to know about one dataset's labels.

    Attributes:
        name: canonical name (``"cityscapes"``, ``"ade20k_150"``, ``"pascal_context_59"`` or a custom one).
        class_names: class names in training-id order (id ``k`` is ``class_names[k]``).
        ignore_index: label value skipped by losses and metrics.
        palette: one RGB colour per class, for visualisation.
        label_mapping: optional raw id -> training id table applied to raw masks (Cityscapes labelIds). Ids not in
            the table become ``ignore_index``.
        reduce_labels: apply the ``0 -> ignore, k -> k - 1`` shift to raw masks (ADE20K, PASCAL-Context).
        aliases: extra names accepted by :func:`get_dataset_info`.
    """

    name: str
    class_names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX
    palette: tuple[tuple[int, int, int], ...] = ()
    label_mapping: Optional[Mapping[int, int]] = None
    reduce_labels: bool = False
    aliases: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        names = tuple(self.class_names)
        object.__setattr__(self, "class_names", names)
        validate_class_names(names, source=f"DatasetInfo({self.name!r})")
        if self.label_mapping is not None and self.reduce_labels:
            raise ValueError("DatasetInfo: give either label_mapping or reduce_labels, not both")
        if 0 <= self.ignore_index < len(names):
            raise ValueError(
                f"DatasetInfo({self.name!r}): ignore_index {self.ignore_index} collides with a class id "
                f"(there are {len(names)} classes)"
            )
        palette = tuple(tuple(int(v) for v in c) for c in self.palette) or make_palette(len(names))
        if len(palette) != len(names) or any(len(c) != 3 for c in palette):
            raise ValueError(
                f"DatasetInfo({self.name!r}): palette needs {len(names)} RGB triples, got {len(palette)}"
            )
        object.__setattr__(self, "palette", palette)

    @property
    def num_classes(self) -> int:
        """Number of classes (excluding the ignore index)."""
        return len(self.class_names)

    @property
    def id2label(self) -> dict[int, str]:
        """``{id: name}``, as in ``transformers`` configs."""
        return dict(enumerate(self.class_names))

    @property
    def label2id(self) -> dict[str, int]:
        """``{name: id}``, as in ``transformers`` configs."""
        return {n: i for i, n in enumerate(self.class_names)}

    @property
    def needs_conversion(self) -> bool:
        """Whether raw masks of this dataset must be converted (label mapping or reduce labels)."""
        return self.label_mapping is not None or self.reduce_labels

    def convert_label(self, mask: np.ndarray) -> np.ndarray:
        """Convert a raw mask to training ids (label mapping or reduce labels; unchanged otherwise)."""
        if self.label_mapping is not None:
            return map_label_ids(mask, self.label_mapping, self.ignore_index)
        if self.reduce_labels:
            return reduce_labels(mask, self.ignore_index)
        return _as_int_array(mask)

    def without_conversion(self) -> "DatasetInfo":
        """The same dataset for masks that already hold training ids (e.g. Cityscapes ``labelTrainIds``)."""
        return dataclasses.replace(self, label_mapping=None, reduce_labels=False)

    def without_reduce_labels(self) -> "DatasetInfo":
        """Alias of :meth:`without_conversion`, e.g. for CAT-Seg's PC-59 masks (``0..58``, background 255)."""
        return self.without_conversion()

    def colorize(self, mask: np.ndarray, ignore_color: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
        """Map a training-id mask ``(H, W)`` to an RGB ``uint8`` image ``(H, W, 3)`` with :attr:`palette`."""
        mask = _as_int_array(mask)
        table = np.zeros((max(256, self.num_classes + 1), 3), dtype=np.uint8)
        table[:] = ignore_color
        table[: self.num_classes] = np.asarray(self.palette, dtype=np.uint8)
        idx = np.where((mask >= 0) & (mask < self.num_classes), mask, table.shape[0] - 1)
        return table[idx]

    @classmethod
    def from_class_names(
        cls,
        class_names: Sequence[str],
        name: str = "custom",
        *,
        ignore_index: int = IGNORE_INDEX,
        palette: Optional[Sequence[Sequence[int]]] = None,
        reduce_labels: bool = False,
    ) -> "DatasetInfo":
        """A :class:`DatasetInfo` for a custom domain (palette generated when not given)."""
        return cls(
            name=name,
            class_names=tuple(class_names),
            ignore_index=ignore_index,
            palette=tuple(tuple(c) for c in palette) if palette is not None else (),  # type: ignore[misc]
            reduce_labels=reduce_labels,
        )


_KNOWN: tuple[DatasetInfo, ...] = (
    DatasetInfo(
        name="cityscapes",
        class_names=CITYSCAPES_CLASSES,
        palette=CITYSCAPES_PALETTE,
        label_mapping=CITYSCAPES_LABEL_ID_TO_TRAIN_ID,
        aliases=("cityscapes_19", "cs", "chris1/cityscapes"),
    ),
    DatasetInfo(
        name="ade20k_150",
        class_names=ADE20K_150_CLASSES,
        palette=ADE20K_150_PALETTE,
        reduce_labels=True,
        aliases=("ade20k", "ade", "ade150", "ade_150", "a150", "scene_parse_150", "sceneparse150"),
    ),
    DatasetInfo(
        name="pascal_context_59",
        class_names=PASCAL_CONTEXT_59_CLASSES,
        palette=PASCAL_CONTEXT_59_PALETTE,
        reduce_labels=True,
        aliases=("pc59", "pc_59", "pcontext59", "pascal_context", "pascalcontext59", "pascal_context59"),
    ),
)


def _normalise_name(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


_REGISTRY: dict[str, DatasetInfo] = {}
for _info in _KNOWN:
    for _key in (_info.name, *_info.aliases):
        _REGISTRY[_normalise_name(_key)] = _info


def known_dataset_names() -> list[str]:
    """Canonical names accepted by :func:`get_dataset_info`."""
    return [i.name for i in _KNOWN]


def get_dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of a known dataset.

    Names are case-insensitive; ``-`` and spaces count as ``_``; common aliases work (``"ade20k"``, ``"pc59"``,
    ``"Chris1/cityscapes"`` ...).

    Raises:
        ValueError: for an unknown name; the message lists the known names and aliases.
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    info = _REGISTRY.get(_normalise_name(name))
    if info is None:
        listing = "; ".join(f"{i.name} (aliases: {', '.join(i.aliases)})" for i in _KNOWN)
        raise ValueError(
            f"unknown dataset {name!r}. Known datasets: {listing}. For a custom domain use "
            "DatasetInfo.from_class_names(...) or vocalign_hf.data.load_class_names(path)."
        )
    return info

"""A small procedurally generated segmentation world with a source and a shifted target domain.

Every image is a little outdoor scene (64 x 64 by default): a sky band above a tilted horizon, a floor made of
bands or a road in perspective, buildings standing on the horizon, tree crowns and cars. Each class has its own
colour statistics and texture (smooth gradient, wave stripes, fine stripes, blob noise, speckle, window grid, car
body with windows and wheels), so that the classes can be told apart by colour *and* texture.

The **source domain** (what the tiny CAT-Seg is "pretrained" on, standing in for COCO-Stuff) uses the class names
of [`CLASSES`]`.source_name`. The **target domain** differs in two ways:

* appearance: a fixed, deterministic camera / lighting shift (hue rotation of the palette, a warm colour cast,
  darker and uneven lighting, coarser and rotated textures, blur, sensor noise), with a small per-image jitter;
* vocabulary: the target dataset names some classes differently (a synonym the text tower never saw, a broader
  term, and a word the source used for another class), and one source class ("ground", bare earth) does not
  occur in the target at all. `target_concepts()` maps each renamed target class to source-like words.

Rendering is vectorised numpy driven by one `numpy.random.Generator` per image, seeded from
`(world seed, split, index)`, so any image can be regenerated on its own and the result does not depend on the
order or number of images generated before it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "CLASSES",
    "ClassSpec",
    "DomainShift",
    "GENERATOR_VERSION",
    "SOURCE_SYNONYMS",
    "SPLITS",
    "WorldConfig",
    "image_rng",
    "render_scene",
    "render_split_arrays",
    "source_class_names",
    "target_class_names",
    "target_concepts",
    "target_to_source",
]

#: Bumped whenever rendering changes, so that cached worlds of an older generator are not reused.
GENERATOR_VERSION = 2

#: Split name -> (domain, index used in the per-image seed).
SPLITS: dict[str, tuple[str, int]] = {
    "source_train": ("source", 0),
    "source_eval": ("source", 1),
    "target_train": ("target", 2),
    "target_eval": ("target", 3),
}


@dataclass(frozen=True)
class ClassSpec:
    """One class of the world.

    Attributes:
        source_name: the name used in the source domain (pretraining vocabulary).
        target_name: the name the target dataset uses, or None when the class never occurs in the target.
        concepts: source-like words given to the VocAlign teacher for the target class (empty when not renamed).
        kind: "same", "synonym", "broader", "ambiguous" or "source-only".
        why: one line explaining the rename.
        color: base RGB colour in the source domain (0..1).
    """

    source_name: str
    target_name: str | None
    concepts: tuple[str, ...]
    kind: str
    why: str
    color: tuple[float, float, float]


#: The eight classes, in source label order. Target label order is the same order with "ground" (bare earth)
#: left out.
CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("sky", "sky", (), "same", "unchanged", (0.45, 0.65, 0.95)),
    ClassSpec("tree", "tree", (), "same", "unchanged", (0.13, 0.42, 0.14)),
    ClassSpec(
        "grass",
        "terrain",
        ("grass", "lawn"),
        "broader",
        "broader, vaguer term (as CityScapes' 'terrain'); never seen in pretraining",
        (0.38, 0.70, 0.25),
    ),
    ClassSpec(
        "ground",
        None,
        (),
        "source-only",
        "bare earth: only in the source domain; its name is reused by the target for the road",
        (0.55, 0.41, 0.26),
    ),
    ClassSpec(
        "road",
        "ground",
        ("road", "street"),
        "ambiguous",
        "the target calls the paved surface 'ground', a word the source used for bare earth",
        (0.42, 0.42, 0.45),
    ),
    ClassSpec("building", "building", (), "same", "unchanged", (0.70, 0.36, 0.28)),
    ClassSpec(
        "car",
        "automobile",
        ("car", "vehicle"),
        "synonym",
        "synonym never seen in pretraining",
        (0.80, 0.12, 0.12),
    ),
    ClassSpec("water", "water", (), "same", "unchanged", (0.12, 0.33, 0.62)),
)

SKY, TREE, GRASS, EARTH, ROAD, BUILDING, CAR, WATER = range(len(CLASSES))

#: Other words for source classes, trained in pretraining with `synonyms=SOURCE_SYNONYMS` (issue 40): web text names
#: a thing in several ways, so a CLIP-like text tower knows every target name and concept, in the *source's* sense.
#: The target then uses "terrain" for grass (here: bare earth, like its use for natural ground) and "ground" for the
#: road (here: bare earth); "automobile" stays a synonym of car; every concept is a word for its class's source class.
SOURCE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "grass": ("lawn",),
    "ground": ("terrain", "dirt"),
    "road": ("street",),
    "car": ("automobile", "vehicle"),
}
#: Standard deviation of the per-image hue jitter present in both domains (degrees).
SOURCE_HUE_JITTER_DEGREES = 8.0
#: Standard deviation of the per-image, per-class colour jitter (0..1 RGB).
CLASS_COLOR_JITTER = 0.05
_FLOOR_CLASSES = {"source": (GRASS, EARTH, ROAD, WATER), "target": (GRASS, ROAD, WATER)}
_BUILDING_COLORS = np.array([(0.70, 0.36, 0.28), (0.80, 0.72, 0.55), (0.55, 0.58, 0.66), (0.62, 0.50, 0.40)])
_CAR_COLORS = np.array(
    [(0.80, 0.12, 0.12), (0.15, 0.25, 0.75), (0.90, 0.80, 0.15), (0.92, 0.92, 0.92), (0.12, 0.12, 0.12)]
)


def source_class_names() -> list[str]:
    """The eight source class names, in source label order."""
    return [spec.source_name for spec in CLASSES]


def target_class_names() -> list[str]:
    """The seven target class names, in target label order."""
    return [spec.target_name for spec in CLASSES if spec.target_name is not None]


def target_to_source() -> list[int]:
    """For each target class index, the source class index of the same visual class."""
    return [index for index, spec in enumerate(CLASSES) if spec.target_name is not None]


def target_concepts() -> dict[str, list[str]]:
    """The concept file `{target class name: [concepts]}` for the renamed target classes (source-like words)."""
    return {spec.target_name: list(spec.concepts) for spec in CLASSES if spec.target_name and spec.concepts}


@dataclass(frozen=True)
class DomainShift:
    """The target domain's appearance shift; `DomainShift.none()` is the source domain.

    Attributes:
        hue_degrees: rotation of all colours around the grey axis.
        cast: per-channel gain (a warm colour cast).
        gain: global brightness factor (darker lighting).
        light_gradient: strength of an uneven lighting ramp (dark bottom-left to lighter top-right).
        texture_scale: multiplies every texture period (coarser textures).
        texture_rotation_degrees: added to the orientation of every striped texture.
        blur_sigma: Gaussian blur, in pixels.
        noise_sigma: additive Gaussian sensor noise (0..1 scale).
        jitter: per-image random variation of hue (x10 degrees), gain and cast around the values above.
    """

    hue_degrees: float = 20.0
    cast: tuple[float, float, float] = (1.07, 0.98, 0.87)
    gain: float = 0.83
    light_gradient: float = 0.15
    texture_scale: float = 1.4
    texture_rotation_degrees: float = 20.0
    blur_sigma: float = 0.7
    noise_sigma: float = 0.03
    jitter: float = 0.3

    @classmethod
    def none(cls) -> "DomainShift":
        """No shift (the source domain's camera)."""
        return cls(0.0, (1.0, 1.0, 1.0), 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0)

    def scaled(self, strength: float) -> "DomainShift":
        """Interpolate between no shift (0) and this shift (1) (extrapolates above 1)."""
        none = DomainShift.none()
        lerp = lambda a, b: a + strength * (b - a)  # noqa: E731
        return DomainShift(
            hue_degrees=lerp(none.hue_degrees, self.hue_degrees),
            cast=tuple(lerp(a, b) for a, b in zip(none.cast, self.cast)),
            gain=lerp(none.gain, self.gain),
            light_gradient=lerp(none.light_gradient, self.light_gradient),
            texture_scale=lerp(none.texture_scale, self.texture_scale),
            texture_rotation_degrees=lerp(none.texture_rotation_degrees, self.texture_rotation_degrees),
            blur_sigma=lerp(none.blur_sigma, self.blur_sigma),
            noise_sigma=lerp(none.noise_sigma, self.noise_sigma),
            jitter=lerp(none.jitter, self.jitter),
        )


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a world; two equal configs give byte-identical datasets.

    Attributes:
        seed: the world seed.
        image_size: side of the square images.
        num_source_train, num_source_eval, num_target_train, num_target_eval: images per split. `target_train` is
            unlabeled (adaptation data); the other splits carry labels.
        shift_strength: scales the target appearance shift (`DomainShift` defaults x this; 0 = no shift).
        shift: the target shift at strength 1.
    """

    seed: int = 0
    image_size: int = 64
    num_source_train: int = 1500
    num_source_eval: int = 100
    num_target_train: int = 400
    num_target_eval: int = 100
    shift_strength: float = 1.0
    shift: DomainShift = field(default_factory=DomainShift)

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        for name in ("num_source_train", "num_source_eval", "num_target_train", "num_target_eval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def split_size(self, split: str) -> int:
        """Number of images of a split ("source_train", "source_eval", "target_train", "target_eval")."""
        return getattr(self, "num_" + split)

    def target_shift(self) -> DomainShift:
        """The effective target shift (`shift` scaled by `shift_strength`)."""
        return self.shift.scaled(self.shift_strength)

    def to_dict(self) -> dict:
        """JSON-serialisable form (with the generator version)."""
        data = asdict(self)
        data["generator_version"] = GENERATOR_VERSION
        return data

    def fingerprint(self) -> str:
        """A short hash of the config and the generator version (the cache key)."""
        payload = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of every other image."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split][1], index]))


# ------------------------------------------------------------------------------------------------ textures
def _smooth_noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Value noise in [-1, 1]: a coarse random grid with cells of `cell` pixels, bilinearly upsampled."""
    n = int(np.ceil(size / max(cell, 1.0))) + 2
    grid = rng.uniform(-1.0, 1.0, (n, n))
    coords = np.arange(size) / max(cell, 1.0)
    i0 = np.floor(coords).astype(int)
    f = coords - i0
    top = grid[i0][:, i0] * (1 - f)[None, :] + grid[i0][:, i0 + 1] * f[None, :]
    bottom = grid[i0 + 1][:, i0] * (1 - f)[None, :] + grid[i0 + 1][:, i0 + 1] * f[None, :]
    return top * (1 - f)[:, None] + bottom * f[:, None]


def _stripes(yy: np.ndarray, xx: np.ndarray, period: float, angle_deg: float, phase: float) -> np.ndarray:
    """sin stripes in [-1, 1] with the given period (pixels) and orientation (0 = vertical stripes)."""
    a = np.deg2rad(angle_deg)
    return np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period + phase)


def _class_texture(
    cls: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, color: np.ndarray, scale: float,
    rotation: float, horizon: float,
) -> np.ndarray:
    """An (H, W, 3) image of class `cls`'s texture over the whole canvas (the caller masks it)."""
    size = yy.shape[0]
    lum = np.zeros_like(yy)
    if cls == SKY:  # smooth vertical gradient, lighter towards the horizon, faint clouds
        lum = 0.25 * (yy / max(horizon, 1.0) - 0.5) + 0.05 * _smooth_noise(rng, size, 16 * scale)
    elif cls == WATER:  # horizontal waves with a wobble
        wobble = 0.8 * np.sin(2 * np.pi * xx / (11 * scale) + rng.uniform(0, 6.3))
        lum = 0.13 * _stripes(yy + wobble, xx, 4.0 * scale, 90 + rotation, rng.uniform(0, 6.3))
    elif cls == GRASS:  # fine near-vertical stripes plus noise
        lum = 0.12 * _stripes(yy, xx, 3.0 * scale, rng.uniform(-10, 10) + rotation, rng.uniform(0, 6.3))
        lum += 0.05 * rng.standard_normal(yy.shape)
    elif cls == TREE:  # blobby foliage
        lum = 0.16 * _smooth_noise(rng, size, 2.5 * scale) + 0.04 * rng.standard_normal(yy.shape)
    elif cls == EARTH:  # speckle: fine noise and dark pebbles
        lum = 0.08 * rng.standard_normal(yy.shape)
        lum -= 0.18 * (rng.random(yy.shape) < 0.06 / scale)
    elif cls == ROAD:  # flat, fine grain
        lum = 0.03 * rng.standard_normal(yy.shape)
    elif cls == BUILDING:  # window grid
        period = rng.uniform(4.0, 6.0) * scale
        a = np.deg2rad(rotation * 0.3)
        u, v = xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)
        offset_u = rng.uniform(0, period)
        offset_v = rng.uniform(0, period)
        win = ((u + offset_u) % period < period * 0.5) & ((v + offset_v) % period < period * 0.5)
        lum = np.where(win, -0.28, 0.0) + 0.02 * rng.standard_normal(yy.shape)
    elif cls == CAR:  # body colour, handled by the car painter (windows and wheels)
        lum = 0.02 * rng.standard_normal(yy.shape)
    return np.clip(color[None, None, :] * (1.0 + lum[..., None]) + 0.1 * lum[..., None], 0.0, 1.0)


# ----------------------------------------------------------------------------------------- colour ops
def _hue_rotation_matrix(degrees: float) -> np.ndarray:
    """RGB rotation about the grey axis (keeps greys grey)."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    k = 1.0 / 3.0
    sq = np.sqrt(k)
    return np.array(
        [
            [c + (1 - c) * k, k * (1 - c) - sq * s, k * (1 - c) + sq * s],
            [k * (1 - c) + sq * s, c + k * (1 - c), k * (1 - c) - sq * s],
            [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + k * (1 - c)],
        ]
    )


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, 3) image, edges replicated."""
    if sigma <= 0.05:
        return image
    radius = max(1, int(np.ceil(2.5 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    h, w = image.shape[:2]
    rows = np.clip(np.arange(h)[:, None] + offsets[None, :], 0, h - 1)  # (H, K)
    cols = np.clip(np.arange(w)[:, None] + offsets[None, :], 0, w - 1)  # (W, K)
    image = np.einsum("hkwc,k->hwc", image[rows], kernel)
    return np.einsum("hwkc,k->hwc", image[:, cols], kernel)


def _apply_shift(image: np.ndarray, shift: DomainShift, rng: np.random.Generator) -> np.ndarray:
    """The camera / lighting part of the target shift, on a float (H, W, 3) image in 0..1."""
    j = shift.jitter
    hue = shift.hue_degrees + j * rng.normal(0.0, 10.0)
    if abs(hue) > 1e-6:
        image = image @ _hue_rotation_matrix(hue).T
    cast = np.asarray(shift.cast) * (1.0 + j * rng.normal(0.0, 0.04, 3))
    gain = shift.gain * (1.0 + j * rng.normal(0.0, 0.08))
    image = image * cast * gain
    if shift.light_gradient:
        h, w = image.shape[:2]
        ramp = (np.arange(w)[None, :] / w - np.arange(h)[:, None] / h) * 0.5  # -0.5 bottom-left .. 0.5 top-right
        image = image * (1.0 + shift.light_gradient * ramp)[..., None]
    image = _gaussian_blur(image, shift.blur_sigma)
    if shift.noise_sigma:
        image = image + rng.normal(0.0, shift.noise_sigma, image.shape)
    return image


# -------------------------------------------------------------------------------------------- layout
def _floor_layers(
    rng: np.random.Generator, floor: np.ndarray, floor_classes: tuple[int, ...], horizon0: float, s: float, size: int,
    yy: np.ndarray, xx: np.ndarray,
) -> list[tuple[int, np.ndarray]]:
    """The floor below the horizon: either horizontal bands or a road in perspective over a base floor."""
    if rng.random() < 0.5:
        num_bands = rng.integers(1, 4)
        classes = rng.choice(floor_classes, size=num_bands, replace=False)
        cuts = np.sort(rng.uniform(horizon0 + 4 * s, size - 4 * s, num_bands - 1))
        edges = np.concatenate([[-np.inf], cuts, [np.inf]])
        wave = 1.5 * s * np.sin(2 * np.pi * xx / rng.uniform(20, 50) / s + rng.uniform(0, 6.3))
        return [
            (int(cls), floor & (yy + wave >= lo) & (yy + wave < hi))
            for cls, lo, hi in zip(classes, edges[:-1], edges[1:])
        ]
    base = int(rng.choice([c for c in floor_classes if c != ROAD]))
    centre = rng.uniform(0.25, 0.75) * size
    half0 = rng.uniform(1.0, 4.0) * s
    spread = rng.uniform(0.5, 1.1)
    lean = rng.uniform(-0.4, 0.4)
    road = floor & (np.abs(xx - centre - lean * (yy - horizon0)) < half0 + spread * (yy - horizon0))
    return [(base, floor), (ROAD, road)]


def _horizon_object_layers(
    rng: np.random.Generator, horizon0: float, tilt: float, s: float, size: int, yy: np.ndarray, xx: np.ndarray
) -> list[tuple[int, np.ndarray]]:
    """Buildings standing on the horizon, then tree crowns around it."""
    layers = []
    for _ in range(rng.integers(0, 4)):
        w, h = rng.uniform(8, 20) * s, rng.uniform(10, 28) * s
        x0 = rng.uniform(-w / 2, size - w / 2)
        bottom = horizon0 + tilt * (x0 + w / 2 - size / 2) + rng.uniform(0, 3) * s
        layers.append((BUILDING, (xx >= x0) & (xx < x0 + w) & (yy >= bottom - h) & (yy < bottom)))
    for _ in range(rng.integers(0, 4)):
        rx, ry = rng.uniform(5, 10) * s, rng.uniform(6, 12) * s
        cx = rng.uniform(0, size)
        cy = horizon0 + tilt * (cx - size / 2) - ry * rng.uniform(0.2, 0.8)
        layers.append((TREE, ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1.0))
    return layers


def _car_shapes(
    rng: np.random.Generator, horizon0: float, s: float, size: int, yy: np.ndarray, xx: np.ndarray
) -> list[tuple[np.ndarray, tuple[float, float, float, float]]]:
    """Cars on the floor, bigger when nearer: (body mask with rounded corners, (x0, y0, w, h)) each."""
    cars = []
    for _ in range(rng.integers(0, 4)):
        cy = rng.uniform(horizon0 + 4 * s, size - 2 * s)
        depth = (cy - horizon0) / max(size - horizon0, 1.0)
        w = (7 + 9 * depth) * s * rng.uniform(0.9, 1.2)
        h = w * rng.uniform(0.5, 0.65)
        cx = rng.uniform(w / 2, size - w / 2)
        x0, y0 = cx - w / 2, cy - h
        body = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < cy)
        corner = (np.minimum(xx - x0, x0 + w - xx) + np.minimum(yy - y0, cy - yy) * 1.5) < h * 0.35
        cars.append((body & ~corner, (x0, y0, w, h)))
    return cars


def _paint_scene(
    rng: np.random.Generator, label: np.ndarray, layers: list[tuple[int, np.ndarray]],
    cars: list[tuple[np.ndarray, tuple[float, float, float, float]]], shift: DomainShift, horizon0: float,
    yy: np.ndarray, xx: np.ndarray,
) -> np.ndarray:
    """Per-class colour with per-image jitter, texture at the domain's scale and rotation; a float image in 0..1."""
    size = label.shape[0]
    scale, rotation = shift.texture_scale, shift.texture_rotation_degrees
    image = np.zeros((size, size, 3))
    for cls in np.unique(label):
        if cls in (BUILDING, CAR):
            continue
        color = np.asarray(CLASSES[cls].color) + rng.normal(0.0, CLASS_COLOR_JITTER, 3)
        mask = label == cls
        image[mask] = _class_texture(int(cls), rng, yy, xx, color, scale, rotation, horizon0)[mask]
    building_mask = np.zeros((size, size), dtype=bool)
    for cls, mask in layers:  # each building its own facade colour
        if cls == BUILDING:
            visible = mask & (label == BUILDING) & ~building_mask
            building_mask |= visible
            color = _BUILDING_COLORS[rng.integers(len(_BUILDING_COLORS))] + rng.normal(0.0, CLASS_COLOR_JITTER, 3)
            image[visible] = _class_texture(BUILDING, rng, yy, xx, color, scale, rotation, horizon0)[visible]
    for body, (x0, y0, w, h) in cars:  # each car its own colour, dark windows on top, wheels at the bottom
        visible = body & (label == CAR)
        color = _CAR_COLORS[rng.integers(len(_CAR_COLORS))] + rng.normal(0.0, 0.03, 3)
        tex = _class_texture(CAR, rng, yy, xx, color, scale, rotation, horizon0)
        window = (yy < y0 + 0.4 * h) & (xx > x0 + 0.25 * w) & (xx < x0 + 0.75 * w)
        wheels_x = (np.abs(xx - x0 - 0.22 * w) < 0.11 * w) | (np.abs(xx - x0 - 0.78 * w) < 0.11 * w)
        wheel = (yy > y0 + 0.78 * h) & wheels_x
        tex[window] = (0.25, 0.3, 0.38)
        tex[wheel] = (0.06, 0.06, 0.06)
        image[visible] = tex[visible]
    return image


def render_scene(
    rng: np.random.Generator, size: int = 64, domain: str = "source", shift: DomainShift | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene.

    Args:
        rng: the image's generator (see `image_rng`).
        size: image side.
        domain: "source" or "target"; the target uses target label ids (no "ground"/bare-earth class) and the
            `shift`.
        shift: the target appearance shift (default `DomainShift()`); ignored for the source domain.
    Returns:
        (image uint8 (size, size, 3), label uint8 (size, size)) with label ids of the domain's class list.
    """
    if domain not in ("source", "target"):
        raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
    shift = (shift if shift is not None else DomainShift()) if domain == "target" else DomainShift.none()
    s = size / 64.0  # geometry is designed at 64 px
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    label = np.zeros((size, size), dtype=np.int64)

    horizon0 = rng.uniform(0.30, 0.52) * size
    tilt = rng.uniform(-0.12, 0.12)
    sky = yy < horizon0 + tilt * (xx - size / 2)
    # (class, mask) painted in order: later layers cover earlier ones
    layers: list[tuple[int, np.ndarray]] = [(SKY, sky)]
    layers += _floor_layers(rng, ~sky, _FLOOR_CLASSES[domain], horizon0, s, size, yy, xx)
    layers += _horizon_object_layers(rng, horizon0, tilt, s, size, yy, xx)
    cars = _car_shapes(rng, horizon0, s, size, yy, xx)
    layers += [(CAR, body) for body, _ in cars]
    for cls, mask in layers:
        label[mask] = cls

    image = _paint_scene(rng, label, layers, cars, shift, horizon0, yy, xx)
    # per-image camera variation of both domains: small hue jitter, exposure and contrast
    image = image @ _hue_rotation_matrix(rng.normal(0.0, SOURCE_HUE_JITTER_DEGREES)).T
    contrast = rng.uniform(0.85, 1.15)
    image = (image - image.mean()) * contrast + image.mean() * rng.uniform(0.85, 1.15)
    if domain == "target":
        image = _apply_shift(image, shift, rng)
        remap = np.full(len(CLASSES), 255, dtype=np.int64)
        remap[target_to_source()] = np.arange(len(target_to_source()))
        label = remap[label]
    image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    return image, label.astype(np.uint8)


def render_split_arrays(config: WorldConfig, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render the images of one split as arrays (N, S, S, 3) uint8 and labels (N, S, S) uint8.

    `limit` renders only the first `limit` images (identical to the first images of the full split).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    domain = SPLITS[split][0]
    n = config.split_size(split) if limit is None else min(limit, config.split_size(split))
    size = config.image_size
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    labels = np.zeros((n, size, size), dtype=np.uint8)
    shift = config.target_shift()
    for index in range(n):
        images[index], labels[index] = render_scene(image_rng(config.seed, split, index), size, domain, shift)
    return images, labels

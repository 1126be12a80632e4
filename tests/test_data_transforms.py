"""Tests of vocalign_hf.data.transforms: paired geometry, colour ops, RGB conversion, presets, collate."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from vocalign_hf.data import (
    ColorJitter,
    PhotoMetricDistortion,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    collate_fn,
    color_jitter,
    make_eval_transform,
    make_train_transform,
    photometric_distortion,
    to_pixel_values,
    train_transform_preset,
)
from vocalign_hf.data.transforms import hsv_to_rgb, rgb_to_hsv

# 6 distinct, non-black colours: class k is drawn with PALETTE[k]; black only appears in padding.
PALETTE = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30], [30, 200, 200], [250, 250, 250]],
                   dtype=np.uint8)  # fmt: skip


def _blocky_mask(h: int, w: int, block: int, seed: int = 0, values=(0, 1, 2, 3, 4, 5)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.choice(np.array(values, dtype=np.uint8), size=(-(-h // block), -(-w // block)))
    return small.repeat(block, 0).repeat(block, 1)[:h, :w]


def _colours_match_labels(x: torch.Tensor, y: torch.Tensor) -> None:
    img = np.rint(x.permute(1, 2, 0).numpy() * 255).astype(np.int64)
    lab = y.numpy()
    pad = lab == 255
    assert (img[pad] == 0).all(), "padded pixels must be black"
    assert (np.abs(img[~pad] - PALETTE[lab[~pad]].astype(np.int64)) == 0).all(), "image and mask are misaligned"


# ---------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------


def test_random_scale_crop_flip_keep_alignment_nearest():
    mask = _blocky_mask(24, 40, block=1, seed=1)  # per-pixel random classes: any offset error shows
    image = Image.fromarray(PALETTE[mask])
    t = SegmentationTrainTransform(crop_size=(20, 28), ratio_range=(0.5, 2.0), flip_prob=0.5,
                                   image_interpolation="nearest", seed=0)  # fmt: skip
    outputs, padded = set(), 0
    for _ in range(40):
        x, y = t.apply(image, Image.fromarray(mask))
        assert x.shape == (3, 20, 28) and y.shape == (20, 28) and y.dtype == torch.int64
        _colours_match_labels(x, y)
        padded += int((y == 255).any())
        outputs.add(hash(y.numpy().tobytes()))
    assert len(outputs) > 30  # the draws differ
    assert padded > 0  # some draws were smaller than the crop (ratio < 1) and were padded


def test_alignment_with_bilinear_images_in_uniform_regions():
    mask = _blocky_mask(48, 64, block=8, seed=2)
    image = Image.fromarray(PALETTE[mask])
    t = SegmentationTrainTransform(crop_size=32, ratio_range=(0.6, 1.7), flip_prob=0.5, seed=3)
    for _ in range(20):
        x, y = t.apply(image, Image.fromarray(mask))
        # pixels whose 5x5 label neighbourhood lies in the crop and is uniform: bilinear colour == class colour
        lab = np.pad(y.numpy().astype(np.int64), 2, constant_values=-1)
        uniform = np.ones(y.shape, bool)
        for dy in range(5):
            for dx in range(5):
                uniform &= lab[dy : dy + y.shape[0], dx : dx + y.shape[1]] == y.numpy()
        uniform &= y.numpy() != 255
        assert uniform.sum() > 50
        img = np.rint(x.permute(1, 2, 0).numpy() * 255)
        diff = np.abs(img[uniform] - PALETTE[y.numpy()[uniform]])
        assert diff.max() <= 1


def test_flip_mirrors_both():
    mask = _blocky_mask(6, 10, block=1, seed=4)
    t = SegmentationTrainTransform(crop_size=None, ratio_range=None, flip_prob=1.0, seed=0)
    x, y = t.apply(Image.fromarray(PALETTE[mask]), Image.fromarray(mask))
    np.testing.assert_array_equal(y.numpy(), mask[:, ::-1])
    _colours_match_labels(x, y)


def test_scaling_keeps_integer_label_set():
    values = (0, 3, 7, 19, 200)
    mask = _blocky_mask(30, 50, block=1, seed=5, values=values)
    t = SegmentationTrainTransform(crop_size=(16, 16), ratio_range=(0.3, 3.0), seed=1)
    for _ in range(25):
        _, y = t.apply(Image.new("RGB", (50, 30)), Image.fromarray(mask))
        assert y.dtype == torch.int64
        assert set(np.unique(y.numpy())) <= set(values) | {255}


def test_mmseg_rescale_and_pad_sizes():
    # scale (2048, 512) fits long <= 2048*r and short <= 512*r: a 100x200 image at r=1 -> factor min(10.24, 5.12)
    t = SegmentationTrainTransform(crop_size=(1000, 1000), scale=(2048, 512), ratio_range=(1.0, 1.0), flip_prob=0)
    x, y = t.apply(Image.new("RGB", (200, 100), (9, 9, 9)), Image.fromarray(np.zeros((100, 200), np.uint8)))
    content = (y != 255).numpy()
    assert content.sum(0).max() == 512 and content.sum(1).max() == 1000  # 512 x 1024 clipped to the 1000 crop
    assert (x[:, 512:, :] == 0).all()  # bottom padding is black


def test_cat_max_ratio_avoids_single_class_crops():
    mask = np.zeros((40, 40), np.uint8)
    mask[:, 30:] = 1  # class 1 only in the right quarter
    img = Image.new("RGB", (40, 40))
    strict = SegmentationTrainTransform(crop_size=16, ratio_range=None, flip_prob=0, cat_max_ratio=0.75, seed=0)
    loose = SegmentationTrainTransform(crop_size=16, ratio_range=None, flip_prob=0, seed=0)

    def good_rate(t):
        ok = 0
        for _ in range(60):
            _, y = t.apply(img, Image.fromarray(mask))
            counts = np.bincount(y.numpy().ravel(), minlength=2)
            ok += int(counts.min() > 0 and counts.max() / counts.sum() < 0.75)
        return ok / 60

    assert good_rate(strict) > 0.9 > good_rate(loose) + 0.3


def test_seed_reproducibility():
    mask = _blocky_mask(20, 30, block=1, seed=6)
    img = Image.fromarray(PALETTE[mask])
    kw = dict(crop_size=12, photometric=PhotoMetricDistortion(), jitter=ColorJitter(p=1.0))
    a = SegmentationTrainTransform(seed=7, **kw)
    b = SegmentationTrainTransform(seed=7, **kw)
    c = SegmentationTrainTransform(seed=8, **kw)
    ra = [a.apply(img, Image.fromarray(mask)) for _ in range(3)]
    rb = [b.apply(img, Image.fromarray(mask)) for _ in range(3)]
    rc = [c.apply(img, Image.fromarray(mask)) for _ in range(3)]
    for (xa, ya), (xb, yb) in zip(ra, rb):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(ra, rc))


def test_seeded_transforms_differ_between_ranks(monkeypatch):
    """Under torchrun / accelerate launch every rank has RANK set: same seed, different but reproducible draws."""
    mask = _blocky_mask(20, 30, block=1, seed=6)
    img = Image.fromarray(PALETTE[mask])
    kw = dict(crop_size=12, jitter=ColorJitter(p=1.0))

    def draws(rank: int) -> list[torch.Tensor]:
        monkeypatch.setenv("RANK", str(rank))
        t = SegmentationTrainTransform(seed=7, **kw)
        return [t.apply(img)[0] for _ in range(3)]

    rank0, rank1 = draws(0), draws(1)
    assert all(torch.equal(a, b) for a, b in zip(rank0, draws(0)))
    assert all(torch.equal(a, b) for a, b in zip(rank1, draws(1)))
    assert not any(torch.equal(a, b) for a, b in zip(rank0, rank1))


# ---------------------------------------------------------------------------------------------------------------
# Image modes
# ---------------------------------------------------------------------------------------------------------------


def test_image_modes_become_rgb():
    gray = Image.fromarray(np.full((4, 6), 77, np.uint8), mode="L")
    rgba_arr = np.zeros((4, 6, 4), np.uint8)
    rgba_arr[..., :3] = (10, 120, 250)
    rgba_arr[:, :3, 3] = 255  # left half opaque, right half transparent
    rgba = Image.fromarray(rgba_arr, mode="RGBA")
    pal = Image.fromarray(np.array([[0, 1, 2, 0, 1, 2]] * 4, np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (768 - 9))
    i16 = Image.fromarray(np.full((4, 6), 65535, np.uint16))
    la = Image.fromarray(np.stack([np.full((4, 6), 90, np.uint8), np.full((4, 6), 255, np.uint8)], -1), mode="LA")
    for im in (gray, rgba, pal, i16, la):
        x = to_pixel_values(im)
        assert x.shape == (3, 4, 6) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    g = to_pixel_values(gray) * 255
    assert torch.allclose(g, torch.full_like(g, 77))
    r = (to_pixel_values(rgba) * 255).round()
    assert r[:, :, :3].permute(1, 2, 0).reshape(-1, 3).unique(dim=0).tolist() == [[10, 120, 250]]
    assert (r[:, :, 3:] == 0).all()  # transparent pixels composited over black
    p = (to_pixel_values(pal) * 255).round()
    assert p[:, 0, 0].tolist() == [255, 0, 0] and p[:, 0, 1].tolist() == [0, 255, 0]
    assert p[:, 0, 2].tolist() == [0, 0, 255]
    assert (to_pixel_values(i16) == 1.0).all()
    assert torch.allclose(to_pixel_values(la) * 255, torch.full((3, 4, 6), 90.0))
    # through the dataset transform too
    t = SegmentationTrainTransform(crop_size=4, ratio_range=None, seed=0)
    out = t({"image": [gray, rgba, pal], "label": [np.zeros((4, 6), np.uint8)] * 3})
    assert [v.shape for v in out["pixel_values"]] == [(3, 4, 4)] * 3


# ---------------------------------------------------------------------------------------------------------------
# Colour operations
# ---------------------------------------------------------------------------------------------------------------


def test_hsv_roundtrip_and_hue_rotation():
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
    red = torch.zeros(3, 2, 2)
    red[0] = 1.0
    hsv = rgb_to_hsv(red)
    hsv[0] = (hsv[0] + 1 / 3) % 1
    assert torch.allclose(hsv_to_rgb(hsv)[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


def test_colour_ops_touch_image_only_and_stay_in_range():
    mask = _blocky_mask(16, 16, block=4, seed=7)
    geo = dict(crop_size=None, ratio_range=None, flip_prob=0.0)
    plain = SegmentationTrainTransform(seed=0, **geo)
    colour = SegmentationTrainTransform(seed=0, photometric=PhotoMetricDistortion(), jitter=ColorJitter(p=1.0), **geo)
    x0, y0 = plain.apply(Image.fromarray(PALETTE[mask]), Image.fromarray(mask))
    changed = 0
    for _ in range(5):
        x1, y1 = colour.apply(Image.fromarray(PALETTE[mask]), Image.fromarray(mask))
        assert torch.equal(y0, y1)
        assert x1.min() >= 0 and x1.max() <= 1
        changed += int(not torch.allclose(x0, x1))
    assert changed >= 4


def test_batched_color_jitter_and_photometric():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    a = color_jitter(x, generator=torch.Generator().manual_seed(5))
    b = color_jitter(x, generator=torch.Generator().manual_seed(5))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.allclose(a[0] - x[0], a[1] - x[1])  # per-image factors
    gray = color_jitter(x, brightness=0, contrast=0, saturation=1.0, hue=0)  # saturation factor in [0, 2]
    assert gray.shape == x.shape and not torch.equal(gray, x)
    assert torch.equal(color_jitter(x, p=0.0), x)
    pm = photometric_distortion(x[0], generator=torch.Generator().manual_seed(0))
    assert pm.shape == x[0].shape and 0 <= pm.min() and pm.max() <= 1


# ---------------------------------------------------------------------------------------------------------------
# Dataset integration, presets, eval, collate
# ---------------------------------------------------------------------------------------------------------------


def _tiny_ds(with_label=True, n=3):
    mask = _blocky_mask(12, 20, block=1, seed=8)
    cols = {"image": [Image.fromarray(PALETTE[mask])] * n}
    feats = {"image": datasets.Image()}
    if with_label:
        cols["label"] = [Image.fromarray(mask)] * n
        feats["label"] = datasets.Image()
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


def test_with_transform_dataloader_and_collate():
    ds = _tiny_ds().with_transform(make_train_transform(crop_size=8, seed=0, image_interpolation="nearest"))
    ex = ds[0]
    assert set(ex) == {"pixel_values", "labels"} and ex["pixel_values"].shape == (3, 8, 8)
    _colours_match_labels(ex["pixel_values"], ex["labels"])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fn)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and batch["labels"].shape == (3, 8, 8)
    assert batch["labels"].dtype == torch.int64 and batch["pixel_values"].dtype == torch.float32
    unl = _tiny_ds(with_label=False).with_transform(make_train_transform(crop_size=8, seed=0))
    assert set(unl[0]) == {"pixel_values"}
    assert "labels" not in collate_fn([unl[0], unl[1]])


def test_collate_pads_different_sizes():
    a = {"pixel_values": torch.ones(3, 2, 3), "labels": torch.zeros(2, 3, dtype=torch.int64), "id": "a"}
    b = {"pixel_values": torch.ones(3, 4, 2), "labels": torch.ones(4, 2, dtype=torch.int64), "id": "b"}
    batch = collate_fn([a, b], return_pixel_mask=True)
    assert batch["pixel_values"].shape == (2, 3, 4, 3) and batch["labels"].shape == (2, 4, 3)
    assert (batch["pixel_values"][0, :, 2:, :] == 0).all() and (batch["labels"][0, 2:, :] == 255).all()
    assert (batch["labels"][1, :, 2:] == 255).all() and batch["pixel_mask"][1].sum() == 8
    assert batch["id"] == ["a", "b"]


def test_presets_follow_paper_and_released_configs():
    rel_cs = train_transform_preset("cityscapes", "released")
    assert rel_cs["crop_size"] == 384 and rel_cs["scale"] == (2048, 1024) and rel_cs["flip_prob"] == 0.0
    assert rel_cs["cat_max_ratio"] == 0.75 and rel_cs["photometric"] is None
    rel_ade = train_transform_preset("ade20k", "released")
    assert rel_ade["scale"] == (2048, 512) and rel_ade["photometric"] == PhotoMetricDistortion()
    assert train_transform_preset("pc59", "released")["scale"] == (520, 520)
    paper_cs = train_transform_preset("cityscapes", "paper")
    assert paper_cs["crop_size"] == 512 and paper_cs["jitter"] is not None and paper_cs["photometric"] is None
    multi = train_transform_preset("cityscapes", "paper_multi")
    assert multi["flip_prob"] == 0.5 and multi["photometric"] is not None and multi["jitter"] is not None
    assert make_train_transform("ade20k", crop_size=64).crop_size == 64
    with pytest.raises(ValueError):
        train_transform_preset("ade20k", "nope")  # type: ignore[arg-type]


def test_eval_transform_resizes_image_only():
    img = Image.new("RGB", (100, 40))
    mask = np.full((40, 100), 3, np.uint8)
    t = make_eval_transform("ade20k")  # fit (2048, 512): factor min(20.48, 12.8) = 12.8
    x, y = t.apply(img, Image.fromarray(mask))
    assert x.shape == (3, 512, 1280) and y.shape == (40, 100)
    x2, y2 = SegmentationEvalTransform(scale=(50, 20), keep_ratio=False, resize_labels=True).apply(img, mask)
    assert x2.shape == (3, 20, 50) and y2.shape == (20, 50) and set(y2.unique().tolist()) == {3}
    out = SegmentationEvalTransform()({"image": [img], "label": [None]})
    assert out["labels"][0].shape == (40, 100) and (out["labels"][0] == 255).all()


def test_transform_rejects_bad_inputs():
    with pytest.raises(ValueError, match="mask"):
        SegmentationTrainTransform(seed=0).apply(Image.new("RGB", (5, 4)), np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="colour-coded"):
        SegmentationTrainTransform(seed=0).apply(Image.new("RGB", (2, 2)), Image.fromarray(PALETTE[[[0, 1], [2, 3]]]))
    with pytest.raises(ValueError):
        SegmentationTrainTransform(image_interpolation="lanczos")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="image"):
        SegmentationTrainTransform(seed=0)({"pixel": [1]})


def test_small_image_upscale_covers_the_crop_without_padding():
    """`small_image="upscale"`: an image smaller than the crop (after the rescale) is resized to cover it, mask
    along (NEAREST), so no crop holds black padding or ignore pixels; `"pad"` (mmseg) pads both."""
    from vocalign_hf.data import SegmentationTrainTransform

    image = np.full((20, 30, 3), 200, dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[:, 15:] = 1
    up = SegmentationTrainTransform(crop_size=64, ratio_range=(0.5, 2.0), small_image="upscale", seed=0)
    padded = SegmentationTrainTransform(crop_size=64, ratio_range=(0.5, 2.0), seed=0)
    for _ in range(5):
        x, y = up.apply(image, mask)
        assert x.shape == (3, 64, 64) and x.min() > 0.7 and set(y.unique().tolist()) <= {0, 1}
    x, y = padded.apply(image, mask)
    assert (x == 0).any() and (y == 255).any()
    with pytest.raises(ValueError, match="small_image must be 'pad' or 'upscale'"):
        SegmentationTrainTransform(small_image="crop")

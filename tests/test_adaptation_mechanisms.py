"""Hand-computed checks of the VocAlign adaptation mechanisms (masking, EMA, pseudo-labels,
Eq. 7 concept aggregation, Top-K, weighted CE / entropy, LoRA placement)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vocalign_hf.adaptation import (
    ConceptVocabulary,
    LoRASettings,
    apply_block_mask,
    count_trainable,
    ema_alpha,
    entropy_loss,
    gather_class_probs,
    lora_config_for_clip,
    lora_parameter_names,
    lora_parameters,
    lora_target_regex,
    pseudo_labels_from_probs,
    sample_block_mask,
    sample_clip_aligned_block_mask,
    select_topk_classes,
    topk_pseudo_labels,
    update_ema_,
    weighted_cross_entropy,
)


# --------------------------------------------------------------------------- EMA


def test_ema_alpha_schedule():
    assert ema_alpha(0, 0.99) == 0.0
    assert ema_alpha(1, 0.99) == pytest.approx(0.5)
    assert ema_alpha(2, 0.99) == pytest.approx(2.0 / 3.0)
    assert ema_alpha(1000, 0.99) == pytest.approx(0.99)  # 1 - 1/1001 = 0.999000... capped
    assert ema_alpha(1000, 0.999) == pytest.approx(0.999)  # 0.999000999 capped at 0.999
    assert ema_alpha(10, 0.999) == pytest.approx(1 - 1 / 11)
    with pytest.raises(ValueError):
        ema_alpha(-1, 0.99)


def test_update_ema_one_step_by_hand():
    teacher = [nn.Parameter(torch.tensor([1.0, 2.0])), torch.tensor([[0.0, -4.0]])]
    student = [nn.Parameter(torch.tensor([3.0, 6.0])), torch.tensor([[8.0, 4.0]])]
    update_ema_(teacher, student, 0.75)
    # 0.75 * [1, 2] + 0.25 * [3, 6] = [1.5, 3.0]; 0.75 * [0, -4] + 0.25 * [8, 4] = [2, -2]
    torch.testing.assert_close(teacher[0].data, torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(teacher[1], torch.tensor([[2.0, -2.0]]))
    torch.testing.assert_close(student[0].data, torch.tensor([3.0, 6.0]))  # student untouched
    assert teacher[0].grad_fn is None and teacher[0].is_leaf
    # alpha 0 (step 0) copies the student
    update_ema_(teacher, student, ema_alpha(0, 0.99))
    torch.testing.assert_close(teacher[1], torch.tensor([[8.0, 4.0]]))
    with pytest.raises(ValueError):
        update_ema_([torch.zeros(2)], [torch.zeros(3)], 0.5)
    with pytest.raises(ValueError):
        update_ema_([torch.zeros(2)], [], 0.5)


# --------------------------------------------------------------------------- confidence weight (Eq. 3-4)


def _probs_1x3x2x2() -> torch.Tensor:
    # pixel (0,0): [.75, .125, .125] max .75   -> 0
    # pixel (0,1): [.25, .5, .25]    max .5    -> 1
    # pixel (1,0): [.125, .25, .625] max .625  -> 2
    # pixel (1,1): [.0625, .875, .0625] max .875 -> 1
    p = torch.tensor(
        [
            [[0.75, 0.25], [0.125, 0.0625]],
            [[0.125, 0.5], [0.25, 0.875]],
            [[0.125, 0.25], [0.625, 0.0625]],
        ]
    )
    return p.unsqueeze(0)


def test_pseudo_labels_and_confidence_weight_ge_semantics():
    probs = _probs_1x3x2x2()
    labels, weight = pseudo_labels_from_probs(probs, threshold=0.625)
    assert labels.dtype == torch.long
    assert labels.tolist() == [[[0, 1], [2, 1]]]
    # maxima .75, .5, .625, .875 ; ">= .625" keeps 3 of 4 (strict ">" would give 0.5)
    assert weight.shape == ()
    assert weight.item() == pytest.approx(0.75)
    _, w_none = pseudo_labels_from_probs(probs, threshold=None)
    assert w_none.item() == 1.0
    _, w_hi = pseudo_labels_from_probs(probs, threshold=0.9)
    assert w_hi.item() == 0.0


def test_confidence_weight_batch_scalar_vs_per_image():
    low = torch.full((1, 3, 2, 2), 1.0 / 3.0)  # no confident pixel
    probs = torch.cat([_probs_1x3x2x2(), low])
    _, w = pseudo_labels_from_probs(probs, threshold=0.625)
    assert w.item() == pytest.approx(3 / 8)  # one scalar over B*H*W = 8 pixels (released code)
    _, w_img = pseudo_labels_from_probs(probs, threshold=0.625, per_image=True)
    torch.testing.assert_close(w_img, torch.tensor([0.75, 0.0]))


# --------------------------------------------------------------------------- block masking (Eq. 5-6)


def test_block_mask_shape_values_blocks_and_seeded_exactness():
    b, h, w, bs, r = 3, 40, 56, 16, 0.5  # not divisible: 3 x 4 block grid, cropped
    g = torch.Generator().manual_seed(123)
    mask = sample_block_mask(b, h, w, bs, r, generator=g)
    assert mask.shape == (b, 1, h, w) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # independent computation from the same draw: pixel (i, j) takes grid[i // bs, j // bs]
    grid = torch.rand((b, 1, 3, 4), generator=torch.Generator().manual_seed(123)) > r
    rows = torch.arange(h) // bs
    cols = torch.arange(w) // bs
    expected = grid[:, :, rows][:, :, :, cols].float()
    torch.testing.assert_close(mask, expected)
    # constant within every block (including the cropped border blocks)
    for i0 in range(0, h, bs):
        for j0 in range(0, w, bs):
            blk = mask[:, :, i0 : i0 + bs, j0 : j0 + bs]
            assert torch.all(blk == blk[:, :, :1, :1])


def test_block_mask_matches_released_nearest_resize_when_divisible():
    b, h, w, bs, r = 2, 64, 32, 16, 0.7
    mask = sample_block_mask(b, h, w, bs, r, generator=torch.Generator().manual_seed(7))
    grid = (torch.rand((b, 1, h // bs, w // bs), generator=torch.Generator().manual_seed(7)) > r).float()
    torch.testing.assert_close(mask, F.interpolate(grid, size=(h, w), mode="nearest"))


def test_clip_aligned_mask_covers_whole_vit_patches():
    """A 512 crop seen by a 384 CLIP with 16-px patches: blocks of 16 CLIP pixels are 21.33 input pixels; after the
    model's bilinear resize every 16 x 16 patch is entirely visible or entirely hidden (up to the blurred edge)."""
    mask = sample_clip_aligned_block_mask(2, 512, 512, 16, 0.5, 384, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (2, 1, 512, 512) and set(mask.unique().tolist()) == {0.0, 1.0}
    seen = F.interpolate(mask, size=(384, 384), mode="bilinear", align_corners=False)
    patches = seen.view(2, 24, 16, 24, 16)[:, :, 2:-2, :, 2:-2]  # the inside of every patch
    assert ((patches == 0).all(dim=(2, 4)) | (patches == 1).all(dim=(2, 4))).all()
    plain = sample_block_mask(2, 512, 512, 16, 0.5, generator=torch.Generator().manual_seed(0))
    patches = F.interpolate(plain, size=(384, 384), mode="bilinear", align_corners=False).view(2, 24, 16, 24, 16)
    assert not ((patches == 0).all(dim=(2, 4)) | (patches == 1).all(dim=(2, 4))).all()  # input-space blocks straddle
    same = sample_clip_aligned_block_mask(2, 384, 384, 16, 0.5, 384, generator=torch.Generator().manual_seed(3))
    assert torch.equal(same, sample_block_mask(2, 384, 384, 16, 0.5, generator=torch.Generator().manual_seed(3)))


def test_student_augmentation_draws_per_image_and_blurs_like_a_gaussian():
    from vocalign_hf.adaptation.student_augmentation import StudentAugmentation, gaussian_blur

    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    aug = StudentAugmentation()
    a = aug(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(1))) and a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a[0], a[1])
    gray = StudentAugmentation(0, 0, 0, 0, grayscale_prob=1.0, blur_prob=0.0)(x)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    # the blur: a 5-tap normalised Gaussian along each axis, reflect padding
    sigma = torch.tensor([0.5, 1.0, 1.5, 2.0])
    blurred = gaussian_blur(x, sigma)
    taps = torch.exp(-0.5 * (torch.arange(-2.0, 3.0) / 1.0) ** 2)
    taps = taps / taps.sum()
    padded = F.pad(x[1:2], (2, 2, 2, 2), mode="reflect")
    by_hand = sum(taps[i] * taps[j] * padded[..., i : i + 16, j : j + 16] for i in range(5) for j in range(5))
    torch.testing.assert_close(blurred[1:2], by_hand, atol=1e-6, rtol=0)


def test_block_mask_visible_ratio():
    r = 0.7
    mask = sample_block_mask(1, 400, 400, 4, r, generator=torch.Generator().manual_seed(0))  # 10k blocks
    assert abs(mask.mean().item() - (1 - r)) < 0.02
    assert sample_block_mask(2, 8, 8, 4, 1.0).sum().item() == 0.0  # r = 1: everything masked
    with pytest.raises(ValueError):
        sample_block_mask(1, 8, 8, 0, 0.5)
    with pytest.raises(ValueError):
        sample_block_mask(1, 8, 8, 4, 1.5)


def test_apply_block_mask_and_callable():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]])  # 1x2x2x2
    m = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    out = apply_block_mask(x, m)
    assert out.tolist() == [[[[1.0, 0.0], [0.0, 4.0]], [[5.0, 0.0], [0.0, 8.0]]]]
    out_fill = apply_block_mask(x, m, fill=[-1.0, -2.0])
    assert out_fill.tolist() == [[[[1.0, -1.0], [-1.0, 4.0]], [[5.0, -2.0], [-2.0, 8.0]]]]
    with pytest.raises(ValueError):
        apply_block_mask(x, torch.ones(1, 1, 3, 3))


# --------------------------------------------------------------------------- Eq. 7 concept aggregation


def _vocab() -> ConceptVocabulary:
    return ConceptVocabulary(["road", "car"], {"road": ["street", "pavement"], "car": ["automobile"]})


def test_vocabulary_entries_and_mapping():
    v = _vocab()
    assert v.entries == ["road", "street", "pavement", "car", "automobile"]
    assert v.entry_to_class.tolist() == [0, 0, 0, 1, 1]
    assert v.class_to_entries == {0: [0, 1, 2], 1: [3, 4]}
    assert (v.num_classes, v.num_entries) == (2, 5)
    v2 = ConceptVocabulary(["road", "car"], {"road": ["street"], "car": ["automobile"]}, include_class_names=False)
    assert v2.entries == ["street", "automobile"]


def test_eq7_worked_one_pixel_example():
    v = _vocab()
    # softmax over ALL 5 entries of log([1, 2, 3, 4, 10]) = [1, 2, 3, 4, 10] / 20
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])).view(1, 5, 1, 1)
    out = v.aggregate(logits)
    assert out.shape == (1, 2, 1, 1)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.30, 0.70]))  # road .05+.10+.15, car .20+.50
    # NOT a per-class softmax: max-pooling or per-class normalisation would give other numbers
    probs_in = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.50]).view(1, 5, 1, 1)
    torch.testing.assert_close(v.aggregate(probs_in, from_logits=False).flatten(), torch.tensor([0.30, 0.70]))


def test_eq7_sum_of_entry_softmax_random():
    v = _vocab()
    logits = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = v.aggregate(logits)
    p = torch.softmax(logits, dim=1)
    torch.testing.assert_close(out[:, 0], p[:, 0] + p[:, 1] + p[:, 2])
    torch.testing.assert_close(out[:, 1], p[:, 3] + p[:, 4])
    torch.testing.assert_close(out.sum(1), torch.ones(2, 3, 4))
    out[:, 1].sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    ident = ConceptVocabulary.identity(["a", "b", "c"])
    x = torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(ident.aggregate(x), torch.softmax(x, 1))
    probs = torch.softmax(x, 1)
    kept = ident.aggregate(probs, from_logits=False)
    assert torch.equal(kept, probs) and kept.data_ptr() != probs.data_ptr()  # a new tensor, never the input
    with pytest.raises(ValueError):
        v.aggregate(torch.randn(1, 4, 2, 2))


def test_entries_of_the_kept_classes_and_their_log_probabilities():
    """Top-K over classes applied to the aligned vocabulary: each image keeps its kept classes' entries (shorter rows
    padded, position -1), and the log-probabilities summed per kept class are Eq. 7 over those entries alone."""
    v = _vocab()  # road: 0 1 2, car: 3 4
    three = ConceptVocabulary(["road", "car", "sky"], {"road": ["street", "pavement"], "car": ["automobile"]})
    entries, positions = three.entries_of(torch.tensor([[0, 1], [1, 2], [0, 2]]))
    assert entries.tolist() == [[0, 1, 2, 3, 4], [3, 4, 5, 3, 3], [0, 1, 2, 5, 0]]
    assert positions.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, -1, -1], [0, 0, 0, 1, -1]]
    logits = torch.randn(3, 5, 2, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    log_probs = ConceptVocabulary.log_class_probs(logits, positions, 2)
    for image in range(3):
        valid = positions[image] >= 0
        p = torch.softmax(logits[image, valid], dim=0)
        owner = positions[image, valid]
        by_hand = torch.stack([p[owner == k].sum(0) for k in range(2)])
        torch.testing.assert_close(log_probs[image].exp(), by_hand)
    log_probs[:, 1].sum().backward()
    assert logits.grad[1, 3:].abs().sum() == 0  # padding takes no part
    # Over the whole vocabulary it is `aggregate`, in log space; large logits do not overflow.
    full = 50 * torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(v.log_class_probs(full, v.entry_to_class, 2).exp(), v.aggregate(full))


@pytest.mark.parametrize(
    "classes, concepts, match",
    [
        ([], {}, "empty"),
        (["road", "car", "road"], {}, "road"),
        (["road"], {"sky": ["heaven"]}, "sky"),
        (["road", "car"], {"road": ["Car"]}, "car"),
        (["road", "car"], {"road": ["lane"], "car": ["lane"]}, "lane"),
        (["road"], {"road": ["  "]}, "empty"),
        (["road"], {"road": "street"}, "list"),
        (["road", "car"], {"road": ["street"]}, None),  # valid
    ],
)
def test_vocabulary_validation(classes, concepts, match):
    if match is None:
        ConceptVocabulary(classes, concepts)
        return
    with pytest.raises(ValueError, match=match):
        ConceptVocabulary(classes, concepts)


def test_vocabulary_dedup_within_class_and_no_entry():
    v = ConceptVocabulary(["road"], {"road": ["street", "Street", "road", "lane"]})
    assert v.entries == ["road", "street", "lane"]
    with pytest.raises(ValueError, match="car"):
        ConceptVocabulary(["road", "car"], {"road": ["street"]}, include_class_names=False)


# --------------------------------------------------------------------------- Top-K


def _topk_probs() -> torch.Tensor:
    # 4 classes, 2x2 pixels a b / c d; columns are the per-pixel distributions
    a = [0.10, 0.60, 0.10, 0.20]
    b = [0.10, 0.50, 0.30, 0.10]
    c = [0.20, 0.10, 0.60, 0.10]
    d = [0.45, 0.15, 0.05, 0.35]
    img0 = torch.tensor([a, b, c, d]).T.reshape(4, 2, 2)
    # means: class0 .2125, class1 .3375, class2 .2625, class3 .1875
    img1 = img0[[1, 3, 0, 2]]  # means .3375, .1875, .2125, .2625 -> top-2 = {0, 3}
    return torch.stack([img0, img1])


def test_topk_selection_sorted_and_gather():
    probs = _topk_probs()
    torch.testing.assert_close(probs.mean(dim=(2, 3))[0], torch.tensor([0.2125, 0.3375, 0.2625, 0.1875]))
    idx = select_topk_classes(probs, 2)
    assert idx.dtype == torch.long and idx.tolist() == [[1, 2], [0, 3]]
    assert select_topk_classes(probs, 3).tolist() == [[0, 1, 2], [0, 2, 3]]
    assert select_topk_classes(probs, 4).tolist() == [[0, 1, 2, 3]] * 2
    assert select_topk_classes(probs, 99).tolist() == [[0, 1, 2, 3]] * 2
    assert select_topk_classes(probs, None).shape == (2, 4)
    g = gather_class_probs(probs, idx)
    assert g.shape == (2, 2, 2, 2)
    torch.testing.assert_close(g[0, 0], probs[0, 1])
    torch.testing.assert_close(g[1, 1], probs[1, 3])


def test_topk_pseudo_labels_argmax_over_gathered():
    probs = _topk_probs()
    idx, labels, weight = topk_pseudo_labels(probs[:1], 2, threshold=0.4)
    assert idx.tolist() == [[1, 2]]
    # gathered [class1, class2]: a [.6,.1]->0, b [.5,.3]->0, c [.1,.6]->1, d [.15,.05]->0
    assert labels.tolist() == [[[0, 0], [1, 0]]]
    # confidence from the gathered maxima .6 .5 .6 .15 (full maxima would all pass 0.4 -> 1.0)
    assert weight.item() == pytest.approx(0.75)
    full_labels, full_w = pseudo_labels_from_probs(probs[:1], 0.4)
    assert full_labels.tolist() == [[[1, 1], [2, 0]]] and full_w.item() == 1.0


# --------------------------------------------------------------------------- losses


def test_weighted_cross_entropy_by_hand():
    # logits [0, ln 3] -> p = [1/4, 3/4]; 1x1 map upsampled (constant) to 2x2
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)
    labels = torch.tensor([[[0, 1], [255, 1]]])
    loss = weighted_cross_entropy(logits, labels, weight=0.5)
    expected = 0.5 * (math.log(4.0) + 2 * math.log(4.0 / 3.0)) / 3  # 3 non-ignored pixels
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    w_t = torch.tensor(0.5)
    assert weighted_cross_entropy(logits, labels, w_t).item() == pytest.approx(expected, rel=1e-6)
    # weight 1 == torch's mean CE over non-ignored pixels
    up = F.interpolate(logits, size=(2, 2), mode="bilinear", align_corners=False)
    ref = F.cross_entropy(up, labels, ignore_index=255)
    assert weighted_cross_entropy(logits, labels).item() == pytest.approx(ref.item(), rel=1e-6)
    # per-image weights: image 2 is all label 0 with weight 0.25
    logits2 = logits.expand(2, 2, 1, 1)
    labels2 = torch.cat([labels, torch.zeros(1, 2, 2, dtype=torch.long)])
    loss2 = weighted_cross_entropy(logits2, labels2, torch.tensor([1.0, 0.25]))
    exp2 = ((math.log(4.0) + 2 * math.log(4.0 / 3.0)) + 0.25 * 4 * math.log(4.0)) / 7
    assert loss2.item() == pytest.approx(exp2, rel=1e-6)
    assert weighted_cross_entropy(logits, torch.full((1, 2, 2), 255)).item() == 0.0


def test_entropy_loss_values():
    assert entropy_loss(torch.zeros(2, 5, 3, 3)).item() == pytest.approx(math.log(5), rel=1e-6)
    two = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_loss(two).item() == pytest.approx(h, rel=1e-6)
    peaked = torch.tensor([50.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert entropy_loss(peaked).item() < 1e-6


# --------------------------------------------------------------------------- LoRA placement


def _tiny_parent() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = CLIPModel(
                CLIPConfig(
                    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                     num_attention_heads=2, vocab_size=100, max_position_embeddings=16),
                    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                       num_attention_heads=2, image_size=32, patch_size=8),
                )
            )
            self.extra = nn.Linear(4, 4)

    torch.manual_seed(0)
    return Parent()


def test_lora_regex():
    rx = lora_target_regex(LoRASettings())
    assert re.fullmatch(rx, "clip.text_model.encoder.layers.3.self_attn.v_proj")
    assert re.fullmatch(rx, "vision_model.encoder.layers.0.self_attn.q_proj")
    assert not re.fullmatch(rx, "clip.text_model.encoder.layers.13.self_attn.q_proj")
    assert not re.fullmatch(rx, "clip.text_model.encoder.layers.4.self_attn.q_proj")
    assert not re.fullmatch(rx, "clip.vision_model.encoder.layers.0.self_attn.out_proj")
    assert not re.fullmatch(rx, "clip.vision_model.encoder.layers.0.self_attn.q_proj_x")
    assert not re.fullmatch(lora_target_regex(LoRASettings(towers=("vision",))),
                            "clip.text_model.encoder.layers.0.self_attn.q_proj")
    with pytest.raises(ValueError):
        LoRASettings(towers=("audio",))
    with pytest.raises(ValueError):
        LoRASettings(layers=())


def test_lora_placement_on_nested_clip():
    peft = pytest.importorskip("peft")
    model = _tiny_parent()
    pixel = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.clip.vision_model(pixel_values=pixel).pooler_output
    settings = LoRASettings()
    pm = peft.get_peft_model(model, lora_config_for_clip(settings))
    names = lora_parameter_names(pm)
    # 2 towers x 4 layers x 3 projections x (A, B)
    assert len(names) == 48
    pat = re.compile(r".*\.(text_model|vision_model)\.encoder\.layers\.([0-9]+)\.self_attn\.(\w+)\.lora_[AB]\.")
    seen = set()
    for n in names:
        mt = pat.match(n)
        assert mt is not None, n
        seen.add((mt.group(1), int(mt.group(2)), mt.group(3)))
    assert seen == {(t, i, p) for t in ("text_model", "vision_model") for i in range(4)
                    for p in ("q_proj", "k_proj", "v_proj")}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == set(names)
    assert count_trainable(pm) == 24 * (2 * 32 * 2)  # 24 modules, A (2x32) + B (32x2)
    assert not pm.base_model.model.extra.weight.requires_grad
    inner = pm.base_model.model.clip
    for tower in (inner.text_model, inner.vision_model):
        for i, layer in enumerate(tower.encoder.layers):
            attn = layer.self_attn
            for proj in ("q_proj", "k_proj", "v_proj"):
                has_lora = hasattr(getattr(attn, proj), "lora_A")
                assert has_lora == (i < 4), (i, proj)
            assert type(attn.out_proj) is nn.Linear
            assert type(layer.mlp.fc1) is nn.Linear and type(layer.mlp.fc2) is nn.Linear
    q = inner.vision_model.encoder.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(2 / math.sqrt(2))  # rsLoRA, as the released code
    with torch.no_grad():
        after = inner.vision_model(pixel_values=pixel).pooler_output
    torch.testing.assert_close(after, before)  # B = 0 at init: the function is unchanged
    assert len(lora_parameters(pm)) == 48


def test_adaptive_topk_keeps_what_the_neediest_image_needs():
    means = torch.tensor([[0.70, 0.20, 0.06, 0.04], [0.35, 0.40, 0.05, 0.20]])
    probs = means.view(2, 4, 1, 1).expand(2, 4, 3, 3)
    # mass 0.85: image 0 needs 2 classes (0.70 + 0.20), image 1 needs 3 (0.40 + 0.35 + 0.20) -> K = 3
    assert select_topk_classes(probs, 4, mass=0.85).tolist() == [[0, 1, 2], [0, 1, 3]]
    assert select_topk_classes(probs, 2, mass=0.85).tolist() == [[0, 1], [0, 1]]  # K capped by k
    assert select_topk_classes(probs, 4, mass=0.5).shape == (2, 2)  # image 1 needs 0.40 + 0.35
    assert select_topk_classes(probs, None, mass=1.0).shape == (2, 4)
    indices, labels, _ = topk_pseudo_labels(probs, 4, None, mass=0.85)
    assert indices.shape == (2, 3) and labels.max() < 3
    with pytest.raises(ValueError, match="mass"):
        select_topk_classes(probs, 4, mass=0.0)


def test_concept_max_reduce_renormalises_the_best_entry():
    vocab = ConceptVocabulary(["a", "b"], {"b": ["c", "d"]})  # entries: a | b, c, d
    probs = torch.tensor([0.4, 0.2, 0.3, 0.1]).view(1, 4, 1, 1)
    assert vocab.aggregate(probs, from_logits=False).flatten().tolist() == pytest.approx([0.4, 0.6])
    assert vocab.aggregate(probs, from_logits=False, reduce="max").flatten().tolist() == pytest.approx([0.4 / 0.7, 0.3 / 0.7])
    with pytest.raises(ValueError, match="reduce"):
        vocab.aggregate(probs, reduce="mean")

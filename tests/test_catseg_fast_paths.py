"""The speed-ups of the aggregator and the teacher (docs/performance.md) compute what the plain forms compute."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vocalign_hf import CATSegForSemanticSegmentation
from vocalign_hf.adaptation import VocAlignArguments, VocAlignTrainer, add_lora
from vocalign_hf.models.catseg import aggregation_catseg as agg

from conftest import tiny_catseg_config


def _aggregator_inputs(config, batch=2, classes=7):
    g = torch.Generator().manual_seed(0)
    d, grid = config.clip_config.projection_dim, config.feature_resolution
    dense = torch.randn(batch, d, grid, grid, generator=g)
    text = F.normalize(torch.randn(batch, classes, config.num_templates, d, generator=g), dim=-1)
    channels = [config.appearance_guidance_dim, *config.decoder_guidance_dims]
    guidance = tuple(torch.randn(batch, c, grid * s, grid * s, generator=g) for c, s in zip(channels, (1, 2, 4)))
    return dense, text, guidance


def test_window_token_order_is_roll_then_partition():
    x = torch.randn(3, 8, 8, 5)
    for shift in (0, 2):
        expected = agg.window_partition(torch.roll(x, shifts=(-shift, -shift), dims=(1, 2)), 4).view(3, 64, 5)
        assert torch.equal(x.view(3, 64, 5)[:, agg.window_token_order(8, 4, shift)], expected)


def test_transposed_convolution_as_one_gemm_matches_conv_transpose():
    torch.manual_seed(0)
    up = agg.CATSegDecoderBlock(12, 8, 4)
    x = torch.randn(3, 12, 5, 6)
    assert up.upsample(x).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(up.upsample(x), up.up(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad_len", [0, 8])
def test_chunked_no_grad_aggregator_equals_the_autograd_path(pad_len, monkeypatch):
    """Without autograd the Swin blocks and the decoder run a few class slices at a time and the feed-forward
    layers in row chunks; with autograd everything runs at once. Small chunks force several of each."""
    monkeypatch.setattr(agg, "INFERENCE_CHUNK_SLICES", 3)
    monkeypatch.setattr(agg, "FEED_FORWARD_CHUNK_ROWS", 50)
    config = tiny_catseg_config(pad_len=pad_len)
    torch.manual_seed(0)
    model = agg.CATSegAggregator(config).eval()
    for parameter in model.parameters():  # zero-initialised layers would hide a wrong guidance or bias path
        parameter.data.normal_(0, 0.2)
    inputs = _aggregator_inputs(config)
    with torch.no_grad():
        chunked = model(*inputs)
    whole = model(*inputs)
    assert whole.requires_grad
    assert chunked.shape == (2, 7, 4 * config.feature_resolution, 4 * config.feature_resolution)
    torch.testing.assert_close(chunked, whole.detach(), rtol=1e-5, atol=1e-5)
    # Each image only sees its own guidance: changing image 1's guidance leaves image 0's logits alone.
    dense, text, guidance = inputs
    other = (guidance[0], guidance[1], guidance[2].clone())
    other[2][1] += 1.0
    with torch.no_grad():
        changed = model(dense, text, other)
    assert torch.equal(changed[0], chunked[0])
    assert (changed[1] - chunked[1]).abs().max() > 1e-3


def _graph_node_names(tensor: torch.Tensor) -> set[str]:
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_student_backward_has_no_whole_gradient_copies():
    """The student's aggregator is frozen and its inputs need gradients: the guidance terms are then added out of
    place, since an in-place add on a GEMM output makes autograd clone the whole gradient (`CopySlices`)."""
    config = tiny_catseg_config()
    model = agg.CATSegAggregator(config).requires_grad_(False)
    dense, text, guidance = _aggregator_inputs(config)
    inputs = [dense.requires_grad_(), text, tuple(g.requires_grad_() for g in guidance)]
    logits = model(*inputs)
    assert not [name for name in _graph_node_names(logits) if "CopySlices" in name]
    logits.square().mean().backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in (dense, *inputs[2]))


class _Images(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"pixel_values": torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(index))}


@pytest.mark.parametrize("teacher_text_ema", [True, False])
def test_teacher_vocabulary_is_encoded_once_per_ema_update(teacher_text_ema, tmp_path, tiny_processor):
    torch.manual_seed(0)
    args = VocAlignArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=5e-3, save_strategy="no", report_to=[], top_k=2, mask_block_size=8, use_cpu=True, seed=0,
        disable_tqdm=True, teacher_text_ema=teacher_text_ema,
    )
    model = add_lora(CATSegForSemanticSegmentation(tiny_catseg_config()), args)
    trainer = VocAlignTrainer(model=model, args=args, class_names=["road", "car", "sky"], processor=tiny_processor,
                              concepts={"car": ["automobile"]}, train_dataset=_Images())
    encode, calls = trainer.teacher.get_text_embeddings, []
    trainer.teacher.get_text_embeddings = lambda *a, **k: calls.append(1) or encode(*a, **k)
    trainer.train()
    # 2 optimiser steps x 2 micro-batches: the text LoRA weights follow the student at each of the 2 EMA updates
    # (encoded before steps 1 and 2), or never (encoded once).
    assert len(calls) == (2 if teacher_text_ema else 1)


def test_prompts_run_cut_after_their_eot_token_and_give_the_padded_embeddings(tiny_processor):
    torch.manual_seed(0)
    model = CATSegForSemanticSegmentation(tiny_catseg_config(prompt_templates=["a {}.", "a photo of the big {}."]))
    model.requires_grad_(False)
    model.catseg.clip.text_model.embeddings.token_embedding.weight.requires_grad_(True)
    processor = type(tiny_processor).from_config(model.config)
    ids = processor.tokenize_classes(["road", "traffic light", "a very long class name indeed"])["input_ids"]  # (3, 2, L)
    padded = F.pad(ids, (0, 77 - ids.shape[-1]), value=model.config.clip_config.text_config.pad_token_id)
    seen = []
    model.catseg.clip.text_model.embeddings.register_forward_hook(lambda m, args, out: seen.append(out.shape[:2]))

    fast = model.catseg.get_text_embeddings(padded)
    # every prompt ran without its padding, in as many passes as there are prompt lengths
    eot = ids.flatten(0, 1).argmax(-1) + 1  # the EOT token has the largest id
    assert sorted(n * length for n, length in seen) == sorted(
        int((eot == length).sum()) * length for length in eot.unique().tolist()
    )
    assert sum(n * length for n, length in seen) < 0.75 * eot.numel() * ids.shape[-1]
    # the reference's layout: the whole padded (77-token) batch at once
    plain = F.normalize(model.catseg.clip.get_text_features(input_ids=padded.flatten(0, 1)).pooler_output, dim=-1)
    torch.testing.assert_close(fast, plain.view_as(fast), rtol=1e-5, atol=1e-6)
    # gradients flow back to each prompt's tokens as in the padded batch
    weights = torch.randn_like(fast)
    (grad_fast,) = torch.autograd.grad((fast * weights).sum(), model.catseg.clip.text_model.embeddings.token_embedding.weight)
    (grad_plain,) = torch.autograd.grad((plain.view_as(fast) * weights).sum(),
                                        model.catseg.clip.text_model.embeddings.token_embedding.weight)
    torch.testing.assert_close(grad_fast, grad_plain, rtol=1e-4, atol=1e-4 * float(grad_plain.abs().max()))


def test_a_forward_under_inference_mode_does_not_break_training_later(tiny_processor):
    """The window order is cached across calls: made first under `torch.inference_mode()` (the demo, a pipeline),
    it must still index a forward that trains (it was an inference tensor, and backward refused it)."""
    from vocalign_hf.models.catseg.aggregation_catseg import window_token_order

    window_token_order.cache_clear()
    torch.manual_seed(0)
    model = CATSegForSemanticSegmentation(tiny_catseg_config())
    tokens = tiny_processor.tokenize_classes(["road", "sky"])["input_ids"]
    images = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        model(pixel_values=images, input_ids=tokens)
    model.train()
    model(pixel_values=images, input_ids=tokens).logits.sum().backward()
    assert any(p.grad is not None for p in model.parameters())

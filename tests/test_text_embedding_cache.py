"""The invalidation rules of `TextEmbeddingCache`, the one cache of a vocabulary's text embeddings (used by the
model's `encode_vocabulary`, the pipeline, the EMA teacher, the trainer's evaluation and the demo)."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from vocalign_hf.adaptation import update_ema_
from vocalign_hf.models.catseg.text_embedding_cache import TextEmbeddingCache

CLASSES = ["road", "car", "sky"]


class Counting:
    """`model.get_text_embeddings`, counting its calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, input_ids):
        self.calls += 1
        return self.model.get_text_embeddings(input_ids)


def lookup(cache, model, ids, encode):
    return cache.get_or_encode(model.catseg.text_tower, ids, encode)


@pytest.fixture
def ids(tiny_processor):
    return tiny_processor.tokenize_classes(CLASSES)["input_ids"]


def lora_model(tiny_model, **extra):
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **extra)
    model = get_peft_model(tiny_model, config)
    model.add_adapter("other", copy.deepcopy(config))
    return model.eval()


@torch.no_grad()
def test_same_inputs_are_encoded_once_and_other_ids_again(tiny_model, ids):
    cache, encode = TextEmbeddingCache(), Counting(tiny_model)
    first = lookup(cache, tiny_model, ids, encode)
    assert lookup(cache, tiny_model, ids.clone(), encode) is first and encode.calls == 1
    lookup(cache, tiny_model, ids[:2], encode)
    assert encode.calls == 2 and len(cache) == 2


@torch.no_grad()
def test_in_place_weight_changes_re_encode(tiny_model, ids):
    cache, encode = TextEmbeddingCache(), Counting(tiny_model)
    first = lookup(cache, tiny_model, ids, encode)
    tiny_model.catseg.clip.text_projection.weight.add_(0.5)  # as an optimiser step writes
    second = lookup(cache, tiny_model, ids, encode)
    assert encode.calls == 2 and not torch.equal(first, second)
    tiny_model.catseg.clip.text_model.final_layer_norm.load_state_dict(
        {"weight": torch.ones(32), "bias": torch.zeros(32)})
    lookup(cache, tiny_model, ids, encode)
    assert encode.calls == 3
    tiny_model.catseg.aggregator.to(torch.float64)  # not the text tower: still cached
    lookup(cache, tiny_model, ids, encode)
    assert encode.calls == 3


@torch.no_grad()
def test_an_ema_update_of_text_weights_re_encodes(tiny_model, ids):
    cache, encode = TextEmbeddingCache(), Counting(tiny_model)
    lookup(cache, tiny_model, ids, encode)
    weight = tiny_model.catseg.clip.text_projection.weight
    update_ema_([weight], [torch.zeros_like(weight)], 0.5)
    lookup(cache, tiny_model, ids, encode)
    assert encode.calls == 2


@torch.no_grad()
def test_active_adapter_decides_and_inactive_weights_do_not(tiny_model, ids):
    model = lora_model(tiny_model)
    base = model.get_base_model()
    cache, encode = TextEmbeddingCache(), Counting(base)
    default = lookup(cache, base, ids, encode)
    model.base_model.set_adapter("other")
    other = lookup(cache, base, ids, encode)
    assert encode.calls == 2 and not torch.equal(default, other)
    for name, weight in model.named_parameters():
        if ".default." in name:
            weight.add_(1)  # the inactive adapter's weights
    assert lookup(cache, base, ids, encode) is other and encode.calls == 2
    with model.disable_adapter():
        lookup(cache, base, ids, encode)
    assert encode.calls == 3


@torch.no_grad()
def test_trainable_token_weights_count(tiny_model, ids):
    model = lora_model(tiny_model, trainable_token_indices={"token_embedding": [ids[0, 0, 1].item()]})
    base = model.get_base_model()
    cache, encode = TextEmbeddingCache(), Counting(base)
    lookup(cache, base, ids, encode)
    (delta,) = [w for n, w in model.named_parameters() if "trainable_tokens_delta.default" in n]
    delta.add_(1)
    lookup(cache, base, ids, encode)
    assert encode.calls == 2


def test_grad_mode_training_mode_and_inference_mode(tiny_model, ids):
    cache, encode = TextEmbeddingCache(), Counting(tiny_model)
    with torch.no_grad():
        cached = lookup(cache, tiny_model, ids, encode)
    with_grad = lookup(cache, tiny_model, ids, encode)  # the text weights require grad: never the no-grad tensor
    assert with_grad.grad_fn is not None and encode.calls == 2
    assert lookup(cache, tiny_model, ids, encode) is not with_grad and encode.calls == 3  # nor kept
    tiny_model.requires_grad_(False)
    assert lookup(cache, tiny_model, ids, encode) is cached and encode.calls == 3  # no gradient can reach them
    tiny_model.train()  # dropout may act: nothing served or kept
    lookup(cache, tiny_model, ids, encode)
    assert encode.calls == 4 and len(cache) == 1
    tiny_model.eval()
    with torch.inference_mode():
        inference = lookup(cache, tiny_model, ids, encode)
    assert encode.calls == 5 and lookup(cache, tiny_model, ids, encode) is not inference


@torch.no_grad()
def test_autocast_and_dtype_decide(tiny_model, ids):
    cache, encode = TextEmbeddingCache(), Counting(tiny_model)
    lookup(cache, tiny_model, ids, encode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lookup(cache, tiny_model, ids, encode).dtype == torch.bfloat16
    tiny_model.to(torch.float64)
    assert lookup(cache, tiny_model, ids, encode).dtype == torch.float64
    assert encode.calls == 3


@torch.no_grad()
def test_oldest_entry_goes_first_and_a_copied_model_starts_empty(tiny_model, ids):
    cache, encode = TextEmbeddingCache(max_entries=2), Counting(tiny_model)
    for rows in (ids[:1], ids[:2], ids[:1], ids[:3], ids[:1], ids[:2]):
        lookup(cache, tiny_model, rows, encode)
    assert encode.calls == 4  # ids[:2] was dropped when ids[:3] came; ids[:1] was used last
    tiny_model.encode_vocabulary(ids)
    assert len(tiny_model.text_embedding_cache) == 1 and len(copy.deepcopy(tiny_model).text_embedding_cache) == 0
    with pytest.raises(ValueError, match="max_entries"):
        TextEmbeddingCache(max_entries=0)

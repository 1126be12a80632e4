"""The one cache of a vocabulary's text embeddings, and its invalidation rules.

A cached encoding is served only while everything that decides it is unchanged:

- the token ids (compared by value, with their shape, dtype and device);
- every weight the text tower computes with: each tensor's identity, storage, dtype, device and version counter
  (an optimiser step, an EMA update, `load_state_dict` or any other in-place write bumps the counter);
- for peft layers (LoRA, trainable tokens): which adapters are active, merged or disabled, and their scaling; the
  weights of inactive adapters do not count;
- autocast (enabled, dtype) and inference mode.

Nothing is cached, or served, while a text module is in training mode (dropout) or when gradients would reach a
text weight: the caller then gets a fresh encoding with its graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import chain

import torch
from torch import nn

__all__ = ["TextEmbeddingCache"]


class TextEmbeddingCache:
    """The last `max_entries` encodings, each served while the rules of the module docstring hold."""

    def __init__(self, max_entries: int = 8) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: list[tuple[tuple, torch.Tensor, torch.Tensor]] = []  # (state, token ids, embeddings)

    def get_or_encode(
        self, text_tower: Iterable[nn.Module], input_ids: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """`encode(input_ids)`, from the cache when an entry for the same ids and the same `text_tower` state
        exists. The returned tensor may be shared: do not modify it in place."""
        state = text_tower_state(text_tower)
        if state is None:
            return encode(input_ids)
        state = (state, _compute_mode(input_ids.device.type))
        for index, (entry_state, entry_ids, embeds) in enumerate(self._entries):
            if entry_state == state and _same_ids(entry_ids, input_ids):
                self._entries.append(self._entries.pop(index))
                return embeds
        embeds = encode(input_ids)
        self._entries = [*self._entries, (state, input_ids.clone(), embeds)][-self.max_entries :]
        return embeds

    def clear(self) -> None:
        self._entries = []

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo) -> "TextEmbeddingCache":
        return TextEmbeddingCache(self.max_entries)  # a copied model has new weights: nothing to carry over


def text_tower_state(modules: Iterable[nn.Module]) -> tuple | None:
    """What of `modules` decides their output, as a comparable tuple; None when it may not be cached (a module in
    training mode, or grad mode on while a weight in use requires grad)."""
    grad = torch.is_grad_enabled()
    state = []
    for item in chain.from_iterable(map(_in_use, modules)):
        if isinstance(item, nn.Module):
            if item.training:
                return None
        elif isinstance(item, torch.Tensor):
            if grad and item.requires_grad:
                return None
            state.append((id(item), item._version, item.data_ptr(), item.dtype, item.device))
        else:
            state.append(item)
    return tuple(state)


def _in_use(module: nn.Module) -> Iterator[nn.Module | torch.Tensor | tuple]:
    """`module`, its submodules, their parameters and buffers, less the adapters that peft layers hold inactive;
    and each peft layer's adapter state."""
    yield module
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)
    active = _active_adapters(module)
    if active is not None:
        scaling = getattr(module, "scaling", {})
        yield active, tuple(module.merged_adapters), tuple(scaling.get(name) for name in active)
    for name, child in module.named_children():
        if active is None or name not in module.adapter_layer_names:
            yield from _in_use(child)
            continue
        for adapter in (child[a] for a in active if a in child):  # a ModuleDict or a ParameterDict
            yield from _in_use(adapter) if isinstance(adapter, nn.Module) else (adapter,)


def _active_adapters(module: nn.Module) -> tuple[str, ...] | None:
    """The adapters a peft layer computes with (none while disabled); None for a module that is no peft layer."""
    if not hasattr(module, "adapter_layer_names"):
        return None
    return () if module.disable_adapters else tuple(module.active_adapters)


def _compute_mode(device_type: str) -> tuple:
    autocast = torch.is_autocast_enabled(device_type)
    return torch.is_inference_mode_enabled(), autocast, torch.get_autocast_dtype(device_type) if autocast else None


def _same_ids(cached: torch.Tensor, input_ids: torch.Tensor) -> bool:
    same_kind = (cached.shape, cached.dtype, cached.device) == (input_ids.shape, input_ids.dtype, input_ids.device)
    return same_kind and torch.equal(cached, input_ids)

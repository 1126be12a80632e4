"""What FSDP2 (torch's `fully_shard`, Accelerate's `fsdp_version: 2`) needs of the student and its teacher.

`fully_shard` turns every parameter into a DTensor sharded along its first dimension over the ranks and gathers a
module's parameters only around its `forward`. Three things of this project live outside that:

* the methods that compute with the model without its `forward` (the vocabulary's text encoding, the sliding
  window, the teacher's text embeddings): [`register_forward_methods`] makes FSDP gather around them too;
* CLIP's `logit_scale`, a 0-dim parameter, which `fully_shard` refuses ("fully_shard doesn't support scalar
  parameters"); CAT-Seg never uses it: [`vectorize_scalar_parameters`] makes it a 1-element vector;
* the teacher's EMA and checkpoint, which read the weights directly: [`local`] is a rank's own shard (the EMA of
  two weights sharded alike is computed shard by shard, with no communication), [`full`] the whole weight (a
  collective: every rank calls it, in the same order).

Without FSDP every function here leaves the model and its tensors as they are.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "FORWARD_METHODS",
    "full",
    "is_sharded",
    "local",
    "register_forward_methods",
    "same_sharding",
    "vectorize_scalar_parameters",
]

#: The methods of a CAT-Seg model (or its peft wrapper) that compute with its weights outside `forward`.
FORWARD_METHODS = ("get_text_embeddings", "encode_vocabulary", "predict_sliding_window", "predict_sliding_window_mmseg")


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support
        return None
    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is an FSDP2 module (`fully_shard` applied to it)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is. In-place updates of it update the DTensor."""
    dtensor = _dtensor_type()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (all-gathered: every rank must call it); any other tensor as it is."""
    dtensor = _dtensor_type()
    return tensor.full_tensor() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def same_sharding(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the local shards of `a` and `b` hold the same elements of their weights (both plain tensors, or
    DTensors of one shape on one mesh with the same placements)."""
    dtensor = _dtensor_type()
    a_d, b_d = (dtensor is not None and isinstance(t, dtensor) for t in (a, b))
    if not (a_d or b_d):
        return True
    return (a_d and b_d and a.shape == b.shape and a.device_mesh == b.device_mesh and a.placements == b.placements
            and a.to_local().shape == b.to_local().shape)


def register_forward_methods(model: nn.Module, names=FORWARD_METHODS) -> None:
    """Make FSDP gather `model`'s parameters around each of `names` as around its `forward` (once per model; names
    the model lacks are skipped). `model` must be the root FSDP module: the one `fully_shard` was applied to last,
    whose forward is the first to run. A no-op when `model` is not sharded."""
    if not is_sharded(model) or getattr(model, "_vocalign_forward_methods", False):
        return
    from torch.distributed.fsdp import register_fsdp_forward_method

    for name in names:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    model._vocalign_forward_methods = True


def vectorize_scalar_parameters(model: nn.Module) -> list[str]:
    """Replace each 0-dim parameter of `model` by a 1-element one of the same value, dtype and `requires_grad`
    (`fully_shard` refuses 0-dim parameters); return their names. In CAT-Seg that is CLIP's `logit_scale`, which it
    never computes with."""
    names = []
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(module, name, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
                names.append(f"{module_name}.{name}" if module_name else name)
    return names

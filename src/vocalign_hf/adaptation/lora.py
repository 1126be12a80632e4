"""LoRA on the attention projections of both CLIP towers (VocAlign Sec. 4.1, with ``peft``).

Paper: LoRA of rank 2 on the attention projections of the first 4 layers of the CLIP image
and text encoders; everything else frozen. Released code: ``configs/vocalign/cityscapes.py``
(``lora_layers=[0,1,2,3,4]``, ``lora_rank=1``, ``alpha=1``; ADE/PC-59: rank 2, alpha 2,
layers 0-4) and ``CAT-Seg/cat_seg/utils/clip_model.py::_add_lora`` (l.130-152: separate
A/B pairs for q, k, v, no LoRA on the output projection), applied to both towers by
``CAT-Seg/cat_seg/models/lora.py``. Its update is
``gamma * B @ A`` with ``gamma = alpha / sqrt(rank)`` (``CAT-Seg/cat_seg/utils/functional.py``
l.28), i.e. rank-stabilised LoRA, hence ``use_rslora=True`` by default here; A is
Kaiming-uniform and B zero (``_reset_lora``), as peft's default init. Our defaults follow the
paper (rank 2, alpha 2, layers 0-3).

In ``transformers``' ``CLIPModel`` the projections are the separate ``nn.Linear`` modules
``{text,vision}_model.encoder.layers.<i>.self_attn.{q,k,v}_proj``. peft forbids
``layers_to_transform`` with a regex ``target_modules``, so the layer choice is encoded in a
single regex matched with ``re.fullmatch`` against full module names, with an optional
prefix so the CLIP model can sit anywhere inside a larger model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Tuple

from peft import LoraConfig
from torch import Tensor, nn

__all__ = [
    "LoRASettings",
    "lora_target_regex",
    "lora_config_for_clip",
    "count_trainable",
    "lora_parameter_names",
    "lora_parameters",
]

_TOWER_MODULES = {"vision": "vision_model", "text": "text_model"}

#: The peft adapter name of an EMA teacher kept on the student's own model (`adaptation/teacher.py`): its weights
#: are not the model's trainable LoRA weights, and the helpers below leave them out.
TEACHER_ADAPTER = "teacher"


@dataclass(frozen=True)
class LoRASettings:
    """Where and how to put LoRA in a CLIP model.

    Attributes:
        rank: LoRA rank ``r`` (paper: 2; released Cityscapes config: 1).
        alpha: LoRA alpha (paper/ADE config: 2; Cityscapes config: 1).
        layers: encoder layer indices that get LoRA, in both towers (paper: 0-3; configs: 0-4).
        dropout: LoRA dropout.
        target_modules: attention projection names inside ``self_attn``.
        towers: ``"vision"`` and/or ``"text"``.
        use_rslora: scale by ``alpha / sqrt(rank)`` as the released code does (peft's
            default would be ``alpha / rank``).
    """

    rank: int = 2
    alpha: float = 2
    layers: Tuple[int, ...] = (0, 1, 2, 3)
    dropout: float = 0.0
    target_modules: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    towers: Tuple[str, ...] = ("vision", "text")
    use_rslora: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "towers", tuple(self.towers))
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.layers or any(i < 0 for i in self.layers):
            raise ValueError(f"layers must be a non-empty list of indices >= 0, got {self.layers}")
        if not self.target_modules or not all(re.fullmatch(r"\w+", m) for m in self.target_modules):
            raise ValueError(f"target_modules must be non-empty module names, got {self.target_modules}")
        bad = [t for t in self.towers if t not in _TOWER_MODULES]
        if not self.towers or bad:
            raise ValueError(f"towers must be a non-empty subset of {sorted(_TOWER_MODULES)}, got {self.towers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")


def lora_target_regex(settings: LoRASettings) -> str:
    """Regex (for ``re.fullmatch``) of the targeted module names, e.g. for the defaults
    ``(?:.*\\.)?(?:vision_model|text_model)\\.encoder\\.layers\\.(?:0|1|2|3)\\.self_attn\\.(?:q_proj|k_proj|v_proj)``."""
    towers = "|".join(_TOWER_MODULES[t] for t in settings.towers)
    layers = "|".join(str(i) for i in sorted(set(settings.layers)))
    mods = "|".join(re.escape(m) for m in settings.target_modules)
    return rf"(?:.*\.)?(?:{towers})\.encoder\.layers\.(?:{layers})\.self_attn\.(?:{mods})"


def lora_config_for_clip(settings: LoRASettings = LoRASettings()) -> LoraConfig:
    """``peft.LoraConfig`` targeting the chosen projections of the chosen layers of the
    chosen CLIP towers, wherever the ``CLIPModel`` is nested. Use with
    ``peft.get_peft_model(model, cfg)`` (freezes everything else) or
    ``peft.inject_adapter_in_model(cfg, model)``."""
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_target_regex(settings),
        bias="none",
        use_rslora=settings.use_rslora,
        init_lora_weights=True,
    )


def count_trainable(model: nn.Module) -> int:
    """Number of scalar parameters with ``requires_grad=True``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _is_lora_name(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def _is_student_lora_name(name: str) -> bool:
    return _is_lora_name(name) and f".{TEACHER_ADAPTER}." not in name


def lora_parameter_names(model: nn.Module) -> List[str]:
    """Names of the LoRA adapter parameters (``lora_A``/``lora_B``/...), in
    ``named_parameters`` order, so student and teacher lists line up for the EMA; an EMA
    teacher's adapter on the same model is left out."""
    return [n for n, _ in model.named_parameters() if _is_student_lora_name(n)]


def lora_parameters(model: nn.Module) -> List[Tensor]:
    """The LoRA adapter parameters themselves, same order as :func:`lora_parameter_names`."""
    return [p for n, p in model.named_parameters() if _is_student_lora_name(n)]

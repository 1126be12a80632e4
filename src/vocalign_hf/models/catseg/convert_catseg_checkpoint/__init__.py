"""Convert an official CAT-Seg checkpoint into a `save_pretrained` folder.

Usage::

    convert-catseg-checkpoint model_base.pth ./catseg-vitb-384            # CVPR'24 B/16 release
    convert-catseg-checkpoint model_large.pth ./catseg-vitl-336 --push-to-hub org/catseg-vitl-336
    convert-catseg-checkpoint catseg_vitb-r101_..._ade20k-384x384-54194d72.pth ./catseg-v1-r101   # v1 (mmseg)

Three layouts are recognised from their keys:

* CVPR'24 detectron2 checkpoints (`sem_seg_head.predictor.*`, `upsample1/2.*`);
* CAT-Seg v1 detectron2 checkpoints (`hamacojr/CAT-Seg` `model_final_base.pth`: the same predictor keys plus a
  detectron2 ResNet-101 under `backbone.stem.*`, `backbone.res{2,3,4}.*`, with frozen batch norms);
* CAT-Seg v1 in mmsegmentation layout (`backbone.clip_model.*`, `backbone.feature_extractor.*` (ResNet),
  `neck.*`, `decode_head.*`), the model VocAlign adapts (openmmlab's `catseg_vitb-r101_...pth`, linked from
  andraghetti/VocAlign's `CAT-Seg/README.md`). Its ResNet goes to the transformers `ResNetBackbone`. The v1
  defaults are VocAlign's configs: 10 `vocalign_select_clip` templates, class pooling (1, 1), 4 heads. A checkpoint
  whose cost embedding has more channels than templates (80 for 10) is used by the reference with the templates
  tiled; here those conv1 weights are summed per template instead (`fold_prompt_channels`), which is the same map.

The checkpoints are `hamacojr/CAT-Seg-weights` (`model_base.pth`, `model_large.pth`, a Space repo). OpenAI-CLIP keys
(with CAT-Seg's separate `q/k/v_proj_weight` or a fused `in_proj_weight`) are mapped onto the transformers
`CLIPModel`; the aggregator keeps its names but one: the class aggregation's `MLP` is the port's `mlp`
(`CVPR24_AGGREGATOR_RENAMES`). Every key must be used and every parameter of the port filled: an
unknown or missing key is an error that names it. Derivable buffers (the Swin shift masks) are checked for shape
and dropped.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData
from safetensors.torch import load_file

from ....atomic import atomic_write_json, atomic_write_text
from ....errors import run_program
from ....outputs import OUTPUT_INFO_FILE, check_not_overlapping, check_replaceable, write_output_folder
# Through the package, which registers the Auto classes: the converted model's config then has its `auto_map`.
from .. import CATSegConfig, CATSegForSemanticSegmentation, CATSegProcessor

CLIP_PREFIX = "sem_seg_head.predictor.clip_model."
V1_CLIP_PREFIX = "backbone.clip_model."
V1_RESNET_PREFIX = "backbone.feature_extractor."
AGGREGATOR_PREFIX = "sem_seg_head.predictor.transformer."
DROPPED_BUFFER = re.compile(r"\.attn_mask$")
# The CVPR'24 aggregator's keys that the port names otherwise (lowercase module names, as in transformers).
CVPR24_AGGREGATOR_RENAMES = ((re.compile(r"\.attention\.MLP\."), ".attention.mlp."),)

_LAYER_RENAMES = (
    ("attn.out_proj.", "self_attn.out_proj."),
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)


class CheckpointConversionError(ValueError):
    """A checkpoint that does not map one to one onto the port."""


def load_reference_state_dict(path: str | Path, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a detectron2 (`{"model": ...}`) or mmengine (`{"state_dict": ...}`) checkpoint, a bare state dict, or a
    safetensors file.

    `.pth` files are read with `torch.load(weights_only=True)`: tensors, containers and plain values only, never
    arbitrary objects. A checkpoint that pickles other objects (e.g. an mmengine `meta` with its own classes) is an
    error unless `allow_unsafe_pickle=True` (`--allow-unsafe-pickle`), which runs the pickle's code: only for files
    from a source you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    _check_readable(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([A-Za-z_][\w.]*\w) ", str(error))
        if found is None:  # a broken pickle stream, not a foreign object: the unsafe flag would not help
            raise CheckpointConversionError(f"{path} is damaged or truncated (its pickle cannot be read); download "
                                            "it again") from None
        raise CheckpointConversionError(
            f"{path} cannot be read with torch.load(weights_only=True): it pickles objects other than tensors "
            f"(found {found.group(1)}). Loading it runs code from the file; only if you trust its source, pass "
            "--allow-unsafe-pickle (load_reference_state_dict(..., allow_unsafe_pickle=True))."
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError) as error:
        detail = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise CheckpointConversionError(f"{path} is damaged or truncated ({detail}); download it again") from None
    if isinstance(blob, Mapping):  # detectron2 keeps weights under "model", mmengine under "state_dict"
        state = blob.get("model", blob.get("state_dict", blob))
    else:
        state = blob
    if not isinstance(state, Mapping):
        raise CheckpointConversionError(f"{path} holds no state dict (found {type(state).__name__})")
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _check_readable(path: Path) -> None:
    """An empty file, or one that is neither a torch zip archive nor a pickle, is named as such, not sent to the
    unpickler (whose errors would suggest the unsafe flag)."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head:
        raise CheckpointConversionError(f"{path} is empty (0 bytes): the download or copy did not finish")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointConversionError(
            f"{path} is not a PyTorch checkpoint (it starts with {head!r}, e.g. a text or HTML page saved under that "
            "name); download the .pth file itself"
        )


def _convert_block(prefix_in: str, prefix_out: str, state: dict, out: dict, used: set) -> None:
    """One OpenAI-CLIP residual block -> one transformers CLIPEncoderLayer."""
    def take(key: str) -> torch.Tensor:
        used.add(prefix_in + key)
        return state[prefix_in + key]

    if prefix_in + "attn.in_proj_weight" in state:
        q, k, v = take("attn.in_proj_weight").chunk(3, dim=0)
    else:
        q, k, v = take("attn.q_proj_weight"), take("attn.k_proj_weight"), take("attn.v_proj_weight")
    qb, kb, vb = take("attn.in_proj_bias").chunk(3, dim=0)
    for name, weight, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
        out[f"{prefix_out}self_attn.{name}.weight"] = weight
        out[f"{prefix_out}self_attn.{name}.bias"] = bias
    for key in list(state):
        if not key.startswith(prefix_in) or key in used:
            continue
        rest = key[len(prefix_in) :]
        for old, new in _LAYER_RENAMES:
            if rest.startswith(old):
                out[prefix_out + new + rest[len(old) :]] = take(rest)
                break


def _convert_clip(c: str, state: dict, out: dict, used: set) -> None:
    """OpenAI-CLIP keys under prefix `c` -> the port's transformers `CLIPModel` (`catseg.clip.*`)."""
    def move(src: str, dst: str, transpose: bool = False) -> None:
        if src not in state:
            raise CheckpointConversionError(f"Missing key in checkpoint: {src}")
        used.add(src)
        out[dst] = state[src].t().contiguous() if transpose else state[src]

    m = "catseg.clip."
    move(c + "visual.conv1.weight", m + "vision_model.embeddings.patch_embedding.weight")
    move(c + "visual.class_embedding", m + "vision_model.embeddings.class_embedding")
    move(c + "visual.positional_embedding", m + "vision_model.embeddings.position_embedding.weight")
    for name, new in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            move(f"{c}visual.{name}.{p}", f"{m}vision_model.{new}.{p}")
    move(c + "visual.proj", m + "visual_projection.weight", transpose=True)
    move(c + "token_embedding.weight", m + "text_model.embeddings.token_embedding.weight")
    move(c + "positional_embedding", m + "text_model.embeddings.position_embedding.weight")
    for p in ("weight", "bias"):
        move(f"{c}ln_final.{p}", f"{m}text_model.final_layer_norm.{p}")
    move(c + "text_projection", m + "text_projection.weight", transpose=True)
    move(c + "logit_scale", m + "logit_scale")
    for tower_in, tower_out in (("visual.transformer.", "vision_model.encoder."), ("transformer.", "text_model.encoder.")):
        indices = sorted({int(k[len(c + tower_in) + 10 :].split(".")[0]) for k in state if k.startswith(c + tower_in + "resblocks.")})
        for i in indices:
            _convert_block(f"{c}{tower_in}resblocks.{i}.", f"{m}{tower_out}layers.{i}.", state, out, used)


# mmseg names -> port names, applied to the key after its prefix (first match wins).
_V1_RESNET_RENAMES = (
    (re.compile(r"^conv1\.(.*)$"), r"embedder.embedder.convolution.\1"),
    (re.compile(r"^bn1\.(.*)$"), r"embedder.embedder.normalization.\1"),
    (re.compile(r"^layer(\d+)\.(\d+)\.downsample\.0\.(.*)$"), r"encoder.stages.{s}.layers.\2.shortcut.convolution.\3"),
    (re.compile(r"^layer(\d+)\.(\d+)\.downsample\.1\.(.*)$"), r"encoder.stages.{s}.layers.\2.shortcut.normalization.\3"),
    (re.compile(r"^layer(\d+)\.(\d+)\.conv(\d)\.(.*)$"), r"encoder.stages.{s}.layers.\2.layer.{n}.convolution.\4"),
    (re.compile(r"^layer(\d+)\.(\d+)\.bn(\d)\.(.*)$"), r"encoder.stages.{s}.layers.\2.layer.{n}.normalization.\4"),
)
_V1_NECK_RENAMES = (
    (re.compile(r"^layers\.(\d+)\.spatial_agg\.guidance_norm\.(.*)$"), r"layers.\1.swin_block.guidance_norm.\2"),
    (re.compile(r"^layers\.(\d+)\.spatial_agg\.(block_\d)\.(norm\d)\.(.*)$"), r"layers.\1.swin_block.\2.\3.\4"),
    (re.compile(r"^layers\.(\d+)\.spatial_agg\.(block_\d)\.attn\.w_msa\.(q|k|v|proj)\.(.*)$"),
     r"layers.\1.swin_block.\2.attn.\3.\4"),
    (re.compile(r"^layers\.(\d+)\.spatial_agg\.(block_\d)\.ffn\.layers\.0\.0\.(.*)$"), r"layers.\1.swin_block.\2.mlp.fc1.\3"),
    (re.compile(r"^layers\.(\d+)\.spatial_agg\.(block_\d)\.ffn\.layers\.1\.(.*)$"), r"layers.\1.swin_block.\2.mlp.fc2.\3"),
    (re.compile(r"^layers\.(\d+)\.class_agg\.attention\.(q|k|v)\.(.*)$"), r"layers.\1.attention.attention.\2.\3"),
    (re.compile(r"^layers\.(\d+)\.class_agg\.MLP\.layers\.0\.0\.(.*)$"), r"layers.\1.attention.mlp.0.\2"),
    (re.compile(r"^layers\.(\d+)\.class_agg\.MLP\.layers\.1\.(.*)$"), r"layers.\1.attention.mlp.2.\2"),
    (re.compile(r"^layers\.(\d+)\.class_agg\.(norm\d)\.(.*)$"), r"layers.\1.attention.\2.\3"),
    (re.compile(r"^((?:conv1|guidance_projection\.0|text_guidance_projection\.0)\..*)$"), r"\1"),
)
_V1_HEAD_RENAMES = (
    (re.compile(r"^(decoder_guidance_projection\.\d\.0\..*)$"), r"\1"),
    (re.compile(r"^(decoder\d)\.up\.(.*)$"), r"\1.up.\2"),
    (re.compile(r"^(decoder\d)\.conv1\.conv\.(.*)$"), r"\1.conv.double_conv.0.\2"),
    (re.compile(r"^(decoder\d)\.conv1\.gn\.(.*)$"), r"\1.conv.double_conv.1.\2"),
    (re.compile(r"^(decoder\d)\.conv2\.conv\.(.*)$"), r"\1.conv.double_conv.3.\2"),
    (re.compile(r"^(decoder\d)\.conv2\.gn\.(.*)$"), r"\1.conv.double_conv.4.\2"),
    (re.compile(r"^conv_seg\.(.*)$"), r"head.\1"),
)
_D2_RESNET_RENAMES = (
    (re.compile(r"^stem\.conv1\.weight$"), r"embedder.embedder.convolution.weight"),
    (re.compile(r"^stem\.conv1\.norm\.(.*)$"), r"embedder.embedder.normalization.\1"),
    (re.compile(r"^res(\d)\.(\d+)\.shortcut\.weight$"), r"encoder.stages.{s}.layers.\2.shortcut.convolution.weight"),
    (re.compile(r"^res(\d)\.(\d+)\.shortcut\.norm\.(.*)$"), r"encoder.stages.{s}.layers.\2.shortcut.normalization.\3"),
    (re.compile(r"^res(\d)\.(\d+)\.conv(\d)\.weight$"), r"encoder.stages.{s}.layers.\2.layer.{n}.convolution.weight"),
    (re.compile(r"^res(\d)\.(\d+)\.conv(\d)\.norm\.(.*)$"), r"encoder.stages.{s}.layers.\2.layer.{n}.normalization.\4"),
)
D2_RESNET_PREFIX = "backbone."

# Unused by the v1 forward (no relative position bias table exists to index): dropped.
V1_DROPPED_BUFFER = re.compile(r"\.attn\.w_msa\.relative_position_index$")


def _rename(rest: str, rules, first_stage: int = 1) -> str | None:
    for pattern, target in rules:
        match = pattern.match(rest)
        if match:
            name = match.expand(target)
            if "{s}" in name or "{n}" in name:  # ResNet stages: mmseg layer1 / detectron2 res2 is transformers' 0
                groups = match.groups()
                name = name.replace("{s}", str(int(groups[0]) - first_stage))
                if "{n}" in name:
                    name = name.replace("{n}", str(int(groups[2]) - 1))
            return name
    return None


def fold_prompt_channels(weight: torch.Tensor, num_templates: int) -> torch.Tensor:
    """Fold a cost-embedding conv trained on C = r * P tiled template channels down to P channels.

    The v1 reference feeds P templates to a C-channel conv by tiling them (`repeat(1, 1, C // P, 1)`), so input
    channel c sees template c mod P; summing the weights of the channels that see the same template gives the same
    convolution on the untiled P channels.
    """
    channels = weight.shape[1]
    if channels == num_templates:
        return weight
    if channels % num_templates:
        raise CheckpointConversionError(
            f"The checkpoint's cost embedding has {channels} template channels, which {num_templates} templates "
            "cannot tile: choose a template set whose size divides it (e.g. 10 or 80 for 80)"
        )
    return weight.unflatten(1, (channels // num_templates, num_templates)).sum(dim=1)


def convert_v1_state_dict(state: Mapping[str, torch.Tensor], num_templates: int | None = None) -> dict[str, torch.Tensor]:
    """Map a CAT-Seg v1 mmseg state dict to the port's keys; `num_templates` folds conv1 (see `fold_prompt_channels`)."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    _convert_clip(V1_CLIP_PREFIX, state, out, used)
    sections = (
        (V1_RESNET_PREFIX, "catseg.backbone.", _V1_RESNET_RENAMES),
        ("neck.", "catseg.aggregator.", _V1_NECK_RENAMES),
        ("decode_head.", "catseg.aggregator.", _V1_HEAD_RENAMES),
    )
    for key, value in state.items():
        for prefix, target, rules in sections:
            if not key.startswith(prefix):
                continue
            if V1_DROPPED_BUFFER.search(key):
                used.add(key)
                break
            name = _rename(key[len(prefix) :], rules)
            if name is not None:
                used.add(key)
                out[target + name] = value
            break
    unknown = sorted(set(state) - used)
    if unknown:
        raise CheckpointConversionError(f"Unknown keys in checkpoint (not mapped, refusing to drop them): {unknown}")
    conv1 = "catseg.aggregator.conv1.weight"
    if num_templates is not None:
        out[conv1] = fold_prompt_channels(out[conv1], num_templates)
    return out


def is_v1_checkpoint(state: Mapping[str, torch.Tensor]) -> bool:
    """True for CAT-Seg v1 in mmsegmentation layout (`backbone.clip_model.*`)."""
    return any(key.startswith(V1_CLIP_PREFIX) for key in state)


def is_d2_v1_checkpoint(state: Mapping[str, torch.Tensor]) -> bool:
    """True for CAT-Seg v1 in detectron2 layout (a ResNet under `backbone.stem.*` next to the predictor)."""
    return "backbone.stem.conv1.weight" in state and any(key.startswith(CLIP_PREFIX) for key in state)


def _convert_d2_resnet(state: dict, out: dict, used: set) -> None:
    """detectron2 ResNet (FrozenBN) -> transformers `ResNetBackbone` under `catseg.backbone.`.

    FrozenBatchNorm2d keeps no `num_batches_tracked`; the port's batch norms get 0 there (they are frozen too)."""
    for key, value in state.items():
        if not key.startswith(D2_RESNET_PREFIX) or key.startswith(V1_CLIP_PREFIX):
            continue
        name = _rename(key[len(D2_RESNET_PREFIX) :], _D2_RESNET_RENAMES, first_stage=2)
        if name is None:
            continue
        used.add(key)
        out["catseg.backbone." + name] = value
        if name.endswith("normalization.running_var"):
            out["catseg.backbone." + name.replace("running_var", "num_batches_tracked")] = torch.tensor(0)


def _port_aggregator_key(rest: str) -> str:
    """A CVPR'24 aggregator key (after `AGGREGATOR_PREFIX`) as the port names it."""
    for pattern, replacement in CVPR24_AGGREGATOR_RENAMES:
        rest = pattern.sub(replacement, rest)
    return rest


def convert_state_dict(state: Mapping[str, torch.Tensor], num_templates: int | None = None) -> dict[str, torch.Tensor]:
    """Map reference CAT-Seg keys to `CATSegForSemanticSegmentation` keys (raises on keys it cannot place).

    `num_templates` (v1 only): fold the cost embedding's input channels to this many templates.
    """
    state = dict(state)
    if is_v1_checkpoint(state):
        return convert_v1_state_dict(state, num_templates)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    _convert_clip(CLIP_PREFIX, state, out, used)
    if is_d2_v1_checkpoint(state):
        _convert_d2_resnet(state, out, used)

    for key, value in state.items():
        if key.startswith(AGGREGATOR_PREFIX):
            used.add(key)
            if not DROPPED_BUFFER.search(key):
                out["catseg.aggregator." + _port_aggregator_key(key[len(AGGREGATOR_PREFIX) :])] = value
        elif key.startswith(("upsample1.", "upsample2.")):
            used.add(key)
            out["catseg." + key] = value
    unknown = sorted(set(state) - used)
    if unknown:
        raise CheckpointConversionError(f"Unknown keys in checkpoint (not mapped, refusing to drop them): {unknown}")
    return out


def _infer_clip_config(state: Mapping[str, torch.Tensor], c: str, overrides: dict) -> tuple[dict, int, int]:
    """The transformers `CLIPConfig` kwargs of the OpenAI-CLIP weights under prefix `c`, its layer count and patch."""
    conv1 = state[c + "visual.conv1.weight"]
    width, patch = conv1.shape[0], conv1.shape[-1]
    vision_layers = _count(state, c + "visual.transformer.resblocks.")
    grid = math.isqrt(state[c + "visual.positional_embedding"].shape[0] - 1)
    text_width = state[c + "ln_final.weight"].shape[0]
    embed_dim = state[c + "text_projection"].shape[1]
    clip_config = {
        "projection_dim": embed_dim,
        "vision_config": {
            "hidden_size": width,
            "intermediate_size": state[c + "visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": vision_layers,
            "num_attention_heads": overrides.pop("vision_heads", max(width // 64, 1)),
            "image_size": grid * patch,
            "patch_size": patch,
            "projection_dim": embed_dim,
        },
        "text_config": {
            "hidden_size": text_width,
            "intermediate_size": state[c + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": _count(state, c + "transformer.resblocks."),
            "num_attention_heads": overrides.pop("text_heads", max(text_width // 64, 1)),
            "vocab_size": state[c + "token_embedding.weight"].shape[0],
            "max_position_embeddings": state[c + "positional_embedding"].shape[0],
            "projection_dim": embed_dim,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
    }
    return clip_config, vision_layers, patch


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of distinct indices right after `prefix` (layers, blocks)."""
    return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})


def _aggregator_dims(state: Mapping[str, torch.Tensor], a: str) -> dict[str, Any]:
    """Aggregator widths of a detectron2-layout predictor (`a` = its prefix), read from the weight shapes."""
    return {
        "hidden_dim": state[a + "conv1.weight"].shape[0],
        "text_guidance_proj_dim": state[a + "text_guidance_projection.0.weight"].shape[0],
        "appearance_guidance_proj_dim": state[a + "guidance_projection.0.weight"].shape[0],
        "decoder_dims": [state[a + "decoder1.conv.double_conv.0.weight"].shape[0],
                         state[a + "decoder2.conv.double_conv.0.weight"].shape[0]],
        "decoder_guidance_proj_dims": [state[a + "decoder_guidance_projection.0.0.weight"].shape[0],
                                       state[a + "decoder_guidance_projection.1.0.weight"].shape[0]],
        "num_layers": _count(state, a + "layers."),
        "pad_len": 256 if a + "layers.0.attention.padding_tokens" in state else 0,
        # 1 or 80 template channels: the single template or the 80 ImageNet ones; other counts must be given.
        "prompt_templates": {1: "single", 80: "imagenet"}.get(state[a + "conv1.weight"].shape[1]),
    }


def _check_templates(kwargs: dict[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    if kwargs["prompt_templates"] is None:
        templates = state[AGGREGATOR_PREFIX + "conv1.weight"].shape[1]
        raise CheckpointConversionError(
            f"The checkpoint was trained with {templates} prompt templates: pass --prompt-templates"
        )


def infer_config(state: Mapping[str, torch.Tensor], **overrides: Any) -> CATSegConfig:
    """Build a [`CATSegConfig`] from the shapes of a reference state dict; `overrides` win.

    Not visible in shapes and taken from the release defaults unless overridden: `num_heads` (4), `pooling_size`
    (2, 2), `window_size` (12), `attention_type` ("linear"), `pad_len` (256 if padding tokens exist),
    attention heads of the CLIP towers (width // 64, the OpenAI rule), `guidance_layers` ([3, 7] for 12 layers,
    [7, 15] for 24) and `clip_resolution` (384 for patch 16, 336 for patch 14). v1 checkpoints: see
    [`infer_v1_config`].
    """
    if is_v1_checkpoint(state):
        return infer_v1_config(state, **overrides)
    if is_d2_v1_checkpoint(state):
        return infer_d2_v1_config(state, **overrides)
    overrides = dict(overrides)
    clip_config, vision_layers, patch = _infer_clip_config(state, CLIP_PREFIX, overrides)
    grid = math.isqrt(state[CLIP_PREFIX + "visual.positional_embedding"].shape[0] - 1)
    kwargs: dict[str, Any] = {
        "clip_config": clip_config,
        "clip_resolution": {16: 384, 14: 336}.get(patch, grid * patch),
        "guidance_layers": {12: [3, 7], 24: [7, 15]}.get(vision_layers),
        "decoder_guidance_dims": [state["upsample1.weight"].shape[1], state["upsample2.weight"].shape[1]],
        **_aggregator_dims(state, AGGREGATOR_PREFIX),
    }
    kwargs.update(overrides)
    _check_templates(kwargs, state)
    if kwargs["guidance_layers"] is None:
        raise CheckpointConversionError(
            f"No default guidance layers for a {vision_layers}-layer CLIP: pass guidance_layers explicitly"
        )
    return CATSegConfig(**kwargs)


def _resnet_config(state: Mapping[str, torch.Tensor], prefix: str, stem_key: str, stage: str, first: int) -> dict:
    """ResNet backbone config of the three stages `{prefix}{stage}{first..first+2}` (bottleneck blocks)."""
    stages = sorted({int(k[len(prefix + stage) :].split(".")[0]) for k in state
                     if k.startswith(prefix + stage) and k[len(prefix + stage) :][:1].isdigit()})
    expected = [first, first + 1, first + 2]
    if stages != expected or f"{prefix}{stage}{first}.0.conv3.weight" not in state:
        raise CheckpointConversionError(
            f"Expected a 3-stage bottleneck ResNet under {prefix} ({stage}{first}..{stage}{first + 2} with conv3), "
            f"found stages {stages}"
        )
    return {
        "model_type": "resnet",
        "embedding_size": state[prefix + stem_key].shape[0],
        "depths": [_count(state, f"{prefix}{stage}{i}.") for i in stages],
        "hidden_sizes": [state[f"{prefix}{stage}{i}.0.conv3.weight"].shape[0] for i in stages],
        "layer_type": "bottleneck",
        "out_features": ["stage1", "stage2", "stage3"],
    }


def infer_d2_v1_config(state: Mapping[str, torch.Tensor], **overrides: Any) -> CATSegConfig:
    """[`CATSegConfig`] (`variant="v1"`) of a detectron2 CAT-Seg v1 state dict (`model_final_base.pth`).

    From shapes: CLIP, the ResNet (`backbone.stem/res2-4`), the aggregator. Not visible in shapes, the release's
    `configs/vitb_r101_384.yaml` gives the defaults: `pooling_size` (2, 2) (its eval.sh evaluates with (1, 1)),
    `num_heads` 4, `window_size` 12, linear attention, the 80 ImageNet templates for an 80-channel cost
    embedding, and its own sliding window (`sliding_window_mode="catseg"`).
    """
    overrides = dict(overrides)
    clip_config, _, patch = _infer_clip_config(state, CLIP_PREFIX, overrides)
    kwargs: dict[str, Any] = {
        "variant": "v1",
        "clip_config": clip_config,
        "backbone_config": _resnet_config(state, D2_RESNET_PREFIX, "stem.conv1.weight", "res", 2),
        "clip_resolution": {16: 384, 14: 336}.get(patch, 384),
        "sliding_window_mode": "catseg",
        **_aggregator_dims(state, AGGREGATOR_PREFIX),
    }
    kwargs.update(overrides)
    _check_templates(kwargs, state)
    return CATSegConfig(**kwargs)


def infer_v1_config(state: Mapping[str, torch.Tensor], **overrides: Any) -> CATSegConfig:
    """[`CATSegConfig`] (`variant="v1"`) of a CAT-Seg v1 mmseg state dict; `overrides` win.

    From shapes: the CLIP towers, the ResNet (stem width, blocks and channels of its three stages), the aggregator
    and decoder widths. Not visible in shapes, VocAlign's configs are the defaults: `prompt_templates`
    "vocalign_select_clip" (10 templates; the 80-channel cost embedding is folded to them), `pooling_size` (1, 1),
    `num_heads` 4, `window_size` 12, linear attention, `clip_resolution` 384 for patch 16 (336 for 14).
    """
    overrides = dict(overrides)
    clip_config, _, patch = _infer_clip_config(state, V1_CLIP_PREFIX, overrides)
    n, h = "neck.", "decode_head."
    backbone = _resnet_config(state, V1_RESNET_PREFIX, "conv1.weight", "layer", 1)
    kwargs: dict[str, Any] = {
        "variant": "v1",
        "clip_config": clip_config,
        "backbone_config": backbone,
        "clip_resolution": {16: 384, 14: 336}.get(patch, 384),
        "prompt_templates": "vocalign_select_clip",
        "pooling_size": [1, 1],
        "hidden_dim": state[n + "conv1.weight"].shape[0],
        "text_guidance_proj_dim": state[n + "text_guidance_projection.0.weight"].shape[0],
        "appearance_guidance_proj_dim": state[n + "guidance_projection.0.weight"].shape[0],
        "decoder_dims": [state[h + "decoder1.conv1.conv.weight"].shape[0], state[h + "decoder2.conv1.conv.weight"].shape[0]],
        "decoder_guidance_proj_dims": [state[h + "decoder_guidance_projection.0.0.weight"].shape[0],
                                       state[h + "decoder_guidance_projection.1.0.weight"].shape[0]],
        "num_layers": _count(state, n + "layers."),
        "pad_len": 0,
        "class_mlp_adds_input": True,  # mmcv FFN
        "sliding_window_mode": "mmseg",
    }
    kwargs.update(overrides)
    return CATSegConfig(**kwargs)


def convert_checkpoint(
    state: Mapping[str, torch.Tensor], **config_overrides: Any
) -> CATSegForSemanticSegmentation:
    """Build a port model holding the reference weights; every parameter must come from the checkpoint."""
    try:
        config = infer_config(state, **config_overrides)
    except KeyError as error:  # a key the architecture's shapes are read from
        sample = ", ".join(sorted(state)[:3]) or "no tensors"
        raise CheckpointConversionError(
            f"not a CAT-Seg checkpoint: it lacks {error.args[0]!r}, which every CAT-Seg checkpoint holds (it holds "
            f"{len(state)} tensors, e.g. {sample})"
        ) from None
    model = CATSegForSemanticSegmentation(config)
    converted = convert_state_dict(state, num_templates=config.num_templates)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise CheckpointConversionError(f"Checkpoint does not fit the port: missing {missing}, unexpected {unexpected}")
    for key, value in converted.items():
        target = model.state_dict()[key]
        if target.shape != value.shape:
            raise CheckpointConversionError(f"Shape mismatch for {key}: port {tuple(target.shape)}, checkpoint {tuple(value.shape)}")
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return model.eval()


CATSEG_CITATION = """@inproceedings{cho2024catseg,
  title     = {CAT-Seg: Cost Aggregation for Open-Vocabulary Semantic Segmentation},
  author    = {Cho, Seokju and Shin, Heeseong and Hong, Sunghwan and Arnab, Anurag and Seo, Paul Hongsuck and
               Kim, Seungryong},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024}
}"""

# (vision width, patch size) of the OpenAI CLIP towers CAT-Seg starts from -> their Hub ids.
_CLIP_HUB_IDS = {(768, 16): "openai/clip-vit-base-patch16", (1024, 14): "openai/clip-vit-large-patch14-336"}


def clip_base_model(config: CATSegConfig) -> str | None:
    """The Hub id of the OpenAI CLIP checkpoint a converted model's towers come from (None if not a released size)."""
    vision = config.clip_config.vision_config
    return _CLIP_HUB_IDS.get((vision.hidden_size, vision.patch_size))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_converted_model_card(
    config: CATSegConfig, checkpoint_name: str, checkpoint_sha256: str, repo_id: str, base_model: str | None = None
):
    """The model card (`README.md`) of a converted checkpoint: license, base CLIP model, pipeline tag, library,
    tags, the source checkpoint's name and sha256, a usage snippet for `repo_id` and the CAT-Seg citation."""
    base_model = base_model or clip_base_model(config)
    variant = "CAT-Seg v1 (CLIP + ResNet guidance)" if config.variant == "v1" else "CAT-Seg (CVPR 2024)"
    templates = config.prompt_templates
    templates = templates if isinstance(templates, str) else f"{len(templates)} custom"
    card_data = ModelCardData(
        license="mit",
        base_model=base_model,
        pipeline_tag="image-segmentation",
        library_name="transformers",
        tags=["catseg", "open-vocabulary-segmentation", "semantic-segmentation", "clip", "vocalign-hf"],
    )
    content = f"""---
{card_data.to_yaml()}
---

# {variant}: `{repo_id}`

Open-vocabulary semantic segmentation: segment an image into any list of class names. Converted from the official
checkpoint with [vocalign-hf](https://pypi.org/project/vocalign-hf/)'s `convert-catseg-checkpoint`; every
checkpoint weight maps onto this port.

| | |
|---|---|
| source checkpoint | `{checkpoint_name}` |
| source sha256 | `{checkpoint_sha256}` |
| CLIP towers | {f"`{base_model}`" if base_model else "(not a released CLIP size)"} |
| CLIP input | {config.clip_resolution} px, prompt templates `{templates}` |

## Use

The modeling code travels with the weights (`auto_map`), so plain `transformers` loads it:

```python
import torch
from PIL import Image
from transformers import AutoModelForSemanticSegmentation, AutoProcessor

model = AutoModelForSemanticSegmentation.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
image = Image.open("street.jpg")
inputs = processor(images=image, text=["road", "car", "sky", "person", "tree"])
with torch.no_grad():
    outputs = model(**inputs)
segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
```

With `vocalign-hf` installed, `CATSegForSemanticSegmentation.from_pretrained("{repo_id}")` needs no remote code, and
the model can be adapted to a new domain with VocAlign (`accelerate launch recipes/adapt.py --base_model {repo_id}`).

## Citation

```bibtex
{CATSEG_CITATION}
```
"""
    return ModelCard(content)


def push_folder_to_hub(
    folder: str | Path, repo_id: str, private: bool = False, token: str | None = None, commit_message: str = ""
) -> str:
    """Create `repo_id` if needed and upload `folder` as one commit; returns the commit sha."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message or "Upload converted CAT-Seg"
    )
    return commit.oid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="convert-catseg-checkpoint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="official CAT-Seg .pth (detectron2 CVPR'24 or v1, mmseg v1) or a state-dict file")
    parser.add_argument("output_dir", help="folder for save_pretrained (model + processor): new, empty, or an earlier "
                        "output of this command (replaced once the new one is complete)")
    parser.add_argument(
        "--prompt-templates", default=None,
        help="template set name (default: single, or imagenet for 80 channels; v1: vocalign_select_clip)",
    )
    parser.add_argument("--num-heads", type=int, default=None, help="aggregator heads (default 4)")
    parser.add_argument(
        "--pooling-size", type=int, nargs=2, default=None, metavar=("H", "W"),
        help="class-aggregation pooling (default: 2 2 for CVPR'24, 1 1 for v1 as VocAlign's configs)",
    )
    parser.add_argument("--guidance-layers", type=int, nargs=2, default=None, metavar=("L1", "L2"),
                        help="CLIP layers guiding the decoder (default: 3 7 for 12 layers, 7 15 for 24)")
    parser.add_argument("--clip-resolution", type=int, default=None,
                        help="side of CLIP's input (default: 384 for patch 16, 336 for patch 14)")
    parser.add_argument("--base-model", default=None,
                        help="Hub id of the CLIP checkpoint for the model card (default: inferred from the shapes)")
    parser.add_argument(
        "--allow-unsafe-pickle", action="store_true",
        help="read a .pth that pickles arbitrary objects (runs code from the file: only for trusted files)",
    )
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also push to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    args = parser.parse_args(argv)

    overrides = {}
    if args.prompt_templates:
        overrides["prompt_templates"] = args.prompt_templates
    if args.num_heads:
        overrides["num_heads"] = args.num_heads
    if args.pooling_size:
        overrides["pooling_size"] = args.pooling_size
    if args.guidance_layers:
        overrides["guidance_layers"] = args.guidance_layers
    if args.clip_resolution:
        overrides["clip_resolution"] = args.clip_resolution
    check_not_overlapping(args.output_dir, [("checkpoint", args.checkpoint)], "output folder")
    check_replaceable(args.output_dir, "converted_model", "output folder")  # before the (long) conversion
    state = load_reference_state_dict(args.checkpoint, allow_unsafe_pickle=args.allow_unsafe_pickle)
    model = convert_checkpoint(state, **overrides)
    processor = CATSegProcessor.from_config(model.config)
    card = build_converted_model_card(
        model.config, Path(args.checkpoint).name, file_sha256(args.checkpoint),
        args.push_to_hub or str(args.output_dir), base_model=args.base_model,
    )
    info = {"written_as": "converted_model", "checkpoint": Path(args.checkpoint).name,
            "sha256": file_sha256(args.checkpoint)}

    def write(folder: Path) -> None:
        # Model, processor, the modeling code (auto_map) and the card in one folder: what gets pushed, as one commit.
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        atomic_write_text(folder / "README.md", str(card))
        atomic_write_json(folder / OUTPUT_INFO_FILE, info)

    write_output_folder(args.output_dir, "converted_model", write, [("checkpoint", args.checkpoint)], "output folder")
    print(f"Saved converted CAT-Seg to {args.output_dir}")
    if args.push_to_hub:
        sha = push_folder_to_hub(args.output_dir, args.push_to_hub, private=args.private,
                                 commit_message=f"Convert {Path(args.checkpoint).name}")
        print(f"Pushed to {args.push_to_hub} (commit {sha})")


def cli() -> int:
    """The `convert-catseg-checkpoint` console script: a bad file is one line and exit status 2 (`-v`: traceback)."""
    return run_program(main, extra_errors=(CheckpointConversionError,))

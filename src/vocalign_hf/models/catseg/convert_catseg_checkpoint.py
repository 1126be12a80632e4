"""Convert an official CAT-Seg checkpoint (detectron2 `.pth`) into a `save_pretrained` folder.

Usage::

    convert-catseg-checkpoint model_base.pth ./catseg-vitb-384            # CVPR'24 B/16 release
    convert-catseg-checkpoint model_large.pth ./catseg-vitl-336 --push-to-hub org/catseg-vitl-336

The checkpoints are `hamacojr/CAT-Seg-weights` (`model_base.pth`, `model_large.pth`, a Space repo). OpenAI-CLIP keys
(with CAT-Seg's separate `q/k/v_proj_weight` or a fused `in_proj_weight`) are mapped onto the transformers
`CLIPModel`; the aggregator keeps its names. Every key must be used and every parameter of the port filled: an
unknown or missing key is an error that names it. Derivable buffers (the Swin shift masks) are checked for shape
and dropped.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .configuration_catseg import CATSegConfig
from .modeling_catseg import CATSegForSemanticSegmentation

CLIP_PREFIX = "sem_seg_head.predictor.clip_model."
AGGREGATOR_PREFIX = "sem_seg_head.predictor.transformer."
DROPPED_BUFFER = re.compile(r"\.attn_mask$")

_LAYER_RENAMES = (
    ("attn.out_proj.", "self_attn.out_proj."),
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)


class CheckpointConversionError(ValueError):
    """A checkpoint that does not map one to one onto the port."""


def load_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a detectron2 checkpoint (`{"model": state_dict, ...}`), a bare state dict, or a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    blob = torch.load(path, map_location="cpu", weights_only=False)
    state = blob.get("model", blob) if isinstance(blob, Mapping) else blob
    if not isinstance(state, Mapping):
        raise CheckpointConversionError(f"{path} holds no state dict (found {type(state).__name__})")
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


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


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map reference CAT-Seg keys to `CATSegForSemanticSegmentation` keys (raises on keys it cannot place)."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def move(src: str, dst: str, transpose: bool = False) -> None:
        if src not in state:
            raise CheckpointConversionError(f"Missing key in checkpoint: {src}")
        used.add(src)
        out[dst] = state[src].t().contiguous() if transpose else state[src]

    c, m = CLIP_PREFIX, "catseg.clip."
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

    for key, value in state.items():
        if key.startswith(AGGREGATOR_PREFIX):
            used.add(key)
            if not DROPPED_BUFFER.search(key):
                out["catseg.aggregator." + key[len(AGGREGATOR_PREFIX) :]] = value
        elif key.startswith(("upsample1.", "upsample2.")):
            used.add(key)
            out["catseg." + key] = value
    unknown = sorted(set(state) - used)
    if unknown:
        raise CheckpointConversionError(f"Unknown keys in checkpoint (not mapped, refusing to drop them): {unknown}")
    return out


def infer_config(state: Mapping[str, torch.Tensor], **overrides: Any) -> CATSegConfig:
    """Build a [`CATSegConfig`] from the shapes of a reference state dict; `overrides` win.

    Not visible in shapes and taken from the release defaults unless overridden: `num_heads` (4), `pooling_size`
    (2, 2), `window_size` (12), `attention_type` ("linear"), `pad_len` (256 if padding tokens exist),
    attention heads of the CLIP towers (width // 64, the OpenAI rule), `guidance_layers` ([3, 7] for 12 layers,
    [7, 15] for 24) and `clip_resolution` (384 for patch 16, 336 for patch 14).
    """
    c, a = CLIP_PREFIX, AGGREGATOR_PREFIX
    overrides = dict(overrides)
    conv1 = state[c + "visual.conv1.weight"]
    width, patch = conv1.shape[0], conv1.shape[-1]
    count = lambda prefix: len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})  # noqa: E731
    vision_layers = count(c + "visual.transformer.resblocks.")
    text_layers = count(c + "transformer.resblocks.")
    grid = math.isqrt(state[c + "visual.positional_embedding"].shape[0] - 1)
    text_width = state[c + "ln_final.weight"].shape[0]
    embed_dim = state[c + "text_projection"].shape[1]
    mlp_key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    clip_config = {
        "projection_dim": embed_dim,
        "vision_config": {
            "hidden_size": width,
            "intermediate_size": state[c + mlp_key].shape[0],
            "num_hidden_layers": vision_layers,
            "num_attention_heads": overrides.pop("vision_heads", max(width // 64, 1)),
            "image_size": grid * patch,
            "patch_size": patch,
            "projection_dim": embed_dim,
        },
        "text_config": {
            "hidden_size": text_width,
            "intermediate_size": state[c + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": text_layers,
            "num_attention_heads": overrides.pop("text_heads", max(text_width // 64, 1)),
            "vocab_size": state[c + "token_embedding.weight"].shape[0],
            "max_position_embeddings": state[c + "positional_embedding"].shape[0],
            "projection_dim": embed_dim,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
    }
    default_guidance = {12: [3, 7], 24: [7, 15]}.get(vision_layers)
    kwargs: dict[str, Any] = {
        "clip_config": clip_config,
        "clip_resolution": {16: 384, 14: 336}.get(patch, grid * patch),
        "guidance_layers": default_guidance,
        "hidden_dim": state[a + "conv1.weight"].shape[0],
        "text_guidance_proj_dim": state[a + "text_guidance_projection.0.weight"].shape[0],
        "appearance_guidance_proj_dim": state[a + "guidance_projection.0.weight"].shape[0],
        "decoder_dims": [state[a + "decoder1.conv.double_conv.0.weight"].shape[0],
                         state[a + "decoder2.conv.double_conv.0.weight"].shape[0]],
        "decoder_guidance_dims": [state["upsample1.weight"].shape[1], state["upsample2.weight"].shape[1]],
        "decoder_guidance_proj_dims": [state[a + "decoder_guidance_projection.0.0.weight"].shape[0],
                                       state[a + "decoder_guidance_projection.1.0.weight"].shape[0]],
        "num_layers": count(a + "layers."),
        "pad_len": 256 if a + "layers.0.attention.padding_tokens" in state else 0,
    }
    templates = state[a + "conv1.weight"].shape[1]
    if templates != 1 and "prompt_templates" not in overrides:
        overrides["prompt_templates"] = "imagenet" if templates == 80 else None
        if overrides["prompt_templates"] is None:
            raise CheckpointConversionError(
                f"The checkpoint was trained with {templates} prompt templates: pass --prompt-templates"
            )
    kwargs.update(overrides)
    if kwargs["guidance_layers"] is None:
        raise CheckpointConversionError(
            f"No default guidance layers for a {vision_layers}-layer CLIP: pass guidance_layers explicitly"
        )
    return CATSegConfig(**kwargs)


def convert_checkpoint(
    state: Mapping[str, torch.Tensor], **config_overrides: Any
) -> CATSegForSemanticSegmentation:
    """Build a port model holding the reference weights; every parameter must come from the checkpoint."""
    config = infer_config(state, **config_overrides)
    model = CATSegForSemanticSegmentation(config)
    converted = convert_state_dict(state)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="official CAT-Seg .pth (detectron2) or a state-dict file")
    parser.add_argument("output_dir", help="folder for save_pretrained (model + processor)")
    parser.add_argument("--prompt-templates", default=None, help="template set name (default: single)")
    parser.add_argument("--num-heads", type=int, default=None, help="aggregator heads (default 4)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also push to this Hub repo")
    args = parser.parse_args(argv)

    from .processing_catseg import CATSegProcessor

    overrides = {}
    if args.prompt_templates:
        overrides["prompt_templates"] = args.prompt_templates
    if args.num_heads:
        overrides["num_heads"] = args.num_heads
    model = convert_checkpoint(load_reference_state_dict(args.checkpoint), **overrides)
    processor = CATSegProcessor.from_config(model.config)
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    print(f"Saved converted CAT-Seg to {args.output_dir}")
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
        processor.push_to_hub(args.push_to_hub)


if __name__ == "__main__":
    main()

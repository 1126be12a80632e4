"""CAT-Seg (Cho et al., CVPR 2024) as a `transformers` model on the `transformers` CLIP towers.

Faithful to cvlab-kaist/CAT-Seg (HEAD 6d3a188, `cat_seg_model.py`, `cat_seg_predictor.py`,
`third_party/model_vpt.py`); see `tests/test_catseg_parity.py` for the numerical check against it. Where this
port differs from the reference, on purpose:

* images arrive already normalised (the image processor does it) and are resized to `clip_resolution` inside the
  model; the reference normalises after padding, which is the same up to float rounding;
* text is given as token ids of shape (num_classes, num_templates, seq_len) or as precomputed, L2-normalised
  embeddings (num_classes, P, D) or per image (batch, K, P, D) (the Top-K path of VocAlign);
* with several templates every (class, template) prompt is encoded and normalised separately, giving P channels
  (the reference's multi-template `get_text_embeds` crashes; CAT-Seg v1 did it this way);
* the loss is the softmax cross-entropy that VocAlign trains with (`loss_type="bce"` gives the reference's
  one-hot BCE).

`variant="v1"` follows the mmsegmentation CAT-Seg that VocAlign adapts (andraghetti/VocAlign 146c662,
`CAT-Seg/cat_seg/models/{clip_ovseg,cat_aggregator,cat_head}.py`; parity in `tests/test_catseg_v1_parity.py`) and
the detectron2 v1 release (cvlab-kaist/CAT-Seg af4fa0b; `tests/test_catseg_v1_d2_parity.py`). Differences, on
purpose:

* the ResNet guidance backbone is the transformers `ResNetBackbone` (`AutoBackbone`), and its batch norms always
  use their running statistics (frozen, as in the detectron2 CAT-Seg v1); the reference leaves them in training
  mode while adapting, so a batch of two re-estimates them;
* its input is derived from the CLIP-normalised `pixel_values` (undo CLIP's normalisation, apply ImageNet's) and
  resized with them to `clip_resolution` when the image has another size (the reference only works at 384);
* with several images per batch the reference pairs image i's classes with the guidance of image `i mod B`
  (`Tensor.repeat` where its einops original meant `repeat_interleave`); here every image keeps its own guidance;
* 80-channel checkpoints used with 10 templates tile the templates 8 times in the reference; the converter folds
  those conv1 weights instead (`convert_catseg_checkpoint.fold_prompt_channels`), which gives the same numbers.
* the detectron2 code pads the ResNet's and CLIP's inputs each after its own normalisation; here the padded
  CLIP-normalised image is re-normalised, so a `size_divisibility` border differs for the ResNet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoBackbone, CLIPModel, PreTrainedModel
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPooling, SemanticSegmenterOutput
from transformers.models.clip.configuration_clip import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .aggregation_catseg import CATSegAggregator, CATSegAggregatorLayer, CATSegSwinTransformerBlock, shifted_window_mask
from .class_list import validate_class_names
from .configuration_catseg import CATSegConfig
from .pixel_normalization import denormalize_pixels, normalize_pixels
from .text_embedding_cache import TextEmbeddingCache
from .vocabulary_catseg import aligned_entries, class_log_probs, concept_token_table, expand_with_concepts, is_one_per_class


def _check_entry_class_ids(entry_class_ids: torch.Tensor, num_rows: int) -> None:
    if entry_class_ids.dim() != 1 or len(entry_class_ids) != num_rows:
        raise ValueError(f"entry_class_ids must give the class of each of the {num_rows} vocabulary rows, got shape "
                         f"{tuple(entry_class_ids.shape)}")
    classes = torch.unique(entry_class_ids)
    if not torch.equal(classes.cpu(), torch.arange(len(classes))):
        raise ValueError("entry_class_ids must number the classes 0..N-1, each with at least one entry")


def _class_scores(logits: torch.Tensor, entry_class_ids: torch.Tensor | None) -> torch.Tensor:
    """The classes' scores from the vocabulary rows' logits: Eq. 7 log-probabilities when a class has several."""
    if entry_class_ids is None or is_one_per_class(entry_class_ids):
        return logits
    return class_log_probs(logits, entry_class_ids)


def _order_keeping_logit(probs: torch.Tensor) -> torch.Tensor:
    """The logit of probabilities in [0, 1], finite and (in float64, before the float32 result) strictly increasing
    over every float32 value, so their argmax is kept: 0 and 1 are clamped just beyond float32's extremes."""
    logits = torch.logit(probs.double().clamp(2.0**-150, 1 - 2.0**-25))
    return logits.to(torch.promote_types(probs.dtype, torch.float32))


def _check_class_indices(class_indices: torch.Tensor, num_classes: int, batch_size: int) -> None:
    """A clear error for `class_indices` that are not (B, K) integer indices into the vocabulary."""
    if class_indices.dtype.is_floating_point or class_indices.dtype == torch.bool or class_indices.dim() != 2:
        raise ValueError(
            f"class_indices must be a (batch, K) integer tensor, got {tuple(class_indices.shape)} {class_indices.dtype}"
        )
    if class_indices.shape[0] != batch_size:
        raise ValueError(f"class_indices has {class_indices.shape[0]} rows for a batch of {batch_size} images")
    if class_indices.numel() and (class_indices.min() < 0 or class_indices.max() >= num_classes):
        bad = class_indices[(class_indices < 0) | (class_indices >= num_classes)].unique().tolist()
        raise ValueError(f"class_indices {bad} are out of range for a vocabulary of {num_classes} classes (0..{num_classes - 1})")


@dataclass
class CATSegImageFeatures(BaseModelOutputWithPooling):
    r"""
    The image side of CAT-Seg: CLIP's vision tower with its dense last layer, and the decoder guidance maps.

    last_hidden_state (`torch.Tensor` of shape `(batch_size, 1 + grid * grid, vision_hidden_size)`):
        The tokens out of the dense last layer, before `post_layernorm`.
    pooler_output (`torch.Tensor` of shape `(batch_size, projection_dim)`):
        The projected CLS token of the dense last layer.
    hidden_states (`tuple(torch.Tensor)`, *optional*, returned with `output_hidden_states=True`):
        The vision tower's input embeddings (after `pre_layrnorm`) and each layer's output, the last one dense.
    dense (`torch.Tensor` of shape `(batch_size, projection_dim, grid, grid)`):
        Projected dense features of the patch tokens: the cost volume's image side.
    guidance (`tuple(torch.Tensor)`):
        (appearance guidance, decoder guidance at 2x, decoder guidance at 4x): CVPR'24: (dense, upsampled CLIP
        layer a, upsampled CLIP layer b); v1: the appearance backbone's stride-16, stride-8 and stride-4 maps.
    """

    dense: torch.Tensor | None = None
    guidance: tuple[torch.Tensor, ...] | None = None


@dataclass
class CATSegModelOutput(ModelOutput):
    r"""
    logits (`torch.Tensor` of shape `(batch_size, num_classes, 4 * grid, 4 * grid)`):
        Per-class logits, not upsampled to the image size.
    hidden_states (`tuple(torch.Tensor)`, *optional*, returned with `output_hidden_states`):
        The cost-volume embedding and the output of each aggregation layer, each `(batch_size, hidden_dim, K, grid,
        grid)` for the K classes aggregated (the `pad_len` best ones when there are more).
    """

    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


# Checkpoint key names from before the port followed transformers' lowercase module names (issue 25), through
# transformers' conversion mapping: `from_pretrained` renames them while loading, and `save_pretrained` writes them
# back by default (transformers' `save_original_format=True`, which older versions of this package read);
# `save_pretrained(..., save_original_format=False)` writes the module names.
LEGACY_KEY_RENAMES = {r"\.attention\.MLP\.": ".attention.mlp."}
register_checkpoint_conversion_mapping(
    CATSegConfig.model_type, [WeightRenaming(old, new) for old, new in LEGACY_KEY_RENAMES.items()], overwrite=True
)


class CATSegDenseCLIPLayer(CLIPEncoderLayer):
    """CLIP's last vision layer as CAT-Seg runs it: a feature for every token, no attention between tokens.

    Each token keeps only the value path of the attention, `out_proj(v_proj(layer_norm1(x)))`, adds a residual and
    goes through the MLP block as in CLIP. The residual is the CLS token's input for every token in the CVPR'24
    model (`ResidualAttentionBlock.forward_dense` of CAT-Seg's `third_party/model_vpt.py`) and each token's own
    input in v1 (`cls_residual=False`; `forward_dense` of VocAlign's `cat_seg/utils/clip_model.py`). It replaces
    `vision_model.encoder.layers[-1]` with that layer's own modules, so parameter names and checkpoint keys stay
    CLIP's; the queries and keys are unused (`CATSegModel` freezes them). CLIP's own forward
    (`model.catseg.clip.vision_model(...)`) runs it too, so it gives the dense features, not CLIP's pooled embedding.
    """

    def __init__(self, config: CLIPVisionConfig, cls_residual: bool = True) -> None:
        super().__init__(config)
        self.cls_residual = cls_residual

    @classmethod
    def from_clip_layer(cls, layer: CLIPEncoderLayer, config: CLIPVisionConfig, cls_residual: bool):
        """The dense layer made of `layer`'s submodules (the same parameters, already initialised)."""
        with torch.device("meta"):  # placeholders, replaced by `layer`'s modules: no memory, no random numbers
            dense = cls(config, cls_residual)
        for name, module in layer.named_children():
            setattr(dense, name, module)
        return dense

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """(B, 1 + N, D) tokens -> (B, 1 + N, D); `attention_mask` is not used (no token attends to another)."""
        values = self.self_attn.out_proj(self.self_attn.v_proj(self.layer_norm1(hidden_states)))
        hidden_states = values + (hidden_states[:, :1] if self.cls_residual else hidden_states)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CATSegPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading for CAT-Seg models.

    Flash attention is not supported: the shifted-window blocks of the spatial aggregation need an additive mask
    (tokens of different regions must not attend to each other), which the flash-attention kernels cannot take, so
    `attn_implementation="flash_attention_2"` (or `_3`, or a flash kernel) is transformers' "does not support" error.
    Flex attention is not wired either: the window attention runs eager or SDPA.
    """

    config_class = CATSegConfig
    config: CATSegConfig
    base_model_prefix = "catseg"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False  # see the class docstring
    _supports_flex_attn = False
    _no_split_modules = ["CLIPEncoderLayer", "CATSegDenseCLIPLayer", "CATSegAggregatorLayer"]
    # The cost embedding (the first layer's input), then each aggregation layer's output.
    _can_record_outputs = {"hidden_states": OutputRecorder(CATSegAggregatorLayer, num_hidden_layers_key="num_layers")}

    def get_input_embeddings(self) -> None:
        """None: CAT-Seg has no input embeddings of its own (its inputs are images and class prompts; the token
        embedding is CLIP's, inside its text tower). transformers' fallback raises instead, and Accelerate's FSDP2
        preparation asks every model for its input embeddings (to shard them as a unit of their own)."""
        return None

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The base class's initialisation (linear and convolution weights normal with `initializer_range`, norms
        ones and zeros), then CAT-Seg's own tensors, through `transformers.initialization`, which leaves tensors
        already loaded alone. The nested CLIP and ResNet models are initialised by their own classes."""
        super()._init_weights(module)
        if isinstance(module, CATSegSwinTransformerBlock) and module.attn_mask is not None:
            # Non-persistent buffer: rebuilt here because from_pretrained materialises modules from meta tensors.
            init.copy_(module.attn_mask, shifted_window_mask(module.resolution, module.window_size, module.shift))
        for name in ("padding_tokens", "padding_guidance"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                init.zeros_(param)


def prompts_by_length(input_ids: torch.Tensor, eos_token_id: int) -> list[tuple[torch.Tensor, int]]:
    """Rows of `input_ids` (N, L) grouped by the length up to and including the token CLIP's text model pools:
    `[(row indices, length), ...]`, shortest first.

    The pooled position is found as `CLIPTextModel` finds it (the first `eos_token_id`, or the largest id for the
    legacy `eos_token_id == 2`), so a row cut to its length pools the same token. With 80 prompt templates about
    40 % of a padded batch's tokens lie after the EOT token (ADE-150).
    """
    if eos_token_id == 2:
        pooled = input_ids.to(torch.int).argmax(dim=-1)
    else:
        pooled = (input_ids == eos_token_id).int().argmax(dim=-1)
    lengths, order = torch.sort(pooled + 1, stable=True)
    values, counts = torch.unique_consecutive(lengths, return_counts=True)
    return list(zip(order.split(counts.tolist()), values.tolist()))


class CATSegModel(CATSegPreTrainedModel):
    """CLIP towers + cost aggregation: returns per-class logits at 4x the CLIP patch grid."""

    def __init__(self, config: CATSegConfig) -> None:
        super().__init__(config)
        self.clip = CLIPModel(config.clip_config)
        layers = self.clip.vision_model.encoder.layers
        layers[-1] = CATSegDenseCLIPLayer.from_clip_layer(
            layers[-1], config.clip_config.vision_config, cls_residual=config.variant != "v1"
        )
        if config.variant == "v1":
            self.backbone = AutoBackbone.from_config(config.backbone_config)
        else:
            width = config.clip_config.vision_config.hidden_size
            self.upsample1 = nn.ConvTranspose2d(width, config.decoder_guidance_dims[0], kernel_size=2, stride=2)
            self.upsample2 = nn.ConvTranspose2d(width, config.decoder_guidance_dims[1], kernel_size=4, stride=4)
        self.aggregator = CATSegAggregator(config)
        # CAT-Seg never uses CLIP's logit scale nor the queries and keys of the dense last layer: frozen, so that
        # optimisers and gradient checks do not expect gradients for them.
        last = layers[-1].self_attn
        for unused in (self.clip.logit_scale, *last.q_proj.parameters(), *last.k_proj.parameters()):
            unused.requires_grad_(False)
        self.post_init()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.variant == "v1":
            self.backbone.eval()  # frozen batch-norm statistics (see the module docstring)
        return self

    # ----------------------------------------------------------------------------------------- text side
    @property
    def text_tower(self) -> tuple[nn.Module, ...]:
        """The modules that [`get_text_embeddings`] computes with."""
        return self.clip.text_model, self.clip.text_projection

    def get_text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Encode prompts into L2-normalised CLIP text embeddings.

        Each prompt runs only up to its EOT token, the one CLIP pools, in one pass per prompt length: the padding after
        it cannot change a causal text model's pooled output, so the result is that of the padded batch.

        Args:
            input_ids: (num_classes, num_templates, seq_len) or (num_classes * num_templates, seq_len) token ids,
                class-major, as produced by [`CATSegProcessor`].
        Returns:
            (num_classes, num_templates, projection_dim) embeddings.
        """
        p = self.config.num_templates
        if input_ids.dim() == 3:
            if input_ids.shape[1] != p:
                raise ValueError(f"input_ids carries {input_ids.shape[1]} templates per class; the model uses {p}")
            input_ids = input_ids.flatten(0, 1)
        if input_ids.dim() != 2 or input_ids.shape[0] % p:
            raise ValueError(
                f"input_ids of shape {tuple(input_ids.shape)} is not (num_classes * {p}, seq_len) or "
                f"(num_classes, {p}, seq_len)"
            )
        # The reference encodes without a padding mask; with CLIP's causal mask, tokens after EOT cannot change
        # the EOT feature, so the mask is unnecessary (and the padding can be cut, see the docstring).
        groups = prompts_by_length(input_ids, self.config.clip_config.text_config.eos_token_id)
        parts = [self.clip.get_text_features(input_ids=input_ids[rows, :length]).pooler_output for rows, length in groups]
        embeds = torch.cat(parts)[torch.argsort(torch.cat([rows for rows, _ in groups]))]
        return F.normalize(embeds, dim=-1).view(-1, p, embeds.shape[-1])

    # --------------------------------------------------------------------------------------- image side
    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        guidance_pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> CATSegImageFeatures:
        """Dense CLIP features and the guidance maps.

        The last vision layer is a [`CATSegDenseCLIPLayer`] (a feature per token, no attention between tokens); all
        tokens then go through `post_layernorm` and `visual_projection`.

        Args:
            pixel_values: (B, 3, H, W) CLIP-normalised images.
            guidance_pixel_values: v1 only: the images the appearance backbone sees (default: `pixel_values`).
                VocAlign masks only the CLIP input of the student and passes the unmasked image here.
            output_hidden_states: also return the vision tower's hidden states (default: `config.output_hidden_states`).
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if not isinstance(output_hidden_states, bool):
            raise TypeError(f"get_image_features takes output_hidden_states=True or False, got {output_hidden_states!r}")
        size = self.config.clip_resolution
        if pixel_values.shape[-2:] != (size, size):
            pixel_values = F.interpolate(pixel_values, size=(size, size), mode="bilinear", align_corners=False)
        v1 = self.config.variant == "v1"
        vision = self.clip.vision_model
        hidden = vision.embeddings(pixel_values.to(self.clip.dtype), interpolate_pos_encoding=True)
        # The layers run one by one (not through CLIP's forward): only the guidance layers' outputs are kept unless
        # all states are asked for (inference frees the others).
        hidden = vision.pre_layrnorm(hidden)
        states = [hidden] if output_hidden_states else None
        guiding = {} if v1 else dict.fromkeys(self.config.guidance_layers)
        for index, layer in enumerate(vision.encoder.layers):  # the last is the CATSegDenseCLIPLayer
            hidden = layer(hidden, None)
            if states is not None:
                states.append(hidden)
            if index in guiding:
                guiding[index] = hidden
        dense = self.clip.visual_projection(vision.post_layernorm(hidden))

        grid = self.config.feature_resolution
        to_map = lambda t: t[:, 1:].transpose(1, 2).unflatten(-1, (grid, grid))  # noqa: E731
        dense_map = to_map(dense)
        if v1:
            maps = self.backbone(self._backbone_input(guidance_pixel_values, pixel_values)).feature_maps
            if maps[2].shape[-2:] != dense_map.shape[-2:]:
                raise ValueError(
                    f"The appearance backbone's last map is {tuple(maps[2].shape[-2:])} but the CLIP grid is "
                    f"{tuple(dense_map.shape[-2:])}: its stride must equal the CLIP patch size"
                )
            guidance = (maps[2], maps[1], maps[0])
        else:
            # In layer order, as the reference's forward hooks append them (a layer given twice guides twice).
            layer_a, layer_b = (guiding[i] for i in sorted(self.config.guidance_layers))
            guidance = (dense_map, self.upsample1(to_map(layer_a)), self.upsample2(to_map(layer_b)))
        return CATSegImageFeatures(
            last_hidden_state=hidden,
            pooler_output=dense[:, 0],
            hidden_states=tuple(states) if output_hidden_states else None,
            dense=dense_map,
            guidance=guidance,
        )

    def _backbone_input(self, guidance_pixel_values: torch.Tensor | None, clip_input: torch.Tensor) -> torch.Tensor:
        """Re-normalise CLIP-normalised images for the v1 backbone: x * clip_std + clip_mean, then ImageNet's."""
        images = clip_input if guidance_pixel_values is None else guidance_pixel_values
        size = self.config.clip_resolution
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        mean, std = (self.config.backbone_normalization[key] for key in ("mean", "std"))
        return normalize_pixels(denormalize_pixels(images), mean, std).to(self.backbone.dtype)

    # ------------------------------------------------------------------------------------------ forward
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        class_indices: torch.Tensor | None = None,
        guidance_pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
    ) -> CATSegModelOutput:
        """Per-class logits (B, num_classes, 4 * grid, 4 * grid) for normalised images (B, 3, H, W).

        `class_indices` (B, K) keeps only those classes of the vocabulary for each image (VocAlign's Top-K): the
        pruned classes never enter the cost volume and the logits are (B, K, ...), in the order of the indices.
        `output_hidden_states` (`True`, or the indices of the states to keep) returns the aggregator's states (see
        [`CATSegModelOutput`]); `output_attentions=True` is an error: the class and window attention of the
        aggregator run through SDPA, which returns no attention weights. `attention_mask` is taken because the
        processor returns it and is not needed: each prompt runs only up to its EOT token, where the mask ends.
        """
        if output_attentions or (output_attentions is None and self.config.output_attentions):
            raise ValueError(f"{type(self).__name__} does not return attentions; call it with output_attentions=False")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if class_indices is not None and input_ids is not None and text_embeds is None:
            # Top-K: encode only the classes some image keeps (with gradients, LoRA sits in the text tower).
            ids = input_ids if input_ids.dim() == 3 else input_ids.view(-1, self.config.num_templates, input_ids.shape[-1])
            _check_class_indices(class_indices, ids.shape[0], pixel_values.shape[0])
            used, inverse = class_indices.unique(return_inverse=True)
            text_embeds = self.get_text_embeddings(ids[used])[inverse]  # (B, K, P, D)
            input_ids, class_indices = None, None
        text_embeds = self._resolve_text(input_ids, text_embeds, pixel_values.shape[0])
        if class_indices is not None:
            _check_class_indices(class_indices, text_embeds.shape[1], pixel_values.shape[0])
            index = class_indices[..., None, None].expand(-1, -1, *text_embeds.shape[2:])
            text_embeds = torch.gather(text_embeds, 1, index)
        features = self.get_image_features(pixel_values, guidance_pixel_values, output_hidden_states=False, return_dict=True)
        return self.aggregate(features, text_embeds, output_hidden_states=output_hidden_states)

    @capture_outputs(tie_last_hidden_states=False)
    def aggregate(self, image_features: CATSegImageFeatures, text_embeds: torch.Tensor, **kwargs) -> CATSegModelOutput:
        """Cost aggregation of text embeddings (B, K, P, D) against the image features.

        The hidden states are recorded here rather than over the whole forward: the vision tower runs layer by layer
        outside its own forward, so CLIP's recording hooks would otherwise add its layers to the aggregator's states.
        """
        dense = image_features.dense
        return CATSegModelOutput(logits=self.aggregator(dense, text_embeds.to(dense.dtype), image_features.guidance))

    def _resolve_text(self, input_ids, text_embeds, batch_size: int) -> torch.Tensor:
        if (input_ids is None) == (text_embeds is None):
            raise ValueError("Give exactly one of `input_ids` (tokenised class prompts) or `text_embeds`.")
        if text_embeds is None:
            text_embeds = self.get_text_embeddings(input_ids)
        if text_embeds.dim() == 3:
            text_embeds = text_embeds.unsqueeze(0).expand(batch_size, -1, -1, -1)
        if text_embeds.dim() != 4 or text_embeds.shape[0] != batch_size:
            raise ValueError(
                f"text_embeds must be (num_classes, P, D) or (batch={batch_size}, num_classes, P, D); "
                f"got {tuple(text_embeds.shape)}"
            )
        if text_embeds.shape[2] != self.config.num_templates:
            raise ValueError(
                f"text_embeds has {text_embeds.shape[2]} templates per class; the model uses {self.config.num_templates}"
            )
        if text_embeds.shape[1] == 0:
            raise ValueError("No classes given: the class list is empty.")
        return text_embeds


class CATSegForSemanticSegmentation(CATSegPreTrainedModel):
    """CAT-Seg for open-vocabulary semantic segmentation: any list of class names, given at call time.

    Example:

    ```python
    >>> from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
    >>> model = CATSegForSemanticSegmentation.from_pretrained("path/or/hub-id")
    >>> processor = CATSegProcessor.from_pretrained("path/or/hub-id")
    >>> inputs = processor(images=image, text=["road", "car", "sky"], return_tensors="pt")
    >>> outputs = model(**inputs)
    >>> segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    ```
    """

    def __init__(self, config: CATSegConfig) -> None:
        super().__init__(config)
        self.catseg = CATSegModel(config)
        #: Encodings of token ids by this model's text tower (see `encode_vocabulary`).
        self.text_embedding_cache = TextEmbeddingCache()
        self.post_init()

    def set_vocabulary(
        self, class_names: list[str], processor, concepts: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        """Make `class_names` the model's default vocabulary (used when a call gives no text).

        The names go to `config.id2label` (so `pipeline("image-segmentation")` labels its masks with them) and their
        prompt token ids to `config.vocabulary_token_ids`, so the vocabulary survives `save_pretrained`. Its text
        embeddings are encoded with [`encode_vocabulary`] (cached while the text weights stay). `concepts`, if given,
        are set as with [`set_concepts`] (without, the concepts the model holds stay).
        """
        if concepts is not None:
            self.set_concepts(concepts, processor)
        tokens = processor.tokenize_classes(class_names)["input_ids"]
        self.config.id2label = {i: name for i, name in enumerate(class_names)}
        self.config.label2id = {name: i for i, name in enumerate(class_names)}
        self.config.vocabulary_token_ids = tokens.tolist()

    def set_concepts(self, concepts: Mapping[str, Sequence[str]] | None, processor) -> None:
        """Score the classes of `concepts` (`{class name: [concept, ...]}`) with their name and concepts by default.

        Every call that names such a class (`processor(text=names)`, the pipelines, the default vocabulary) then
        returns, for each class, the log of its Eq. 7 probability (see `vocabulary_catseg`). The concepts and their
        prompt token ids are kept in `config.concepts` and `config.concept_token_ids`, so a saved, merged or pushed
        model scores the same way. A call that gives its own concepts (`processor(..., concepts=...)`,
        `entry_class_ids`) uses those; `concepts={}` there scores the names alone. `set_concepts(None, processor)`
        forgets them.
        """
        concepts = {name: list(items) for name, items in (concepts or {}).items() if items}
        self.config.concepts = self.config.concept_token_ids = None
        if not concepts:
            return
        names = validate_class_names(list(concepts), source="concepts")
        entries, entry_class_ids = aligned_entries(names, dict(zip(names, concepts.values())))
        tokens = processor.tokenize_classes(entries)["input_ids"]
        if tokens.shape[1] != self.config.num_templates:
            raise ValueError(f"the processor prompts with {tokens.shape[1]} templates, the model with "
                             f"{self.config.num_templates}: use the model's own processor")
        self.config.concepts = {
            name: [entries[e] for e in (entry_class_ids == i).nonzero().flatten().tolist()[1:]]
            for i, name in enumerate(names)
        }
        eos = self.config.clip_config.text_config.eos_token_id
        self.config.concept_token_ids = concept_token_table(tokens, entry_class_ids, names, eos)

    def expand_with_concepts(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The entries that score the classes of `input_ids` ((num_classes, P, L) or (num_classes * P, L)): each class
        name, followed by the concepts the model holds for it ([`set_concepts`]). Returns the entries' token ids
        (num_entries, P, L') and their `entry_class_ids`, or `(input_ids, None)` when no class has concepts."""
        if not self.config.concept_token_ids:
            return input_ids, None
        ids = input_ids if input_ids.dim() == 3 else input_ids.view(-1, self.config.num_templates, input_ids.shape[-1])
        eos = self.config.clip_config.text_config.eos_token_id
        return expand_with_concepts(ids, self.config.concept_token_ids, self.config.concepts or {}, eos)

    def _default_vocabulary(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The default vocabulary's text embeddings and `entry_class_ids` (with the concepts the model holds)."""
        token_ids = getattr(self.config, "vocabulary_token_ids", None)
        if token_ids is None:
            raise ValueError(
                "No classes given: pass `input_ids` (processor(text=class_names)) or `text_embeds`, or set a default "
                "vocabulary with model.set_vocabulary(class_names, processor)."
            )
        ids, entry_class_ids = self.expand_with_concepts(torch.tensor(token_ids, device=self.device))
        return self.encode_vocabulary(ids), entry_class_ids

    def _resolve_vocabulary(
        self, input_ids: torch.Tensor | None, text_embeds: torch.Tensor | None, entry_class_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text embeddings to score and, when they are entries of an aligned vocabulary, their class ids: the
        given embeddings, else the given token ids' (with the concepts the model holds unless `entry_class_ids` says
        what the rows are), else the default vocabulary's."""
        if text_embeds is None and input_ids is None:
            if entry_class_ids is not None:
                raise ValueError("entry_class_ids describes the rows of input_ids or text_embeds: give those too")
            return self._default_vocabulary()
        if text_embeds is None:
            if entry_class_ids is None:
                input_ids, entry_class_ids = self.expand_with_concepts(input_ids)
            text_embeds = self.get_text_embeddings(input_ids)
        if entry_class_ids is not None:
            _check_entry_class_ids(entry_class_ids, text_embeds.shape[-3])
        return text_embeds, entry_class_ids

    def get_text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """See [`CATSegModel.get_text_embeddings`]; [`encode_vocabulary`] encodes a vocabulary once."""
        return self.catseg.get_text_embeddings(input_ids)

    def encode_vocabulary(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[`get_text_embeddings`], served from `text_embedding_cache` while the token ids, the text tower's
        weights and adapters, autocast and inference mode are those of a cached encoding (see `TextEmbeddingCache`;
        in training mode, or when gradients reach the text weights, always encoded afresh). Pass the result as
        `text_embeds` to score many images with one vocabulary."""
        return self.text_embedding_cache.get_or_encode(self.catseg.text_tower, input_ids, self.get_text_embeddings)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        class_indices: torch.Tensor | None = None,
        guidance_pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        entry_class_ids: torch.Tensor | None = None,
    ) -> SemanticSegmenterOutput:
        """
        Args:
            pixel_values: (B, 3, H, W) images normalised with the CLIP mean/std (see [`CATSegImageProcessor`]).
            input_ids: token ids of the class prompts, (num_classes, P, L) or (num_classes * P, L). A class the model
                holds concepts for ([`set_concepts`]) is scored with its name and its concepts.
            text_embeds: precomputed normalised text embeddings, (num_classes, P, D) or (B, K, P, D).
            attention_mask: the processor's prompt mask; not needed (see [`CATSegModel.forward`]).
            labels: (B, H', W') class indices; `config.semantic_loss_ignore_index` (255) is ignored.
            class_indices: (B, K) per-image subset of the vocabulary to segment with (Top-K); logits follow it.
                The rows given are the classes (the concepts the model holds are not added).
            entry_class_ids: (num_entries,) the class of each row of `input_ids` / `text_embeds` when they are the
                entries of an aligned vocabulary (`processor(text=names, concepts=...)` returns it): the logits
                are then the classes' Eq. 7 log-probabilities. Given, it replaces the concepts the model holds.
            guidance_pixel_values: v1 only: the images its appearance backbone sees (default: `pixel_values`).
            output_hidden_states: also return the cost-aggregation embeddings: `True`, or the indices of those to
                keep (the others are `None`) (default: `config.output_hidden_states`).
            output_attentions: not supported (CAT-Seg's attention runs through SDPA); `True` is an error.
            return_dict: `False` returns a tuple `(loss, logits, hidden_states)` without the `None` entries
                (default: `config.return_dict`).
        Returns:
            `SemanticSegmenterOutput` with `logits` of shape (B, num_classes, 4 * grid, 4 * grid) (not upsampled,
            like SegFormer; use `post_process_semantic_segmentation`), `loss` when labels are given, and with
            `output_hidden_states` the aggregator's embeddings `hidden_states`: the cost-volume embedding and the
            output of each aggregation layer, each (B, hidden_dim, K, grid, grid) for the K classes it aggregates
            (the `pad_len` best ones when there are more). With concepts, `logits` are each class's log-probability
            (Eq. 7: softmax over all entries, summed per class; their softmax gives those probabilities) and the
            hidden states are over the entries; with one entry per class they are the model's logits.
        """
        if class_indices is None:
            text_embeds, entry_class_ids = self._resolve_vocabulary(input_ids, text_embeds, entry_class_ids)
            input_ids = None
        elif entry_class_ids is not None or (input_ids is None and text_embeds is None):
            raise ValueError("class_indices (Top-K) selects among the classes given by input_ids or text_embeds; "
                             "it cannot be combined with entry_class_ids or the default vocabulary")
        outputs = self.catseg(
            pixel_values,
            input_ids=input_ids,
            text_embeds=text_embeds,
            attention_mask=attention_mask,
            class_indices=class_indices,
            guidance_pixel_values=guidance_pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        logits = _class_scores(outputs.logits, entry_class_ids)
        loss = self.semantic_loss(logits, labels) if labels is not None else None
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    def semantic_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of logits (B, C, h, w) against labels (B, H, W), logits upsampled bilinearly to the label size.

        Named so as not to shadow `PreTrainedModel.loss_function`, transformers' per-task loss lookup, which knows
        no CAT-Seg loss (`config.loss_type` picks this one's form)."""
        ignore = self.config.semantic_loss_ignore_index
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        labels = labels.long()
        if self.config.loss_type == "cross_entropy":
            return F.cross_entropy(logits, labels, ignore_index=ignore)
        valid = labels != ignore
        target = F.one_hot(labels.clamp(0, logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2).float()
        target = target * valid.unsqueeze(1)
        return F.binary_cross_entropy_with_logits(logits, target)

    @torch.no_grad()
    def predict_sliding_window(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_size: tuple[int, int] | None = None,
        kernel: int | None = None,
        overlap: float | None = None,
        out_res: tuple[int, int] | None = None,
        entry_class_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The reference's sliding-window inference, batched over images and windows; returns logits, as `forward`.

        `config.sliding_window_mode == "catseg"` (CVPR'24): each image is resized to `out_res` (640x640), cut into
        `kernel` (384) windows with `overlap` (0.333), and also resized whole to one global window; the per-class
        sigmoid probabilities of the windows are folded back (averaging overlaps) and averaged with the global view,
        then resized to `output_size` (default: the input size), as the reference does. The logits returned are
        those averaged probabilities read back through the logit (their `sigmoid()` gives the reference's numbers).

        `"mmseg"` (v1, what VocAlign evaluates with): see [`predict_sliding_window_mmseg`]; the averaged logits.

        The vocabulary is that of `forward` (concepts the model holds, or `entry_class_ids`). With concepts the
        entries' logits are reduced to classes at `output_size`: the classes' Eq. 7 log-probabilities, as `forward`.
        `attention_mask` is taken so that `**processor(text=...)` can be passed, and not needed (see `forward`).

        Returns:
            (B, num_classes, *output_size) class logits whose argmax is the prediction (for `"catseg"` the argmax of
            the averaged probabilities, up to float32 ties); `post_process_semantic_segmentation` turns them into
            class probabilities.
        """
        text_embeds, entry_class_ids = self._resolve_vocabulary(input_ids, text_embeds, entry_class_ids)
        if self.config.sliding_window_mode == "mmseg":
            return self.predict_sliding_window_mmseg(pixel_values, text_embeds=text_embeds, output_size=output_size,
                                                     kernel=kernel, entry_class_ids=entry_class_ids)
        probs = self._predict_sliding_window_catseg(pixel_values, text_embeds, output_size, kernel, overlap, out_res)
        if entry_class_ids is None or is_one_per_class(entry_class_ids):
            return _order_keeping_logit(probs)
        return class_log_probs(torch.logit(probs.float().clamp(1e-6, 1 - 1e-6)), entry_class_ids)

    def _predict_sliding_window_catseg(self, pixel_values, text_embeds, output_size, kernel, overlap, out_res):
        """The CVPR'24 sliding window over the rows of `text_embeds` (see `predict_sliding_window`)."""
        kernel = kernel or self.config.sliding_window_kernel
        overlap = self.config.sliding_window_overlap if overlap is None else overlap
        out_res = tuple(out_res or self.config.sliding_window_out_res)
        output_size = tuple(output_size or pixel_values.shape[-2:])
        stride = int(kernel * (1 - overlap))
        b = pixel_values.shape[0]

        canvas = F.interpolate(pixel_values, size=out_res, mode="bilinear", align_corners=False)
        windows = F.unfold(canvas, kernel_size=kernel, stride=stride)  # (B, 3*k*k, L)
        num_windows = windows.shape[-1]
        windows = windows.transpose(1, 2).reshape(b * num_windows, 3, kernel, kernel)
        global_view = F.interpolate(pixel_values, size=(kernel, kernel), mode="bilinear", align_corners=False)
        views = torch.cat([windows, global_view], dim=0)

        if text_embeds.dim() == 4:  # per-image vocabularies: repeat for each image's windows, then globals
            text_embeds = torch.cat([text_embeds.repeat_interleave(num_windows, dim=0), text_embeds], dim=0)
        logits = self.catseg(views, text_embeds=text_embeds, return_dict=True).logits
        probs = F.interpolate(logits, size=(kernel, kernel), mode="bilinear", align_corners=False).sigmoid()
        num_classes = probs.shape[1]

        window_probs = probs[: b * num_windows].reshape(b, num_windows, num_classes * kernel * kernel).transpose(1, 2)
        fold = lambda t: F.fold(t, out_res, kernel_size=kernel, stride=stride)  # noqa: E731
        coverage = fold(F.unfold(probs.new_ones(1, 1, *out_res), kernel_size=kernel, stride=stride))
        folded = fold(window_probs) / coverage
        global_probs = F.interpolate(probs[b * num_windows :], size=out_res, mode="bilinear", align_corners=False)
        merged = (folded + global_probs) / 2
        return F.interpolate(merged, size=output_size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict_sliding_window_mmseg(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        output_size: tuple[int, int] | None = None,
        kernel: int | None = None,
        stride: int | None = None,
        entry_class_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """mmsegmentation's `slide_inference` (`EncoderDecoder.slide_inference`), which VocAlign evaluates with.

        `kernel` x `kernel` crops are taken from the image at its own size every `stride` pixels (the last row and
        column are moved back to end at the border), their logits are resized to the crop and averaged where crops
        overlap; all crops of all images run as one batch. Images smaller than `kernel` are one crop.

        Returns:
            (B, num_classes, *output_size) averaged logits (default size: the input's); with concepts, the classes'
            Eq. 7 log-probabilities of the averaged entry logits (see `forward`).
        """
        kernel = kernel or self.config.sliding_window_kernel
        stride = stride or self.config.sliding_window_stride
        b, _, height, width = pixel_values.shape
        crop_h, crop_w = min(kernel, height), min(kernel, width)

        def starts(size: int, crop: int) -> list[int]:
            count = max(size - crop + stride - 1, 0) // stride + 1
            return [max(min(i * stride + crop, size) - crop, 0) for i in range(count)]

        offsets = [(y, x) for y in starts(height, crop_h) for x in starts(width, crop_w)]
        crops = torch.stack([pixel_values[:, :, y : y + crop_h, x : x + crop_w] for y, x in offsets], dim=1)
        num_crops = len(offsets)
        text_embeds, entry_class_ids = self._resolve_vocabulary(input_ids, text_embeds, entry_class_ids)  # once
        if text_embeds.dim() == 4:  # per-image vocabularies follow their image's crops
            text_embeds = text_embeds.repeat_interleave(num_crops, dim=0)
        logits = self.catseg(crops.flatten(0, 1), text_embeds=text_embeds, return_dict=True).logits
        logits = F.interpolate(logits, size=(crop_h, crop_w), mode="bilinear", align_corners=False)
        logits = logits.view(b, num_crops, -1, crop_h, crop_w)

        total = logits.new_zeros(b, logits.shape[2], height, width)
        count = logits.new_zeros(1, 1, height, width)
        for i, (y, x) in enumerate(offsets):
            total[:, :, y : y + crop_h, x : x + crop_w] += logits[:, i]
            count[:, :, y : y + crop_h, x : x + crop_w] += 1
        averaged = total / count
        if output_size is not None and tuple(output_size) != (height, width):
            averaged = F.interpolate(averaged, size=tuple(output_size), mode="bilinear", align_corners=False)
        return _class_scores(averaged, entry_class_ids)

"""Configuration of CAT-Seg (Cho et al., CVPR 2024) on the `transformers` CLIP backbone."""

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, CLIPConfig, PreTrainedConfig, ResNetConfig
from transformers.configuration_utils import SubConfigSpec

from .prompt_templates import resolve_prompt_templates

# Normalisation CAT-Seg applies before its CLIP image encoder (0-255 scale in the reference; 0-1 here).
CLIP_PIXEL_MEAN = (122.7709383 / 255.0, 116.7460125 / 255.0, 104.09373615 / 255.0)
CLIP_PIXEL_STD = (68.5005327 / 255.0, 66.6321579 / 255.0, 70.3231630 / 255.0)
# Normalisation of the v1 appearance backbone (ImageNet statistics, as torchvision's ResNet-101 weights).
IMAGENET_PIXEL_MEAN = (123.675 / 255.0, 116.28 / 255.0, 103.53 / 255.0)
IMAGENET_PIXEL_STD = (58.395 / 255.0, 57.12 / 255.0, 57.375 / 255.0)

VARIANTS = ("cvpr24", "v1")


def default_v1_backbone_config() -> ResNetConfig:
    """ResNet-101 cut after its third stage (strides 4, 8, 16; 256, 512, 1024 channels), as CAT-Seg v1 uses it."""
    return ResNetConfig(
        depths=[3, 4, 23],
        hidden_sizes=[256, 512, 1024],
        embedding_size=64,
        layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3"],
    )


@strict
class CATSegConfig(PreTrainedConfig):
    r"""Configuration of [`CATSegForSemanticSegmentation`].

    The defaults reproduce the released CVPR'24 ViT-B/16 model (`configs/vitb_384.yaml` of cvlab-kaist/CAT-Seg).
    `variant="v1"` gives the earlier CAT-Seg that the VocAlign paper adapts (the mmsegmentation port in
    andraghetti/VocAlign, `CAT-Seg/cat_seg/models/*`): an extra ResNet guidance backbone (`backbone_config`,
    loaded through the transformers backbone API) supplies the appearance guidance (its last feature map) and the
    decoder guidance (the two earlier ones) instead of intermediate CLIP layers; the dense last CLIP layer keeps
    every token's own residual; and sliding-window inference defaults to mmsegmentation's
    (`sliding_window_mode="mmseg"`). The mmsegmentation checkpoints also need `class_mlp_adds_input=True` (the
    converter sets it).

    Args:
        clip_config (`CLIPConfig` or `dict`): the CLIP towers. The checkpoint's native resolution stays in
            `clip_config.vision_config.image_size` (224 for ViT-B/16); position embeddings are resized bicubically
            to `clip_resolution` at run time, as the reference does.
        clip_resolution (`int`): side of the square image fed to CLIP (384 for B/16, 336 for L/14).
        guidance_layers (`list[int]`): the two CLIP vision layers whose outputs guide the upsampling decoder ([3, 7]
            for B/16, [7, 15] for L/14), used in layer order as the reference does; a layer may be given twice.
            Unused by `variant="v1"`.
        variant (`str`): `"cvpr24"` (default) or `"v1"` (see above).
        backbone_config (`ResNetConfig` or `dict`, *optional*): the v1 appearance backbone; three `out_features`
            (strides 4, 8, 16). Defaults to ResNet-101's first three stages when `variant="v1"`.
        backbone_normalization (`dict`): `{"mean": [...], "std": [...]}`, the normalisation the appearance backbone
            expects (0-1 scale; ImageNet). The model derives its input from the CLIP-normalised `pixel_values`.
            (One field rather than `*_std`: transformers reads config keys with `_std` as initialisation scales.
            Configs saved with the former `backbone_pixel_mean` / `backbone_pixel_std` still load.)
        prompt_templates (`str` or `list[str]`): template set name (`"single"`, `"imagenet"`, `"imagenet_select"`,
            `"imagenet_select_clip"`) or a list of templates with one `{}`; their number P is the number of input
            channels of the cost-volume embedding.
        text_guidance_proj_dim, appearance_guidance_proj_dim, decoder_dims, decoder_guidance_dims,
        decoder_guidance_proj_dims, num_layers, num_heads, hidden_dim, pooling_size, window_size, attention_type,
        pad_len: the aggregator's hyper-parameters, named as in the reference. For v1, `decoder_guidance_dims` is
        set from the backbone (the channels of its stride-8 and stride-4 maps) and `pad_len` is 0 in its checkpoints.
        sliding_window_kernel, sliding_window_overlap, sliding_window_out_res: the reference's sliding-window
            inference (kernel 384, overlap 0.333, 640x640 canvas).
        sliding_window_mode (`str`): `"catseg"` (the CVPR'24 reference: canvas resize, sigmoid probabilities
            averaged with a global view) or `"mmseg"` (v1 / VocAlign: `kernel` crops of the image at its own size
            every `sliding_window_stride` pixels, logits averaged where crops overlap). Defaults to `"mmseg"` for v1
            and `"catseg"` otherwise. Both return logits (`"catseg"`: the logit of the averaged probabilities).
        sliding_window_stride (`int`): crop stride of the `"mmseg"` mode (VocAlign's configs: 384, no overlap).
        class_mlp_adds_input (`bool`): the class-aggregation MLP adds its (normalised) input once more,
            `x + norm2(x) + MLP(norm2(x))`, as mmcv's `FFN` does in the mmsegmentation CAT-Seg v1 (the detectron2
            code has a plain MLP).
        loss_type (`str`): `"cross_entropy"` (softmax over classes, what VocAlign trains with) or `"bce"`
            (one-hot binary cross-entropy, what CAT-Seg pretraining uses).
        semantic_loss_ignore_index (`int`): label value ignored by the loss (255).
        vocabulary_token_ids (`list`, *optional*): the prompt token ids (classes, templates, length) of the default
            vocabulary, written by `CATSegForSemanticSegmentation.set_vocabulary` (its names are `id2label`).
        concepts (`dict[str, list[str]]`, *optional*): the aligned vocabulary the model scores with (VocAlign's
            vocabulary alignment, Eq. 7): class name -> its concepts, written by
            `CATSegForSemanticSegmentation.set_concepts` (an adapter trained with concepts carries them here).
        concept_token_ids (`dict[str, list]`, *optional*): per class of `concepts`, the prompt token ids (entries,
            templates, tokens up to EOT) of its name and concepts; how the model recognises the class by its name.

    Like the `transformers` configs, this is a `huggingface_hub` strict dataclass: every field is type-checked when
    set (`clip_resolution="384"` is a clear error) and `validate()` runs `transformers`' own checks (such as
    `output_attentions` needing eager attention) and CAT-Seg's (`validate_architecture`).
    """

    model_type = "catseg"
    # Default towers: OpenAI CLIP ViT-B/16 (the B model of the CVPR'24 release).
    sub_configs_defaults = {
        "clip_config": SubConfigSpec(
            config_class=CLIPConfig, init_kwargs={"vision_config": {"patch_size": 16}, "projection_dim": 512}
        ),
        # Only CAT-Seg v1 has one; `variant="v1"` fills in ResNet-101 when it is left out.
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet", optional=True),
    }

    clip_config: dict | CLIPConfig | None = None
    clip_resolution: int = 384
    guidance_layers: list[int] | tuple[int, ...] = (3, 7)
    variant: str = "cvpr24"
    backbone_config: dict | PreTrainedConfig | None = None
    backbone_normalization: dict[str, list[float | int]] | None = None
    prompt_templates: str | list[str] | tuple[str, ...] = "single"
    text_guidance_proj_dim: int = 128
    appearance_guidance_proj_dim: int = 128
    decoder_dims: list[int] | tuple[int, ...] = (64, 32)
    decoder_guidance_dims: list[int] | tuple[int, ...] = (256, 128)
    decoder_guidance_proj_dims: list[int] | tuple[int, ...] = (32, 16)
    num_layers: int = 2
    num_heads: int = 4
    hidden_dim: int = 128
    pooling_size: list[int] | tuple[int, ...] = (2, 2)
    window_size: int = 12
    attention_type: str = "linear"
    pad_len: int = 256
    sliding_window_kernel: int = 384
    sliding_window_overlap: float | int = 0.333
    sliding_window_out_res: list[int] | tuple[int, ...] = (640, 640)
    sliding_window_mode: str | None = None
    sliding_window_stride: int = 384
    class_mlp_adds_input: bool = False
    loss_type: str = "cross_entropy"
    semantic_loss_ignore_index: int = 255
    vocabulary_token_ids: list[list[list[int]]] | None = None
    concepts: dict[str, list[str]] | None = None
    concept_token_ids: dict[str, list[list[list[int]]]] | None = None
    initializer_range: float | int = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        old_keys = {key: f"backbone_pixel_{key}" for key in ("mean", "std")}  # configs saved before this field
        legacy = {key: kwargs.pop(name) for key, name in old_keys.items() if name in kwargs}
        super().__post_init__(**kwargs)
        normalization = self.backbone_normalization or {"mean": IMAGENET_PIXEL_MEAN, "std": IMAGENET_PIXEL_STD} | legacy
        self.backbone_normalization = {key: list(value) for key, value in normalization.items()}
        if isinstance(self.clip_config, dict):
            self.clip_config = CLIPConfig(**self.clip_config)
        if self.variant == "v1" and self.backbone_config is None:
            self.backbone_config = default_v1_backbone_config()
        if self.variant == "v1" and len(getattr(self.backbone_config, "out_features", ())) == 3:
            # The decoder is guided by the backbone's stride-8 and stride-4 maps: their channels fix these dims.
            self.decoder_guidance_dims = self._backbone_channels()[1::-1]
        if self.sliding_window_mode is None:
            self.sliding_window_mode = "mmseg" if self.variant == "v1" else "catseg"
        self.guidance_layers = list(self.guidance_layers)
        self.decoder_dims = list(self.decoder_dims)
        self.decoder_guidance_dims = list(self.decoder_guidance_dims)
        self.decoder_guidance_proj_dims = list(self.decoder_guidance_proj_dims)
        self.pooling_size = list(self.pooling_size)
        self.sliding_window_out_res = list(self.sliding_window_out_res)
        if not isinstance(self.prompt_templates, str):
            self.prompt_templates = list(self.prompt_templates)
        # `@strict` runs `validate()` (transformers' class validators and `validate_architecture`) after __init__.

    def validate_architecture(self) -> None:
        """Part of the `@strict` validation: raise a `ValueError` naming the first inconsistent CAT-Seg setting."""
        super().validate_architecture()
        resolve_prompt_templates(self.prompt_templates)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.sliding_window_mode not in ("catseg", "mmseg"):
            raise ValueError(f"sliding_window_mode must be 'catseg' or 'mmseg', got {self.sliding_window_mode!r}")
        if self.variant == "v1":
            self._validate_backbone()
        elif self.backbone_config is not None:
            raise ValueError("backbone_config is only used by variant='v1'; the CVPR'24 model guides with CLIP layers")
        vision = self.clip_config.vision_config
        if self.clip_resolution % vision.patch_size:
            raise ValueError(
                f"clip_resolution {self.clip_resolution} is not a multiple of the CLIP patch size {vision.patch_size}"
            )
        if len(self.guidance_layers) != 2:
            raise ValueError(f"guidance_layers needs two CLIP layer indices, got {self.guidance_layers}")
        bad = [i for i in self.guidance_layers if not 0 <= i < vision.num_hidden_layers - 1]
        if bad and self.variant == "cvpr24":
            raise ValueError(
                f"guidance_layers {bad} out of range for a {vision.num_hidden_layers}-layer CLIP vision tower "
                "(the last layer is the dense output layer)"
            )
        if sorted(self.backbone_normalization) != ["mean", "std"] or any(
            len(v) != 3 for v in self.backbone_normalization.values()
        ):
            raise ValueError(
                f"backbone_normalization needs 'mean' and 'std', three values each, got {self.backbone_normalization}"
            )
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        if self.attention_type not in ("linear", "full"):
            raise ValueError(f"attention_type must be 'linear' or 'full', got {self.attention_type!r}")
        if self.loss_type not in ("cross_entropy", "bce"):
            raise ValueError(f"loss_type must be 'cross_entropy' or 'bce', got {self.loss_type!r}")
        for dims in (self.decoder_dims, self.decoder_guidance_dims, self.decoder_guidance_proj_dims):
            if len(dims) != 2:
                raise ValueError(f"decoder dimension lists need two entries, got {dims}")

    def _validate_backbone(self) -> None:
        stages = list(getattr(self.backbone_config, "out_features", None) or ())
        if len(stages) != 3:
            raise ValueError(f"the v1 appearance backbone needs three out_features (strides 4, 8, 16), got {stages}")
        if not hasattr(self.backbone_config, "hidden_sizes") or not hasattr(self.backbone_config, "embedding_size"):
            raise ValueError(f"the v1 appearance backbone must be a ResNet-like config, got {type(self.backbone_config).__name__}")

    def _backbone_channels(self) -> list[int]:
        """Channels of the backbone's three feature maps, shallowest first."""
        config = self.backbone_config
        sizes = [config.embedding_size, *config.hidden_sizes]  # stage_names: stem, stage1, stage2, ...
        return [sizes[config.stage_names.index(stage)] for stage in config.out_features]

    @property
    def appearance_guidance_dim(self) -> int:
        """Channels of the map the appearance guidance is projected from (CLIP embedding, or v1 backbone stage)."""
        return self._backbone_channels()[-1] if self.variant == "v1" else self.clip_config.projection_dim

    @property
    def feature_resolution(self) -> int:
        """Side of the CLIP patch grid the aggregator works on (24 for B/16 at 384)."""
        return self.clip_resolution // self.clip_config.vision_config.patch_size

    @property
    def templates(self) -> tuple[str, ...]:
        """The resolved prompt templates."""
        return resolve_prompt_templates(self.prompt_templates)

    @property
    def num_templates(self) -> int:
        return len(self.templates)

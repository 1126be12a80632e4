"""Configuration of CAT-Seg (Cho et al., CVPR 2024) on the `transformers` CLIP backbone."""

from __future__ import annotations

from typing import Any

from transformers import CLIPConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .prompt_templates import resolve_prompt_templates

# Normalisation CAT-Seg applies before its CLIP image encoder (0-255 scale in the reference; 0-1 here).
CLIP_PIXEL_MEAN = (122.7709383 / 255.0, 116.7460125 / 255.0, 104.09373615 / 255.0)
CLIP_PIXEL_STD = (68.5005327 / 255.0, 66.6321579 / 255.0, 70.3231630 / 255.0)


class CATSegConfig(PreTrainedConfig):
    r"""Configuration of [`CATSegForSemanticSegmentation`].

    The defaults reproduce the released CVPR'24 ViT-B/16 model (`configs/vitb_384.yaml` of cvlab-kaist/CAT-Seg).

    Args:
        clip_config (`CLIPConfig` or `dict`): the CLIP towers. The checkpoint's native resolution stays in
            `clip_config.vision_config.image_size` (224 for ViT-B/16); position embeddings are resized bicubically
            to `clip_resolution` at run time, as the reference does.
        clip_resolution (`int`): side of the square image fed to CLIP (384 for B/16, 336 for L/14).
        guidance_layers (`list[int]`): CLIP vision layers whose outputs guide the upsampling decoder ([3, 7] for
            B/16, [7, 15] for L/14).
        prompt_templates (`str` or `list[str]`): template set name (`"single"`, `"imagenet"`, `"imagenet_select"`,
            `"imagenet_select_clip"`) or a list of templates with one `{}`; their number P is the number of input
            channels of the cost-volume embedding.
        text_guidance_proj_dim, appearance_guidance_proj_dim, decoder_dims, decoder_guidance_dims,
        decoder_guidance_proj_dims, num_layers, num_heads, hidden_dim, pooling_size, window_size, attention_type,
        pad_len: the aggregator's hyper-parameters, named as in the reference.
        sliding_window_kernel, sliding_window_overlap, sliding_window_out_res: the reference's sliding-window
            inference (kernel 384, overlap 0.333, 640x640 canvas).
        loss_type (`str`): `"cross_entropy"` (softmax over classes, what VocAlign trains with) or `"bce"`
            (one-hot binary cross-entropy, what CAT-Seg pretraining uses).
        semantic_loss_ignore_index (`int`): label value ignored by the loss (255).
    """

    model_type = "catseg"
    # Default towers: OpenAI CLIP ViT-B/16 (the B model of the CVPR'24 release).
    sub_configs_defaults = {
        "clip_config": SubConfigSpec(
            config_class=CLIPConfig, init_kwargs={"vision_config": {"patch_size": 16}, "projection_dim": 512}
        )
    }

    clip_config: dict | CLIPConfig | None = None
    clip_resolution: int = 384
    guidance_layers: list[int] | tuple[int, ...] = (3, 7)
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
    sliding_window_overlap: float = 0.333
    sliding_window_out_res: list[int] | tuple[int, ...] = (640, 640)
    loss_type: str = "cross_entropy"
    semantic_loss_ignore_index: int = 255
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if isinstance(self.clip_config, dict):
            self.clip_config = CLIPConfig(**self.clip_config)
        self.guidance_layers = list(self.guidance_layers)
        self.decoder_dims = list(self.decoder_dims)
        self.decoder_guidance_dims = list(self.decoder_guidance_dims)
        self.decoder_guidance_proj_dims = list(self.decoder_guidance_proj_dims)
        self.pooling_size = list(self.pooling_size)
        self.sliding_window_out_res = list(self.sliding_window_out_res)
        if not isinstance(self.prompt_templates, str):
            self.prompt_templates = list(self.prompt_templates)
        self.validate()

    def validate(self) -> None:
        """Raise a `ValueError` naming the first inconsistent setting."""
        resolve_prompt_templates(self.prompt_templates)
        vision = self.clip_config.vision_config
        if self.clip_resolution % vision.patch_size:
            raise ValueError(
                f"clip_resolution {self.clip_resolution} is not a multiple of the CLIP patch size {vision.patch_size}"
            )
        if len(self.guidance_layers) != 2:
            raise ValueError(f"guidance_layers needs two CLIP layer indices, got {self.guidance_layers}")
        bad = [i for i in self.guidance_layers if not 0 <= i < vision.num_hidden_layers - 1]
        if bad:
            raise ValueError(
                f"guidance_layers {bad} out of range for a {vision.num_hidden_layers}-layer CLIP vision tower "
                "(the last layer is the dense output layer)"
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

"""Shared tiny models and data for the tests: a 3-layer CLIP at 32x32, built in well under a second."""

import pytest
import torch
from torch.utils.data import Dataset

from vocalign_hf import CATSegConfig, CATSegForSemanticSegmentation, CATSegProcessor


def tiny_catseg_config(**overrides) -> CATSegConfig:
    clip = dict(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=49408,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    kwargs = dict(
        clip_config=clip, clip_resolution=32, guidance_layers=[0, 1], text_guidance_proj_dim=16,
        appearance_guidance_proj_dim=16, decoder_dims=[16, 16], decoder_guidance_dims=[16, 8],
        decoder_guidance_proj_dims=[8, 4], hidden_dim=16, num_heads=2, window_size=4, pad_len=8,
    )
    kwargs.update(overrides)
    return CATSegConfig(**kwargs)


@pytest.fixture
def tiny_config() -> CATSegConfig:
    return tiny_catseg_config()


@pytest.fixture
def tiny_model(tiny_config) -> CATSegForSemanticSegmentation:
    torch.manual_seed(0)
    return CATSegForSemanticSegmentation(tiny_config).eval()


@pytest.fixture
def tiny_processor(tiny_config) -> CATSegProcessor:
    return CATSegProcessor.from_config(tiny_config)


def tiny_catseg_v1_config(**overrides) -> CATSegConfig:
    """The tiny CLIP with CAT-Seg v1's appearance backbone: a 3-stage bottleneck ResNet (strides 4, 8, 16)."""
    backbone = dict(
        model_type="resnet", depths=[1, 1, 1], hidden_sizes=[16, 32, 32], embedding_size=8,
        layer_type="bottleneck", out_features=["stage1", "stage2", "stage3"],
    )
    kwargs = dict(variant="v1", backbone_config=backbone, pad_len=0, clip_resolution=128)
    kwargs.update(overrides)
    config = tiny_catseg_config(**kwargs)
    config.clip_config.vision_config.patch_size = 16  # the backbone's stride-16 map must match the CLIP grid
    return config


class RandomImages(Dataset):
    """Deterministic 32x32 images and 3-class labels per index (a labelled split for trainer tests)."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        return {"pixel_values": torch.rand(3, 32, 32, generator=g), "labels": torch.randint(0, 3, (32, 32), generator=g)}

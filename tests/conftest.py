"""Tiny randomly initialised diffusers models built in code (no download)."""

from __future__ import annotations

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler,
                       SD3Transformer2DModel, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from asyndm.shapes.tokenizer import write_clip_tokenizer

# Tiny models: one thread is fastest, and on a shared 2-core machine two OpenMP threads
# spin-wait on each other (measured 5-30x slower under load).
torch.set_num_threads(1)

WORDS = [
    "a", "an", "the", "cat", "dog", "eating", "sandwich", "playing", "basketball", "red",
    "blue", "car", "driving", "and", "on", "table", "with", "photo", "of", "horse", "two",
]


def tiny_unet(sdxl: bool = False, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    kwargs = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )
    if sdxl:
        kwargs.update(addition_embed_type="text_time", cross_attention_dim=64, addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8,
                      transformer_layers_per_block=(1, 2, 2), use_linear_projection=True)
    return UNet2DConditionModel(**kwargs).eval()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return write_clip_tokenizer(WORDS, tmp_path_factory.mktemp("tok"), model_max_length=77)


def tiny_text_encoder(tokenizer, projection: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=32,
    ).eval()


def ddim(prediction_type: str = "epsilon", **kw) -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        prediction_type=prediction_type, **kw,
    )


def tiny_transformer(sd35: bool = False, seed: int = 0) -> SD3Transformer2DModel:
    """SD3-style MMDiT; ``sd35`` adds SD3.5's dual attention (AdaLayerNormZeroX) and qk-norm."""
    torch.manual_seed(seed)
    extra = dict(dual_attention_layers=(0, 1), qk_norm="rms_norm") if sd35 else {}
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16, **extra,
    ).eval()


def tiny_sd3_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=32, scaling_factor=1.5, shift_factor=0.1,
    ).eval()


def flow_scheduler(**kw) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0, **kw)


@pytest.fixture(scope="session")
def sdxl_components(tokenizer):
    return dict(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
        text_encoder_2=tiny_text_encoder(tokenizer, projection=True, seed=1),
        tokenizer_2=tokenizer, unet=tiny_unet(sdxl=True), scheduler=ddim(),
    )


@pytest.fixture(scope="session")
def sd_components(tokenizer):
    return dict(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=tiny_unet(), scheduler=ddim(), safety_checker=None, feature_extractor=None,
    )


@pytest.fixture(scope="session")
def sd3_components(tokenizer):
    return dict(
        transformer=tiny_transformer(), scheduler=flow_scheduler(), vae=tiny_sd3_vae(),
        text_encoder=tiny_text_encoder(tokenizer, projection=True, seed=1), tokenizer=tokenizer,
        text_encoder_2=tiny_text_encoder(tokenizer, projection=True, seed=2),
        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )

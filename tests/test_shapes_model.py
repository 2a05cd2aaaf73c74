"""The shapes model: registry sizes, shapes, cross-attention at 8x8, lossless folder round trip."""

from __future__ import annotations

import json
import time

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, CrossAttnUpBlock2D
from transformers import CLIPTextModel, CLIPTokenizer

from asyndm.shapes.model import (
    MODEL_SIZES,
    ShapesModelConfig,
    build_components,
    latents_to_pixels,
    param_count_report,
    param_counts,
    pixels_to_latents,
    save_model_folder,
)

WORDS = "a red blue green circle square triangle on the left of above".split()


@pytest.fixture(scope="module")
def tiny():
    return build_components(MODEL_SIZES["tiny"], WORDS, seed=0)


def _forward(comps, prompts, z, t):
    tok = comps["tokenizer"]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        context = comps["text_encoder"](ids).last_hidden_state
        return comps["unet"](z, t, encoder_hidden_states=context).sample


def test_tiny_builds_fast_and_small():
    start = time.perf_counter()
    comps = build_components(MODEL_SIZES["tiny"], WORDS)
    assert time.perf_counter() - start < 1.0
    n = sum(p.numel() for k in ("unet", "text_encoder") for p in comps[k].parameters())
    assert n < 200_000


def test_forward_shapes(tiny):
    z = torch.randn(2, 12, 16, 16)
    out = _forward(tiny, ["a red circle", ""], z, torch.tensor([10, 900]))
    assert out.shape == (2, 12, 16, 16)
    assert torch.isfinite(out).all()


def test_pixel_latent_round_trip_is_exact():
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    z = pixels_to_latents(x)
    assert z.shape == (3, 12, 16, 16)
    assert torch.equal(latents_to_pixels(z), x)
    # Channel c*4 + dy*2 + dx holds colour c at offset (dy, dx) of each 2x2 patch.
    assert torch.equal(z[:, 4 * 2 + 2 * 1 + 0], x[:, 2, 1::2, 0::2])


def test_unet_cross_attention_at_8x8_and_plain_conditioning(tiny):
    unet = tiny["unet"]
    assert isinstance(unet.down_blocks[1], CrossAttnDownBlock2D)
    assert isinstance(unet.up_blocks[1], CrossAttnUpBlock2D)
    cfg = unet.config
    assert cfg.class_embed_type is None and cfg.addition_embed_type is None
    assert cfg.resnet_time_scale_shift == "default"
    assert cfg.cross_attention_dim == tiny["text_encoder"].config.hidden_size
    sizes = {}
    hooks = [
        block.attentions[0].register_forward_pre_hook(
            lambda m, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:])))
        for name, block in (("down", unet.down_blocks[1]), ("up", unet.up_blocks[1]))
    ]
    _forward(tiny, ["a red circle"], torch.randn(1, 12, 16, 16), torch.tensor([500]))
    for h in hooks:
        h.remove()
    assert sizes == {"down": (8, 8), "up": (8, 8)}


def test_text_encoder_matches_tokenizer(tiny):
    te, tok = tiny["text_encoder"].config, tiny["tokenizer"]
    assert te.max_position_embeddings == tok.model_max_length == 32
    assert te.vocab_size == len(tok)
    assert te.eos_token_id == tok.eos_token_id and te.bos_token_id == tok.bos_token_id


def test_scheduler_config(tiny):
    c = tiny["scheduler"].config
    assert isinstance(tiny["scheduler"], DDIMScheduler)
    assert (c.prediction_type, c.beta_schedule, c.timestep_spacing) == (
        "v_prediction", "squaredcos_cap_v2", "leading")
    assert c.clip_sample and c.clip_sample_range == 1.0 and not c.set_alpha_to_one
    assert c.num_train_timesteps == 1000 and c.steps_offset == 1


def test_seeded_init_is_reproducible():
    a = build_components(MODEL_SIZES["tiny"], WORDS, seed=3)["unet"].state_dict()
    b = build_components(MODEL_SIZES["tiny"], WORDS, seed=3)["unet"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_folder_round_trip(tiny, tmp_path):
    out = save_model_folder(tmp_path / "m", tiny, card="# card\n")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and "_diffusers_version" in index
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["vae"] == ["asyndm", "PixelShuffleVAE"]  # pixel space: a weightless shuffle
    for absent in ("safety_checker", "feature_extractor", "image_encoder"):
        assert index[absent] == [None, None]
    assert index["requires_safety_checker"] is False
    assert (out / "README.md").read_text() == "# card\n"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "text_encoder" / "model.safetensors").is_file()

    loaded = {
        "unet": UNet2DConditionModel.from_pretrained(out, subfolder="unet", use_safetensors=True),
        "text_encoder": CLIPTextModel.from_pretrained(
            out, subfolder="text_encoder", use_safetensors=True, dtype=torch.float32),
        "tokenizer": CLIPTokenizer.from_pretrained(out, subfolder="tokenizer"),
        "scheduler": DDIMScheduler.from_pretrained(out, subfolder="scheduler"),
    }
    assert loaded["scheduler"].config.clip_sample is True
    assert loaded["tokenizer"].model_max_length == 32
    z, t = torch.randn(2, 12, 16, 16), torch.tensor([3, 700])
    prompts = ["a blue square above a red circle", ""]
    assert torch.equal(_forward(tiny, prompts, z, t), _forward(loaded, prompts, z, t))


def test_base_size_within_budget():
    counts = param_counts(MODEL_SIZES["base"])
    assert 6e6 <= counts["unet"] <= 12e6
    assert 2 * counts["total"] <= 30e6  # fp16 bytes of everything together
    assert "| unet |" in param_count_report(MODEL_SIZES["base"])


def test_config_validation():
    with pytest.raises(ValueError):
        ShapesModelConfig((16, 16, 20), 1, (1, 1, 1), 8, 16, 1, 1, 32)
    with pytest.raises(ValueError):
        ShapesModelConfig((16, 16, 16), 1, (1, 1, 3), 8, 16, 1, 1, 32)

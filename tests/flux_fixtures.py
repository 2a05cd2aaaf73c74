"""Tiny random FLUX.1 components built in code (no download): transformer, CLIP, T5, VAE.

The T5 tokenizer is a real sentencepiece-style Unigram model (transformers' ``T5Tokenizer``
over a vocabulary of ``(piece, log-probability)`` pairs, ``▁`` marking a word start), so words
split into pieces as in FLUX.1's own tokenizer: ``hedgehog`` is ``▁hedge`` + ``hog``, and a
word outside the vocabulary falls back to single letters.
"""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from conftest import WORDS, tiny_text_encoder

PIECES = ["▁hedge", "hog", "▁sand"]
"""Pieces beyond whole words: ``hedgehog`` is two pieces; ``sandwich`` stays one word."""


def t5_tokenizer(model_max_length: int = 32) -> T5Tokenizer:
    """A Unigram (sentencepiece-style) T5 tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -3.0) for w in WORDS] + [(p, -3.5) for p in PIECES]
    vocab += [(c, -9.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_t5(tokenizer: T5Tokenizer, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                   eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def tiny_flux_transformer(guidance: bool = True, seed: int = 0,
                          **overrides) -> FluxTransformer2DModel:
    """Two double- and two single-stream blocks; 4 packed channels (a 1-channel latent).

    ``overrides``: other ``FluxTransformer2DModel`` sizes (the benchmark's larger model).
    """
    torch.manual_seed(seed)
    cfg = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
               pooled_projection_dim=32, axes_dims_rope=(2, 2, 4))
    return FluxTransformer2DModel(guidance_embeds=guidance, **{**cfg, **overrides}).eval()


def tiny_flux_vae(seed: int = 0) -> AutoencoderKL:
    """One level (``vae_scale_factor`` 1), one latent channel, Flux's shift and scale."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
        layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def flux_scheduler(dev: bool = True) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config (dynamic shifting by image size) or schnell's (shift 1)."""
    if dev:
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def flux_components(clip_tokenizer, dev: bool = True, **transformer) -> dict:
    """The keyword arguments of ``FluxPipeline`` (dev: guidance embedding; schnell: none);
    ``transformer``: size overrides of :func:`tiny_flux_transformer`."""
    t5_tok = t5_tokenizer()
    return dict(
        scheduler=flux_scheduler(dev), vae=tiny_flux_vae(),
        text_encoder=tiny_text_encoder(clip_tokenizer, seed=1), tokenizer=clip_tokenizer,
        text_encoder_2=tiny_t5(t5_tok, seed=2), tokenizer_2=t5_tok,
        transformer=tiny_flux_transformer(guidance=dev, **transformer),
    )


def reference_pipeline(components: dict) -> FluxPipeline:
    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe

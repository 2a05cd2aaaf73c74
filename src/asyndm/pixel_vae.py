"""``PixelShuffleVAE``: the "autoencoder" of a pixel-space model, so diffusers' pipelines run it.

The embedded ShapesBench model denoises the image itself, pixel-unshuffled by a factor ``r``
(``(B, 3, H, W) -> (B, 3 r^2, H / r, W / r)``). Diffusers' Stable Diffusion pipelines decode
with ``vae.decode(latents / scaling_factor)`` and encode (img2img) with
``vae.encode(image).latent_dist.sample(generator)``; this component does both exactly
(``pixel_shuffle`` / ``pixel_unshuffle``, no parameters, deterministic), so the unchanged
``StableDiffusionPipeline`` -- and ``DiffusionPipeline.from_pretrained`` of the folder -- can
sample such a model. Its config is what the pipelines read: ``scaling_factor = 1``, and
``block_out_channels`` of length ``log2(r) + 1`` so that their ``vae_scale_factor`` is ``r``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config


@dataclass
class _Latents:
    """Stands where an ``AutoencoderKL`` returns a distribution: a point mass."""

    latents: torch.Tensor

    def sample(self, generator=None) -> torch.Tensor:
        return self.latents

    def mode(self) -> torch.Tensor:
        return self.latents


@dataclass
class _EncoderOutput:
    latent_dist: _Latents


class PixelShuffleVAE(ModelMixin, ConfigMixin):
    """Pixel (un)shuffle by ``factor``, with the config keys SD pipelines read."""

    @register_to_config
    def __init__(self, factor: int = 2, in_channels: int = 3, scaling_factor: float = 1.0,
                 shift_factor: float | None = None, force_upcast: bool = False,
                 block_out_channels: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if factor < 1 or 2 ** round(math.log2(factor)) != factor:
            raise ValueError(f"factor must be a power of 2, got {factor}")
        if block_out_channels is None:  # vae_scale_factor = 2 ** (len - 1) = factor
            self.register_to_config(block_out_channels=(1,) * (round(math.log2(factor)) + 1))
        self.factor = factor
        # no weights; this buffer only carries the module's device and dtype
        self.register_buffer("anchor", torch.zeros(()), persistent=True)

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels * self.factor**2

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, 3 r^2, H / r, W / r)``."""
        lat = F.pixel_unshuffle(x, self.factor)
        return _EncoderOutput(_Latents(lat)) if return_dict else (_Latents(lat),)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """``(B, 3 r^2, h, w)`` -> ``(B, 3, h r, w r)``."""
        image = F.pixel_shuffle(z, self.factor)
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=image)
        return (image,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latent_dist.sample()).sample

"""SEG (Hong, "Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy
Curvature of Attention", NeurIPS 2024; official code github.com/SusungHong/SEG-SDXL,
``pipeline_seg.py``).

Equation: a third branch ``g``, the conditional prediction with the *queries* of the chosen
self-attention layers Gaussian-blurred (equivalent to blurring the attention weights)::

    out = u + w (c - u) + s (c - g)

(their ``noise_pred_text + (w - 1)(c - u) + s (c - g)``, the same thing). Blur: a Gaussian of
``sigma`` over the query map ``(B, heads * d, h, w)``, kernel ``ceil(6 sigma) + 1`` made odd,
capped by the map size, reflect padding; ``sigma > 9999`` (and ``inf``) is their "infinite
blur": every query replaced by the spatial mean. Defaults (theirs): ``scale = 3.0``,
``sigma = inf`` (their ``9999999``), layers ``"mid"``.

How it runs here: the structure is PAG's (three rows ``[u; c; g]`` in one UNet call, the
combination above), so SEG is diffusers' PAG pipeline (:mod:`asyndm.methods.pag`) with our
:class:`SEGProcessor` installed through the pipeline's own ``set_pag_applied_layers(...,
pag_attn_processors=...)`` seam in place of the identity-attention processors. diffusers'
experimental ``SmoothedEnergyGuidance`` guider (modular SDXL / SD3 / Flux) is not used: issue
16 reports its blur branches swapped (an open fix); reading it in diffusers 0.42.1, the blur
hook goes on the prepared branch whose count is 3 (``is_conditional``: count 1 or 3, and
count > 1), which is ``pred_cond_seg`` with CFG on, but with CFG off ``pred_cond_seg`` is
the 2nd branch and is never blurred. ``scale = 0`` is the parent's CFG loop
exactly; one UNet call per step, 3 rows per image. SDXL: yes (the official code is SDXL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from ..adapters.attention import level_size
from .base import Call, Method, require_sd
from .common import blur_queries
from .pag import pag_pipeline, run_pag_pipeline

INF_BLUR = 9999.0
"""Their threshold above which the blur is infinite (the mean query)."""


class SEGProcessor:
    """Self-attention with the last ``1 / chunks`` of the batch's queries blurred.

    The other rows go through diffusers' default ``AttnProcessor2_0``, as in the PAG
    processors. ``latent_hw`` is the run's latent size (the query map's ``(h, w)`` follows
    from the layer's token count).
    """

    def __init__(self, chunks: int, sigma: float, latent_hw: tuple[int, int]) -> None:
        self.chunks, self.latent_hw = chunks, latent_hw
        self.sigma = math.inf if sigma > INF_BLUR else sigma
        self.plain = AttnProcessor2_0()

    def _map_hw(self, n_tokens: int) -> tuple[int, int]:
        for level in range(8):
            hw = level_size(self.latent_hw, level)
            if hw[0] * hw[1] == n_tokens:
                return hw
        raise ValueError(f"seg: cannot place {n_tokens} query tokens on the latent grid "
                         f"{self.latent_hw}")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        n = hidden_states.shape[0] // self.chunks
        main = self.plain(attn, hidden_states[:-n], None, attention_mask, temb)
        return torch.cat([main, self._blurred(attn, hidden_states[-n:], temb)])

    def _blurred(self, attn, x: torch.Tensor, temb) -> torch.Tensor:
        residual = x
        if attn.spatial_norm is not None:
            x = attn.spatial_norm(x, temb)
        four_d = x.ndim == 4
        if four_d:
            b, ch, hh, ww = x.shape
            x = x.view(b, ch, hh * ww).transpose(1, 2)  # (B, N, C)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        bsz, n_tok, _ = x.shape
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (B, N, H*d)
        heads = attn.heads
        d = q.shape[-1] // heads
        q = q.view(bsz, n_tok, heads, d).transpose(1, 2)  # (B, H, N, d)
        k = k.view(bsz, n_tok, heads, d).transpose(1, 2)
        v = v.view(bsz, n_tok, heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        h, w = self._map_hw(n_tok)
        qmap = q.permute(0, 1, 3, 2).reshape(bsz, heads * d, h, w)  # (B, H*d, h, w)
        qmap = blur_queries(qmap, self.sigma)
        q = qmap.reshape(bsz, heads, d, n_tok).permute(0, 1, 3, 2)  # (B, H, N, d)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(bsz, n_tok, heads * d).to(q.dtype)  # (B, N, H*d)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, ch, hh, ww)  # (B, C, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@dataclass(frozen=True)
class SEGParams:
    """``scale``: SEG scale ``s`` (0 = CFG); ``sigma``: query blur (``inf``: the mean);
    ``layers``: self-attention layers blurred (a PAG layer regex)."""

    scale: float = 3.0
    sigma: float = math.inf
    layers: str = "mid"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"seg: scale must be >= 0, got {self.scale}")
        if math.isnan(self.sigma) or self.sigma <= 0:
            raise ValueError(f"seg: sigma must be > 0 (inf: infinite blur), got {self.sigma}")
        if not self.layers.strip():
            raise ValueError("seg: layers must name at least one layer (e.g. mid)")


def run_seg(pipe, call: Call, params: SEGParams):
    require_sd(pipe, "seg")
    factor = pipe.vae_scale_factor
    size = pipe.unet.config.sample_size * factor
    latent_hw = ((call.height or size) // factor, (call.width or size) // factor)
    procs = (SEGProcessor(3, params.sigma, latent_hw), SEGProcessor(2, params.sigma, latent_hw))
    try:
        return run_pag_pipeline(pag_pipeline(pipe, params.layers, procs), call, params.scale)
    except ValueError as err:
        raise ValueError(f"seg: {err}") from None


METHOD = Method(name="seg", params=SEGParams, run=run_seg,
                summary="SEG: third branch with Gaussian-blurred self-attention queries")

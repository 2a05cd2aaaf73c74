"""S-CFG (Shen et al., "Rethinking the Spatial Inconsistency in Classifier-Free Diffusion
Guidance", CVPR 2024; official code github.com/SmilesDZgk/S-CFG, ``sd/sd.py``, ``sd/utils.py``).

Equation: CFG with a per-pixel scale, ``out = u + w * rate(x) * (c - u)``, where the rate
equalises the guidance strength of the prompt's semantic regions::

    S     = (A_self + 3 A_self @ A_self) / 4                # self-attention smoothing (*)
    M_l   = Smooth(S @ A_cross), normalised by its spatial mean, per token l
    region(x) = argmax_l M_l(x)                             # conditional rows, all 77 tokens
    fore(x)   = [start token not the max of (start, sum of the others)]  (unconditional rows)
    rate_l = mean_fore ||c - u|| / mean_{region l} ||c - u||     (|| . || over channels)
    rate(x) = Smooth(min(clamp(rate_region(x), rate_min, rate_max), max_scale / w))

``A_*`` are head-averaged probabilities of the layers at a quarter and an eighth of the
latent (their ``R = 4``: 16 x 16 and 8 x 8 for 64 x 64 latents; the 8 x 8 maps upsampled
bilinearly), averaged over layers; ``Smooth`` is their 3 x 3 ``GaussianSmoothing`` with
sigma 0.5 and reflect padding. (*) their code adds ``sa @ sa`` three times to ``sa`` and
divides by 4 (probably meant as powers of ``sa``); we keep their arithmetic. The foreground
mask is read from the first half of the batch (the unconditional rows) as in their code.
Defaults (theirs): ``rate_min = 0.8``, ``rate_max = 3.0``, ``max_scale = 15``.

How it runs here: the parent pipeline's own ``__call__`` with two seams: attention probes
(processors that delegate to the layer's own processor, so outputs are unchanged) on the
self- and cross-attention layers at those levels, and a forward hook on the UNet that, after
each call, replaces the conditional rows ``c`` by ``u + rate (c - u)``, so that the parent's
own CFG line yields ``u + w rate (c - u)``. ``rate_min = rate_max = 1`` is plain CFG exactly
(the hook leaves the output alone). One UNet call per step (2 rows per image), as CFG, plus
the probes' attention recomputation. Applied to the model's output whatever its prediction
type (as their code does for epsilon). SDXL: the seams are the same and it runs; the paper
evaluates SD 1.5 / 2.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..adapters.attention import choose_level, level_size
from .base import Call, Method, require_sd
from .common import ProbeStore, ae_kernel, attention_blocks, probes, smooth_maps
from .pag import parent_call


@dataclass(frozen=True)
class SCFGParams:
    """Rate clamps (``rate_min = rate_max = 1``: plain CFG) and the cap ``w * rate <=
    max_scale``."""

    rate_min: float = 0.8
    rate_max: float = 3.0
    max_scale: float = 15.0

    def __post_init__(self) -> None:
        for name in ("rate_min", "rate_max", "max_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"s_cfg: {name} must be > 0, got {value}")
        if self.rate_min > self.rate_max:
            raise ValueError(f"s_cfg: rate_min ({self.rate_min}) must be <= rate_max "
                             f"({self.rate_max})")


def semantic_masks(self_maps: list[list[torch.Tensor]], cross_maps: list[list[torch.Tensor]],
                   hw: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Region and foreground masks at the finest level given (their ``get_mask``).

    Args:
        self_maps, cross_maps: per level (finest first), per layer, ``(2B, N, N)`` /
            ``(2B, N, L)`` head-averaged probabilities of rows ``[uncond; cond]``.
        hw: per level, the maps' ``(h, w)``.
    Returns: ``(B, L, h0, w0)`` one-hot regions of the conditional rows and ``(B, 1, h0,
    w0)`` foreground of the unconditional rows.
    """
    kernel = ae_kernel(3, 0.5)
    total_ca, total_fore, count = 0.0, 0.0, 0
    for sa_list, ca_list, (h, w) in zip(self_maps, cross_maps, hw):
        sa = torch.stack(sa_list, 1).flatten(0, 1)  # (2B n, N, N)
        ca = torch.stack(ca_list, 1).flatten(0, 1)  # (2B n, N, L)
        n = len(sa_list)
        sa = (sa + 3 * (sa @ sa)) / 4
        ca = (sa @ ca).transpose(1, 2).reshape(ca.shape[0], ca.shape[2], h, w)  # (2Bn, L, h, w)
        if (h, w) != hw[0]:
            ca = F.interpolate(ca, size=hw[0], mode="bilinear")  # (2Bn, L, h0, w0)
        m, lt = ca.shape[0], ca.shape[1]
        ca = smooth_maps(ca.flatten(0, 1), kernel).reshape(m, lt, *hw[0])  # (2Bn, L, h0, w0)
        ca_norm = ca / (ca.mean((2, 3), keepdim=True) + 1e-8)
        total_ca = total_ca + ca_norm.unflatten(0, (-1, n)).sum(1)  # (2B, L, h0, w0)
        fore = torch.stack([ca[:, 0], ca[:, 1:].sum(1)], 1)  # (2Bn, 2, h0, w0)
        fore = fore / fore.mean((2, 3), keepdim=True)
        total_fore = total_fore + fore.unflatten(0, (-1, n)).sum(1)  # (2B, 2, h0, w0)
        count += n
    _, cond_ca = (total_ca / count).chunk(2)
    uncond_fore, _ = (total_fore / count).chunk(2)
    regions = (cond_ca == cond_ca.max(1, keepdim=True).values).float()  # (B, L, h0, w0)
    fore = 1.0 - (uncond_fore == uncond_fore.max(1, keepdim=True).values).float()[:, :1]
    return regions, fore


def guidance_rate(delta: torch.Tensor, regions: torch.Tensor, fore: torch.Tensor, w: float,
                  params: SCFGParams) -> torch.Tensor:
    """``(B, 1, h, w)`` S-CFG rate for ``delta = c - u`` ``(B, C, h, w)`` (module docstring)."""
    size = tuple(delta.shape[-2:])
    mask = F.interpolate(regions, size=size, mode="nearest")  # (B, L, h, w)
    mask_fore = F.interpolate(fore, size=size, mode="nearest")  # (B, 1, h, w)
    norm = delta.float().norm(dim=1, keepdim=True)  # (B, 1, h, w)
    down = (norm * mask).sum((2, 3)) / (mask.sum((2, 3)) + 1e-8)  # (B, L)
    up = (norm * mask_fore).sum((2, 3)) / (mask_fore.sum((2, 3)) + 1e-8)  # (B, 1)
    present = (mask.sum((2, 3)) > 0).float()
    rate = up * present / (down + 1e-8)  # (B, L)
    rate = (rate[..., None, None] * mask).sum(1, keepdim=True)  # (B, 1, h, w)
    rate = rate.clamp(params.rate_min, params.rate_max).clamp(max=params.max_scale / w)
    return smooth_maps(rate[:, 0], ae_kernel(3, 0.5))[:, None]  # (B, 1, h, w)


def _levels(unet, latent_hw: tuple[int, int]) -> list[int]:
    base = choose_level(unet, latent_hw)
    present = {lvl for lvl, _, _ in attention_blocks(unet).values()}
    return [lvl for lvl in (base, base + 1) if lvl in present]


def run_s_cfg(pipe, call: Call, params: SCFGParams):
    require_sd(pipe, "s_cfg")
    if call.guidance <= 1:
        raise ValueError(f"s_cfg reshapes classifier-free guidance: guidance must be > 1, "
                         f"got {call.guidance}")
    w = call.guidance
    kwargs = dict(num_inference_steps=call.steps, guidance_scale=w,
                  generator=call.generator_arg(), height=call.height, width=call.width,
                  negative_prompt=call.negative_arg(), num_images_per_prompt=call.num_images,
                  output_type=call.output_type, **call.eta_kwargs())
    if params.rate_min == params.rate_max and min(params.rate_min, params.max_scale / w) == 1:
        return parent_call(pipe)(pipe, [call.prompt], **kwargs).images  # a unit rate: CFG
    store = ProbeStore()
    state: dict = {}

    def before(module, args, kwargs_):
        store.clear()
        state["hw"] = tuple((args[0] if args else kwargs_["sample"]).shape[-2:])

    def after(module, args, kwargs_, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        uncond, text = sample.chunk(2)  # (B, C, h, w) each
        levels = _levels(module, state["hw"])
        hw = [level_size(state["hw"], lvl) for lvl in levels]
        regions, fore = semantic_masks([store.maps[(lvl, "self")] for lvl in levels],
                                       [store.maps[(lvl, "cross")] for lvl in levels], hw)
        rate = guidance_rate(text - uncond, regions, fore, w, params).to(text.dtype)
        new = torch.cat([uncond, uncond + rate * (text - uncond)])  # (2B, C, h, w)
        if isinstance(output, tuple):
            return (new, *output[1:])
        output.sample = new
        return output

    unet = pipe.unet
    h = call.height or unet.config.sample_size * pipe.vae_scale_factor
    wd = call.width or unet.config.sample_size * pipe.vae_scale_factor
    levels = set(_levels(unet, (h // pipe.vae_scale_factor, wd // pipe.vae_scale_factor)))
    handles = [unet.register_forward_pre_hook(before, with_kwargs=True),
               unet.register_forward_hook(after, with_kwargs=True)]
    try:
        with probes(unet, levels, store, self_attention=True):
            return parent_call(pipe)(pipe, [call.prompt], **kwargs).images
    finally:
        for handle in handles:
            handle.remove()


METHOD = Method(name="s_cfg", params=SCFGParams, run=run_s_cfg,
                summary="S-CFG: per-region guidance scales from self-smoothed cross-attention")

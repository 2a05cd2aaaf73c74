"""PAG (Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance",
ECCV 2024), through diffusers' own ``StableDiffusionPAGPipeline`` / ``StableDiffusionXLPAG
Pipeline`` and its PAG attention processors.

Equation (diffusers' ``PAGMixin``), with ``p`` the conditional branch whose self-attention
maps in the chosen layers are replaced by the identity (each query attends to itself)::

    out = u + w (c - u) + s (c - p)

Defaults (diffusers'): ``scale = 3.0`` (``pag_scale``), layers ``"mid"``
(``pag_applied_layers``, a regex over the UNet's self-attention layer names, e.g.
``"down.block_2"`` or ``"mid|up.block_0"``), no adaptive scale.

How it runs here: the PAG pipeline is built over the *same* components as ``pipe`` (no
weights copied) with a fresh copy of the scheduler (the PAG pipeline's ``__init__`` rewrites
its scheduler's config, e.g. ``clip_sample``, which the embedded model needs on), and called
with the run's generators: same initial and per-step noise as DM. ``scale = 0`` is the
parent's plain CFG loop exactly. Model calls: one per step, 3 rows per image with CFG.
SDXL: yes (``StableDiffusionXLPAGPipeline``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

from .base import Call, Method, require_sd


def parent_call(pipe):
    """The diffusers base class ``__call__`` of ``pipe`` (SD or SDXL), asyndm keywords aside."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline if isinstance(pipe, StableDiffusionXLPipeline) \
        else StableDiffusionPipeline
    return base.__call__


def pag_pipeline(pipe, layers: str, processors: tuple | None = None):
    """A diffusers PAG pipeline over ``pipe``'s components (module docstring)."""
    from diffusers import (StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline,
                           StableDiffusionXLPipeline)

    cls = StableDiffusionXLPAGPipeline if isinstance(pipe, StableDiffusionXLPipeline) \
        else StableDiffusionPAGPipeline
    accepted = inspect.signature(cls.__init__).parameters
    comps = {k: v for k, v in pipe.components.items() if k in accepted}
    # clip_sample off here only so that the PAG __init__ has nothing to warn about or rewrite
    comps["scheduler"] = type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                          clip_sample=False)
    extra = {}
    if "requires_safety_checker" in accepted:
        extra["requires_safety_checker"] = False
    if "force_zeros_for_empty_prompt" in accepted and "force_zeros_for_empty_prompt" in pipe.config:
        extra["force_zeros_for_empty_prompt"] = pipe.config.force_zeros_for_empty_prompt
    out = cls(**comps, **extra, pag_applied_layers=layers)
    # the run's own scheduler config, untouched by the PAG pipeline's __init__
    out.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    if processors is not None:
        out.set_pag_applied_layers(layers, pag_attn_processors=processors)
    out.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return out


def run_pag_pipeline(pag, call: Call, scale: float):
    return pag(prompt=[call.prompt], num_inference_steps=call.steps,
               guidance_scale=call.guidance, pag_scale=scale, pag_adaptive_scale=0.0,
               generator=call.generator_arg(), height=call.height, width=call.width,
               negative_prompt=call.negative_arg(), num_images_per_prompt=call.num_images,
               output_type=call.output_type, **call.eta_kwargs()).images


@dataclass(frozen=True)
class PAGParams:
    """``scale``: PAG scale ``s`` (0 = CFG); ``layers``: self-attention layers perturbed."""

    scale: float = 3.0
    layers: str = "mid"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"pag: scale must be >= 0, got {self.scale}")
        if not self.layers.strip():
            raise ValueError("pag: layers must name at least one layer (e.g. mid)")


def run_pag(pipe, call: Call, params: PAGParams):
    require_sd(pipe, "pag")
    try:
        return run_pag_pipeline(pag_pipeline(pipe, params.layers), call, params.scale)
    except ValueError as err:
        raise ValueError(f"pag: {err}") from None


METHOD = Method(name="pag", params=PAGParams, run=run_pag,
                summary="PAG: identity self-attention branch (diffusers' PAG pipeline)")

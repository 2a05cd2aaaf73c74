"""Z-Sampling (Bai et al., "Zigzag Diffusion Sampling: Diffusion Models Can Self-Improve via
Self-Reflection", ICLR 2025; official code github.com/xie-lab-ml/Zigzag-Diffusion-Sampling,
``utils/pipeline_stable_diffusion_xl.py``, ``z_sampling_call``).

Equation: at each of the first ``zigzag`` steps ``t_i -> t_{i+1}`` (``rounds`` times)::

    x_{i+1}  = DDIM(x_i, eps(x_i, t_i; gamma_1))              # zig: denoise, strong guidance
    x_i      = DDIM^-1(x_{i+1}, eps(x_{i+1}, t_i; gamma_2))   # zag: invert, weak guidance
    x_{i+1}  = DDIM(x_i, eps(x_i, t_i; gamma_1))              # the step itself

with ``eps(x, t; g) = eps_u + g (eps_c - eps_u)``; the guidance gap ``gamma_1 - gamma_2``
accumulates prompt semantics. Defaults (their ``infer.py``): ``gamma_1`` the run's
``--guidance`` (their 5.5 for SDXL), ``gamma_2 = 0`` (``inv_guidance``), ``zigzag =
steps - 1`` (their ``lambda_step = 49`` of 50; ``-1`` here means ``steps - 1``), ``rounds = 1``
(``T_max``). ``gamma_2 = 0`` is the unconditional branch alone (one row per image).

Inversion indexing (checked against DDIM inversion): DDIM inversion takes a sample at
``t_{i+1}`` back to ``t_i`` with the coefficients of the denoising step reversed,
``x_i = sqrt(ab(t_i)) x0 + sqrt(1 - ab(t_i)) eps`` where ``x0, eps`` come from the network
output read at ``ab(t_{i+1})``; diffusers' ``DDIMInverseScheduler.step(out, t, x)`` maps
``ab(t - T/N) -> ab(t)``, so the right call is ``step(out, t_i, x_{i+1})``. The official code
calls ``step(out, timesteps[i + 1], x_{i+1})``, i.e. ``ab(t_{i+1} - T/N) -> ab(t_{i+1})``:
one step too low, the inverted sample lands at ``t_{i+1}``'s noise level and is then
denoised as if it were at ``t_i``. We use the exact reverse (``ab(t_{i+1}) -> ab(t_i)``),
with the network evaluated at ``t_i`` as in their code and in diffusers' inversion loops.

Pairing: the zig and zag are deterministic (``eta = 0``); the step itself is the scheduler's
own step with the run's ``eta`` and generators, so each step adds DM's per-step noise.
``zigzag = 0`` is DM exactly. Model calls per zigzag step: 3 (zig, zag, step), else 1.
SDXL: yes (their code is SDXL-only): the same loop with SDXL's conditioning
(asyndm.methods.common).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Call, Method, require_ddim, require_sd
from .common import cfg, finish, prepare, to_eps, unet_out


@dataclass(frozen=True)
class ZSamplingParams:
    """``zigzag``: steps with a zigzag (``-1``: all but the last); ``inv_guidance``: gamma_2
    of the inversion; ``rounds``: zigzags per step (their ``T_max``)."""

    zigzag: int = -1
    inv_guidance: float = 0.0
    rounds: int = 1

    def __post_init__(self) -> None:
        if self.zigzag < -1:
            raise ValueError(f"z_sampling: zigzag must be >= 0 (or -1: all steps but the "
                             f"last), got {self.zigzag}")
        if not math.isfinite(self.inv_guidance) or self.inv_guidance < 0:
            raise ValueError(f"z_sampling: inv_guidance must be >= 0, got {self.inv_guidance}")
        if self.rounds < 1:
            raise ValueError(f"z_sampling: rounds must be >= 1, got {self.rounds}")


def ddim_invert(out: torch.Tensor, x: torch.Tensor, ab_from: torch.Tensor, ab_to: torch.Tensor,
                prediction_type: str, clip: float | None = None) -> torch.Tensor:
    """One deterministic DDIM inversion step ``ab_from -> ab_to`` (``ab_to < ab_from``).

    Args: ``out`` ``(B, C, h, w)`` network output for ``x``; ``ab_*`` 0-d alpha-bars; ``clip``:
    clamp ``x0`` to ``[-clip, clip]`` as the scheduler does (``None``: no clipping).
    """
    eps = to_eps(out, x, ab_from, prediction_type)
    x0 = (x - (1 - ab_from).sqrt() * eps) / ab_from.sqrt()
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return ab_to.sqrt() * x0 + (1 - ab_to).sqrt() * eps


def _guided(pipe, x, t, embeds, scale: float) -> torch.Tensor:
    if scale == 0:  # the unconditional branch alone
        return unet_out(pipe, x, t, embeds[: x.shape[0]])
    return cfg(pipe, x, t, embeds, scale)


@torch.no_grad()
def run_z_sampling(pipe, call: Call, params: ZSamplingParams):
    require_sd(pipe, "z_sampling")
    require_ddim(pipe, "z_sampling")
    sched = pipe.scheduler
    inp = prepare(pipe, call)
    steps = inp.timesteps
    zigzag = len(steps) - 1 if params.zigzag == -1 else params.zigzag
    if zigzag > len(steps) - 1:
        raise ValueError(f"z_sampling: zigzag must be <= steps - 1 = {len(steps) - 1} (the last "
                         f"step has no noisier step to invert to), got {zigzag}")
    clip = sched.config.clip_sample_range if sched.config.clip_sample else None
    pred = sched.config.prediction_type
    acp = sched.alphas_cumprod
    x = inp.latents
    with pipe.progress_bar(total=len(steps)) as bar:
        for i, t in enumerate(steps):
            if i < zigzag:
                ab_t = acp[int(t)].to(x.device, torch.float32)
                ab_next = acp[int(steps[i + 1])].to(x.device, torch.float32)
                for _ in range(params.rounds):
                    # zig: a deterministic step with the strong guidance
                    out = cfg(pipe, x, t, inp.embeds, call.guidance)
                    x_next = sched.step(out, t, x, eta=0.0, return_dict=False)[0]
                    # zag: back to t_i with the weak guidance
                    out = _guided(pipe, x_next, t, inp.embeds, params.inv_guidance)
                    x = ddim_invert(out, x_next, ab_next, ab_t, pred, clip).to(x.dtype)
            # the step itself, with DM's eta and per-step noise
            out = cfg(pipe, x, t, inp.embeds, call.guidance)
            x = sched.step(out, t, x, **inp.step_kwargs, return_dict=False)[0]
            bar.update()
    return finish(pipe, x, call, inp.embeds.dtype)


METHOD = Method(name="z_sampling", params=ZSamplingParams, run=run_z_sampling,
                summary="Z-Sampling: zigzag denoise / invert / denoise, guidance gap")

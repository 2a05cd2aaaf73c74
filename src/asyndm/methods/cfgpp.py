"""CFG++ (Chung et al., "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion
Models", ICLR 2025; official code github.com/CFGpp-diffusion/CFGpp, ``latent_diffusion.py``).

Equation (DDIM form, their Algorithm 1), with ``a_t = sqrt(alpha_bar_t)``,
``s_t = sqrt(1 - alpha_bar_t)``::

    eps_lam = eps_u + lam (eps_c - eps_u)                  # guidance with lam in [0, 1]
    x0      = (x_t - s_t eps_lam) / a_t                    # Tweedie with the guided eps
    x_prev  = a_prev x0 + s_prev eps_u                     # renoise with the UNCONDITIONAL eps

(CFG renoises with ``eps_lam`` and ``lam = w`` can exceed 1; CFG++ keeps ``lam`` in [0, 1].)
Defaults: ``lam = 0.6``, their text-to-image example for SD (``--cfg_guidance 0.6``).

How it runs here: a pure DDIM loop over the pipeline's components
(:mod:`asyndm.methods.common`). The step is handed to the pipeline's own
``DDIMScheduler.step`` with ``model_output = eps_u`` and the sample moved to
``x_t - s_t (eps_lam - eps_u)``: the scheduler then computes exactly ``x0`` above and renoises
with ``eps_u``, with its own clipping, ``eta`` and per-step noise (``eta > 0`` adds DM's noise
of the same seed; the paper's setting is ``eta = 0``). The shared ``--guidance`` is not used:
``lam`` replaces it.

Prediction types: CFG++ is written for epsilon-prediction. A v-prediction model (the
embedded model, SD 2.x 768) is handled exactly: both branches are converted to epsilon
(``eps = a_t v + s_t x_t``), the step above is formed in epsilon, and the scheduler gets the
pair ``(sample, v)`` that has the same ``x0`` and ``eps``: ``sample = a_t x0 + s_t eps_u``,
``v = a_t eps_u - s_t x0``. ``sample`` prediction raises ``ValueError``.

Degenerate case: ``lam = 0`` is unconditional DDIM (``eps_lam = eps_u``): its image equals
DM's image of the prompt ``""`` (whose guided output ``eps_u + w (eps_u - eps_u)`` is
``eps_u`` exactly), which the tests check bit for bit. Model calls: one batched
``[uncond; cond]`` call per step (2 rows per image), as CFG. SDXL: yes (their
``latent_sdxl.py``; here the same loop with SDXL's conditioning, asyndm.methods.common).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Call, Method, require_ddim, require_sd
from .common import finish, prepare, to_eps, unet_out


@dataclass(frozen=True)
class CFGppParams:
    """``lam``: the CFG++ guidance in [0, 1] (0 = unconditional, their example 0.6)."""

    lam: float = 0.6

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lam) and 0 <= self.lam <= 1):
            raise ValueError(f"cfgpp: lam must be in [0, 1], got {self.lam}")


def cfgpp_inputs(out_u: torch.Tensor, out_c: torch.Tensor, x: torch.Tensor,
                 alpha_bar: torch.Tensor, lam: float,
                 prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sample, model_output)`` that make a DDIM step the CFG++ step (module docstring).

    Args: ``out_u``, ``out_c``, ``x``: ``(B, C, h, w)`` unconditional / conditional network
    outputs and the sample; ``alpha_bar``: 0-d alpha-bar of the step's timestep.
    """
    eps_u = to_eps(out_u, x, alpha_bar, prediction_type)
    eps_c = to_eps(out_c, x, alpha_bar, prediction_type)
    eps_lam = eps_u + lam * (eps_c - eps_u)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    # written as a shift of x so that lam = 0 leaves x untouched (x - s * 0 == x)
    sample = x - s * (eps_lam - eps_u)
    if prediction_type == "epsilon":
        return sample, eps_u
    x0 = (x - s * eps_lam) / a
    return sample, a * eps_u - s * x0


@torch.no_grad()
def run_cfgpp(pipe, call: Call, params: CFGppParams):
    require_sd(pipe, "cfgpp")
    require_ddim(pipe, "cfgpp")
    sched = pipe.scheduler
    pred = sched.config.prediction_type
    if pred not in ("epsilon", "v_prediction"):
        raise ValueError(f"cfgpp needs an epsilon- or v-prediction model, got {pred!r}")
    inp = prepare(pipe, call)
    x = inp.latents
    with pipe.progress_bar(total=len(inp.timesteps)) as bar:
        for t in inp.timesteps:
            out_u, out_c = unet_out(pipe, torch.cat([x] * 2), t, inp.embeds).chunk(2)
            ab = sched.alphas_cumprod[int(t)].to(device=x.device, dtype=torch.float32)
            sample, model_out = cfgpp_inputs(out_u, out_c, x, ab, params.lam, pred)
            x = sched.step(model_out, t, sample, **inp.step_kwargs, return_dict=False)[0]
            bar.update()
    return finish(pipe, x, call, inp.embeds.dtype)


METHOD = Method(name="cfgpp", params=CFGppParams, run=run_cfgpp,
                summary="CFG++: guided x0, unconditional renoising (lam in [0, 1])")

"""Attend-and-Excite (Chefer et al., "Attend-and-Excite: Attention-Based Semantic Guidance for
Text-to-Image Diffusion Models", SIGGRAPH 2023; official code
github.com/yuval-alaluf/Attend-and-Excite, ``pipeline_attend_and_excite.py``, ``config.py``).

Equation: before the denoising step at ``t_i`` (for ``i < updates``) the latent moves down
the gradient of the subjects' weakest attention::

    A      = softmax(100 * mean_layers,heads CrossAttn(z_t, c)[:, :, 1:eot])  # text tokens
    L      = max_s (1 - max_pixels Smooth(A_s))                               # per image
    z_t   <- z_t - alpha_i * dL/dz_t,      alpha_i = scale_factor * sqrt(r_i)

with ``r_i`` linear from ``scale_start`` to ``scale_end`` over the steps, the gradient
through the UNet's conditional branch. At refinement steps the update repeats until every
subject's max attention reaches its threshold (at most ``max_refine`` times). Defaults
(their ``RunConfig``): ``updates`` = half the steps (25 of 50), ``scale_factor = 20``,
``scale_range = (1.0, 0.5)``, refinement at steps 0 / 10 / 20 of 50 with thresholds
0.05 / 0.5 / 0.8 (here at the same fractions 0 / 0.2 / 0.4 of the steps), smoothing 3x3
with sigma 0.5 (their ``GaussianSmoothing``, see :func:`asyndm.methods.common.ae_kernel`),
attention at 16 x 16 for 64 x 64 latents (here the repo's level rule: a quarter of the
latent, at least 8; :func:`asyndm.adapters.attention.choose_level`).

Choices: a subject phrase (``"red circle"``) is excited through its last token (the head
noun); the softmax runs over the prompt's own text tokens (start, end and padding
excluded: their SD 2.1 setting; for SD 1.4 they keep the padding). In a batch each image
has its own loss and refinement stops per image, so an image depends on its seed only.

How it runs here: a pure DDIM loop over the pipeline's components; the update steps add
UNet calls on the conditional rows (one forward and one backward each); the denoising step
is the parent's. ``updates = 0`` with ``refine = false`` is DM exactly. SDXL: yes (diffusers had
an SDXL variant in the community): the same loop with SDXL's conditioning, the subjects'
positions counted in the first tokenizer's tokens (both CLIP tokenizers split a prompt alike).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..adapters.attention import choose_level, level_size
from .base import Call, Method, check_positions, require_ddim, require_sd
from .common import ProbeStore, ae_kernel, cfg, finish, prepare, probes, smooth_maps, unet_out

REFINE_AT = ((0.0, 0.05), (0.2, 0.5), (0.4, 0.8))
"""(fraction of the steps, threshold): their refinement steps 0 / 10 / 20 of 50."""


@dataclass(frozen=True)
class AttendExciteParams:
    """See the module docstring; ``updates = -1`` is half the steps."""

    updates: int = -1
    scale_factor: float = 20.0
    scale_start: float = 1.0
    scale_end: float = 0.5
    refine: bool = True
    max_refine: int = 20
    smooth: bool = True
    sigma: float = 0.5

    def __post_init__(self) -> None:
        if self.updates < -1:
            raise ValueError(f"attend_excite: updates must be >= 0 (or -1: half the steps), "
                             f"got {self.updates}")
        for name in ("scale_factor", "scale_start", "scale_end", "sigma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"attend_excite: {name} must be >= 0, got {value}")
        if self.sigma == 0 and self.smooth:
            raise ValueError("attend_excite: sigma must be > 0 when smooth is on")
        if self.max_refine < 0:
            raise ValueError(f"attend_excite: max_refine must be >= 0, got {self.max_refine}")


def excite_loss(attention: torch.Tensor, tokens: list[int], eot: int, hw: tuple[int, int],
                kernel: torch.Tensor | None) -> torch.Tensor:
    """Per-image loss ``max_s (1 - max A_s)`` (module docstring).

    Args:
        attention: ``(B, N, L)`` cross-attention probabilities, ``N = h w``.
        tokens: the excited token positions (in the prompt's token sequence).
        eot: position of the end token (the text tokens are ``1 .. eot - 1``).
        kernel: smoothing kernel, or ``None``.
    Returns: ``(B,)``.
    """
    bsz = attention.shape[0]
    text = (attention[:, :, 1:eot] * 100).softmax(-1)  # (B, N, eot - 1)
    maxima = []
    for p in tokens:
        m = text[:, :, p - 1].reshape(bsz, *hw)  # (B, h, w)
        if kernel is not None:
            m = smooth_maps(m, kernel)
        maxima.append(m.flatten(1).max(1).values)  # (B,)
    return (1 - torch.stack(maxima, 1)).clamp(min=0).max(1).values  # (B,)


class _Exciter:
    def __init__(self, pipe, embeds: torch.Tensor, tokens: list[int], eot: int, level: int,
                 hw: tuple[int, int], kernel: torch.Tensor | None) -> None:
        self.pipe, self.embeds, self.tokens, self.eot = pipe, embeds, tokens, eot
        self.level, self.hw, self.kernel = level, hw, kernel
        self.store = ProbeStore()

    def loss(self, x: torch.Tensor, t) -> torch.Tensor:
        """``(B,)`` loss of ``x`` (which requires grad) through the conditional UNet call."""
        self.store.clear()
        unet_out(self.pipe, x, t, self.embeds)
        maps = self.store.maps[(self.level, "cross")]
        attention = torch.stack(maps).mean(0)  # (B, N, L) mean over layers
        return excite_loss(attention, self.tokens, self.eot, self.hw, self.kernel)

    @staticmethod
    def update(x: torch.Tensor, loss: torch.Tensor, alpha: float,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        picked = loss if rows is None else loss * rows
        grad = torch.autograd.grad(picked.sum(), [x])[0]
        return (x - alpha * grad).detach().requires_grad_(True)


def run_attend_excite(pipe, call: Call, params: AttendExciteParams):
    require_sd(pipe, "attend_excite")
    require_ddim(pipe, "attend_excite")
    check_positions("attend_excite", call.subject_positions)
    with torch.no_grad():
        inp = prepare(pipe, call)
    steps = inp.timesteps
    n = len(steps)
    updates = round(n / 2) if params.updates == -1 else params.updates
    refine = {round(f * n): thr for f, thr in REFINE_AT} if params.refine else {}
    ratios = np.linspace(params.scale_start, params.scale_end, n)
    x = inp.latents
    latent_hw = tuple(x.shape[-2:])
    level = choose_level(pipe.unet, latent_hw)
    eot = len(pipe.tokenizer(call.prompt, truncation=True,
                             max_length=pipe.tokenizer.model_max_length).input_ids) - 1
    tokens = [pos[-1] for pos in call.subject_positions]
    bad = [p for p in tokens if not 0 < p < eot]
    if bad:
        raise ValueError(f"attend_excite: subject token position(s) {bad} are not text tokens "
                         f"of the prompt (1..{eot - 1})")
    kernel = ae_kernel(3, params.sigma) if params.smooth else None
    ex = _Exciter(pipe, inp.embeds[call.num_images:], tokens, eot, level,
                  level_size(latent_hw, level), kernel)
    with pipe.progress_bar(total=n) as bar:
        for i, t in enumerate(steps):
            if i < updates or i in refine:
                alpha = params.scale_factor * math.sqrt(ratios[i])
                # probes only while updating: the denoising calls stay the parent's own
                with torch.enable_grad(), probes(pipe.unet, {level}, ex.store):
                    z = x.detach().requires_grad_(True)
                    loss = ex.loss(z, t)
                    if i in refine:
                        target, tries = 1 - refine[i], 0
                        while bool((loss > target).any()) and tries < params.max_refine:
                            z = ex.update(z, loss, alpha, (loss > target).to(loss.dtype))
                            loss = ex.loss(z, t)
                            tries += 1
                    if i < updates:
                        z = ex.update(z, loss, alpha)
                x = z.detach()
            with torch.no_grad():
                out = cfg(pipe, x, t, inp.embeds, call.guidance)
                x = pipe.scheduler.step(out, t, x, **inp.step_kwargs, return_dict=False)[0]
            bar.update()
    with torch.no_grad():
        return finish(pipe, x, call, inp.embeds.dtype)


METHOD = Method(name="attend_excite", params=AttendExciteParams, run=run_attend_excite,
                uses_subjects=True,
                summary="Attend-and-Excite: latent updates raising each subject's max attention")

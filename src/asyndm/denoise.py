"""The model as a callable: ``denoise(x, t) -> DenoiseOutput``.

:class:`UNetDenoiser` wraps a ``UNet2DConditionModel`` with classifier-free guidance, the
per-pixel time-embedding adapter (when ``t`` is a map) and attention capture (on the
conditional rows only). Samplers only ever see this callable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .adapters.attention import AttentionCapture


@dataclass(frozen=True)
class DenoiseOutput:
    model_output: torch.Tensor
    """``(B, C, h, w)`` guided network output (eps, v or x0)."""
    attention: torch.Tensor | None = None
    """``(B, P, hm, wm)`` subject-token attention of the conditional branch, if asked for."""


class Denoiser(Protocol):
    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, capture: bool = False
    ) -> DenoiseOutput: ...


def _uniform(t: torch.Tensor) -> torch.Tensor | None:
    """A 0-d timestep if every entry of ``t`` is equal, else ``None`` (one host sync)."""
    if t.ndim == 0:
        return t
    first = t.reshape(-1)[0]
    return first if bool((t == first).all()) else None


@dataclass
class UNetDenoiser:
    """Classifier-free guided UNet call.

    Attributes:
        unet: the UNet (with :class:`~asyndm.adapters.unet.PerPixelTimestep` installed when
            maps are passed).
        prompt_embeds: ``(2B, L, D)`` ``[negative; positive]`` with guidance, else ``(B, L, D)``.
        guidance_scale: CFG scale; guidance is on when ``> 1`` (as in diffusers).
        added_cond_kwargs: SDXL's ``text_embeds`` / ``time_ids``, already batched like embeds.
        capture: attention capture installed on the UNet, or ``None``.
        token_positions: ``(B, P)`` subject token columns to capture.
        guidance_rescale: diffusers' ``guidance_rescale`` (0 = off).
    """

    unet: nn.Module
    prompt_embeds: torch.Tensor
    guidance_scale: float = 1.0
    added_cond_kwargs: dict | None = None
    capture: AttentionCapture | None = None
    token_positions: torch.Tensor | None = None
    guidance_rescale: float = 0.0

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, capture: bool = False) -> DenoiseOutput:
        """Args: ``x`` ``(B, C, h, w)``; ``t`` a 0-d timestep or a ``(B, h, w)`` int map."""
        bsz = x.shape[0]
        uniform = _uniform(t)
        t_in = uniform if uniform is not None else t
        x_in = torch.cat([x, x]) if self.do_cfg else x  # (2B, C, h, w) with guidance
        if t_in.ndim > 0 and self.do_cfg:
            t_in = torch.cat([t_in, t_in])  # (2B, h, w)
        net_dtype = self.unet.dtype
        if capture:
            if self.capture is None or self.token_positions is None:
                raise ValueError("capture requested but no AttentionCapture / positions set")
            rows = slice(bsz, 2 * bsz) if self.do_cfg else slice(None)
            self.capture.start(self.token_positions, rows)
        out = self.unet(
            x_in.to(net_dtype),
            t_in,
            encoder_hidden_states=self.prompt_embeds,
            added_cond_kwargs=self.added_cond_kwargs,
            return_dict=False,
        )[0]
        attention = self.capture.stop() if capture else None
        if self.do_cfg:
            uncond, text = out.chunk(2)
            out = uncond + self.guidance_scale * (text - uncond)
            if self.guidance_rescale > 0:
                out = _rescale(out, text, self.guidance_rescale)
        return DenoiseOutput(model_output=out, attention=attention)


def _rescale(cfg: torch.Tensor, text: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, sec. 3.4): match the text branch's std."""
    dims = list(range(1, cfg.ndim))
    std_text = text.std(dim=dims, keepdim=True)
    std_cfg = cfg.std(dim=dims, keepdim=True)
    rescaled = cfg * (std_text / std_cfg)
    return phi * rescaled + (1 - phi) * cfg

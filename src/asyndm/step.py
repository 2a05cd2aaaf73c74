"""The gather helper and the asynchronous DDIM step.

Notation (DDIM paper, eq. 12 and 16; every symbol may vary per pixel):

================  ==============================================================
symbol            meaning
================  ==============================================================
``a_t``           alpha-bar at the pixel's current timestep
``a_prev``        alpha-bar at the pixel's next timestep (final alpha-bar after the
                  last step)
``x0``            predicted clean sample
``eps``           predicted noise
``sigma``         ``eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)``
================  ==============================================================

With a uniform timestep map the arithmetic is, operation for operation, diffusers'
``DDIMScheduler.step``, so the two agree bit for bit in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def gather(table: torch.Tensor, t: torch.Tensor | int, ndim: int = 4) -> torch.Tensor:
    """Index a per-timestep table first, broadcast second.

    Args:
        table: ``(T,)`` values per integer timestep (e.g. ``alphas_cumprod``).
        t: a Python int, a 0-d tensor, a ``(B,)`` vector, a ``(B, h, w)`` map or a
            ``(B, 1, h, w)`` map of integer timesteps.
        ndim: rank of the tensor the result must broadcast against (4 for latents).

    Returns:
        ``table[t]`` reshaped to broadcast against a ``(B, C, h, w)`` tensor: ``()`` for a
        scalar, ``(B, 1, 1, 1)`` for a vector, ``(B, 1, h, w)`` for a map.
    """
    idx = torch.as_tensor(t, device=table.device).long()
    vals = table[idx]
    if vals.ndim == 0:
        return vals
    if vals.ndim == 1:
        return vals.reshape(-1, *([1] * (ndim - 1)))  # (B, 1, 1, 1)
    if vals.ndim == ndim - 1:
        return vals.unsqueeze(1)  # (B, h, w) -> (B, 1, h, w)
    if vals.ndim == ndim:
        return vals
    raise ValueError(f"cannot broadcast a timestep tensor of shape {tuple(idx.shape)}")


def alpha_bar(
    alphas_cumprod: torch.Tensor, t: torch.Tensor | int, final_alpha_cumprod: torch.Tensor | float
) -> torch.Tensor:
    """``alphas_cumprod[t]`` where ``t >= 0`` and ``final_alpha_cumprod`` where ``t < 0``."""
    idx = torch.as_tensor(t, device=alphas_cumprod.device).long()
    vals = gather(alphas_cumprod, idx.clamp(min=0))
    final = torch.as_tensor(final_alpha_cumprod, dtype=vals.dtype, device=vals.device)
    # the same broadcasting as vals: () for a scalar, (B, 1, 1, 1) or (B, 1, h, w) for maps
    is_final = (idx < 0).reshape(vals.shape)
    return torch.where(is_final, final, vals)


@dataclass(frozen=True)
class StepConfig:
    """The scheduler conventions an async DDIM step honours (read from a scheduler config)."""

    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} not supported; use {PREDICTION_TYPES}"
            )
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.clip_sample_range <= 0:
            raise ValueError("clip_sample_range must be > 0")

    @classmethod
    def from_scheduler(cls, scheduler, eta: float = 0.0) -> "StepConfig":
        cfg = scheduler.config
        if getattr(cfg, "thresholding", False):
            raise ValueError("dynamic thresholding schedulers are not supported by asyndm yet")
        return cls(
            prediction_type=cfg.prediction_type,
            clip_sample=bool(getattr(cfg, "clip_sample", False)),
            clip_sample_range=float(getattr(cfg, "clip_sample_range", 1.0)),
            eta=eta,
        )


@dataclass(frozen=True)
class StepOutput:
    prev_sample: torch.Tensor
    """``(B, C, h, w)`` the sample at each pixel's next timestep."""
    pred_original_sample: torch.Tensor
    """``(B, C, h, w)`` the predicted clean sample ``x0``."""


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    a_t: torch.Tensor,
    a_prev: torch.Tensor,
    cfg: StepConfig,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """One DDIM step where alpha-bars may differ per pixel.

    Args:
        model_output: ``(B, C, h, w)`` network output (eps, v or x0 per ``cfg``).
        sample: ``(B, C, h, w)`` current sample ``x_t``.
        a_t, a_prev: alpha-bars broadcastable to ``sample`` (from :func:`alpha_bar`), float32.
        cfg: prediction type, clipping and ``eta``.
        noise: ``(B, C, h, w)`` standard normal noise; required when ``cfg.eta > 0``.
    """
    # 1. betas
    b_t = 1 - a_t
    # 2. predicted x0 and eps for the model's parameterisation
    if cfg.prediction_type == "epsilon":
        x0 = (sample - b_t ** (0.5) * model_output) / a_t ** (0.5)
        eps = model_output
    elif cfg.prediction_type == "sample":
        x0 = model_output
        eps = (sample - a_t ** (0.5) * x0) / b_t ** (0.5)
    else:  # v_prediction
        x0 = (a_t**0.5) * sample - (b_t**0.5) * model_output
        eps = (a_t**0.5) * model_output + (b_t**0.5) * sample
    # 3. the scheduler's clipping convention
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    # 4. sigma(eta), eq. 16
    b_prev = 1 - a_prev
    variance = (b_prev / b_t) * (1 - a_t / a_prev)
    std = cfg.eta * variance ** (0.5)
    # 5. direction to x_t and the deterministic part, eq. 12
    direction = (1 - a_prev - std**2) ** (0.5) * eps
    prev = a_prev ** (0.5) * x0 + direction
    # 6. fresh noise, only if eta > 0 (as diffusers does)
    if cfg.eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs a noise tensor")
        prev = prev + std * noise
    return StepOutput(prev_sample=prev, pred_original_sample=x0)


# -- Euler (k-diffusion) family ------------------------------------------------------------
#
# Notation (Karras et al. 2022; diffusers' EulerDiscreteScheduler / EulerAncestral...):
# ``sigma = sqrt((1 - a_t) / a_t)`` per pixel, the sample is ``x = x0 + sigma eps`` and the
# network sees ``x / sqrt(sigma^2 + 1)``. ``sigma_next`` is ``0`` after the last step.


def sigma_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``(T,)`` sigma of every integer timestep, in the Euler schedulers' own arithmetic."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def euler_x0(model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor,
             prediction_type: str) -> torch.Tensor:
    """Predicted clean sample for an Euler step (``sample`` already in float32)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    if prediction_type in ("sample", "original_sample"):
        return model_output
    raise ValueError(f"prediction_type {prediction_type!r} is not supported by Euler steps")


def euler_step(
    model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor,
    sigma_next: torch.Tensor, prediction_type: str = "epsilon",
) -> StepOutput:
    """One Euler step where sigmas may differ per pixel (``s_churn = 0``).

    Args:
        model_output: ``(B, C, h, w)`` network output.
        sample: ``(B, C, h, w)`` current sample (upcast to float32 as the scheduler does).
        sigma, sigma_next: float32, broadcastable to ``sample`` (``(B, 1, h, w)`` maps).
    """
    # 1. the clean sample, 2. the ODE derivative, 3. the step, in float32
    x = sample.to(torch.float32)
    x0 = euler_x0(model_output, x, sigma, prediction_type)
    derivative = (x - x0) / sigma
    prev = x + derivative * (sigma_next - sigma)
    return StepOutput(prev_sample=prev.to(model_output.dtype), pred_original_sample=x0)


def euler_ancestral_step(
    model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor,
    sigma_next: torch.Tensor, noise: torch.Tensor, prediction_type: str = "epsilon",
) -> StepOutput:
    """One ancestral Euler step where sigmas may differ per pixel.

    The step goes down to ``sigma_down`` and adds ``sigma_up`` of fresh ``noise``, with
    ``sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2`` and
    ``sigma_down^2 = sigma_next^2 - sigma_up^2``.
    """
    x = sample.to(torch.float32)
    x0 = euler_x0(model_output, x, sigma, prediction_type)
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    derivative = (x - x0) / sigma
    prev = x + derivative * (sigma_down - sigma)
    prev = prev + noise * sigma_up
    return StepOutput(prev_sample=prev.to(model_output.dtype), pred_original_sample=x0)


# -- DDPM (ancestral) ------------------------------------------------------------------------


def ddpm_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    a_t: torch.Tensor,
    a_prev: torch.Tensor,
    cfg: StepConfig,
    noise: torch.Tensor | None,
    variance_type: str = "fixed_small",
) -> StepOutput:
    """One DDPM ancestral step where alpha-bars may differ per pixel (Ho et al. 2020, eq. 7).

    Args:
        model_output, sample: ``(B, C, h, w)``.
        a_t, a_prev: alpha-bars broadcastable to ``sample``; ``a_prev`` is ``1`` after the
            last step (DDPMScheduler's convention, not the final alpha-bar).
        cfg: prediction type and clipping (``eta`` is not used).
        noise: ``(B, C, h, w)`` standard normal noise, or ``None`` for no variance (as the
            scheduler does at ``t = 0``).
        variance_type: ``"fixed_small"`` (posterior variance) or ``"fixed_large"`` (beta).
    """
    # 1. alphas and betas of the transition
    b_t, b_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    # 2. predicted x0 and the scheduler's clipping
    if cfg.prediction_type == "epsilon":
        x0 = (sample - b_t ** (0.5) * model_output) / a_t ** (0.5)
    elif cfg.prediction_type == "sample":
        x0 = model_output
    else:  # v_prediction
        x0 = (a_t**0.5) * sample - (b_t**0.5) * model_output
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    # 3. the posterior mean, eq. 7
    x0_coeff = (a_prev ** (0.5) * cur_beta) / b_t
    sample_coeff = cur_alpha ** (0.5) * b_prev / b_t
    prev = x0_coeff * x0 + sample_coeff * sample
    # 4. the variance
    if noise is not None:
        if variance_type == "fixed_small":
            var = torch.clamp(b_prev / b_t * cur_beta, min=1e-20)
        elif variance_type == "fixed_large":
            var = cur_beta
        else:
            raise ValueError(f"variance_type {variance_type!r} is not supported per pixel; "
                             "use 'fixed_small' or 'fixed_large'")
        prev = prev + (var**0.5) * noise
    return StepOutput(prev_sample=prev, pred_original_sample=x0)

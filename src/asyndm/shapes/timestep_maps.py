"""Per-pixel timestep maps for training the shapes model on asynchronous noise levels.

Issue 12: a model trained only on one shared timestep per image sees AsynDM's lagging
regions out of its training distribution. With a :class:`MapMixture` each training image
draws a timestep *map* ``(16, 16)`` (one level per latent pixel) from three kinds:

| kind     | the map                                                                         |
|----------|---------------------------------------------------------------------------------|
| shared   | one ``t ~ U{0..T-1}`` everywhere (today's training)                              |
| asyndm   | a step ``i`` of a ``steps``-step DDIM run and ``k ~ U(k_range)``: background at  |
|          | the scheduler's timestep ``tau_i``, the scene's objects at the state AsynDM's     |
|          | quadratic curve gives a region of strength ``k`` at step ``i``                  |
|          | (:func:`region_trajectories`); object pixels taken at the attention's 8x8 grid,  |
|          | as the sampler's masks are (a cell lags if any of its pixels is an object's)     |
| smooth   | ``clamp(round(m + s z), 0, T-1)``: mean ``m ~ U(0, T-1)``, spread                |
|          | ``s ~ U(0, spread T)``, ``z`` a 4x4 standard normal field upsampled bilinearly   |
|          | and re-standardised per image (mean and spread controlled, as AsyncPatch's       |
|          | sampler does, instead of independent per-pixel levels)                           |

The loss is then per pixel at each pixel's own level (``noisy_and_velocity``). Everything
here is a pure function of explicit tensors and a ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from asyndm.schedules import SchedulePlan, advance

__all__ = ["KINDS", "MapMixture", "draw_maps", "noisy_and_velocity", "region_trajectories"]

KINDS = ("shared", "asyndm", "smooth")


@dataclass(frozen=True)
class MapMixture:
    """Probabilities of the three map kinds (normalised) and their parameters."""

    shared: float = 1.0
    asyndm: float = 0.0
    smooth: float = 0.0
    k_low: float = 0.1
    k_high: float = 0.7
    steps: int = 20
    spread: float = 0.25

    def __post_init__(self) -> None:
        weights = (self.shared, self.asyndm, self.smooth)
        if min(weights) < 0 or not sum(weights) > 0 or not all(map(math.isfinite, weights)):
            raise ValueError(f"map mixture weights must be >= 0 with a positive sum, got "
                             f"{weights}")
        if not 0 < self.k_low <= self.k_high < 1:
            raise ValueError(f"need 0 < k_low <= k_high < 1, got {self.k_low}, {self.k_high}")
        if self.steps < 2 or not 0 <= self.spread <= 1:
            raise ValueError(f"need steps >= 2 and spread in [0, 1], got {self.steps}, "
                             f"{self.spread}")

    @property
    def synchronous(self) -> bool:
        """Only shared timesteps: training is exactly today's (no maps are drawn)."""
        return self.asyndm == 0 and self.smooth == 0

    @classmethod
    def parse(cls, text: str, **kw) -> "MapMixture":
        """``"shared,asyndm,smooth"`` weights, e.g. ``"0.4,0.3,0.3"``."""
        parts = text.split(",")
        if len(parts) != 3:
            raise ValueError(f"a map mixture is three weights shared,asyndm,smooth; got {text!r}")
        try:
            shared, asyn, smooth = (float(x) for x in parts)
        except ValueError:
            raise ValueError(f"map mixture weights must be numbers, got {text!r}") from None
        return cls(shared, asyn, smooth, **kw)


def region_trajectories(scheduler, mixture: MapMixture, n_k: int = 13) -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
    """The background and region timesteps of every step for ``n_k`` strengths.

    Returns:
        ``ks`` ``(K,)`` float64, evenly spaced over ``[k_low, k_high]``, and ``table``
        ``(K, N, 2)`` int64: at step ``i`` (``N = mixture.steps``), the background pixel's
        timestep and the region pixel's, both as the sampler rounds them.
    """
    plan = SchedulePlan.from_scheduler(scheduler, mixture.steps, "quadratic")
    ks = torch.linspace(mixture.k_low, mixture.k_high, n_k, dtype=torch.float64)  # (K,)
    k_map = torch.stack([torch.zeros_like(ks), ks], dim=1)  # (K, 2): background, region
    state = torch.full_like(k_map, plan.initial)
    rows = []
    for i in range(plan.num_steps):
        state = advance(plan, state, i - 1, k_map)  # (K, 2) states at step i
        rows.append(state.round().clamp(0, plan.num_train_timesteps - 1).long())
    return ks, torch.stack(rows, dim=1)  # (K, N, 2)


def draw_maps(gen: torch.Generator, objects: torch.Tensor, mixture: MapMixture,
              table: torch.Tensor, num_train_timesteps: int = 1000) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """One timestep map per image.

    Args:
        gen: the step's generator (CPU); every draw comes from it, in a fixed order.
        objects: ``(B, h, w)`` bool object pixels at the latent resolution.
        mixture: the kinds' weights and parameters.
        table: ``(K, N, 2)`` from :func:`region_trajectories`.

    Returns:
        ``maps`` ``(B, h, w)`` int64 in ``[0, T-1]`` and ``kinds`` ``(B,)`` int64 indices
        into :data:`KINDS`.
    """
    b, h, w = objects.shape
    top = num_train_timesteps - 1
    weights = torch.tensor([mixture.shared, mixture.asyndm, mixture.smooth], dtype=torch.float64)
    kinds = torch.multinomial(weights, b, replacement=True, generator=gen)  # (B,)
    # shared: one level everywhere
    shared = torch.randint(0, num_train_timesteps, (b,), generator=gen)[:, None, None]
    shared = shared.expand(b, h, w)  # (B, h, w)
    # asyndm: objects lag on the curve; cells of the attention's 2x coarser grid
    k_idx = torch.randint(0, table.shape[0], (b,), generator=gen)
    step = torch.randint(0, table.shape[1], (b,), generator=gen)
    levels = table[k_idx, step]  # (B, 2): background, region
    coarse = F.max_pool2d(objects[:, None].float(), 2)  # (B, 1, h/2, w/2)
    lag = F.interpolate(coarse, size=(h, w), mode="nearest")[:, 0] > 0  # (B, h, w)
    asyn = torch.where(lag, levels[:, 1, None, None], levels[:, 0, None, None])  # (B, h, w)
    # smooth: controlled mean and spread
    mean = torch.rand(b, generator=gen, dtype=torch.float64) * top  # (B,)
    spread = torch.rand(b, generator=gen, dtype=torch.float64) * mixture.spread * top  # (B,)
    z = torch.randn(b, 1, 4, 4, generator=gen, dtype=torch.float64)
    z = F.interpolate(z, size=(h, w), mode="bilinear", align_corners=True)[:, 0]  # (B, h, w)
    z = (z - z.mean(dim=(1, 2), keepdim=True)) / z.std(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    smooth = (mean[:, None, None] + spread[:, None, None] * z).round().clamp(0, top).long()
    choice = kinds[:, None, None]  # (B, 1, 1)
    maps = torch.where(choice == 0, shared, torch.where(choice == 1, asyn, smooth))
    return maps.contiguous(), kinds


def noisy_and_velocity(z0: torch.Tensor, noise: torch.Tensor, t_map: torch.Tensor,
                       alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z_t`` and the v target per pixel, each pixel at its own level.

    Args:
        z0, noise: ``(B, C, h, w)``.
        t_map: ``(B, h, w)`` int64 timesteps.
        alphas_cumprod: ``(T,)`` of the scheduler.

    Returns:
        ``z_t = sqrt(a) z0 + sqrt(1 - a) eps`` and ``v = sqrt(a) eps - sqrt(1 - a) z0`` with
        ``a = alphas_cumprod[t_map]`` broadcast over channels, in ``z0``'s dtype.
    """
    a = alphas_cumprod.to(z0.device)[t_map][:, None].to(z0.dtype)  # (B, 1, h, w)
    sa, sb = a.sqrt(), (1 - a).sqrt()
    return sa * z0 + sb * noise, sa * noise - sb * z0

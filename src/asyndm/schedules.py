"""Per-pixel timestep curves and the plan that advances a timestep map.

AsynDM gives every latent pixel its own timestep *state* (a float; the network sees it
rounded). Background pixels follow the scheduler's own timesteps, so a run whose masks are
empty is plain sampling. Subject pixels follow a concave curve of strength ``k`` that lags
behind the background and still reaches the scheduler's last timestep at the last step.

Notation (as in the paper and the reference implementation):

==========  ======================================================================
symbol      meaning
==========  ======================================================================
``N``       number of sampling steps
``s``       current state of a pixel (float timestep)
``n``       steps left *after* this transition (``n = N - 1 - i`` when moving from the
            state of step ``i`` to the state of step ``i + 1``; ``n = N`` for the
            transition from the initial state to the state of step 0)
``target``  the scheduler's last timestep (``steps_offset`` for "leading" spacing)
``X, Y``    curve scales: ``X = N`` steps, ``Y = num_train_timesteps``
==========  ======================================================================

Every curve is *re-solved* at every step from the pixel's current state and the steps
left (the paper's Proposition 1): a curve of the family with the pixel's ``k`` is fitted
through ``(0, s)`` and ``(n, target)`` and evaluated one step ahead. A pixel that stays in
one region therefore traces one fixed curve, while a pixel that enters or leaves a region
mid-run continues on a shifted curve. The next state is clamped to ``[target, s]`` so that
no pixel ever goes up, whatever the mask switches.

State convention: states run from ``initial = num_train_timesteps + steps_offset`` (never
evaluated) through the ``N`` evaluated states to :data:`FINAL_STATE` (``0.0``) after the
last step, which the step function reads as "clean" (the scheduler's final alpha-bar).
"""

from __future__ import annotations

import copy
import functools

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

FINAL_STATE = 0.0
"""State of every pixel after the last step: read as the scheduler's final alpha-bar."""

CurveFn = Callable[[torch.Tensor, int, "torch.Tensor | float", float, float, float], torch.Tensor]


@functools.lru_cache(maxsize=64)
def _scalar_on(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d tensor of ``like``'s dtype and device, made once (an operator
    each step otherwise); the formulas only read it."""
    return _scalar_on(float(value), like.dtype, like.device)


def linear_next(s: torch.Tensor, n: int, target: float) -> torch.Tensor:
    """Linear re-solve: the straight line through ``(0, s)`` and ``(n, target)``, one step on.

    Written in the reference implementation's float32 operation order,
    ``s (1 - 1/n) + target / n`` with ``target`` a tensor of ``s``'s dtype, so that states
    halfway between two integers round as they do there.
    """
    return s * (1 - 1 / n) + _scalar(target, s) / n


# The curves below take ``k`` as a Python float (one region's strength: the arithmetic on
# scalars then happens in float64 and only the tensor operations in float32, in the
# reference implementation's order, so states round as they do there) or as a tensor
# broadcastable to ``s`` (per-pixel strengths; the same formulas, all in ``s``'s dtype).


def quadratic_next(
    s: torch.Tensor, n: int, k, target: float, x_scale: float, y_scale: float
) -> torch.Tensor:
    """The paper's main curve: a parabola of fixed curvature ``c = -k Y / X^2``.

    Through ``(0, s)`` and ``(n, target)`` with vertex at ``x0``:
    ``y(x) = c (x - x0)^2 + y0``; the next state is ``y(1)``. With the curvature fixed,
    a pixel that stays in its region follows one parabola for the whole run.
    """
    c = -k * (y_scale / (x_scale * x_scale))
    x0 = (c * n**2 - (_scalar(target, s) - s)) / (2 * c * n)
    y0 = s - c * x0**2
    return c * (1 - x0) ** 2 + y0


def piecewise_next(
    s: torch.Tensor, n: int, k, target: float, x_scale: float, y_scale: float
) -> torch.Tensor:
    """Two lines: a shallow slope ``-(1-k) Y/X``, then a steep ``-(1+k) Y/X`` into ``target``."""
    shallow = -(1 - k) * y_scale / x_scale
    steep = -(1 + k) * y_scale / x_scale
    steep_line = steep + (target - steep * n)  # the steep line one step on, a scalar or map
    if torch.is_tensor(steep_line):
        return (shallow + s).minimum(steep_line)
    return (shallow + s).clamp(max=steep_line)


def exponential_next(
    s: torch.Tensor, n: int, k, target: float, x_scale: float, y_scale: float
) -> torch.Tensor:
    """``y(x) = a e^{(x - x0)/X} + b x + c`` with ``a = -k Y/(e-1)``, ``b = -(1-k) Y/X``.

    The shift ``x0`` is solved so the curve passes through ``(0, s)`` and ``(n, target)``.
    """
    lam = 1 / x_scale
    a = -k * y_scale / (math.e - 1)
    b = -(1 - k) * y_scale / x_scale
    # e^{-lam x0}, from y(n) - y(0) = a e^{-lam x0} (e^{lam n} - 1) + b n = target - s
    shift = (s - target + b * n) / (a * (1 - math.e ** (lam * n)))
    return a * (math.e**lam - 1) * shift + b + s


CURVES: dict[str, CurveFn] = {
    "quadratic": quadratic_next,
    "piecewise": piecewise_next,
    "exponential": exponential_next,
}
"""Subject curves by name; the CLI uses the keys as its ``--curve`` choices."""


@dataclass(frozen=True)
class SchedulePlan:
    """Everything the per-pixel schedule needs, fixed for one run.

    Attributes:
        curve: key of :data:`CURVES` for subject pixels.
        timesteps: the scheduler's timesteps, ``(N,)`` descending: the background ladder.
        num_train_timesteps: ``T``; evaluated states must stay inside ``[0, T - 1]``.
        steps_offset: the scheduler's ``steps_offset``; the initial state is ``T + offset``.
    """

    curve: str
    timesteps: tuple[int, ...]
    num_train_timesteps: int = 1000
    steps_offset: int = 1

    def __post_init__(self) -> None:
        if self.curve not in CURVES:
            raise ValueError(f"unknown curve {self.curve!r}; choose one of {sorted(CURVES)}")
        if len(self.timesteps) < 1:
            raise ValueError("a plan needs at least one timestep")
        ts = self.timesteps
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"timesteps must be strictly descending, got {ts[:5]}...")
        if ts[0] > self.num_train_timesteps - 1 or ts[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}]")

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, curve: str) -> "SchedulePlan":
        """Build a plan from a diffusers scheduler (``set_timesteps`` is called on a copy)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        # a copy, not from_config: that would drop config keys a pipeline patched in
        # (listed in `_use_default_values`, such as SD's steps_offset=1)
        sched = copy.deepcopy(scheduler)
        sched.set_timesteps(num_steps)
        cfg = scheduler.config
        return cls(
            curve=curve,
            timesteps=tuple(int(t) for t in sched.timesteps.tolist()),
            num_train_timesteps=int(cfg.num_train_timesteps),
            steps_offset=int(getattr(cfg, "steps_offset", 0)),
        )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    integer_states = True
    """The model sees each state rounded to an integer timestep (DDIM's alpha-bar table)."""

    @property
    def uniform_ladder(self) -> bool:
        """Whether the initial state and the timesteps are evenly spaced (DDIM's "leading"
        spacing when ``N`` divides ``T``: then the linear re-solve walks the ladder itself)."""
        ladder = (self.initial, *self.timesteps)
        return len({a - b for a, b in zip(ladder, ladder[1:])}) <= 1

    @property
    def initial(self) -> float:
        """The never-evaluated state before step 0 (the reference's ``T + steps_offset``)."""
        return float(self.num_train_timesteps + self.steps_offset)

    @property
    def target(self) -> float:
        """The state every pixel holds at the last step: the scheduler's last timestep."""
        return float(self.timesteps[-1])

    def background_at(self, i: int) -> float:
        """The background ladder ``tau_i`` with ``tau_{-1} = initial``, ``tau_N = FINAL``."""
        if i < 0:
            return self.initial
        if i >= self.num_steps:
            return FINAL_STATE
        return float(self.timesteps[i])

    def region_first_state(self, k: float) -> float:
        """State at step 0 of a pixel that starts in a region of strength ``k``."""
        s = torch.tensor([self.initial], dtype=torch.float64)
        kk = torch.tensor([k], dtype=torch.float64)
        return float(advance(self, s, -1, kk)[0])

    def max_k(self) -> float:
        """Largest ``k`` in ``(0, 1)`` whose first state stays in the trained range."""
        limit = self.num_train_timesteps - 1
        if round(self.region_first_state(1e-6)) > limit:
            return 0.0
        lo, hi = 1e-6, 1.0 - 1e-9
        if round(self.region_first_state(hi)) <= limit:
            return hi
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if round(self.region_first_state(mid)) <= limit:
                lo = mid
            else:
                hi = mid
        return lo

    def validate_k(self, k: float) -> None:
        """Raise ``ValueError`` unless ``k`` is allowed for this curve and step count."""
        k_max = self.max_k()
        ok = 0.0 < k < 1.0 and math.isfinite(k) and k <= k_max
        if not ok:
            raise ValueError(
                f"k={k:g} is out of range for the {self.curve} curve at {self.num_steps} "
                f"steps: allowed 0 < k <= {math.floor(k_max * 1000) / 1000:.3f} (larger k "
                f"would start subject pixels above timestep {self.num_train_timesteps - 1})"
            )


def advance(
    plan: SchedulePlan,
    state: torch.Tensor,
    i: int,
    k_map: torch.Tensor,
    k_values: Sequence[float] | None = None,
) -> torch.Tensor:
    """Move a timestep-state map from step ``i`` to step ``i + 1``.

    Args:
        plan: the run's schedule plan.
        state: ``(B, h, w)`` (any shape) float states at step ``i``; for ``i = -1`` the
            initial state ``plan.initial`` everywhere.
        i: the step being left, in ``[-1, N - 1]``.
        k_map: same shape as ``state``: the curve strength of each pixel's region for this
            transition, ``0`` for background pixels.
        k_values: the distinct non-zero strengths ``k_map`` holds, as Python floats (each
            region's ``k``). Given, every region is evaluated with its scalar ``k`` in the
            reference implementation's operation order (states that fall halfway between
            two integers then round as they do there); ``None`` evaluates ``k_map`` itself.

    Returns:
        The states at step ``i + 1`` (``FINAL_STATE`` everywhere after the last step),
        same shape and dtype as ``state``, never above ``state``.
    """
    n_total = plan.num_steps
    if not -1 <= i < n_total:
        raise ValueError(f"step {i} outside [-1, {n_total - 1}]")
    if i == n_total - 1:
        return torch.full_like(state, FINAL_STATE)
    n = n_total - 1 - i  # steps left after this transition, >= 1
    target = plan.target
    # Background. On a uniform ladder read through rounding (DDIM's), every background pixel
    # takes the linear re-solve in the reference's float32 order: a pixel on the ladder stays
    # within round-off of it (so its rounded timestep is the scheduler's, and empty masks are
    # the scheduler's own run) and a subject that joined the background rounds as there.
    # Otherwise a pixel on the ladder moves to the next rung exactly, and a pixel off it
    # takes the linear re-solve (uniform ladder) or keeps its excess over the ladder,
    # decaying linearly to zero at the last step.
    tau_i, tau_next = plan.background_at(i), plan.background_at(i + 1)
    if plan.uniform_ladder:
        background = linear_next(state, n, target)
    else:
        background = tau_next + (state - tau_i) * ((n - 1) / n)
    if not (plan.uniform_ladder and plan.integer_states):
        background = torch.where(state == tau_i, torch.full_like(state, tau_next), background)
    is_region = k_map > 0
    if n == 1:  # every curve ends exactly on target; skip the round-off of evaluating it
        region = torch.full_like(state, target)
    elif k_values is not None:
        curve = CURVES[plan.curve]
        region = background
        for kv in k_values:
            value = curve(state, n, float(kv), target, float(n_total),
                          float(plan.num_train_timesteps))
            region = torch.where(k_map == kv, value, region)
    else:
        # background pixels get a harmless k so the curve stays finite, then are masked
        safe_k = torch.where(is_region, k_map, torch.full_like(k_map, 0.5)).to(state.dtype)
        region = CURVES[plan.curve](
            state, n, safe_k, target, float(n_total), float(plan.num_train_timesteps)
        )
    nxt = torch.where(is_region, region, background)
    # Never up, never below the last timestep before the last step.
    return nxt.clamp(min=target).minimum(state)


def state_trajectory(plan: SchedulePlan, k: float) -> dict[str, list[float]]:
    """States of one background pixel and one subject pixel over a whole run.

    Entry ``i`` is the state at which the model is evaluated at step ``i``; the last entry is
    the state after the last step (the convention of ``schedule_vectors.json``).
    """
    plan.validate_k(k)
    out: dict[str, list[float]] = {}
    for name, kk in (("background", 0.0), ("region", k)):
        s = torch.tensor([plan.initial], dtype=torch.float64)
        k_map = torch.tensor([kk], dtype=torch.float64)
        states = []
        for i in range(-1, plan.num_steps):
            s = advance(plan, s, i, k_map)
            states.append(float(s[0]))
        out[name] = states
    return out

"""Flow matching with per-token timesteps: the plan, the Euler step and the sampling loop.

SD3 / SD3.5 (and Flux) sample with rectified flow: ``x_sigma = (1 - sigma) x0 + sigma eps``,
the network predicts the velocity ``v = eps - x0`` and diffusers'
``FlowMatchEulerDiscreteScheduler`` takes Euler steps over its (shifted) ``sigmas``. AsynDM
gives every image token (a ``p x p`` latent patch) its own sigma.

Notation:

==============  ================================================================
symbol          meaning
==============  ================================================================
``N``           number of sampling steps
``T``           ``num_train_timesteps`` (1000); also the curves' ``Y`` scale
``sigma_i``     the scheduler's sigmas, ``i = 0 .. N`` (``sigma_N = 0``)
``t_i``         the scheduler's timesteps, what the network sees (``sigma_i * T``)
``u``           a token's timestep *state*; background tokens sit on ``u_i``
``u_i``         the state ladder ``T (N - i) / N``: linear in the step index
``v``           the network's velocity prediction
==============  ================================================================

State -> sigma (the design). The curves of :mod:`asyndm.schedules` were made for DDIM's ladder,
which is linear in the step index. The flow schedulers' sigmas are not (SD3's ``shift=3``
keeps sigma high for most steps), and running the curves on ``t_i`` itself would put subject
tokens *ahead* of the background (a concave curve below a more concave ladder). So the state
machinery runs on the linear ladder ``u_i`` (``X = N``, ``Y = T``, exactly the DDIM geometry),
and a state is read as a *fractional step index* ``j = N (1 - u / T)``: its sigma (and network
timestep) is the scheduler's own ``sigma_j`` (``t_j``), linearly interpolated between the two
neighbouring steps. Every shift (fixed ``shift``, resolution-dependent ``mu``, Karras, ...)
is therefore honoured as it is, a lag in ``u`` is a lag in sigma (the map is monotone), and a
state on the ladder reads the scheduler's float32 value bit for bit, so that a run whose
masks are empty is the scheduler's own run.

One difference from DDIM: sigma_0 is 1 (pure noise), so nothing can lag at step 0. Every token
starts at ``u_0 = T`` and the curves are re-solved from step 0 on (the transition ``-1 -> 0``
of :func:`asyndm.schedules.advance` is never taken); the last transition reaches ``u = 0``,
``sigma = 0``.
"""

from __future__ import annotations

import copy

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .denoise import DenoiseOutput, _uniform
from .masks import k_map_from_labels
from .sampler import (SampleResult, StepRecord, Subjects, check_sample_args, initial_regions,
                      regions_from_attention)
from .schedules import CURVES, FINAL_STATE, SchedulePlan, advance


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (so that float32 states compare equal to it)."""
    return float(torch.tensor(x, dtype=torch.float32))


@dataclass(frozen=True)
class FlowPlan(SchedulePlan):
    """A :class:`~asyndm.schedules.SchedulePlan` on the linear state ladder of a flow scheduler.

    Attributes (besides ``curve`` and ``num_train_timesteps``):
        timesteps: the state ladder ``u_i = T (N - i) / N``, ``(N,)`` float32 values.
        sigmas: the scheduler's ``(N + 1,)`` sigmas, ending with ``0``.
        model_timesteps: the scheduler's ``(N,)`` timesteps (what the network sees).
    """

    sigmas: tuple[float, ...] = ()
    model_timesteps: tuple[float, ...] = ()
    integer_states = False  # states are read through `lookup`, not rounded

    def __post_init__(self) -> None:
        if self.curve not in CURVES:
            raise ValueError(f"unknown curve {self.curve!r}; choose one of {sorted(CURVES)}")
        n = len(self.timesteps)
        if n < 1 or len(self.sigmas) != n + 1 or len(self.model_timesteps) != n:
            raise ValueError("a flow plan needs N states, N + 1 sigmas and N model timesteps")
        ts = self.timesteps
        if any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] > self.num_train_timesteps:
            raise ValueError(f"states must descend from at most {self.num_train_timesteps}")
        if any(b > a for a, b in zip(self.sigmas, self.sigmas[1:])) or self.sigmas[-1] < 0:
            raise ValueError("sigmas must be non-increasing and end at a value >= 0")

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor, timesteps: torch.Tensor, curve: str,
                    num_train_timesteps: int = 1000) -> "FlowPlan":
        """A plan from a flow scheduler's ``sigmas`` ``(N + 1,)`` and ``timesteps`` ``(N,)``."""
        n = int(timesteps.numel())
        if sigmas.numel() != n + 1:
            raise ValueError(f"{sigmas.numel()} sigmas for {n} timesteps; expected N + 1")
        return cls(
            curve=curve,
            timesteps=tuple(_f32(num_train_timesteps * (n - i) / n) for i in range(n)),
            num_train_timesteps=num_train_timesteps,
            steps_offset=0,
            sigmas=tuple(float(s) for s in sigmas.float().cpu()),
            model_timesteps=tuple(float(t) for t in timesteps.float().cpu()),
        )

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, curve: str,
                       mu: float | None = None) -> "FlowPlan":
        """Build a plan from a ``FlowMatchEulerDiscreteScheduler`` (set up on a copy).

        ``mu`` is the resolution-dependent shift for schedulers with ``use_dynamic_shifting``.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        # a copy, not from_config: that would drop config keys a pipeline patched in
        # (listed in `_use_default_values`, such as SD's steps_offset=1)
        sched = copy.deepcopy(scheduler)
        kwargs = {"mu": mu} if mu is not None else {}
        sched.set_timesteps(num_steps, **kwargs)
        return cls.from_sigmas(sched.sigmas, sched.timesteps, curve,
                               int(scheduler.config.num_train_timesteps))

    @property
    def initial(self) -> float:
        """The state of every token at step 0 (``u_0``): pure noise, evaluated, never lagging."""
        return float(self.timesteps[0])

    def max_k(self) -> float:
        """Any ``k`` in ``(0, 1)``: states never leave ``[u_{N-1}, u_0]`` (advance clamps)."""
        return 1.0 - 1e-9

    def validate_k(self, k: float) -> None:
        if not 0.0 < k < 1.0:
            raise ValueError(f"k={k:g} is out of range: allowed 0 < k < 1")

    def lookup(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sigma and the network timestep of each state (see the module docstring).

        Args:
            state: float32 states of any shape, in ``[0, u_0]`` (``0`` = after the last step).

        Returns:
            ``(sigma, timestep)``, float32, shaped like ``state``; exactly the scheduler's
            ``sigma_i`` and ``t_i`` (``0`` for the final state) on the ladder.
        """
        dev = state.device
        # ascending tables over the fractional step index, final state included
        xs = torch.tensor((FINAL_STATE, *reversed(self.timesteps)), dtype=torch.float64, device=dev)
        sig = torch.tensor(tuple(reversed(self.sigmas)), dtype=torch.float64, device=dev)
        tts = torch.tensor((0.0, *reversed(self.model_timesteps)), dtype=torch.float64, device=dev)
        x = state.double()
        hi = torch.searchsorted(xs, x, right=True).clamp(1, xs.numel() - 1)
        lo = hi - 1
        w = (x - xs[lo]) / (xs[hi] - xs[lo])
        on_hi = x == xs[hi]  # the top of the ladder: read it exactly too
        out = []
        for table in (sig, tts):
            val = table[lo] + w * (table[hi] - table[lo])
            out.append(torch.where(on_hi, table[hi], val).float())
        return out[0], out[1]


def upsample_tokens(token_map: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, h, w)`` per-token values -> ``(B, 1, h p, w p)``, broadcastable to the latents."""
    up = token_map.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)
    return up[:, None]  # (B, 1, H, W)


def flow_step(
    model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step where sigmas may differ per pixel: ``x' = x + (sigma' - sigma) v``.

    Args:
        model_output: ``(B, C, H, W)`` velocity ``v``.
        sample: ``(B, C, H, W)`` current sample.
        sigma, sigma_next: float32, ``()`` or ``(B, 1, H, W)`` (e.g. from :func:`upsample_tokens`).

    Returns:
        ``(prev_sample, pred_original_sample)``: the sample at the next sigmas, in the
        output's dtype, and ``x0 = x - sigma v``. With 0-d sigmas the arithmetic is,
        operation for operation, ``FlowMatchEulerDiscreteScheduler.step``.
    """
    # 1. the update in float32, as the scheduler does
    x = sample.to(torch.float32)
    prev = x + (sigma_next - sigma) * model_output
    # 2. the clean-sample prediction, for callbacks
    x0 = x - sigma * model_output
    return prev.to(model_output.dtype), x0


def _uniform_or_map(sigma: torch.Tensor, patch_size: int) -> torch.Tensor:
    """A 0-d sigma when all tokens share it (the scheduler's exact arithmetic, also in half
    precision), else the ``(B, 1, H, W)`` map."""
    uniform = _uniform(sigma)
    return uniform if uniform is not None else upsample_tokens(sigma, patch_size)


class FlowDenoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, capture: bool = False,
                 text_t: torch.Tensor | None = None) -> DenoiseOutput: ...


def sample_flow(
    denoise: FlowDenoiser,
    latents: torch.Tensor,
    plan: FlowPlan,
    patch_size: int,
    *,
    mode: str = "asyndm",
    subjects: Subjects | None = None,
    mask_threshold: float = 1.0,
    static_labels: torch.Tensor | None = None,
    capture_attention: bool = False,
    callback: Callable[[StepRecord], None] | None = None,
    progress: Callable[[int], object] | None = None,
) -> SampleResult:
    """Sample a flow-matching model with DM, DM_concave or AsynDM, per image token.

    The same loop as :func:`asyndm.sampler.sample` (regions, dynamic / static masks, records),
    on token maps ``(B, h, w)`` with ``h = H / patch_size``.

    Args:
        denoise: the guided model; takes ``t`` as a 0-d timestep or a ``(B, h, w)`` float
            map, ``text_t`` as the text tokens' 0-d timestep, and returns token-grid
            attention ``(B, P, h', w')`` when ``capture`` is set.
        latents: ``(B, C, H, W)`` initial noise.
        plan: from :meth:`FlowPlan.from_scheduler`.
        patch_size: the transformer's patch size ``p``.
        mode, subjects, mask_threshold, static_labels, capture_attention, callback, progress:
            as in :func:`asyndm.sampler.sample`; ``static_labels`` are ``(B, h, w)``.

    Records carry float32 token maps of network timesteps (``sigma * T``; ``0`` = clean).
    """
    check_sample_args(mode, subjects, capture_attention)
    bsz, _, big_h, big_w = latents.shape
    if big_h % patch_size or big_w % patch_size:
        raise ValueError(f"latent size {(big_h, big_w)} is not a multiple of {patch_size}")
    h, w = big_h // patch_size, big_w // patch_size
    device = latents.device
    x = latents
    n_steps = plan.num_steps
    dynamic = mode == "asyndm" and static_labels is None
    capture = capture_attention or dynamic
    sigmas = torch.tensor(plan.sigmas, dtype=torch.float32, device=device)
    # the network timesteps, then 0 for "clean" after the last step
    model_ts = torch.tensor((*plan.model_timesteps, 0.0), dtype=torch.float32, device=device)

    # 1. the regions of the first transition; every token starts at pure noise
    labels, k = initial_regions(mode, subjects, static_labels, bsz, (h, w), device)
    state = torch.full((bsz, h, w), plan.initial, dtype=torch.float32, device=device)
    k_map = k_map_from_labels(labels, k) if labels is not None else torch.zeros_like(state)

    attn_sum: torch.Tensor | None = None
    steps = range(n_steps) if progress is None else progress(n_steps)
    for i in steps:
        # 2. the next state of every token, from this transition's regions
        nxt = advance(plan, state, i, k_map)
        if mode == "dm":
            sigma, sigma_next = sigmas[i], sigmas[i + 1]  # 0-d, as the scheduler uses them
            t = model_ts[i]
            t_map = t.expand(bsz, h, w)
            t_next_map = model_ts[i + 1].expand(bsz, h, w)
            text_t = None
        else:
            sig_map, t_map = plan.lookup(state)  # (B, h, w) each
            sig_next_map, t_next_map = plan.lookup(nxt)
            sigma = _uniform_or_map(sig_map, patch_size)
            sigma_next = _uniform_or_map(sig_next_map, patch_size)
            t = t_map
            # text tokens follow the background ladder (dm_concave: its map is uniform)
            text_t = model_ts[i] if mode == "asyndm" else None
        # 3. the guided model, with the subject attention of this step when needed
        out = denoise(x, t, capture=capture, text_t=text_t)
        # 4. the per-token Euler update
        x, x0 = flow_step(out.model_output, x, sigma, sigma_next)
        if callback is not None:
            callback(StepRecord(i, n_steps, t_map, t_next_map, labels, x, x0))
        # 5. dynamic masks: this step's attention sets the regions of the next transition
        if out.attention is not None:
            subj_attn = subjects.subject_attention(out.attention)  # (B, S, hm, wm)
            attn_sum = subj_attn if attn_sum is None else attn_sum + subj_attn
            if dynamic:
                labels, k_map = regions_from_attention(subj_attn, k, mask_threshold, (h, w))
        state = nxt
    attention = attn_sum / n_steps if attn_sum is not None else None
    return SampleResult(latents=x, labels=labels, attention=attention)

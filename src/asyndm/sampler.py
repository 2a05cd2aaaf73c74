"""The sampling loop: plan + step + guidance + callback, as one pure function.

``sample`` runs DM (plain DDIM), DM_concave (every pixel on the concave curve) or AsynDM
(background on the scheduler's ladder, subject regions on the concave curve) from explicit
tensors. Nothing is hidden in objects: the state (latents, timestep-state map, labels) lives
in loop locals, and every step is reported through one typed :class:`StepRecord`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .denoise import Denoiser
from .masks import region_labels, resize_labels
from .schedules import SchedulePlan
from .state import (MASK_MODES, MODES, Subjects, after_step, begin, check_sample_args,
                    initial_regions, ladder_flags, next_timestep_map, regions_from_attention,
                    step_states)
from .step import StepConfig, alpha_bar, ddim_step

__all__ = ["MASK_MODES", "MODES", "SampleResult", "StepRecord", "Subjects", "check_sample_args",
           "initial_regions", "regions_from_attention", "sample", "static_labels_from_attention"]


@dataclass(frozen=True)
class StepRecord:
    """What one step did; passed to the callback and used for visualisations."""

    step: int
    num_steps: int
    timesteps: torch.Tensor
    """``(B, h, w)`` int64 timestep map the model was evaluated at."""
    next_timesteps: torch.Tensor
    """``(B, h, w)`` int64 map after this step (``-1`` = clean, after the last step)."""
    labels: torch.Tensor | None
    """``(B, h, w)`` region labels used for this transition (``-1`` background), if any."""
    latents: torch.Tensor
    """``(B, C, h, w)`` the sample after this step."""
    pred_original_sample: torch.Tensor
    """``(B, C, h, w)`` the predicted clean sample at this step."""


@dataclass(frozen=True)
class SampleResult:
    latents: torch.Tensor
    """``(B, C, h, w)`` the final sample."""
    labels: torch.Tensor | None
    """``(B, h, w)`` the region labels of the last transition (``None`` for ``dm``)."""
    attention: torch.Tensor | None
    """``(B, S, hm, wm)`` subject attention averaged over all steps, when it was captured."""


NoiseFn = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def sample(
    denoise: Denoiser,
    latents: torch.Tensor,
    plan: SchedulePlan,
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: torch.Tensor,
    step_cfg: StepConfig,
    *,
    mode: str = "asyndm",
    subjects: Subjects | None = None,
    mask_threshold: float = 1.0,
    static_labels: torch.Tensor | None = None,
    capture_attention: bool = False,
    noise_fn: NoiseFn | None = None,
    callback: Callable[[StepRecord], None] | None = None,
    progress: Callable[[int], object] | None = None,
) -> SampleResult:
    """Sample with DM, DM_concave or AsynDM.

    Args:
        denoise: the guided model callable.
        latents: ``(B, C, h, w)`` initial noise (already scaled by the scheduler's
            ``init_noise_sigma``).
        plan: the per-pixel schedule plan (its ``timesteps`` are the DM timesteps).
        alphas_cumprod: ``(T,)`` float32; ``final_alpha_cumprod``: 0-d, the clean alpha-bar.
        step_cfg: prediction type, clipping, eta.
        mode: one of :data:`MODES`.
        subjects: needed for ``dm_concave`` (its largest ``k``), ``asyndm`` and capture.
        mask_threshold: multiple of the spatial mean that claims a pixel (dynamic masks).
        static_labels: ``(B, h, w)`` fixed labels; ``None`` means dynamic masks.
        capture_attention: also capture attention in ``dm`` / ``dm_concave`` (static masks
            come from a DM run with capture), returned averaged over steps.
        noise_fn: draws ``(B, C, h, w)`` standard normal noise per step when ``eta > 0``
            (per-sample generators make an image depend on its seed only).
        callback: called with a :class:`StepRecord` after every step.
        progress: wraps the step range (e.g. a tqdm factory).
    """
    check_sample_args(mode, subjects, capture_attention)
    bsz, _, h, w = latents.shape
    device = latents.device
    alphas_cumprod = alphas_cumprod.to(device=device, dtype=torch.float32)
    final_alpha = torch.as_tensor(final_alpha_cumprod, dtype=torch.float32, device=device)
    x = latents
    n_steps = plan.num_steps
    dynamic = mode == "asyndm" and static_labels is None
    capture = capture_attention or dynamic

    # 1. the regions of the first transition and the state map of step 0
    st = begin(plan, mode, subjects, (bsz, h, w), device, static_labels)
    attn_sum: torch.Tensor | None = None
    steps = range(n_steps) if progress is None else progress(n_steps)
    for i in steps:
        # 2. the next state of every pixel, from this transition's regions
        nxt = step_states(plan, st)
        nxt_flags = ladder_flags(plan, i + 1, nxt)
        t_map, t_next_map = st.timestep_map(), next_timestep_map(plan, st, nxt, nxt_flags[2])
        # a grid on the ladder takes 0-d timesteps, as diffusers passes them
        t = t_map if st.lagging else torch.tensor(plan.timesteps[i], device=device)
        t_next = t_next_map if nxt_flags[0] else torch.tensor(
            plan.timesteps[i + 1] if i + 1 < n_steps else -1, device=device)
        # 3. the guided model, with the subject attention of this step when needed
        out = denoise(x, t, capture=capture)
        # 4. the asynchronous DDIM update, alpha-bar gathered per pixel
        noise = None
        if step_cfg.eta > 0:
            if noise_fn is None:
                raise ValueError("eta > 0 needs noise_fn")
            noise = noise_fn(tuple(out.model_output.shape), out.model_output.dtype, device)
        res = ddim_step(
            out.model_output, x,
            alpha_bar(alphas_cumprod, t, final_alpha),
            alpha_bar(alphas_cumprod, t_next, final_alpha),
            step_cfg, noise,
        )
        x = res.prev_sample
        if callback is not None:
            callback(StepRecord(i, n_steps, t_map, t_next_map, st.labels, x,
                                res.pred_original_sample))
        # 5. dynamic masks: this step's attention sets the regions of the next transition
        subj_attn = None
        if out.attention is not None:
            subj_attn = subjects.subject_attention(out.attention)  # (B, S, hm, wm)
            attn_sum = subj_attn if attn_sum is None else attn_sum + subj_attn
        st = after_step(plan, st, nxt, subj_attn if dynamic else None, mask_threshold,
                        nxt_flags)
    attention = attn_sum / n_steps if attn_sum is not None else None
    return SampleResult(latents=x, labels=st.labels, attention=attention)


def static_labels_from_attention(
    attention: torch.Tensor, subjects: Subjects, size: tuple[int, int], threshold: float = 1.0
) -> torch.Tensor:
    """Static masks: step-averaged ``(B, S, hm, wm)`` attention -> ``(B, h, w)`` labels."""
    return resize_labels(region_labels(attention, subjects.k.to(attention.device), threshold), size)

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
from .masks import initial_labels, k_map_from_labels, region_labels, resize_labels
from .schedules import SchedulePlan, advance
from .step import StepConfig, alpha_bar, ddim_step

MODES = ("dm", "dm_concave", "asyndm")
MASK_MODES = ("dynamic", "static")


@dataclass(frozen=True)
class Subjects:
    """Subject tokens and strengths of a batch (padded to the batch's largest count).

    Attributes:
        positions: ``(B, P)`` token columns to capture (padding repeats a valid column).
        weights: ``(B, S, P)`` averaging weights: subject ``s`` is the mean of its columns.
        k: ``(B, S)`` curve strength; ``0`` marks padding.
        first_position: ``(B, S)`` first token position of each subject.
    """

    positions: torch.Tensor
    weights: torch.Tensor
    k: torch.Tensor
    first_position: torch.Tensor

    def __post_init__(self) -> None:
        b, s, p = self.weights.shape
        if self.positions.shape != (b, p) or self.k.shape != (b, s):
            raise ValueError("Subjects tensors disagree on (B, S, P)")
        if self.first_position.shape != (b, s):
            raise ValueError("first_position must be (B, S)")
        if not bool((self.k.max(dim=1).values > 0).all()):
            raise ValueError("every sample needs at least one subject with k > 0")

    def subject_attention(self, token_attention: torch.Tensor) -> torch.Tensor:
        """``(B, P, hm, wm)`` token maps -> ``(B, S, hm, wm)`` subject maps."""
        w = self.weights.to(token_attention)
        return torch.einsum("bsp,bphw->bshw", w, token_attention)


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


def check_sample_args(mode: str, subjects: Subjects | None, capture_attention: bool) -> None:
    """The argument rules every sampling loop (DDIM or flow) shares."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "dm" and subjects is None:
        raise ValueError(f"mode {mode!r} needs subjects")
    if capture_attention and subjects is None:
        raise ValueError("capture_attention needs subjects")


def initial_regions(
    mode: str, subjects: Subjects | None, static_labels: torch.Tensor | None,
    bsz: int, hw: tuple[int, int], device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Labels ``(B, h, w)`` and strengths ``(B, S)`` of the first transition.

    ``asyndm``: the static labels, or every pixel in the last subject's region (dynamic);
    ``dm_concave``: every pixel in one region of the largest subject ``k``; ``dm``: none.
    """
    if mode == "asyndm":
        k = subjects.k.to(device)
        if static_labels is not None:
            return static_labels.to(device), k
        return initial_labels(subjects.first_position.to(device), k, hw), k
    if mode == "dm_concave":
        k = subjects.k.max(dim=1, keepdim=True).values.to(device)  # (B, 1)
        return torch.zeros(bsz, *hw, dtype=torch.long, device=device), k
    return None, None


def regions_from_attention(
    subj_attn: torch.Tensor, k: torch.Tensor, threshold: float, hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic masks: ``(B, S, hm, wm)`` attention -> labels ``(B, h, w)`` and the k map."""
    small = region_labels(subj_attn, k, threshold)  # (B, hm, wm)
    labels = resize_labels(small, hw)  # (B, h, w)
    return labels, k_map_from_labels(labels, k)


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

    # 1. the regions of the first transition and the initial state map
    labels, k = initial_regions(mode, subjects, static_labels, bsz, (h, w), device)
    state = torch.full((bsz, h, w), plan.initial, dtype=torch.float32, device=device)
    k_map = k_map_from_labels(labels, k) if labels is not None else torch.zeros_like(state)
    state = advance(plan, state, -1, k_map)

    attn_sum: torch.Tensor | None = None
    steps = range(n_steps) if progress is None else progress(n_steps)
    for i in steps:
        # 2. the next state of every pixel, from this transition's regions
        nxt = advance(plan, state, i, k_map)
        if mode == "dm":
            t = torch.tensor(plan.timesteps[i], device=device)  # 0-d, as diffusers passes it
            t_next = torch.tensor(plan.timesteps[i + 1] if i + 1 < n_steps else -1, device=device)
            t_map = t.expand(bsz, h, w)
            t_next_map = t_next.expand(bsz, h, w)
        else:
            t_map = state.round().long()  # (B, h, w)
            t_next_map = nxt.round().long() if i + 1 < n_steps else torch.full_like(t_map, -1)
            t, t_next = t_map, t_next_map
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
            callback(StepRecord(i, n_steps, t_map, t_next_map, labels, x, res.pred_original_sample))
        # 5. dynamic masks: this step's attention sets the regions of the next transition
        if out.attention is not None:
            subj_attn = subjects.subject_attention(out.attention)  # (B, S, hm, wm)
            attn_sum = subj_attn if attn_sum is None else attn_sum + subj_attn
            if dynamic:
                labels, k_map = regions_from_attention(subj_attn, k, mask_threshold, (h, w))
        state = nxt
    attention = attn_sum / n_steps if attn_sum is not None else None
    return SampleResult(latents=x, labels=labels, attention=attention)


def static_labels_from_attention(
    attention: torch.Tensor, subjects: Subjects, size: tuple[int, int], threshold: float = 1.0
) -> torch.Tensor:
    """Static masks: step-averaged ``(B, S, hm, wm)`` attention -> ``(B, h, w)`` labels."""
    return resize_labels(region_labels(attention, subjects.k.to(attention.device), threshold), size)

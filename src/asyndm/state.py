"""The per-pixel state of one AsynDM run and its transitions, as pure functions.

One run is a sequence of :class:`PixelState` values, one per step: the timestep *state* of
every latent pixel at that step, the regions (labels) of the transition out of it and the
strengths of those regions. :func:`begin` makes the first, :func:`step_states` the next
states of a transition and :func:`after_step` the state of the next step, with this
step's subject attention turned into the next regions when the masks are dynamic.

The pure loop :func:`asyndm.sampler.sample` and the diffusers-facing schedulers of
:mod:`asyndm.schedulers` both run on these functions, so there is one implementation of the
method whichever way it is driven.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import initial_labels, k_map_from_labels, region_labels, resize_labels
from .schedules import SchedulePlan, advance

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

    @property
    def batch_size(self) -> int:
        return int(self.k.shape[0])

    def subject_attention(self, token_attention: torch.Tensor) -> torch.Tensor:
        """``(B, P, hm, wm)`` token maps -> ``(B, S, hm, wm)`` subject maps."""
        w = self.weights.to(token_attention)
        return torch.einsum("bsp,bphw->bshw", w, token_attention)


@dataclass(frozen=True)
class PixelState:
    """Everything one step of a run needs, and nothing else.

    Attributes:
        step: the step about to be taken, ``0 .. N`` (``N``: the run is over).
        state: ``(B, h, w)`` float32 timestep states at ``step``.
        labels: ``(B, h, w)`` int64 regions of the transition out of ``step`` (``-1``
            background), ``None`` in ``dm``.
        k: ``(B, S)`` strength of each region (``dm_concave``: ``(B, 1)``), or ``None``.
        k_map: ``(B, h, w)`` float32 strength of every pixel's region, ``0`` on background.
        k_values: the distinct non-zero strengths, as Python floats.
        lagging: whether any pixel is off the background ladder at ``step`` (a host flag,
            read once per step, so that a run with no lag is the scheduler's own run).
        uniform: the one timestep of the whole map when all pixels share it (dm_concave,
            the first step of dynamic masks), else ``None``: the model then takes the
            plain scalar-timestep path.
    """

    step: int
    state: torch.Tensor
    labels: torch.Tensor | None
    k: torch.Tensor | None
    k_map: torch.Tensor
    k_values: tuple[float, ...]
    lagging: bool
    uniform: float | None = None
    rounded: torch.Tensor | None = None
    """``(B, h, w)`` int64 rounded states, when :func:`ladder_flags` made them already."""

    def timestep_map(self) -> torch.Tensor:
        """``(B, h, w)`` int64 timesteps the model is evaluated at (the rounded states)."""
        return self.rounded if self.rounded is not None else self.state.round().long()


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


def ladder_flags(plan: SchedulePlan, step: int, state: torch.Tensor
                 ) -> tuple[bool, float | None, torch.Tensor | None]:
    """``(lagging, uniform, rounded)`` of a state map at ``step`` (one host synchronisation).

    Both flags are read from the map the model is given (the rounded states where the model
    sees rounded states): ``lagging``, some pixel is off the ladder; ``uniform``, the
    timestep every pixel has when the map holds a single value, else ``None``; ``rounded``
    is that ``(B, h, w)`` int64 map (``None`` where states are not rounded).
    """
    if step >= plan.num_steps:
        return False, None, None
    t_map = state.round() if plan.integer_states else state  # what the model is given
    # from the extremes: no pixel is off the ladder iff both are on it, one value iff equal
    low, high = torch.stack(t_map.aminmax()).tolist()
    rounded = t_map.long() if plan.integer_states else None
    rung = plan.background_at(step)
    lagging = not (low == rung and high == rung)
    if low != high:
        return lagging, None, rounded
    return lagging, int(low) if plan.integer_states else low, rounded


def begin(
    plan: SchedulePlan,
    mode: str,
    subjects: Subjects | None,
    shape: tuple[int, int, int],
    device: torch.device,
    static_labels: torch.Tensor | None = None,
    entered: bool = False,
) -> PixelState:
    """The state at step 0.

    Args:
        plan: the run's plan (its timesteps are the ladder the run walks, e.g. the part of
            the scheduler's ladder an img2img run enters).
        mode, subjects, static_labels: as in :func:`asyndm.sampler.sample`.
        shape: ``(B, h, w)`` of the latent grid.
        entered: the samples were noised to the ladder's first rung (img2img, inpainting
            with ``strength < 1``): every pixel starts there, and regions lag from the
            first transition on. Otherwise the samples are pure noise and the transition
            from ``plan.initial`` to step 0 already lets regions lag.
    """
    check_sample_args(mode, subjects, False)
    bsz, h, w = shape
    labels, k = initial_regions(mode, subjects, static_labels, bsz, (h, w), device)
    state = torch.full(shape, plan.initial, dtype=torch.float32, device=device)
    if labels is None:
        k_map, k_values = torch.zeros_like(state), ()
    else:
        k_map = k_map_from_labels(labels, k)
        k_values = tuple(sorted({float(v) for v in k[k > 0].tolist()}))
    if entered:
        state = torch.full_like(state, plan.background_at(0))
    else:
        state = advance(plan, state, -1, k_map, k_values)
    return PixelState(0, state, labels, k, k_map, k_values, *ladder_flags(plan, 0, state))


def step_states(plan: SchedulePlan, st: PixelState) -> torch.Tensor:
    """``(B, h, w)`` states after the step ``st.step`` (``FINAL_STATE`` after the last)."""
    return advance(plan, st.state, st.step, st.k_map, st.k_values)


def next_timestep_map(plan: SchedulePlan, st: PixelState, nxt: torch.Tensor,
                      rounded: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, h, w)`` int64 timesteps after the step (``-1`` = clean, after the last step);
    ``rounded``: ``nxt`` rounded already (from :func:`ladder_flags`)."""
    if st.step + 1 >= plan.num_steps:
        return torch.full_like(nxt, -1, dtype=torch.long)
    return rounded if rounded is not None else nxt.round().long()


def after_step(
    plan: SchedulePlan,
    st: PixelState,
    nxt: torch.Tensor,
    subj_attn: torch.Tensor | None = None,
    threshold: float = 1.0,
    flags: tuple[bool, float | None, torch.Tensor | None] | None = None,
) -> PixelState:
    """The state of the next step.

    Args:
        plan: the run's plan.
        st: the state of the step just taken.
        nxt: its :func:`step_states`.
        subj_attn: ``(B, S, hm, wm)`` subject attention of this step's model call; given,
            it sets the regions of the next transition (dynamic masks).
        threshold: multiple of the spatial mean that claims a pixel.
        flags: :func:`ladder_flags` of ``nxt``, when the caller has read them already.
    """
    labels, k_map = st.labels, st.k_map
    if subj_attn is not None:
        labels, k_map = regions_from_attention(subj_attn, st.k, threshold,
                                               tuple(nxt.shape[-2:]))
    step = st.step + 1
    if flags is None:
        flags = ladder_flags(plan, step, nxt)
    return PixelState(step, nxt, labels, st.k, k_map, st.k_values, *flags)

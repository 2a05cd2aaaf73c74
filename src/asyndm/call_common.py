"""What every AsynDM pipeline call does the same way, whatever the backbone.

Argument checks (before any model work), subject resolution per prompt, generator state
snapshots (so a static-mask pre-run and the run itself share their noise), and the
collection of step records into the pipeline output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils import BaseOutput

from .sampler import MASK_MODES, MODES, StepRecord
from .schedules import CURVES, SchedulePlan
from .subjects import ResolvedSubject, resolve_subjects


@dataclass
class AsynDMPipelineOutput(BaseOutput):
    """Images plus, on request, the masks and timestep maps of the run."""

    images: list | np.ndarray | torch.Tensor
    mode: str
    masks: torch.Tensor | None = None
    """``(B, h, w)`` region labels of the last transition (``-1`` background)."""
    timestep_maps: torch.Tensor | None = None
    """``(N, B, h, w)`` int64 timestep map of every step."""
    label_maps: torch.Tensor | None = None
    """``(N, B, h, w)`` region labels used at every step (``asyndm`` only)."""



def check_call(mode: str, curve: str, mask_mode: str, mask_threshold: float,
               num_inference_steps: int, prompt) -> list[str]:
    """Validate the AsynDM arguments a user can get wrong; return the prompts as a list."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if curve not in CURVES:
        raise ValueError(f"curve must be one of {sorted(CURVES)}, got {curve!r}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    if not mask_threshold > 0:
        raise ValueError(f"mask_threshold must be > 0, got {mask_threshold}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    return prompts


def check_generators(generator, batch_size: int) -> None:
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"{len(generator)} generators for a batch of {batch_size} images")


def per_prompt(subjects: Sequence, n_prompts: int) -> list[list]:
    """One list per prompt when several prompts come with as many lists, else shared."""
    if n_prompts > 1 and len(subjects) == n_prompts and all(
        isinstance(s, (list, tuple)) for s in subjects
    ):
        return [list(s) for s in subjects]
    return [list(subjects)] * n_prompts


def resolve_all(tokenizer, prompts: list[str], subjects, k, mode: str,
                plan: SchedulePlan | None) -> list[list[ResolvedSubject]] | None:
    """Resolve every prompt's subjects and check each ``k`` against ``plan`` (if given)."""
    if subjects is None or len(subjects) == 0:
        if mode != "dm":
            raise ValueError(f"mode {mode!r} needs subjects (words of the prompt, e.g. 'cat')")
        return None
    resolved = [resolve_subjects(tokenizer, p, s, k)
                for p, s in zip(prompts, per_prompt(subjects, len(prompts)))]
    if plan is not None:
        for sub in (s for subs in resolved for s in subs):
            plan.validate_k(sub.k)
    return resolved


def generator_states(generator) -> list | None:
    """Snapshot the generators' states (``None`` passes through)."""
    if generator is None:
        return None
    gens = generator if isinstance(generator, list) else [generator]
    return [g.get_state() for g in gens]


def restore_generators(generator, states) -> None:
    if generator is None:
        return
    gens = generator if isinstance(generator, list) else [generator]
    for g, s in zip(gens, states):
        g.set_state(s)


class StepRecorder:
    """Forwards step records to a user callback and keeps them when maps are requested."""

    def __init__(self, keep: bool, callback: Callable[[StepRecord], None] | None) -> None:
        self.keep, self.callback, self.records = keep, callback, []

    def __call__(self, rec: StepRecord) -> None:
        if self.keep:
            self.records.append(rec)
        if self.callback is not None:
            self.callback(rec)

    def timestep_maps(self) -> torch.Tensor | None:
        """``(N, B, h, w)`` or ``None``."""
        return torch.stack([r.timesteps for r in self.records]) if self.records else None

    def label_maps(self) -> torch.Tensor | None:
        if not self.records or self.records[0].labels is None:
            return None
        return torch.stack([r.labels for r in self.records])

    def output(self, images, mode: str, masks: torch.Tensor | None) -> AsynDMPipelineOutput:
        """The pipeline output with the recorded maps (``None`` unless they were kept)."""
        return AsynDMPipelineOutput(images=images, mode=mode, masks=masks,
                                    timestep_maps=self.timestep_maps(),
                                    label_maps=self.label_maps())

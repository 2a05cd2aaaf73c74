"""The one interface every training-free competitor implements, and what they share.

A method is a :class:`Method`: a name, a frozen parameter dataclass (validated in its
``__post_init__``; its fields are the ``MODE:KEY=VALUE`` keys of ``asyndm bench``), whether it
reads subjects, and ``run(pipe, call, params) -> images``.
:class:`Call` holds what every method gets from one command line: prompt, steps, guidance,
eta, one CPU generator per image, size, and the subjects' token positions.

Pairing with DM: every method draws its initial latents through the pipeline's own
``prepare_latents`` and its per-step noise through the scheduler's own ``step`` with the
call's generators, in DM's order, and draws nothing else from them; so a method's image
of seed ``S`` starts from DM's noise of seed ``S`` and, step for step, adds DM's noise.

Cost: :func:`count_model_calls` counts the denoiser's forward calls and the rows (batch
entries) they evaluated, on any method, DM included.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

__all__ = ["Call", "Method", "ModelCalls", "count_model_calls", "parse_params",
           "params_dict", "require_ddim", "require_sd"]


@dataclass(frozen=True)
class Call:
    """One generation request, the same for every method.

    Attributes:
        prompt: the text prompt (one prompt; ``len(generators)`` images of it).
        generators: one CPU generator per image (image ``i``'s noise depends on it only).
        steps: scheduler steps; guidance: CFG scale (diffusers' ``guidance_scale``).
        eta: DDIM eta (``None``: the scheduler takes none).
        subject_positions: per subject, the prompt's token positions (``()`` if none given).
        output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``, as in diffusers.
    """

    prompt: str
    generators: tuple[torch.Generator, ...]
    steps: int = 50
    guidance: float = 7.5
    eta: float | None = 1.0
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    subject_positions: tuple[tuple[int, ...], ...] = ()
    output_type: str = "pil"

    def __post_init__(self) -> None:
        if not self.generators:
            raise ValueError("give at least one generator (one per image)")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")

    @property
    def num_images(self) -> int:
        return len(self.generators)

    def generator_arg(self) -> torch.Generator | list[torch.Generator]:
        """What diffusers' ``generator=`` gets: a list of one generator per image."""
        return list(self.generators)

    def eta_kwargs(self) -> dict[str, float]:
        return {} if self.eta is None else {"eta": self.eta}

    def negative_arg(self) -> list[str] | None:
        # a one-prompt list, so that diffusers sees prompt and negative prompt of one type
        return None if self.negative_prompt is None else [self.negative_prompt]


@dataclass(frozen=True)
class Method:
    """A registered competitor (see the module docstring)."""

    name: str
    params: type
    run: Callable[[Any, Call, Any], list[Image.Image] | torch.Tensor]
    uses_subjects: bool = False
    summary: str = ""

    def default_params(self):
        return self.params()


def _coerce(method: str, f: dataclasses.Field, text: str):
    kind = f.type if isinstance(f.type, type) else {"float": float, "int": int,
                                                      "str": str, "bool": bool}.get(f.type, str)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"expected true or false, got {text!r}")
            return text.lower() in ("true", "1")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError as err:
        raise ValueError(f"{method}: {f.name}={text!r}: {err}") from None
    return text


def parse_params(method: Method, items: dict[str, str]):
    """A method's parameter dataclass from ``KEY=VALUE`` strings (unknown keys refused)."""
    fields = {f.name: f for f in dataclasses.fields(method.params)}
    unknown = sorted(set(items) - set(fields))
    if unknown:
        raise ValueError(f"{method.name}: unknown key(s) {', '.join(unknown)}; its keys are "
                         f"{', '.join(fields) or 'none'}")
    return method.params(**{k: _coerce(method.name, fields[k], v) for k, v in items.items()})


def params_dict(params) -> dict[str, Any]:
    """JSON-ready parameters (infinite floats as the string ``"inf"``)."""
    out = {}
    for key, value in dataclasses.asdict(params).items():
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


@dataclass
class ModelCalls:
    """Forward calls of the denoiser and the rows they evaluated (``rows`` counts each
    batch entry once: with CFG one call of ``B`` images is ``2 B`` rows)."""

    calls: int = 0
    rows: int = 0
    per_call_rows: list[int] = field(default_factory=list)
    counted: bool = True
    """False when the pipeline exposed no ``unet`` / ``transformer`` to count."""

    def per_image(self, images: int) -> float:
        """Network evaluations per image: rows / images (batch-size independent)."""
        return self.rows / max(images, 1)


@contextmanager
def count_model_calls(pipe) -> Iterator[ModelCalls]:
    """Count ``pipe.unet``'s forward calls in the body (a removable forward-pre hook)."""
    counter = ModelCalls()
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if net is None:  # a wrapper object: nothing to count
        counter.counted = False
        yield counter
        return

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        counter.calls += 1
        counter.rows += int(sample.shape[0])
        counter.per_call_rows.append(int(sample.shape[0]))

    handle = net.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def require_sd(pipe, method: str) -> None:
    """Refuse a pipeline that is not Stable Diffusion 1.x / 2.x or SDXL (one line)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ValueError(f"{method} needs a Stable Diffusion (UNet) pipeline, got "
                         f"{type(pipe).__name__}")


def require_ddim(pipe, method: str) -> None:
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        raise ValueError(f"{method} is a DDIM sampler: the pipeline's scheduler must be a "
                         f"DDIMScheduler, got {type(pipe.scheduler).__name__}")


def check_positions(method: str, positions: Sequence[Sequence[int]]) -> None:
    if not positions:
        raise ValueError(f"{method} needs subjects (--subjects: words of the prompt)")

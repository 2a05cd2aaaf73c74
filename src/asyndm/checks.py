"""Checks of what a Python caller can get wrong, each answered by one clear ``ValueError``.

They run before any model work: :func:`asyndm.enable` checks its AsynDM options, the
pipeline subclasses check those and the parent-pipeline arguments whose mistakes would
otherwise surface as errors from deep inside torch (a string step count, an int as a
generator, latents of the wrong shape, ``clip_skip`` past the text encoder's layers).
Whatever the parent pipeline already checks itself (prompt types, generator list lengths,
image sizes) is left to it.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from .schedules import CURVES
from .state import MASK_MODES, MODES


def _real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_options(mode: str, curve: str, mask_mode: str, mask_threshold: float) -> None:
    """The AsynDM options."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if curve not in CURVES:
        raise ValueError(f"curve must be one of {sorted(CURVES)}, got {curve!r}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    if not (_real(mask_threshold) and mask_threshold > 0):
        raise ValueError(f"mask_threshold must be a finite number > 0, got {mask_threshold!r}")


def _check_spec(spec) -> None:
    if isinstance(spec, str) or _whole(spec):
        return
    if isinstance(spec, (list, tuple)) and spec and all(_whole(p) for p in spec):
        return
    raise ValueError(f"a subject is a word or phrase of the prompt ('cat') or token "
                     f"positions (an int or a list of ints), got {spec!r}")


def check_subjects(subjects, k) -> None:
    """``subjects``: one list of subjects, or one list per prompt; ``k``: a number or a list."""
    if subjects is not None:
        if isinstance(subjects, str):
            raise ValueError(f"subjects must be a list, e.g. [{subjects!r}], not the string "
                             f"{subjects!r} (it would be read letter by letter)")
        if not isinstance(subjects, (list, tuple)):
            raise ValueError(f"subjects must be a list of words or token positions, got "
                             f"{type(subjects).__name__}")
        for entry in subjects:
            # a list of words (or of position lists) is one prompt's subjects
            per_prompt = isinstance(entry, (list, tuple)) and not all(_whole(p) for p in entry)
            for spec in (entry if per_prompt else [entry]):
                _check_spec(spec)
    values = k if isinstance(k, (list, tuple)) else [k]
    if not values or not all(_real(v) for v in values):
        hint = "; use float(k)" if torch.is_tensor(k) else ""
        raise ValueError(f"k must be a number or a list of numbers (one per subject), got "
                         f"{k!r}{hint}")


def check_call_kwargs(pipe, kwargs: dict) -> None:
    """The parent-pipeline arguments a caller most often gets wrong (see module docstring)."""
    steps = kwargs.get("num_inference_steps", 1)
    custom = kwargs.get("timesteps") is not None or kwargs.get("sigmas") is not None
    if not (_whole(steps) and steps >= 1) and not (steps is None and custom):
        raise ValueError(f"num_inference_steps must be a whole number >= 1, got {steps!r}")
    per_prompt = kwargs.get("num_images_per_prompt", 1)
    if not (_whole(per_prompt) and per_prompt >= 1):
        raise ValueError(f"num_images_per_prompt must be a whole number >= 1, got "
                         f"{per_prompt!r}")
    guidance = kwargs.get("guidance_scale", 1.0)
    if not _real(guidance) or guidance < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance!r}")
    gen = kwargs.get("generator")
    gens = gen if isinstance(gen, list) else [gen]
    if gen is not None and not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError("generator must be a torch.Generator or a list of them, e.g. "
                         f"torch.Generator().manual_seed(0); got {gen!r}")
    clip_skip = kwargs.get("clip_skip")
    encoder = getattr(pipe, "text_encoder", None)
    if clip_skip is not None and encoder is not None:
        layers = int(encoder.config.num_hidden_layers)
        if not (_whole(clip_skip) and 0 <= clip_skip < layers):
            raise ValueError(f"clip_skip must be a whole number in [0, {layers - 1}] for this "
                             f"{layers}-layer text encoder, got {clip_skip!r}")
    latents = kwargs.get("latents")
    if latents is not None:
        _check_latents(pipe, latents, kwargs)


def _check_latents(pipe, latents, kwargs: dict) -> None:
    if not torch.is_tensor(latents):
        raise ValueError(f"latents must be a tensor, got {type(latents).__name__}")
    unet = getattr(pipe, "unet", None)
    if unet is None:  # SD3: the transformer's own checks
        if latents.ndim != 4:
            raise ValueError(f"latents must be (B, C, h, w), got shape {tuple(latents.shape)}")
        return
    factor = pipe.vae_scale_factor
    default = unet.config.sample_size * factor
    height, width = kwargs.get("height") or default, kwargs.get("width") or default
    # an inpainting UNet takes 9 channels, of which the latents are the first 4
    channels = 4 if unet.config.in_channels == 9 else unet.config.in_channels
    want = (channels, height // factor, width // factor)
    if latents.ndim != 4 or tuple(latents.shape[1:]) != want:
        raise ValueError(f"latents must be (B, {want[0]}, {want[1]}, {want[2]}) for "
                         f"{height}x{width} images, got {tuple(latents.shape)}")

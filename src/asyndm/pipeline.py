"""``AsynDMPipeline`` / ``AsynDMXLPipeline``: thin subclasses that call the parent's ``__call__``.

Each call resolves the AsynDM arguments, switches AsynDM on for this pipeline object
(:class:`asyndm.hooks.AsynDMHooks`: the per-pixel scheduler, the model hooks, subjects from
the prompt) and runs diffusers' own ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
``__call__``: every argument, default and feature of the parent (prompt embeddings,
``callback_on_step_end``, IP-Adapter, the safety checker, SDXL's VAE upcast, ...) is the
parent's. Without subjects (or with ``mode="dm"``) a call is the parent's call.

``mask_mode="static"`` runs the parent twice: a DM run of the same seed (generators are
restored) whose step-averaged attention gives the regions, then the AsynDM run.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from diffusers import (AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from transformers import (CLIPImageProcessor, CLIPTextModel, CLIPTokenizer,
                          CLIPVisionModelWithProjection)

from .checks import check_call_kwargs, check_options, check_subjects
from .hooks import AsynDMHooks
from .pixel_vae import PixelShuffleVAE
from .regions import regions_for_call
from .sampler import StepRecord, static_labels_from_attention
from .schedulers import AsynRun
from .subjects import SubjectSpec

__all__ = ["AsynDMPipeline", "AsynDMPipelineOutput", "AsynDMXLPipeline"]


@dataclass
class AsynDMPipelineOutput(StableDiffusionPipelineOutput):
    """The parent's output (``images``, then ``nsfw_content_detected``, as in
    ``StableDiffusionPipelineOutput``) plus the run's mode, masks and timestep maps."""

    mode: str = "dm"
    masks: torch.Tensor | None = None
    """``(B, h, w)`` region labels of the last transition (``-1`` background)."""
    timestep_maps: torch.Tensor | None = None
    """``(N, B, h, w)`` int64 timestep map of every step (``return_timestep_maps=True``)."""
    label_maps: torch.Tensor | None = None
    """``(N, B, h, w)`` region labels used at every step (``return_timestep_maps=True``)."""


def _generator_states(generator) -> list | None:
    gens = [] if generator is None else generator if isinstance(generator, list) else [generator]
    return [(g, g.get_state()) for g in gens]


def _restore(states) -> None:
    for g, state in states:
        g.set_state(state)


class _AsynDMCall:
    """The AsynDM arguments of ``__call__``, shared by the SD and SDXL subclasses."""

    def _asyndm_call(
        self,
        parent_call: Callable,
        args: tuple,
        kwargs: dict,
        subjects: Sequence[SubjectSpec] | Sequence[Sequence[SubjectSpec]] | None,
        k: float | Sequence[float],
        mode: str | None,
        curve: str,
        mask_mode: str,
        mask_threshold: float,
        mask_level: int | None,
        callback: Callable[[StepRecord], None] | None,
        return_timestep_maps: bool,
        region_mask=None,
    ):
        # 1. what a user can get wrong, before any model work
        if mode is None:
            mode = "asyndm" if subjects or region_mask is not None else "dm"
        check_options(mode, curve, mask_mode, mask_threshold)
        check_subjects(subjects, k)
        mode, regions = regions_for_call(region_mask, subjects, mode)
        check_call_kwargs(self, kwargs)
        if getattr(self, "vae", None) is None and kwargs.get("output_type", "pil") != "latent":
            raise ValueError("this pipeline has no VAE: pass output_type='latent' or set pipe.vae")
        if mode == "dm" and callback is None and not return_timestep_maps:
            out = parent_call(*args, **kwargs)  # nothing to observe: the parent, untouched
            if not kwargs.get("return_dict", True):
                return out
            return AsynDMPipelineOutput(
                images=out.images, mode=mode,
                nsfw_content_detected=getattr(out, "nsfw_content_detected", None))
        static = None
        # 2. static masks: a DM run of the same seed, attention averaged over its steps
        if mode == "asyndm" and mask_mode == "static" and regions is None:
            states = _generator_states(kwargs.get("generator"))
            pre = AsynRun(mode="dm", curve=curve, capture=True, keep_records=False)
            with AsynDMHooks(self, pre, subjects, k, mask_level):
                parent_call(*args, **{**kwargs, "output_type": "latent"})
            _restore(states)
            attention = pre.attention_sum / pre.plan.num_steps  # (B, S, hm, wm)
            static = static_labels_from_attention(attention, pre.subjects,
                                                  tuple(pre.pixels.state.shape[-2:]),
                                                  mask_threshold)
        # 3. the run itself, through the parent's own __call__
        run = AsynRun(mode=mode, curve=curve, mask_threshold=float(mask_threshold),
                      static_labels=static, region_mask=regions, callback=callback,
                      capture=mode == "asyndm" and static is None and regions is None,
                      keep_records=return_timestep_maps)
        with AsynDMHooks(self, run, subjects, k, mask_level):
            out = parent_call(*args, **kwargs)
        if not kwargs.get("return_dict", True):
            return out
        return AsynDMPipelineOutput(
            images=out.images, mode=mode, masks=run.masks, timestep_maps=run.timestep_maps(),
            label_maps=run.label_maps(),
            nsfw_content_detected=getattr(out, "nsfw_content_detected", None))


_CALL_DOC = """Generate images with DM, DM_concave or AsynDM, through the parent's ``__call__``.

        AsynDM arguments (keyword only; every other argument is the parent pipeline's):
            subjects: subject words / phrases of the prompt (``"cat"``, ``"red car"``,
                ``"cat#2"`` for a second occurrence) or raw token positions; one list for all
                prompts or one list per prompt.
            k: curve strength, one value or one per subject, in ``(0, max]`` (see
                :meth:`asyndm.schedules.SchedulePlan.validate_k`).
            mode: ``"dm"``, ``"dm_concave"`` or ``"asyndm"``; default ``"asyndm"`` when
                subjects are given, else ``"dm"`` (the parent's own sampling).
            curve: ``"quadratic"``, ``"piecewise"`` or ``"exponential"``.
            mask_mode: ``"dynamic"`` (previous step's attention) or ``"static"`` (a DM run).
            mask_threshold: multiple of the spatial mean that claims a pixel.
            mask_level: override of the attention level the masks are read at.
            callback: called with an :class:`asyndm.sampler.StepRecord` after every step.
            return_timestep_maps: also return ``(N, B, h, w)`` timestep and label maps.
            region_mask: a user's mask (path, PIL image or array, :mod:`asyndm.regions`)
                whose regions lag instead of the subjects' (repair with the same seed,
                editing with a new prompt); ``k`` is one value or one per region.

        The scheduler may be DDIM (the paper's sampler; ``eta=1.0`` is the paper's setting,
        ``0.0`` the parent's default), Euler or Euler-ancestral.
        """


def asyndm_call(parent: type, level_name: str = "mask_level") -> Callable:
    """A subclass's ``__call__``: the AsynDM keywords, then ``parent.__call__`` itself.

    Its signature is the parent's with the AsynDM keywords added (keyword only), so that
    ``inspect.signature`` -- which diffusers uses, e.g. to decide what to pass to a
    pipeline -- sees every argument the parent takes.
    """
    parent_call = parent.__call__

    @torch.no_grad()
    def __call__(self, *args, subjects=None, k=0.5, mode=None, curve="quadratic",
                 mask_mode="dynamic", mask_threshold=1.0, callback=None,
                 return_timestep_maps=False, region_mask=None, **kwargs):
        level = kwargs.pop(level_name, None)
        if level is not None and not isinstance(level, int):
            level = tuple(level)  # SD3: block indices
        return self._asyndm_call(partial(parent_call, self), args, kwargs, subjects, k, mode,
                                 curve, mask_mode, mask_threshold, level, callback,
                                 return_timestep_maps, region_mask)

    kw = inspect.Parameter.KEYWORD_ONLY
    ours = [inspect.Parameter(name, kw, default=default, annotation=annotation)
            for name, default, annotation in (
                ("subjects", None, "Sequence[SubjectSpec] | None"),
                ("k", 0.5, "float | Sequence[float]"), ("mode", None, "str | None"),
                ("curve", "quadratic", "str"), ("mask_mode", "dynamic", "str"),
                ("mask_threshold", 1.0, "float"),
                (level_name, None, "int | Sequence[int] | None"),
                ("callback", None, "Callable[[StepRecord], None] | None"),
                ("return_timestep_maps", False, "bool"), ("region_mask", None, "Any"))]
    params = list(inspect.signature(parent_call).parameters.values())
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    __call__.__signature__ = inspect.Signature([*rest, *ours, *var_kw])
    __call__.__doc__ = _CALL_DOC
    return __call__


class AsynDMPipeline(_AsynDMCall, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with asynchronous denoising.

    ``vae=None`` with a pixel-space UNet (``3 r^2`` channels, as the embedded model) uses a
    :class:`~asyndm.pixel_vae.PixelShuffleVAE` of factor ``r``.
    """

    def __init__(
        self,
        vae: AutoencoderKL | PixelShuffleVAE | None,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = False,
    ):
        # annotations as in the parent: diffusers matches components by them (from_pipe)
        if vae is None and unet is not None:
            c = unet.config.in_channels
            r = int(round(math.sqrt(c / 3)))
            if 3 * r * r == c and r > 1:
                vae = PixelShuffleVAE(r)
        # The parent turns a scheduler's clip_sample off (a fix for old SD checkpoints); a
        # pixel-space model is trained for x0 clipping to [-1, 1], so keep it there.
        keep_clip = (isinstance(vae, PixelShuffleVAE) and scheduler is not None
                     and bool(getattr(scheduler.config, "clip_sample", False)))
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker,
                         feature_extractor, image_encoder, requires_safety_checker)
        if keep_clip:
            self.scheduler.register_to_config(clip_sample=True)

    __call__ = asyndm_call(StableDiffusionPipeline)


class AsynDMXLPipeline(_AsynDMCall, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with asynchronous denoising (any of its schedulers that
    AsynDM has a per-pixel version of; Euler, its default, included)."""

    __call__ = asyndm_call(StableDiffusionXLPipeline)

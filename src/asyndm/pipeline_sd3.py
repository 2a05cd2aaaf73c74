"""``AsynDMSD3Pipeline``: DM, DM_concave or AsynDM on SD3 / SD3.5 (MMDiT, flow matching).

A subclass of diffusers' ``StableDiffusion3Pipeline`` (built with ``from_pretrained`` /
``from_pipe``; ``text_encoder_3=None, tokenizer_3=None`` drops T5 as in diffusers). Prompt
encoding, latents and the VAE are the parent's; the sampling loop is
:func:`asyndm.flow.sample_flow`, with per-token timesteps from
:class:`asyndm.adapters.sd3.PerTokenTimestep` and subject masks from
:class:`asyndm.adapters.sd3.JointAttentionCapture`. Subject words are found with the first
CLIP tokenizer, whose token ``p`` is text column ``p`` of the joint attention.

``dm`` is diffusers' own SD3 sampling (same seed, same image); maps, masks and timesteps are
per image token (a ``2 x 2`` latent patch), so ``masks`` and ``timestep_maps`` are
``(B, h, w)`` / ``(N, B, h, w)`` on the token grid, timesteps as float ``sigma * 1000``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from torch import nn

from .adapters.sd3 import JointAttentionCapture, PerTokenTimestep
from .denoise import DenoiseOutput, _uniform
from .flow import FlowPlan, sample_flow
from .call_common import (StepRecorder, check_call, check_generators, generator_states,
                          resolve_all, restore_generators)
from .sampler import StepRecord, static_labels_from_attention
from .subjects import SubjectSpec, batch_subjects


@dataclass
class TransformerDenoiser:
    """Classifier-free guided SD3 transformer call (the flow sampler's ``denoise``).

    Attributes:
        transformer: the transformer (with :class:`PerTokenTimestep` installed when maps
            are passed).
        prompt_embeds: ``(2B, L, D)`` ``[negative; positive]`` with guidance, else ``(B, L, D)``.
        pooled_embeds: ``(2B, Dp)`` or ``(B, Dp)``, batched like ``prompt_embeds``.
        guidance_scale: CFG scale; guidance is on when ``> 1`` (as in diffusers).
        capture: attention capture installed on the transformer, or ``None``.
        token_positions: ``(B, P)`` subject text columns to capture.
    """

    transformer: nn.Module
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    guidance_scale: float = 7.0
    capture: JointAttentionCapture | None = None
    token_positions: torch.Tensor | None = None

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, capture: bool = False,
                 text_t: torch.Tensor | None = None) -> DenoiseOutput:
        """Args: ``x`` ``(B, C, H, W)``; ``t`` a 0-d timestep or a ``(B, h, w)`` float map;
        ``text_t`` the text tokens' 0-d or ``(B,)`` timestep for a map (default: its minimum)."""
        bsz = x.shape[0]
        n_in = 2 * bsz if self.do_cfg else bsz
        x_in = torch.cat([x, x]) if self.do_cfg else x  # (2B, C, H, W) with guidance
        uniform = _uniform(t)
        if uniform is not None and text_t is not None and not bool((text_t == uniform).all()):
            uniform = None  # the text tokens are on another timestep: keep the map
        extra = {}
        if uniform is not None:
            t_in = uniform.expand(n_in)  # (2B,), as diffusers' pipeline passes it
        else:
            t_in = torch.cat([t, t]) if self.do_cfg else t  # (2B, h, w)
            if text_t is not None:
                tt = text_t.expand(bsz) if text_t.ndim == 0 else text_t  # (B,)
                extra["text_timestep"] = torch.cat([tt, tt]) if self.do_cfg else tt
        if capture:
            if self.capture is None or self.token_positions is None:
                raise ValueError("capture requested but no JointAttentionCapture / positions set")
            rows = slice(bsz, n_in) if self.do_cfg else slice(None)
            self.capture.start(self.token_positions, rows)
        out = self.transformer(
            hidden_states=x_in, timestep=t_in, encoder_hidden_states=self.prompt_embeds,
            pooled_projections=self.pooled_embeds, return_dict=False, **extra,
        )[0]
        attention = self.capture.stop() if capture else None
        if self.do_cfg:
            uncond, text = out.chunk(2)
            out = uncond + self.guidance_scale * (text - uncond)
        return DenoiseOutput(model_output=out, attention=attention)


class AsynDMSD3Pipeline(StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` with asynchronous denoising per image token."""

    def _plan(self, num_steps: int, curve: str, token_count: int) -> FlowPlan:
        """The run's plan, with the parent's resolution-dependent shift when configured."""
        cfg = self.scheduler.config
        mu = None
        if cfg.get("use_dynamic_shifting", False):
            mu = calculate_shift(token_count, cfg.get("base_image_seq_len", 256),
                                 cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                 cfg.get("max_shift", 1.16))
        return FlowPlan.from_scheduler(self.scheduler, num_steps, curve, mu=mu)

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        vae = self.vae
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image = vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        subjects: Sequence[SubjectSpec] | Sequence[Sequence[SubjectSpec]] | None = None,
        k: float | Sequence[float] = 0.5,
        mode: str = "asyndm",
        curve: str = "quadratic",
        mask_mode: str = "dynamic",
        mask_threshold: float = 1.0,
        mask_layers: Sequence[int] | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float = 7.0,
        generator=None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[StepRecord], None] | None = None,
        return_timestep_maps: bool = False,
        latents: torch.Tensor | None = None,
        max_sequence_length: int = 256,
    ):
        """Generate images with DM, DM_concave or AsynDM.

        Args:
            prompt: one prompt or a list.
            subjects: subject words / phrases of the prompt (``"cat"``, ``"red car"``,
                ``"cat#2"``) or raw CLIP token positions; one list for all prompts or one
                list per prompt.
            k: curve strength, one value or one per subject, in ``(0, 1)``.
            mode: ``"dm"``, ``"dm_concave"`` or ``"asyndm"``.
            curve: ``"quadratic"``, ``"piecewise"`` or ``"exponential"``.
            mask_mode: ``"dynamic"`` (previous step's attention) or ``"static"`` (a DM run).
            mask_threshold: multiple of the spatial mean that claims a token.
            mask_layers: transformer blocks the masks are read from (default: middle third).
            callback: called with an :class:`asyndm.sampler.StepRecord` after every step
                (token maps of float timesteps ``sigma * 1000``).
            return_timestep_maps: also return ``(N, B, h, w)`` timestep and label maps.
            Others as in ``StableDiffusion3Pipeline``.
        """
        # 1. validate what a user can get wrong, before any model work
        prompts = check_call(mode, curve, mask_mode, mask_threshold, num_inference_steps, prompt)
        if not isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"AsynDM on SD3 takes Euler flow steps; this pipeline has "
                             f"{type(self.scheduler).__name__}")
        patch = self.transformer.config.patch_size
        factor = self.vae_scale_factor
        height = height or self.default_sample_size * factor
        width = width or self.default_sample_size * factor
        if height % (factor * patch) or width % (factor * patch) or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {factor * patch}")
        token_hw = (height // factor // patch, width // factor // patch)
        plan = self._plan(num_inference_steps, curve, token_hw[0] * token_hw[1])
        bsz = len(prompts) * num_images_per_prompt
        check_generators(generator, bsz)
        resolved = resolve_all(self.tokenizer, prompts, subjects, k, mode, plan)
        device = self._execution_device

        # 2. text conditioning (the parent's encoders), [negative; positive] with guidance
        do_cfg = guidance_scale > 1.0
        embeds, neg_embeds, pooled, neg_pooled = self.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device,
            num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt, max_sequence_length=max_sequence_length,
        )
        if do_cfg:
            embeds, pooled = torch.cat([neg_embeds, embeds]), torch.cat([neg_pooled, pooled])
        subj = None
        if resolved is not None:
            subj = batch_subjects([s for s in resolved for _ in range(num_images_per_prompt)],
                                  device)
        states = generator_states(generator)

        def init_latents():
            return self.prepare_latents(bsz, self.transformer.config.in_channels, height, width,
                                        embeds.dtype, device, generator, latents)

        recorder = StepRecorder(return_timestep_maps, callback)

        with ExitStack() as stack:
            capture = None
            if subj is not None and mode == "asyndm":
                capture = stack.enter_context(JointAttentionCapture(
                    self.transformer, token_hw, tuple(mask_layers) if mask_layers else None))
            if mode != "dm":
                stack.enter_context(PerTokenTimestep(self.transformer))
            denoise = TransformerDenoiser(self.transformer, embeds, pooled, guidance_scale,
                                          capture, subj.positions if subj is not None else None)
            static = None
            # 3. static masks: a DM run of the same seed, attention averaged over its steps
            if mode == "asyndm" and mask_mode == "static":
                pre = sample_flow(denoise, init_latents(), plan, patch, mode="dm", subjects=subj,
                                  capture_attention=True, progress=self._progress)
                static = static_labels_from_attention(pre.attention, subj, token_hw,
                                                      mask_threshold)
                restore_generators(generator, states)
            # 4. the run itself
            result = sample_flow(denoise, init_latents(), plan, patch, mode=mode, subjects=subj,
                                 mask_threshold=mask_threshold, static_labels=static,
                                 callback=recorder, progress=self._progress)

        # 5. decode and post-process (the parent's VAE and image processor)
        images = self._decode(result.latents, output_type)
        self.maybe_free_model_hooks()
        out = recorder.output(images, mode, result.labels)
        return out if return_dict else (out.images,)

    def _progress(self, n: int):
        return self.progress_bar(range(n))

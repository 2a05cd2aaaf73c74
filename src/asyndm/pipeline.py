"""diffusers pipeline subclasses that sample with DM, DM_concave or AsynDM.

``AsynDMPipeline`` extends ``StableDiffusionPipeline`` (SD 1.x / 2.x, and the embedded
pixel-space model, which has no VAE) and ``AsynDMXLPipeline`` extends
``StableDiffusionXLPipeline``. Both are built the diffusers way (``from_pretrained``,
``from_pipe``) and add the AsynDM arguments to ``__call__``; prompt encoding, latents,
decoding and post-processing are the parent pipeline's own methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from transformers import (CLIPImageProcessor, CLIPTextModel, CLIPTokenizer,
                          CLIPVisionModelWithProjection)

from .adapters.attention import AttentionCapture
from .adapters.unet import PerPixelTimestep
from .call_common import (AsynDMPipelineOutput, StepRecorder, check_call, check_generators,
                          generator_states, resolve_all, restore_generators)
from .denoise import UNetDenoiser
from .sampler import StepRecord, sample, static_labels_from_attention
from .schedules import SchedulePlan
from .step import StepConfig
from .subjects import SubjectSpec, batch_subjects

__all__ = ["AsynDMPipeline", "AsynDMPipelineOutput", "AsynDMXLPipeline"]


class _AsynDMMixin:
    """The AsynDM ``__call__`` shared by the SD and SDXL subclasses."""

    def _pixel_space_factor(self) -> int:
        """Without a VAE the latent is the image pixel-unshuffled by this factor."""
        c = self.unet.config.in_channels
        r = int(round(math.sqrt(c / 3)))
        if 3 * r * r != c:
            raise ValueError(f"a model without VAE needs 3*r^2 UNet channels, got {c}")
        return r

    def _setup_pixel_space(self) -> None:
        if getattr(self, "vae", None) is None:
            self.vae_scale_factor = self._pixel_space_factor()
            self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] ``(B, 3, H, W)``."""
        if getattr(self, "vae", None) is None:
            return F.pixel_shuffle(latents, self.vae_scale_factor)  # (B, 12, h, w) -> (B, 3, H, W)
        vae = self.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]

    def _check_scheduler(self) -> None:
        if not isinstance(self.scheduler, DDIMScheduler):
            raise ValueError(
                f"AsynDM samples with DDIM; this pipeline has {type(self.scheduler).__name__}. "
                "Set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
            )

    def _asyndm_call(
        self,
        prompt: str | list[str],
        *,
        subjects: Sequence[SubjectSpec] | Sequence[Sequence[SubjectSpec]] | None,
        k: float | Sequence[float],
        mode: str,
        curve: str,
        mask_mode: str,
        mask_threshold: float,
        mask_level: int | None,
        num_inference_steps: int,
        guidance_scale: float,
        eta: float,
        generator,
        height: int | None,
        width: int | None,
        negative_prompt,
        num_images_per_prompt: int,
        output_type: str,
        return_dict: bool,
        callback: Callable[[StepRecord], None] | None,
        return_timestep_maps: bool,
        latents: torch.Tensor | None,
        encode_kwargs: dict,
    ):
        # 1. validate what a user can get wrong, before any model work
        prompts = check_call(mode, curve, mask_mode, mask_threshold, num_inference_steps, prompt)
        self._check_scheduler()
        factor = self.vae_scale_factor
        default = self.unet.config.sample_size * factor
        height, width = height or default, width or default
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {factor}")
        plan = SchedulePlan.from_scheduler(self.scheduler, num_inference_steps, curve)
        bsz = len(prompts) * num_images_per_prompt
        check_generators(generator, bsz)
        resolved = resolve_all(self.tokenizer, prompts, subjects, k, mode, plan)
        device = self._execution_device
        self._guidance_scale = guidance_scale

        # 2. text conditioning (the parent pipeline's own encoders)
        embeds, added = self._encode(prompts, negative_prompt, num_images_per_prompt,
                                     guidance_scale > 1.0, device, height, width, encode_kwargs)
        subj = None
        if resolved is not None:
            subj = batch_subjects([s for s in resolved for _ in range(num_images_per_prompt)],
                                  device)
        latent_hw = (height // factor, width // factor)
        states = generator_states(generator)

        def init_latents():
            return self.prepare_latents(bsz, self.unet.config.in_channels, height, width,
                                        embeds.dtype, device, generator, latents)

        def noise_fn(shape, dtype, dev):
            return randn_tensor(shape, generator=generator, device=dev, dtype=dtype)

        alphas = self.scheduler.alphas_cumprod
        final_alpha = self.scheduler.final_alpha_cumprod
        step_cfg = StepConfig.from_scheduler(self.scheduler, eta)
        recorder = StepRecorder(return_timestep_maps, callback)

        with ExitStack() as stack:
            capture = None
            if subj is not None and mode == "asyndm":
                capture = stack.enter_context(AttentionCapture(self.unet, latent_hw, mask_level))
            if mode != "dm":
                stack.enter_context(PerPixelTimestep(self.unet))
            denoise = UNetDenoiser(self.unet, embeds, guidance_scale, added, capture,
                                   subj.positions if subj is not None else None)
            static = None
            # 3. static masks: a DM run of the same seed, attention averaged over its steps
            if mode == "asyndm" and mask_mode == "static":
                pre = sample(denoise, init_latents(), plan, alphas, final_alpha, step_cfg,
                             mode="dm", subjects=subj, capture_attention=True,
                             noise_fn=noise_fn, progress=self._progress)
                static = static_labels_from_attention(pre.attention, subj, latent_hw,
                                                      mask_threshold)
                restore_generators(generator, states)
            # 4. the run itself
            result = sample(denoise, init_latents(), plan, alphas, final_alpha, step_cfg,
                            mode=mode, subjects=subj, mask_threshold=mask_threshold,
                            static_labels=static, noise_fn=noise_fn, callback=recorder,
                            progress=self._progress)

        # 5. decode and post-process (the parent's image processor)
        if output_type == "latent":
            images = result.latents
        else:
            decoded = self._decode(result.latents)
            images = self.image_processor.postprocess(decoded.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        out = recorder.output(images, mode, result.labels)
        return out if return_dict else (out.images,)

    def _progress(self, n: int):
        return self.progress_bar(range(n))


_CALL_DOC = """Generate images with DM, DM_concave or AsynDM.

        Args:
            prompt: one prompt or a list.
            subjects: subject words / phrases of the prompt (``"cat"``, ``"red car"``,
                ``"cat#2"`` for a second occurrence) or raw token positions; one list for all
                prompts or one list per prompt.
            k: curve strength, one value or one per subject, in ``(0, max]`` (see
                :meth:`asyndm.schedules.SchedulePlan.validate_k`).
            mode: ``"dm"``, ``"dm_concave"`` or ``"asyndm"``.
            curve: ``"quadratic"``, ``"piecewise"`` or ``"exponential"``.
            mask_mode: ``"dynamic"`` (previous step's attention) or ``"static"`` (a DM run).
            mask_threshold: multiple of the spatial mean that claims a pixel.
            mask_level: override of the attention level the masks are read at.
            callback: called with an :class:`asyndm.sampler.StepRecord` after every step.
            return_timestep_maps: also return ``(N, B, h, w)`` timestep and label maps.
            Others as in the parent diffusers pipeline.
        """


class AsynDMPipeline(_AsynDMMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with asynchronous denoising; a VAE is optional."""

    _optional_components = [*StableDiffusionPipeline._optional_components, "vae"]

    def __init__(
        self,
        vae: AutoencoderKL | None,
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
        # The parent turns a scheduler's clip_sample off (a fix for old SD checkpoints); a
        # pixel-space model (no VAE) is trained for x0 clipping to [-1, 1], so keep it there.
        keep_clip = vae is None and bool(getattr(scheduler.config, "clip_sample", False))
        if keep_clip:
            scheduler.register_to_config(clip_sample=False)
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker,
                         feature_extractor, image_encoder, requires_safety_checker)
        if keep_clip:
            self.scheduler.register_to_config(clip_sample=True)
        self._setup_pixel_space()

    def _encode(self, prompts, negative_prompt, n_per_prompt, do_cfg, device, height, width,
                encode_kwargs):
        pos, neg = self.encode_prompt(prompts, device, n_per_prompt, do_cfg, negative_prompt,
                                      clip_skip=encode_kwargs.get("clip_skip"))
        return (torch.cat([neg, pos]) if do_cfg else pos), None

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], subjects=None, k: float | Sequence[float] = 0.5,
                 mode: str = "asyndm", curve: str = "quadratic", mask_mode: str = "dynamic",
                 mask_threshold: float = 1.0, mask_level: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, eta: float = 1.0,
                 generator=None, height: int | None = None, width: int | None = None,
                 negative_prompt=None, num_images_per_prompt: int = 1, output_type: str = "pil",
                 return_dict: bool = True, callback=None, return_timestep_maps: bool = False,
                 latents: torch.Tensor | None = None, clip_skip: int | None = None):
        return self._asyndm_call(
            prompt, subjects=subjects, k=k, mode=mode, curve=curve, mask_mode=mask_mode,
            mask_threshold=mask_threshold, mask_level=mask_level,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
            generator=generator, height=height, width=width, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, output_type=output_type,
            return_dict=return_dict, callback=callback,
            return_timestep_maps=return_timestep_maps, latents=latents,
            encode_kwargs={"clip_skip": clip_skip},
        )

    __call__.__doc__ = _CALL_DOC


class AsynDMXLPipeline(_AsynDMMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with asynchronous denoising."""

    def _encode(self, prompts, negative_prompt, n_per_prompt, do_cfg, device, height, width,
                encode_kwargs):
        pos, neg, pooled, neg_pooled = self.encode_prompt(
            prompts, device=device, num_images_per_prompt=n_per_prompt,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt)
        if self.text_encoder_2 is None:
            proj_dim = int(pooled.shape[-1])
        else:
            proj_dim = self.text_encoder_2.config.projection_dim
        time_ids = self._get_add_time_ids((height, width), (0, 0), (height, width),
                                          dtype=pos.dtype, text_encoder_projection_dim=proj_dim)
        bsz = pos.shape[0]
        time_ids = time_ids.to(device).repeat(bsz, 1)  # (B, 6)
        if do_cfg:
            return (torch.cat([neg, pos]),
                    {"text_embeds": torch.cat([neg_pooled, pooled]).to(device),
                     "time_ids": torch.cat([time_ids, time_ids])})
        return pos, {"text_embeds": pooled.to(device), "time_ids": time_ids}

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], subjects=None, k: float | Sequence[float] = 0.5,
                 mode: str = "asyndm", curve: str = "quadratic", mask_mode: str = "dynamic",
                 mask_threshold: float = 1.0, mask_level: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, eta: float = 1.0,
                 generator=None, height: int | None = None, width: int | None = None,
                 negative_prompt=None, num_images_per_prompt: int = 1, output_type: str = "pil",
                 return_dict: bool = True, callback=None, return_timestep_maps: bool = False,
                 latents: torch.Tensor | None = None):
        return self._asyndm_call(
            prompt, subjects=subjects, k=k, mode=mode, curve=curve, mask_mode=mask_mode,
            mask_threshold=mask_threshold, mask_level=mask_level,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
            generator=generator, height=height, width=width, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, output_type=output_type,
            return_dict=return_dict, callback=callback,
            return_timestep_maps=return_timestep_maps, latents=latents, encode_kwargs={},
        )

    __call__.__doc__ = _CALL_DOC

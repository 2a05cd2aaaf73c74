"""diffusers schedulers that take AsynDM's per-pixel steps: thin adapters over the pure maths.

``AsynDMDDIMScheduler``, ``AsynDMDDPMScheduler``, ``AsynDMEulerDiscreteScheduler`` and
``AsynDMEulerAncestralDiscreteScheduler`` subclass diffusers' own schedulers and are swapped
in the diffusers way (``from_config``, which :func:`asyndm.enable` does for the user). With
no run attached (``scheduler.asyndm_run is None``) they *are* the parent scheduler. With a
run attached:

* ``set_timesteps`` is the parent's; the run's plan is made at the first step from the
  ladder the pipeline actually walks (an img2img run enters it part-way), so the background
  follows the scheduler's own timesteps and a run whose masks stay empty is, step for step,
  the parent's own sampling (those steps *call* the parent's ``step``);
* ``step`` gathers alpha-bar (DDIM) or sigma (Euler) per pixel from the run's timestep map,
  draws its noise as the parent does (same generator, shape and dtype), records the step
  and advances the run's state with :mod:`asyndm.state`;
* ``scale_model_input`` (Euler) scales every pixel by its own sigma; ``add_noise`` before
  the loop marks the run as entered (img2img), inside it (inpainting with a 4-channel UNet)
  noises every pixel to its own level.

All the state of a run lives in one :class:`AsynRun`; the model hooks of
:mod:`asyndm.hooks` read the timestep map from it and hand it this step's attention.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)
from diffusers.utils.torch_utils import randn_tensor

from .regions import mask_regions
from .sampler import StepRecord
from .schedules import SchedulePlan
from .state import (PixelState, Subjects, after_step, begin, ladder_flags, next_timestep_map,
                    step_states)
from .step import (StepConfig, StepOutput, alpha_bar, ddim_step, ddpm_step,
                   euler_ancestral_step, euler_step, gather, sigma_table)


@dataclass
class AsynRun:
    """The one mutable place of an AsynDM run: what was asked, and where the run is.

    Attributes:
        mode: ``"dm"``, ``"dm_concave"`` or ``"asyndm"``.
        curve: key of :data:`asyndm.schedules.CURVES`.
        subjects: the batch's subjects, set once the prompt is known (``None`` in ``dm``).
        mask_threshold: multiple of the spatial mean that claims a pixel.
        static_labels: ``(B, h, w)`` fixed regions, or ``None`` for dynamic masks.
        capture: whether the model hooks capture subject attention at every call.
        callback: called with a :class:`~asyndm.sampler.StepRecord` after every step.
        keep_records: keep every step's record (for timestep maps and masks).
        patch_size: latent pixels per state in each direction (SD3: 2, a token's patch).
        token_grid: ``(h, w)`` of packed latents ``(B, N, C)``, token ``n = row * w + col``
            (Flux), set by the model hooks; ``None`` for ``(B, C, H, W)`` latents.
        region_mask: a user's ``(H, W)`` region numbers (:func:`asyndm.regions.load_mask`),
            the regions of every step instead of attention masks (repair, editing).
        plan, pixels: the run's plan and the state of the current step (``None`` until
            the first step, reset by ``set_timesteps``).
        entered: the samples were noised onto the ladder before the first step (img2img).
        attention: ``(B, S, hm, wm)`` subject attention of this step's model call.
        attention_sum: the sum of every step's subject attention (static masks).
        records: the kept step records.
    """

    mode: str
    curve: str = "quadratic"
    subjects: Subjects | None = None
    mask_threshold: float = 1.0
    static_labels: torch.Tensor | None = None
    capture: bool = False
    callback: Callable[[StepRecord], None] | None = None
    keep_records: bool = True
    patch_size: int = 1
    token_grid: tuple[int, int] | None = None
    region_mask: torch.Tensor | None = None
    plan: SchedulePlan | None = None
    pixels: PixelState | None = None
    entered: bool = False
    attention: torch.Tensor | None = None
    attention_sum: torch.Tensor | None = None
    records: list[StepRecord] = field(default_factory=list)

    @property
    def dynamic(self) -> bool:
        return self.mode == "asyndm" and self.static_labels is None

    def reset(self) -> None:
        """Forget the previous run's progress (``set_timesteps`` starts a new one)."""
        self.plan, self.pixels, self.entered = None, None, False
        self.attention, self.attention_sum, self.records = None, None, []

    def timestep_maps(self) -> torch.Tensor | None:
        """``(N, B, h, w)`` int64 timestep map of every step, or ``None``."""
        return torch.stack([r.timesteps for r in self.records]) if self.records else None

    def label_maps(self) -> torch.Tensor | None:
        """``(N, B, h, w)`` regions of every step, or ``None`` (``dm``)."""
        if not self.records or self.records[0].labels is None:
            return None
        return torch.stack([r.labels for r in self.records])

    @property
    def masks(self) -> torch.Tensor | None:
        """``(B, h, w)`` regions of the last transition (``-1`` background)."""
        return self.pixels.labels if self.pixels is not None else None


_STEP_SIGNATURES: dict[type, inspect.Signature] = {}


class _PerPixelScheduler:
    """The per-pixel part shared by the AsynDM schedulers (a mixin before the parent)."""

    asyndm_run: AsynRun | None = None
    _output_cls: type
    _tables: dict

    # -- the run's state -------------------------------------------------------------------
    def set_timesteps(self, *args, **kwargs):
        out = super().set_timesteps(*args, **kwargs)
        if self.asyndm_run is not None:
            self.asyndm_run.reset()
        return out

    def asyndm_pixels(self, sample: torch.Tensor, timestep, bsz: int) -> PixelState:
        """The current step's state; the first call of a run makes the plan and state 0.

        Args:
            sample: the model input or the sample, ``(M, C, H, W)``; only its grid and
                device are read.
            timestep: the pipeline's timestep of this step (places the run on the ladder).
            bsz: the number of samples ``B``.
        """
        run = self.asyndm_run
        if run.pixels is None:
            ladder = [float(t) for t in self.timesteps.tolist()]
            t0 = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
            if t0 not in ladder:
                raise ValueError(f"timestep {t0:g} is not on this scheduler's ladder")
            run.plan = self._new_plan(run.curve, ladder.index(t0))
            if run.subjects is not None and run.mode != "dm":
                for kv in sorted({float(v) for v in run.subjects.k[run.subjects.k > 0].tolist()}):
                    run.plan.validate_k(kv)
            if run.subjects is not None and run.subjects.batch_size != bsz:
                raise ValueError(f"subjects were resolved for {run.subjects.batch_size} "
                                 f"samples, the pipeline samples {bsz}")
            p = run.patch_size
            grid = ((bsz, *run.token_grid) if run.token_grid is not None  # packed (Flux)
                    else (bsz, sample.shape[-2] // p, sample.shape[-1] // p))
            if run.region_mask is not None:  # the user's regions, on this grid
                labels = mask_regions(run.region_mask, grid[1:]).to(sample.device)
                run.static_labels = labels.expand(bsz, -1, -1).clone()  # (B, h, w)
            run.pixels = begin(run.plan, run.mode, run.subjects, grid, sample.device,
                               run.static_labels, run.entered or not run.plan.integer_states)
        return run.pixels

    def _new_plan(self, curve: str, start: int) -> SchedulePlan:
        """The plan of a run that walks this scheduler's ladder from rung ``start`` on."""
        ladder = [float(t) for t in self.timesteps.tolist()][start:]
        if any(t != round(t) for t in ladder):
            raise ValueError(
                f"AsynDM needs integer timesteps; this {type(self).__name__} has "
                f"{ladder[:3]}...: use timestep_spacing='leading' or 'trailing' and no "
                "Karras / exponential / beta sigmas")
        cfg = self.config
        return SchedulePlan(curve, tuple(int(t) for t in ladder), int(cfg.num_train_timesteps),
                            int(getattr(cfg, "steps_offset", 0)))

    def asyndm_maps(self, st: PixelState, nxt: torch.Tensor,
                    rounded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, h, w)`` timesteps the model sees at this step and after it (``-1``: clean);
        ``rounded``: ``nxt`` rounded already."""
        return st.timestep_map(), next_timestep_map(self.asyndm_run.plan, st, nxt, rounded)

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """A per-timestep table (float32) on ``device``, made once per device."""
        key = (name, device)
        if key not in self.__dict__.setdefault("_tables", {}):
            self._tables[key] = self._make_table(name).to(device=device, dtype=torch.float32)
        return self._tables[key]

    # -- diffusers' scheduler interface ----------------------------------------------------
    def _asyndm_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args,
                     **kwargs):
        run = self.asyndm_run
        if run is None:
            return super().step(model_output, timestep, sample, *args, **kwargs)
        signature = _STEP_SIGNATURES.get(type(self))
        if signature is None:  # the parent's step, read once per class (a per-step cost)
            signature = _STEP_SIGNATURES.setdefault(type(self), inspect.signature(super().step))
        bound = signature.bind(model_output, timestep, sample, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        st = self.asyndm_pixels(sample, timestep, sample.shape[0])
        plan = run.plan
        # 1. every pixel's next state; 2. the step, the parent's own while no pixel lags
        nxt = step_states(plan, st)
        nxt_flags = ladder_flags(plan, st.step + 1, nxt)
        t_map, t_next_map = self.asyndm_maps(st, nxt, nxt_flags[2])
        if st.lagging or nxt_flags[0]:
            res = self._pixel_step(model_output, timestep, sample, st, nxt, t_map, t_next_map, a)
        else:
            out = super().step(**{**a, "return_dict": False})
            x0 = out[1] if len(out) > 1 else self._x0(model_output, sample, st)
            res = StepOutput(prev_sample=out[0], pred_original_sample=x0)
        # 3. record, then the state of the next step (dynamic masks from this step's call)
        if run.keep_records or run.callback is not None:  # a record only when one is read
            rec = StepRecord(st.step, plan.num_steps, t_map, t_next_map, st.labels,
                             res.prev_sample, res.pred_original_sample)
            if run.keep_records:
                run.records.append(rec)
            if run.callback is not None:
                run.callback(rec)
        attn, run.attention = run.attention, None
        if attn is not None:
            run.attention_sum = attn if run.attention_sum is None else run.attention_sum + attn
        run.pixels = after_step(plan, st, nxt, attn if run.dynamic else None,
                                run.mask_threshold, nxt_flags)
        return self._output(res, a["return_dict"])

    def _output(self, res: StepOutput, return_dict: bool):
        """The parent's own output type (or tuple) for a step's result."""
        if not return_dict:
            return (res.prev_sample, res.pred_original_sample)
        return self._output_cls(prev_sample=res.prev_sample,
                                pred_original_sample=res.pred_original_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        run = self.asyndm_run
        if run is not None and run.pixels is None:
            run.entered = True  # img2img / inpainting: the run starts on the ladder
        elif (run is not None and run.pixels.lagging and run.plan.integer_states
              and run.pixels.step < run.plan.num_steps):
            rung = run.plan.timesteps[run.pixels.step]
            if float(torch.as_tensor(timesteps).flatten()[0]) == rung:
                # inpainting with a 4-channel UNet re-noises the known region each step:
                # every pixel to its own level
                return self._noise_to(original_samples, noise, run.pixels.timestep_map())
        return super().add_noise(original_samples, noise, timesteps)

    # -- per family ------------------------------------------------------------------------
    def _make_table(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _pixel_step(self, model_output, timestep, sample, st, nxt, t_map, t_next_map,
                    a: dict) -> StepOutput:
        raise NotImplementedError

    def _noise_to(self, x0: torch.Tensor, noise: torch.Tensor, t_map: torch.Tensor):
        raise NotImplementedError

    def _x0(self, model_output, sample, st) -> torch.Tensor:
        """The clean-sample prediction, for schedulers whose ``step`` does not return it."""
        raise NotImplementedError


def _step_like(parent_step):
    """``step`` with the parent's signature: pipelines pass ``eta`` and ``generator`` only to
    a ``step`` whose signature names them (``prepare_extra_step_kwargs``)."""

    def step(self, *args, **kwargs):
        return self._asyndm_step(*args, **kwargs)

    step.__signature__ = inspect.signature(parent_step)
    step.__doc__ = parent_step.__doc__
    return step


class _AlphaBarFamily(_PerPixelScheduler):
    """Per-pixel alpha-bar for the DDIM and DDPM schedulers."""

    def _make_table(self, name: str) -> torch.Tensor:
        return self.alphas_cumprod

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Accepted so that img2img pipelines tell where they enter (the parent has none)."""
        self._begin_index = begin_index

    def _noise_to(self, x0, noise, t_map):
        a = gather(self._table("alphas_cumprod", x0.device), t_map)  # (B, 1, h, w)
        return (a**0.5 * x0 + (1 - a) ** 0.5 * noise).to(x0.dtype)


class AsynDMDDIMScheduler(_AlphaBarFamily, DDIMScheduler):
    """``DDIMScheduler`` with per-pixel timesteps (the paper's sampler, at any ``eta``)."""

    step = _step_like(DDIMScheduler.step)
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput as _output_cls

    def _pixel_step(self, model_output, timestep, sample, st, nxt, t_map, t_next_map,
                    a: dict) -> StepOutput:
        cfg = StepConfig.from_scheduler(self, a["eta"])
        noise = None
        if cfg.eta > 0:
            noise = a["variance_noise"]
            if noise is None:  # drawn as DDIMScheduler.step draws it
                noise = randn_tensor(model_output.shape, generator=a["generator"],
                                     device=model_output.device, dtype=model_output.dtype)
        acp = self._table("alphas_cumprod", sample.device)
        final = self.final_alpha_cumprod.to(sample.device)
        return ddim_step(model_output, sample, alpha_bar(acp, t_map, final),
                         alpha_bar(acp, t_next_map, final), cfg, noise)


class AsynDMDDPMScheduler(_AlphaBarFamily, DDPMScheduler):
    """``DDPMScheduler`` (ancestral sampling) with per-pixel timesteps."""

    step = _step_like(DDPMScheduler.step)
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput as _output_cls

    def _pixel_step(self, model_output, timestep, sample, st, nxt, t_map, t_next_map,
                    a: dict) -> StepOutput:
        cfg = StepConfig.from_scheduler(self)
        noise = None
        if timestep > 0:  # drawn as DDPMScheduler.step draws it: when the step's t > 0
            noise = randn_tensor(model_output.shape, generator=a["generator"],
                                 device=model_output.device, dtype=model_output.dtype)
        acp = self._table("alphas_cumprod", sample.device)
        one = torch.ones((), device=sample.device)  # alpha-bar after the last step
        return ddpm_step(model_output, sample, alpha_bar(acp, t_map, one),
                         alpha_bar(acp, t_next_map, one), cfg, noise, self.config.variance_type)


class _EulerFamily(_PerPixelScheduler):
    """Per-pixel sigma for the Euler schedulers (``sigma = sqrt((1 - a) / a)`` per pixel)."""

    _ancestral = False

    def _make_table(self, name: str) -> torch.Tensor:
        # the sigma of every integer timestep, then 0 (index -1: clean, after the last step)
        return torch.cat([sigma_table(self.alphas_cumprod), torch.zeros(1)])

    def _sigma(self, t_map: torch.Tensor, device: torch.device) -> torch.Tensor:
        return gather(self._table("sigmas", device), t_map)  # (B, 1, h, w)

    def _noise_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The standard deviation ``init_noise_sigma`` gives pure noise at ``sigma``."""
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return sigma
        return (sigma**2 + 1) ** 0.5

    def _effective_sample(self, sample: torch.Tensor, st: PixelState) -> torch.Tensor:
        """At the first step of a text-to-image run, pure noise scaled to each pixel's sigma.

        The pipeline scales its noise by ``init_noise_sigma`` (the ladder's first sigma); a
        pixel that starts higher up the ladder gets the same noise at its own, larger sigma.
        """
        if st.step > 0 or self.asyndm_run.entered:
            return sample
        sigma = self._sigma(st.timestep_map(), sample.device)
        rep = sample.shape[0] // sigma.shape[0]
        scale = self._noise_sigma(sigma) / self._noise_sigma(self.sigmas[self._index(st)])
        return sample * scale.repeat(rep, 1, 1, 1).to(sample.dtype)

    def _index(self, st: PixelState) -> int:
        return (self.begin_index or 0) + st.step if self.step_index is None else self.step_index

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        run = self.asyndm_run
        if run is None or (run.pixels is None and run.subjects is None):
            return super().scale_model_input(sample, timestep)
        bsz = run.subjects.batch_size if run.subjects is not None else sample.shape[0]
        st = self.asyndm_pixels(sample, timestep, bsz)
        if not st.lagging:
            return super().scale_model_input(sample, timestep)
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self._sigma(st.timestep_map(), sample.device)  # (B, 1, h, w)
        sigma = sigma.repeat(sample.shape[0] // sigma.shape[0], 1, 1, 1)  # (M, 1, h, w)
        self.is_scale_input_called = True
        return self._effective_sample(sample, st) / ((sigma**2 + 1) ** 0.5)

    def _pixel_step(self, model_output, timestep, sample, st, nxt, t_map, t_next_map,
                    a: dict) -> StepOutput:
        if self.step_index is None:
            self._init_step_index(timestep)
        pred = self.config.prediction_type
        sigma = self._sigma(t_map, sample.device)
        sigma_next = self._sigma(t_next_map, sample.device)
        x = self._effective_sample(sample, st)
        if self._ancestral:
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype,
                                 device=model_output.device, generator=a["generator"])
            res = euler_ancestral_step(model_output, x, sigma, sigma_next, noise, pred)
        else:
            if a.get("s_churn", 0.0):
                raise ValueError("AsynDM's Euler steps take s_churn=0 (diffusers' default)")
            res = euler_step(model_output, x, sigma, sigma_next, pred)
        self._step_index += 1
        return res

    def _noise_to(self, x0, noise, t_map):
        return x0 + noise * self._sigma(t_map, x0.device).to(x0.dtype)


class AsynDMEulerDiscreteScheduler(_EulerFamily, EulerDiscreteScheduler):
    """``EulerDiscreteScheduler`` (SDXL's default) with per-pixel sigmas."""

    step = _step_like(EulerDiscreteScheduler.step)

    from diffusers.schedulers.scheduling_euler_discrete import (
        EulerDiscreteSchedulerOutput as _output_cls)


class AsynDMEulerAncestralDiscreteScheduler(_EulerFamily, EulerAncestralDiscreteScheduler):
    """``EulerAncestralDiscreteScheduler`` with per-pixel sigmas."""

    _ancestral = True
    step = _step_like(EulerAncestralDiscreteScheduler.step)
    from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
        EulerAncestralDiscreteSchedulerOutput as _output_cls)


PER_PIXEL = {
    DDIMScheduler: AsynDMDDIMScheduler,
    DDPMScheduler: AsynDMDDPMScheduler,
    EulerDiscreteScheduler: AsynDMEulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler: AsynDMEulerAncestralDiscreteScheduler,
}
"""The diffusers schedulers AsynDM has a per-pixel version of, and that version."""


def per_pixel_scheduler(scheduler) -> _PerPixelScheduler:
    """The AsynDM version of ``scheduler``, with the same config (patched keys included).

    Raises ``ValueError`` naming the supported schedulers and how to swap to one.
    """
    if isinstance(scheduler, _PerPixelScheduler):
        return scheduler
    from .schedulers_flow import AsynDMFlowMatchEulerScheduler  # imports this module

    classes = {**PER_PIXEL, FlowMatchEulerDiscreteScheduler: AsynDMFlowMatchEulerScheduler}
    cls = classes.get(type(scheduler))
    if cls is None:
        names = ", ".join(c.__name__ for c in classes)
        raise ValueError(
            f"AsynDM has no per-pixel version of {type(scheduler).__name__}; supported: "
            f"{names}. Swap first, e.g. pipe.scheduler = "
            "DDIMScheduler.from_config(pipe.scheduler.config)")
    if getattr(scheduler.config, "thresholding", False):
        raise ValueError("AsynDM does not support dynamic thresholding (thresholding=True)")
    # every key as the scheduler holds it: from_config alone would drop the keys listed in
    # _use_default_values, such as the steps_offset=1 SD pipelines patch in
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    return cls(**{k: v for k, v in config.items()
                  if k in inspect.signature(cls.__init__).parameters})

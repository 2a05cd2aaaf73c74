"""``asyndm.enable(pipe, ...)``: AsynDM inside a diffusers pipeline's own ``__call__``.

Inside the ``with`` block the pipeline samples with AsynDM, through three seams and nothing
else (every one undone on exit):

1. its scheduler is swapped for the per-pixel version (:mod:`asyndm.schedulers`), which
   holds the run's state (:class:`~asyndm.schedulers.AsynRun`);
2. forward(-pre) hooks on the UNet (and a ControlNet) or SD3's transformer hand the model
   that state's timestep map instead of the scalar timestep, through
   :class:`~asyndm.adapters.unet.PerPixelTimestep` (SD3:
   :class:`~asyndm.adapters.sd3.PerTokenTimestep`), and capture the subject attention of
   the conditional rows (processors of :mod:`asyndm.adapters.attention`) into the state
   (a user's ``region_mask`` replaces the attention masks);
3. the pipeline's ``encode_prompt`` is wrapped (an instance attribute) so that subject
   words are resolved against the prompt the pipeline was called with, by its tokenizer.

Batches are recognised by their size: the model sees ``m B`` rows for ``B`` samples
(``m = 2`` with classifier-free guidance, ``3`` with PAG on top), the map is repeated ``m``
times and attention is read from the conditional rows.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .adapters.attention import AttentionCapture
from .adapters.flux import (FluxAttentionCapture, FluxPerTokenTimestep, check_text_positions,
                            ladder_timestep, token_grid)
from .adapters.sd3 import JointAttentionCapture, PerTokenTimestep
from .adapters.unet import PerPixelTimestep
from .checks import check_options, check_subjects
from .regions import region_subjects, regions_for_call
from .sampler import StepRecord
from .schedulers import AsynRun, per_pixel_scheduler
from .subjects import (ResolvedSubject, SubjectSpec, batch_subjects, k_values,
                       resolve_subjects, subject_tokenizer)


def _per_prompt(subjects: Sequence, n_prompts: int) -> list[list]:
    """One list per prompt when the prompts come with as many lists, else shared. A single
    prompt's ``[["cat", "dog"]]`` is its own list (words are never token positions), while
    ``[[3, 4]]`` stays one subject of two token positions."""
    lists = len(subjects) == n_prompts and all(isinstance(s, (list, tuple)) for s in subjects)
    if lists and (n_prompts > 1 or any(isinstance(x, str) for x in subjects[0])):
        return [list(s) for s in subjects]
    return [list(subjects)] * n_prompts


def _positions_only(specs: Sequence, k, first: int = 1) -> list[ResolvedSubject]:
    """Subjects given as token positions, for a call with ``prompt_embeds`` and no prompt;
    ``first``: the first prompt token (1 after CLIP's start token, 0 for Flux's T5)."""
    ks = k_values(k, len(specs), "subjects")
    out = []
    for spec, kk in zip(specs, ks):
        if isinstance(spec, int):
            spec = (spec,)
        if isinstance(spec, str) or not all(isinstance(p, int) and p >= first for p in spec):
            raise ValueError("with prompt_embeds and no prompt, give subjects as token "
                             f"positions (ints >= {first}), not {spec!r}")
        out.append(ResolvedSubject(label=f"tokens{list(spec)}", positions=tuple(spec), k=kk))
    return out


class AsynDMHooks:
    """Install AsynDM on a pipeline object for one or more calls (see the module docstring).

    Args:
        pipe: a diffusers pipeline with a ``unet`` (SD 1.x / 2.x, SDXL and their img2img,
            inpainting, ControlNet and PAG pipelines) or an SD3 ``transformer``.
        run: the run state the scheduler and hooks share.
        subjects: subject words / token positions (one list, or one list per prompt).
        k: one strength or one per subject.
        mask_level: override of the attention level the masks are read at (SD3: the
            blocks, a sequence of indices).
        unet_adapters: the UNet's (attention capture, per-pixel timestep) classes; other
            implementations of the same interface can be measured against ours.
    """

    def __init__(self, pipe, run: AsynRun, subjects: Sequence | None, k,
                 mask_level: int | Sequence[int] | None = None,
                 unet_adapters: tuple[type, type] = (AttentionCapture, PerPixelTimestep)) -> None:
        unet = getattr(pipe, "unet", None)
        if unet is None:  # SD3 / SD3.5: the MMDiT is the denoiser
            unet = getattr(pipe, "transformer", None)
            if type(unet).__name__ not in ("SD3Transformer2DModel", "FluxTransformer2DModel"):
                raise ValueError(
                    f"asyndm.enable needs a pipeline with a UNet or an SD3 / Flux transformer; "
                    f"{type(pipe).__name__} has {type(unet).__name__}")
        if not isinstance(unet, nn.Module):
            raise ValueError(f"{type(pipe).__name__} has no denoising model loaded")
        self.mmdit = not hasattr(unet, "time_embedding")
        # Flux: packed latents, T5 text columns, a second encode_prompt call for true CFG
        self.flux = type(unet).__name__ == "FluxTransformer2DModel"
        self._encoded = False
        controlnet = getattr(pipe, "controlnet", None)
        if controlnet is not None and not hasattr(controlnet, "time_embedding"):
            raise ValueError(f"{type(controlnet).__name__} is not supported by asyndm.enable "
                             "(one ControlNetModel is)")
        self.pipe, self.run, self.unet, self.controlnet = pipe, run, unet, controlnet
        self.specs, self.k, self.mask_level = subjects, k, mask_level
        self.capture_cls, self.per_pixel_cls = unet_adapters
        self.capture: AttentionCapture | None = None
        self._undo: list[Callable[[], None]] = []
        self._capturing = False

    # -- lifecycle -------------------------------------------------------------------------
    def install(self) -> "AsynDMHooks":
        pipe, run = self.pipe, self.run
        original = pipe.scheduler
        if getattr(original, "asyndm_run", None) is not None:
            raise ValueError("AsynDM is already switched on for this pipeline (one "
                             "asyndm.enable at a time)")
        sched = per_pixel_scheduler(original)
        sched.asyndm_run = run
        pipe.scheduler = sched
        self._undo.append(lambda: setattr(pipe, "scheduler", original))
        self._undo.append(lambda: setattr(sched, "asyndm_run", None))
        self._wrap_encode_prompt()
        if self.mmdit:
            run.patch_size = int(self.unet.config.patch_size)
        for model in (self.unet, self.controlnet):
            if model is None:
                continue
            if run.mode != "dm":
                adapter = ((FluxPerTokenTimestep if self.flux else PerTokenTimestep)
                           if self.mmdit else self.per_pixel_cls)
                if self.mmdit:
                    per_pixel = adapter(model).install()
                else:  # the UNet's tables span the train timesteps
                    n_train = int(sched.config.num_train_timesteps)
                    per_pixel = adapter(model, num_timesteps=n_train).install()
                self._undo.append(per_pixel.remove)
            handle = model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True)
            self._undo.append(handle.remove)
        handle = self.unet.register_forward_hook(self._post)
        self._undo.append(handle.remove)
        return self

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        if self.capture is not None:
            self.capture.remove()
            self.capture = None

    def __enter__(self) -> "AsynDMHooks":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- subjects, from the prompt the pipeline is called with -----------------------------
    def _wrap_encode_prompt(self) -> None:
        pipe = self.pipe
        original = pipe.encode_prompt
        signature = inspect.signature(original)

        def encode_prompt(*args, **kwargs):
            out = original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            prompt = bound.arguments.get("prompt")
            if self.flux:  # T5 reads prompt_2 when given; the second call is the negative's
                if self._encoded:
                    return out
                self._encoded = True
                prompt = bound.arguments.get("prompt_2") or prompt
            self._resolve(prompt,
                          int(bound.arguments.get("num_images_per_prompt") or 1), out[0])
            return out

        pipe.encode_prompt = encode_prompt
        self._undo.append(lambda: delattr(pipe, "encode_prompt"))

    def _resolve(self, prompt, n_per_prompt: int, embeds: torch.Tensor) -> None:
        run, specs = self.run, self.specs
        if run.region_mask is not None:  # the user's regions: one k each, no tokens
            run.subjects = region_subjects(self.k, int(run.region_mask.max()), embeds.shape[0],
                                           embeds.device)
            return
        if not specs:
            if run.mode != "dm":
                raise ValueError(f"mode {run.mode!r} needs subjects (words of the prompt, "
                                 "e.g. 'cat')")
            run.subjects = None
            return
        n_prompts = embeds.shape[0] // n_per_prompt
        if prompt is None:  # prompt_embeds given: subjects must be token positions
            resolved = [_positions_only(s, self.k, 0 if self.flux else 1)
                        for s in _per_prompt(specs, n_prompts)]
        else:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            resolved = [resolve_subjects(subject_tokenizer(self.pipe), p, s, self.k)
                        for p, s in zip(prompts, _per_prompt(specs, len(prompts)))]
        run.subjects = batch_subjects([s for s in resolved for _ in range(n_per_prompt)],
                                      embeds.device)
        if self.flux:
            check_text_positions(run.subjects.positions, embeds.shape[1])

    # -- model hooks -----------------------------------------------------------------------
    def _cond_rows(self, rows: int, bsz: int) -> slice:
        """The conditional rows of a model batch: ``[uncond; cond; ...]`` with guidance."""
        cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", rows >= 2 * bsz))
        return slice(bsz, 2 * bsz) if cfg and rows >= 2 * bsz else slice(0, bsz)

    def _pre(self, module, args, kwargs):
        run = self.run
        if self.flux:  # the denoising loop has begun; packed latents carry no grid
            self._encoded = False
            if run.pixels is None:  # once per run (reading img_ids syncs with the device)
                hidden = args[0] if args else kwargs["hidden_states"]  # (M, N, C)
                run.token_grid = token_grid(kwargs.get("img_ids"), hidden.shape[1])
        if run.subjects is None:
            return None  # dm without subjects: nothing lags, nothing to capture
        key = "hidden_states" if self.mmdit else "sample"
        sample = args[0] if args else kwargs[key]
        in_args = len(args) > 1
        t = args[1] if in_args else kwargs["timestep"]
        bsz, rows = run.subjects.batch_size, sample.shape[0]
        if rows % bsz:
            raise ValueError(f"the model got {rows} rows for {bsz} samples")
        sched = self.pipe.scheduler
        if self.flux and run.pixels is None:  # Flux's model sees timestep / 1000
            st = sched.asyndm_pixels(sample, ladder_timestep(sched.timesteps, t), bsz)
        else:
            st = sched.asyndm_pixels(sample, t, bsz)
        # one capture per step: the first call of the denoiser (SD3's skip-layer guidance
        # calls it again, with layers skipped)
        if module is self.unet and run.capture and run.attention is None and not self._capturing:
            if self.capture is None:
                grid = tuple(run.pixels.state.shape[-2:])
                joint = FluxAttentionCapture if self.flux else JointAttentionCapture
                self.capture = (joint(self.unet, grid, self.mask_level)
                                if self.mmdit else
                                self.capture_cls(self.unet, grid, self.mask_level)).install()
            text = None  # the layers' text, where it is the UNet's own argument
            if not self.mmdit and getattr(self.unet, "encoder_hid_proj", None) is None:
                text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
            self.capture.start(run.subjects.positions, self._cond_rows(rows, bsz),
                               run.subjects.weights, text=text)  # subject maps straight out
            self._capturing = True
        if not st.lagging:
            return None
        if self.mmdit:
            return args, self._token_timesteps(kwargs, st, t, rows // bsz)
        # a map even where every pixel shares one timestep: the per-pixel path reads the
        # run's embedding tables, fewer operators than the model's own scalar path
        t_map = st.timestep_map().repeat(rows // bsz, 1, 1)  # (m B, h, w)
        if in_args:
            return (args[0], t_map, *args[2:]), kwargs
        return args, {**kwargs, "timestep": t_map}

    def _token_timesteps(self, kwargs: dict, st, t: torch.Tensor, rep: int) -> dict:
        """SD3's timestep keywords: a token map, the text tokens on the background's."""
        t_map = self.pipe.scheduler.asyndm_model_timesteps(st)  # (B, h, w)
        if self.flux:
            t_map = t_map / 1000  # the units Flux's pipeline calls its transformer in
        if st.uniform is not None and self.run.mode == "dm_concave":
            # every token, text included, on one timestep: the model's own path
            return {**kwargs, "timestep": t_map.flatten()[:1].expand(t.shape[0])}  # (m B,)
        return {**kwargs, "timestep": t_map.repeat(rep, 1, 1),  # (m B, h, w)
                "text_timestep": t}

    def _post(self, module, args, output):
        if self._capturing:
            self._capturing = False
            self.run.attention = self.capture.stop()  # (B, S, hm, wm)
        return output


class AsynDMSession:
    """What :func:`enable` yields: the run's results after each pipeline call."""

    def __init__(self, run: AsynRun) -> None:
        self.run = run

    @property
    def timestep_maps(self) -> torch.Tensor | None:
        """``(N, B, h, w)`` int64: the map the model was evaluated at, per step."""
        return self.run.timestep_maps()

    @property
    def label_maps(self) -> torch.Tensor | None:
        """``(N, B, h, w)`` int64 regions of every step (``-1`` background)."""
        return self.run.label_maps()

    @property
    def masks(self) -> torch.Tensor | None:
        """``(B, h, w)`` regions of the last transition (``-1`` background)."""
        return self.run.masks

    @property
    def records(self) -> list[StepRecord]:
        return self.run.records


@contextmanager
def enable(
    pipe,
    subjects: Sequence[SubjectSpec] | Sequence[Sequence[SubjectSpec]] | None = None,
    k: float | Sequence[float] = 0.5,
    mode: str = "asyndm",
    curve: str = "quadratic",
    mask_mode: str = "dynamic",
    mask_threshold: float = 1.0,
    mask_level: int | None = None,
    callback: Callable[[StepRecord], None] | None = None,
    region_mask=None,
) -> Iterator[AsynDMSession]:
    """Sample with AsynDM inside ``pipe``'s own ``__call__`` while the block runs.

    ``with asyndm.enable(pipe, subjects=["cat"], k=0.5) as run: image = pipe(prompt).images[0]``;
    afterwards ``run.timestep_maps`` is ``(N, B, h, w)`` and ``run.masks`` ``(B, h, w)``.

    Args:
        pipe: a diffusers pipeline with a UNet and a DDIM, Euler or Euler-ancestral
            scheduler (SD 1.x / 2.x, SDXL; text-to-image, img2img, inpainting, ControlNet,
            PAG).
        subjects: subject words / phrases of the prompt (``"cat"``, ``"red car"``,
            ``"cat#2"``) or token positions; one list for all prompts or one per prompt.
        k: curve strength, one value or one per subject.
        mode: ``"asyndm"``, ``"dm_concave"`` or ``"dm"``.
        curve: ``"quadratic"``, ``"piecewise"`` or ``"exponential"``.
        mask_mode: only ``"dynamic"`` here (the previous step's attention); static masks
            need a DM pre-run of the same seed, which :class:`asyndm.pipeline.AsynDMPipeline`
            does.
        mask_threshold: multiple of the spatial mean that claims a pixel.
        mask_level: override of the attention level the masks are read at.
        callback: called with a :class:`~asyndm.sampler.StepRecord` after every step.
        region_mask: a user's mask (a path, PIL image or array; see :mod:`asyndm.regions`)
            whose regions lag instead of the subjects' (repair, editing); ``k`` is then one
            value or one per region, and ``subjects`` is not given.
    """
    check_options(mode, curve, mask_mode, mask_threshold)
    check_subjects(subjects, k)
    mode, regions = regions_for_call(region_mask, subjects, mode)
    if mask_mode == "static":
        raise ValueError("mask_mode='static' needs a DM pre-run of the same seed: use "
                         "AsynDMPipeline / AsynDMXLPipeline (mask_mode='static') instead")
    run = AsynRun(mode=mode, curve=curve, mask_threshold=float(mask_threshold),
                  capture=mode == "asyndm" and regions is None, callback=callback,
                  region_mask=regions)
    with AsynDMHooks(pipe, run, subjects, k, mask_level):
        yield AsynDMSession(run)

"""AsynDM inside diffusers' own pipelines: schedulers, hooks, asyndm.enable, thin subclasses.

Tiny random components built in code (conftest.py); every pipeline is diffusers' own class.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ddim, tiny_unet
from diffusers import (ControlNetModel, DDIMScheduler, DDPMScheduler, DiffusionPipeline,
                       DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionControlNetPipeline,
                       StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPAGPipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from safetensors.torch import load_file

import asyndm
from asyndm.pipeline import AsynDMPipeline, AsynDMXLPipeline
from asyndm.schedulers import AsynDMDDIMScheduler, per_pixel_scheduler

sys.path.insert(0, str(Path(__file__).parent / "golden"))
from make_pipeline_golden import CASES  # noqa: E402

PROMPT = "a cat eating a sandwich"
GOLDEN = Path(__file__).parent / "golden" / "pipeline_v1.safetensors"


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def euler(ancestral=False):
    cls = EulerAncestralDiscreteScheduler if ancestral else EulerDiscreteScheduler
    return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               steps_offset=1, timestep_spacing="leading")


@pytest.fixture(scope="module")
def sd(sd_components):
    return _quiet(StableDiffusionPipeline(**sd_components, requires_safety_checker=False))


@pytest.fixture(scope="module")
def asyn(sd_components):
    return _quiet(AsynDMPipeline(**sd_components))


# -- the new path reproduces the old one ---------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_reproduces_the_pinned_outputs_of_the_reimplemented_call(case, sd_components,
                                                                 sdxl_components):
    ref = load_file(GOLDEN)
    if case.startswith("sdxl"):
        pipe = _quiet(AsynDMXLPipeline(**sdxl_components))
    else:
        pipe = _quiet(AsynDMPipeline(**sd_components))
    kw = dict(CASES[case])
    kw.setdefault("mode", "asyndm")
    out = pipe(PROMPT, generator=_gen(), output_type="latent", return_timestep_maps=True, **kw)
    assert torch.equal(out.timestep_maps, ref[f"{case}.timestep_maps"])
    # Bit for bit up to 466ce4c. Since then (issue 15) the time embedding and the ResNets'
    # projections are per-run tables of every train timestep (matrix products over 1000
    # rows, not over the call's rows), which moves float32 round-off: measured <= 5.8e-5
    # over 10 steps (SD and SDXL); the maps, where masks and schedules decide, stay exact.
    torch.testing.assert_close(out.images.float(), ref[f"{case}.latents"], atol=2e-4, rtol=0)


# -- no AsynDM arguments: the parent, bit for bit ------------------------------------------
def ddpm():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         steps_offset=1, clip_sample=False)


SCHEDULERS = {"ddim": ddim, "ddpm": ddpm, "euler": euler, "euler_a": lambda: euler(True)}


@pytest.mark.parametrize("scheduler", [*SCHEDULERS, "dpm"])
def test_no_asyndm_arguments_is_the_parent(sd_components, scheduler):
    sched = SCHEDULERS[scheduler]() if scheduler != "dpm" else DPMSolverMultistepScheduler()
    comps = {**sd_components, "scheduler": sched}
    want = _quiet(StableDiffusionPipeline(**comps, requires_safety_checker=False))(
        PROMPT, num_inference_steps=3, output_type="np", generator=_gen(1)).images
    pipe = _quiet(AsynDMPipeline(**comps))
    assert np.array_equal(pipe(PROMPT, num_inference_steps=3, output_type="np",
                               generator=_gen(1)).images, want)
    if scheduler != "dpm":  # observed dm: through the per-pixel scheduler, still the parent
        out = pipe(PROMPT, mode="dm", return_timestep_maps=True, num_inference_steps=3,
                   output_type="np", generator=_gen(1))
        assert np.array_equal(out.images, want)
        assert out.timestep_maps.shape == (3, 1, 16, 16)


def test_patched_steps_offset_is_kept_and_save_load_changes_nothing(sd_components, tmp_path):
    # DDIMScheduler() has steps_offset=0; StableDiffusionPipeline patches it to 1
    pipe = _quiet(AsynDMPipeline(**{**sd_components, "scheduler": DDIMScheduler()}))
    assert pipe.scheduler.config.steps_offset == 1
    assert per_pixel_scheduler(pipe.scheduler).config.steps_offset == 1
    out = pipe(PROMPT, mode="dm", num_inference_steps=2, return_timestep_maps=True,
               output_type="np", generator=_gen())
    assert out.timestep_maps[:, 0, 0, 0].tolist() == [501, 1]
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = _quiet(AsynDMPipeline.from_pretrained(tmp_path, use_safetensors=True))
    again = loaded(PROMPT, subjects=["cat"], num_inference_steps=2, output_type="np",
                   generator=_gen())
    first = pipe(PROMPT, subjects=["cat"], num_inference_steps=2, output_type="np",
                 generator=_gen())
    assert np.array_equal(again.images, first.images)


def test_eta_defaults_to_the_parents(sd, asyn):
    want = sd(PROMPT, num_inference_steps=3, output_type="np", generator=_gen(2)).images
    got = asyn(PROMPT, mode="dm", return_timestep_maps=True, num_inference_steps=3,
               output_type="np", generator=_gen(2)).images
    assert np.array_equal(got, want)


# -- AsynDM through every scheduler --------------------------------------------------------
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_empty_masks_equal_dm_and_regions_lag(sd_components, scheduler):
    sched = SCHEDULERS[scheduler]()
    pipe = _quiet(AsynDMPipeline(**{**sd_components, "scheduler": sched}))
    kw = dict(num_inference_steps=4, output_type="np")
    dm = pipe(PROMPT, generator=_gen(), **kw).images
    empty = pipe(PROMPT, subjects=["cat"], mask_mode="static", mask_threshold=1e9,
                 generator=_gen(), **kw).images
    assert np.array_equal(dm, empty)
    out = pipe(PROMPT, subjects=["cat", "sandwich"], k=[0.6, 0.3], generator=_gen(),
               return_timestep_maps=True, **kw)
    tm = out.timestep_maps  # (N, B, h, w)
    assert torch.all(tm[1:] <= tm[:-1])
    ladder = torch.as_tensor(pipe.scheduler.timesteps).round().long()
    assert torch.all(tm >= ladder[:, None, None, None]) and (tm[1] > ladder[1]).any()
    assert np.isfinite(out.images).all() and not np.array_equal(out.images, dm)


def test_enable_on_an_existing_pipe_and_removal_restores_it(sd):
    before = sd(PROMPT, num_inference_steps=3, output_type="np", generator=_gen()).images
    scheduler, unet_hooks = sd.scheduler, len(sd.unet._forward_pre_hooks)
    with asyndm.enable(sd, subjects=["sandwich"], k=0.4) as run:
        assert isinstance(sd.scheduler, AsynDMDDIMScheduler)
        out = sd(PROMPT, num_inference_steps=3, output_type="np", generator=_gen()).images
    assert run.timestep_maps.shape == (3, 1, 16, 16) and run.timestep_maps.dtype == torch.int64
    assert run.masks.shape == (1, 16, 16)
    assert not np.array_equal(out, before)
    assert sd.scheduler is scheduler and len(sd.unet._forward_pre_hooks) == unet_hooks
    assert "encode_prompt" not in vars(sd)
    after = sd(PROMPT, num_inference_steps=3, output_type="np", generator=_gen()).images
    assert np.array_equal(after, before)


def test_enable_twice_at_once_is_refused_and_the_first_stays_intact(sd):
    with asyndm.enable(sd, subjects=["cat"]) as run:
        with pytest.raises(ValueError, match="already switched on"):
            with asyndm.enable(sd, subjects=["sandwich"]):
                pass
        sd(PROMPT, num_inference_steps=2, output_type="np", generator=_gen())
    assert run.timestep_maps.shape == (2, 1, 16, 16)


def test_unsupported_scheduler_and_static_enable_are_one_line_errors(sd_components):
    pipe = _quiet(StableDiffusionPipeline(**{**sd_components,
                                             "scheduler": DPMSolverMultistepScheduler()},
                                          requires_safety_checker=False))
    with pytest.raises(ValueError, match=r"DDIMScheduler\.from_config"):
        with asyndm.enable(pipe, subjects=["cat"]):
            pass
    with pytest.raises(ValueError, match="AsynDMPipeline"):
        with asyndm.enable(pipe, subjects=["cat"], mask_mode="static"):
            pass


# -- other diffusers pipelines -------------------------------------------------------------
def test_img2img_enters_the_ladder_where_strength_says(sd_components):
    pipe = _quiet(StableDiffusionImg2ImgPipeline(**sd_components,
                                                 requires_safety_checker=False))
    image = torch.rand(1, 3, 32, 32)
    with asyndm.enable(pipe, subjects=["cat"], k=0.5) as run:
        pipe(PROMPT, image=image, strength=0.5, num_inference_steps=8, output_type="np",
             generator=_gen())
        ladder = pipe.scheduler.timesteps[4:]
    tm = run.timestep_maps  # (4, 1, 16, 16): the second half of an 8-step ladder
    assert tm.shape == (4, 1, 16, 16)
    assert torch.all(tm[0] == int(ladder[0]))  # every pixel starts where it was noised to
    assert (tm[1] > int(ladder[1])).any() and torch.all(tm[-1] == int(ladder[-1]))


def test_inpainting_controlnet_and_pag_run_with_asyndm(sd_components, tokenizer):
    torch.manual_seed(0)
    inpaint_unet = UNet2DConditionModel(**{**tiny_unet().config, "in_channels": 9}).eval()
    common = {k: v for k, v in sd_components.items() if k != "unet"}
    image, mask = torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    cases = [
        (StableDiffusionInpaintPipeline(**common, unet=inpaint_unet,
                                        requires_safety_checker=False),
         dict(image=image, mask_image=mask)),
        (StableDiffusionControlNetPipeline(
            **common, unet=sd_components["unet"],
            controlnet=ControlNetModel.from_unet(sd_components["unet"],
                                                 conditioning_embedding_out_channels=(16, 32)),
            requires_safety_checker=False), dict(image=torch.rand(1, 3, 32, 32))),
        (StableDiffusionPAGPipeline(**common, unet=sd_components["unet"],
                                    pag_applied_layers=["mid"],
                                    requires_safety_checker=False), dict(pag_scale=3.0)),
    ]
    for pipe, extra in cases:
        _quiet(pipe)
        dm = pipe(PROMPT, num_inference_steps=3, output_type="np", generator=_gen(), **extra)
        with asyndm.enable(pipe, subjects=["cat"], k=0.5) as run:
            out = pipe(PROMPT, num_inference_steps=3, output_type="np", generator=_gen(),
                       **extra)
        name = type(pipe).__name__
        assert run.timestep_maps.shape == (3, 1, 16, 16), name
        assert (run.timestep_maps[0] > int(pipe.scheduler.timesteps[0])).all(), name
        assert np.isfinite(out.images).all() and not np.array_equal(out.images, dm.images), name


def test_controlnet_sees_the_timestep_map(sd_components):
    controlnet = ControlNetModel.from_unet(sd_components["unet"],
                                           conditioning_embedding_out_channels=(16, 32))
    pipe = _quiet(StableDiffusionControlNetPipeline(
        **sd_components, controlnet=controlnet, requires_safety_checker=False))
    seen = []
    handle = controlnet.time_embedding.register_forward_hook(
        lambda m, a, o: seen.append(a[0].shape[0]))
    with asyndm.enable(pipe, subjects=["cat", "sandwich"], k=[0.5, 0.2]):
        pipe(PROMPT, image=torch.rand(1, 3, 32, 32), num_inference_steps=3, output_type="np",
             generator=_gen())
    handle.remove()
    # the ControlNet took the per-pixel path: its time MLP embedded the run's table of every
    # train timestep once; only the last step (every pixel on the ladder's last rung again)
    # takes the model's own path, with its (2,) timestep
    assert seen == [1000, 2]


def test_sdxl_default_euler_scheduler(sdxl_components):
    comps = {**sdxl_components, "scheduler": euler()}
    ref = _quiet(StableDiffusionXLPipeline(**comps))
    pipe = _quiet(AsynDMXLPipeline(**comps))
    kw = dict(num_inference_steps=3, output_type="np", height=32, width=32)
    want = ref(PROMPT, generator=_gen(), **kw).images
    assert np.array_equal(pipe(PROMPT, generator=_gen(), **kw).images, want)
    out = pipe(PROMPT, subjects=["cat"], generator=_gen(), return_timestep_maps=True, **kw)
    assert out.timestep_maps.shape == (3, 1, 16, 16)
    assert np.isfinite(out.images).all() and not np.array_equal(out.images, want)


# -- defects of the re-implemented __call__ ------------------------------------------------
def test_attention_slicing_works_in_asyndm_mode(sd_components):
    pipe = _quiet(AsynDMPipeline(**sd_components))
    pipe.enable_attention_slicing(1)
    try:
        out = pipe(PROMPT, subjects=["cat"], num_inference_steps=3, output_type="np",
                   generator=_gen())
    finally:
        pipe.disable_attention_slicing()
    assert np.isfinite(out.images).all()


def test_missing_components_build_and_a_missing_vae_is_a_clear_error(sd_components):
    AsynDMPipeline(**{**sd_components, "scheduler": None, "unet": None})
    pipe = _quiet(AsynDMPipeline(**{**sd_components, "vae": None}))
    with pytest.raises(ValueError, match="no VAE"):
        pipe(PROMPT, subjects=["cat"], num_inference_steps=2)
    lat = pipe(PROMPT, subjects=["cat"], num_inference_steps=2, output_type="latent",
               generator=_gen()).images
    assert lat.shape == (1, 4, 16, 16)


def test_parent_arguments_prompt_embeds_and_step_end_callbacks(asyn):
    embeds, neg = asyn.encode_prompt(PROMPT, "cpu", 1, True)
    seen = []

    def on_step_end(pipe, i, t, kwargs):
        seen.append(i)
        return kwargs

    out = asyn(prompt_embeds=embeds, negative_prompt_embeds=neg, subjects=[2], k=0.4,
               num_inference_steps=3, output_type="np", generator=_gen(),
               callback_on_step_end=on_step_end, return_timestep_maps=True)
    assert seen == [0, 1, 2] and out.timestep_maps.shape == (3, 1, 16, 16)
    with pytest.raises(ValueError, match="token positions"):
        asyn(prompt_embeds=embeds, negative_prompt_embeds=neg, subjects=["cat"],
             num_inference_steps=2)


def test_embedded_model_loads_without_a_dtype_and_through_diffusion_pipeline():
    path = asyndm.embedded_model_path()
    pipe = _quiet(AsynDMPipeline.from_pretrained(path, use_safetensors=True))
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32
    img = pipe("a red circle", subjects=["circle"], num_inference_steps=3,
               guidance_scale=2.0, generator=_gen()).images[0]
    assert img.size == (32, 32)
    plain = _quiet(DiffusionPipeline.from_pretrained(path, use_safetensors=True))
    assert type(plain) is StableDiffusionPipeline
    assert plain("a red circle", num_inference_steps=2, output_type="np",
                 generator=_gen()).images.shape == (1, 32, 32, 3)


def test_inpainting_with_a_4_channel_unet_renoises_every_pixel_to_its_own_level(sd_components):
    pipe = _quiet(StableDiffusionInpaintPipeline(**sd_components, requires_safety_checker=False))
    image, mask = torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    seen = []
    with asyndm.enable(pipe, subjects=["cat"], k=0.5) as run:
        sched = pipe.scheduler
        original = sched._noise_to

        def spy(x0, noise, t_map):
            seen.append(t_map.clone())
            return original(x0, noise, t_map)

        sched._noise_to = spy
        out = pipe(PROMPT, image=image, mask_image=mask, num_inference_steps=4,
                   output_type="np", generator=_gen())
        ladder = pipe.scheduler.timesteps
    # the known region is re-noised after every step but the last: at the next step's map
    # where it lags (elsewhere at the ladder's rung, by the parent's own add_noise)
    lagging = [m for t, m in zip(ladder[1:], run.timestep_maps[1:]) if (m != int(t)).any()]
    assert len(seen) == len(lagging) >= 1
    assert all(torch.equal(a, b) for a, b in zip(seen, lagging))
    assert np.isfinite(out.images).all()
    x0, noise = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    a = sched.alphas_cumprod[seen[0]][:, None]  # (1, 1, 16, 16)
    torch.testing.assert_close(original(x0, noise, seen[0]), a**0.5 * x0 + (1 - a) ** 0.5 * noise)


def test_enable_on_a_stock_sd3_pipeline(sd3_components):
    from diffusers import StableDiffusion3Pipeline

    pipe = _quiet(StableDiffusion3Pipeline(**sd3_components))
    kw = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np",
              max_sequence_length=8)
    dm = pipe(PROMPT, generator=_gen(), **kw).images
    with asyndm.enable(pipe, subjects=["cat"], k=0.5) as run:
        out = pipe(PROMPT, generator=_gen(), **kw).images
    assert run.timestep_maps.shape == (4, 1, 4, 4)  # the 2x2-patch token grid
    assert torch.all(run.timestep_maps[1:] <= run.timestep_maps[:-1])
    assert np.isfinite(out).all() and not np.array_equal(out, dm)
    assert np.array_equal(pipe(PROMPT, generator=_gen(), **kw).images, dm)


def test_the_parents_safety_checker_runs_in_asyndm_mode(sd_components):
    """Defect 5: decoding and post-processing are the parent's (here: its safety checker)."""
    from transformers import CLIPImageProcessor

    class FlagEverything(torch.nn.Module):  # a stand-in checker: flags every image
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        device = property(lambda self: self.anchor.device)  # what diffusers reads
        dtype = property(lambda self: self.anchor.dtype)

        def forward(self, images, clip_input):
            return images, [True] * len(images)

    comps = {**sd_components, "safety_checker": FlagEverything(),
             "feature_extractor": CLIPImageProcessor(crop_size=32, size=32)}
    pipe = _quiet(AsynDMPipeline(**comps, requires_safety_checker=True))
    out = pipe(PROMPT, subjects=["cat"], num_inference_steps=2, output_type="np",
               generator=_gen())
    assert out.nsfw_content_detected == [True] and out.mode == "asyndm"

import numpy as np
import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)

from asyndm.pipeline import AsynDMPipeline, AsynDMXLPipeline
from conftest import ddim

PROMPT = "a cat eating a sandwich"


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(sd_components):
    return _quiet(AsynDMPipeline(**sd_components))


def _run(pipe, seed=0, **kw):
    kw.setdefault("num_inference_steps", 4)
    kw.setdefault("output_type", "np")
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dm_equals_diffusers_stable_diffusion(pipe, sd_components, eta):
    ref = _quiet(StableDiffusionPipeline(**sd_components, requires_safety_checker=False))
    want = ref(PROMPT, num_inference_steps=4, eta=eta, output_type="np",
               generator=torch.Generator().manual_seed(3)).images
    got = _run(pipe, seed=3, mode="dm", eta=eta).images
    assert np.array_equal(got, want)


def test_asyndm_with_empty_masks_equals_dm(pipe):
    dm = _run(pipe, mode="dm", subjects=["cat"]).images
    # static masks with an unreachable threshold: no pixel ever joins a subject
    empty = _run(pipe, mode="asyndm", subjects=["cat"], mask_mode="static",
                 mask_threshold=1e9).images
    assert np.array_equal(dm, empty)


def test_modes_share_noise_and_differ(pipe):
    out = {m: _run(pipe, mode=m, subjects=["cat", "sandwich"], k=[0.6, 0.3],
                   return_timestep_maps=True) for m in ("dm", "dm_concave", "asyndm")}
    assert not np.array_equal(out["dm"].images, out["asyndm"].images)
    tm = out["asyndm"].timestep_maps  # (N, B, h, w)
    assert tm.shape == (4, 1, 16, 16)
    assert torch.all(tm[1:] <= tm[:-1])
    assert out["asyndm"].label_maps.shape == (4, 1, 16, 16)
    # dm_concave: every pixel on the concave curve of the largest k, above DM's timesteps
    conc, dm = out["dm_concave"].timestep_maps, out["dm"].timestep_maps
    assert torch.all(conc[:-1] >= dm[:-1]) and torch.all(conc[-1] == dm[-1])
    assert (conc[1] > dm[1]).all()


def test_callback_sees_typed_records_and_non_square(pipe):
    seen = []
    out = _run(pipe, mode="asyndm", subjects=["sandwich"], height=24, width=40,
               callback=seen.append)
    assert out.images.shape == (1, 24, 40, 3)
    assert [r.step for r in seen] == [0, 1, 2, 3]
    assert seen[0].timesteps.shape == (1, 12, 20) and seen[-1].next_timesteps.max() == -1
    assert out.masks.shape == (1, 12, 20)


def test_static_masks_and_batches_with_per_sample_generators(pipe):
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    batch = pipe([PROMPT], subjects=["cat"], mode="asyndm", mask_mode="static",
                 num_inference_steps=3, num_images_per_prompt=2, generator=gens,
                 output_type="np").images
    single = pipe(PROMPT, subjects=["cat"], mode="asyndm", mask_mode="static",
                  num_inference_steps=3, generator=torch.Generator().manual_seed(6),
                  output_type="np").images
    assert np.allclose(batch[1], single[0], atol=1e-4)


def test_one_prompt_in_a_list_takes_one_list_of_subject_words(pipe):
    """``pipe([prompt], subjects=[[words]])``: the per-prompt form for a batch of one (the
    inner list was read as token positions and failed inside int())."""
    kw = dict(mode="asyndm", num_inference_steps=4, output_type="np")
    shared = pipe(PROMPT, subjects=["cat", "sandwich"], generator=torch.Generator().manual_seed(0),
                  **kw).images
    listed = pipe([PROMPT], subjects=[["cat", "sandwich"]],
                  generator=[torch.Generator().manual_seed(0)], **kw).images
    assert np.array_equal(shared, listed)


def test_user_errors_are_clear(pipe):
    with pytest.raises(ValueError, match="needs subjects"):
        _run(pipe, mode="asyndm")
    with pytest.raises(ValueError, match="'dog' does not occur"):
        _run(pipe, mode="asyndm", subjects=["dog"])
    with pytest.raises(ValueError, match="allowed 0 < k"):
        _run(pipe, mode="asyndm", subjects=["cat"], k=0.999, num_inference_steps=50)
    with pytest.raises(ValueError, match="mode must be one of"):
        _run(pipe, mode="async")
    with pytest.raises(ValueError, match="mask_threshold must be"):
        _run(pipe, subjects=["cat"], mask_threshold=float("nan"))


def test_from_pipe_and_scheduler_check(sd_components):
    base = StableDiffusionPipeline(**sd_components, requires_safety_checker=False)
    pipe = _quiet(AsynDMPipeline.from_pipe(base))
    assert isinstance(pipe, AsynDMPipeline)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    _run(pipe, mode="dm")  # plain sampling: any scheduler the parent takes
    with pytest.raises(ValueError, match="DDIMScheduler.from_config"):
        _run(pipe, subjects=["cat"])


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = _quiet(AsynDMPipeline.from_pretrained(tmp_path, use_safetensors=True))
    assert np.array_equal(_run(loaded, mode="dm").images, _run(pipe, mode="dm").images)


def test_pixel_space_model_without_vae(sd_components, tokenizer):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=12, out_channels=12, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    ).eval()
    pipe = _quiet(AsynDMPipeline(vae=None, text_encoder=sd_components["text_encoder"],
                                 tokenizer=tokenizer, unet=unet, scheduler=ddim("v_prediction")))
    assert pipe.vae_scale_factor == 2 and type(pipe.vae).__name__ == "PixelShuffleVAE"
    out = _run(pipe, mode="asyndm", subjects=["cat"], return_timestep_maps=True)
    assert out.images.shape == (1, 16, 16, 3)
    assert out.timestep_maps.shape[-2:] == (8, 8)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sdxl_dm_equals_diffusers_and_asyndm_runs(sdxl_components, eta):
    ref = _quiet(StableDiffusionXLPipeline(**sdxl_components))
    pipe = _quiet(AsynDMXLPipeline(**sdxl_components))
    kw = dict(num_inference_steps=3, eta=eta, output_type="np", height=32, width=32)
    want = ref(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    got = pipe(PROMPT, mode="dm", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.allclose(got, want, atol=1e-6)
    out = pipe(PROMPT, mode="asyndm", subjects=["cat"], generator=torch.Generator().manual_seed(0),
               return_timestep_maps=True, **kw)
    assert out.timestep_maps.shape == (3, 1, 16, 16)

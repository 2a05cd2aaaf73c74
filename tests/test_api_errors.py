"""Python API mistakes: one clear ValueError each, raised before any model work.

The catalogue of issue 11 for the Python side (``docs/bad_inputs.md`` lists the CLI's): every
case calls ``AsynDMPipeline`` (or ``asyndm.enable``) on the tiny SD model and checks the
message and that the UNet and the text encoder were never called.
"""

from __future__ import annotations

import pytest
import torch

import asyndm
from asyndm.pipeline import AsynDMPipeline

PROMPT = "a cat eating a sandwich"
GEN = torch.Generator().manual_seed(0)

CASES = [
    # (what the user passes, a regex the message must match)
    (dict(subjects=["cat"], k=torch.tensor(0.5)), r"k must be a number.*float\(k\)"),
    (dict(subjects=["cat"], k=None), r"k must be a number"),
    (dict(subjects=["cat"], k="0.5"), r"k must be a number"),
    (dict(subjects=["cat"], k=[]), r"k must be a number"),
    (dict(subjects=["cat"], k=float("nan")), r"k must be a number"),
    (dict(subjects=["cat"], k=0.0), r"k must be in \(0, 1\)"),
    (dict(subjects=["cat"], k=1.5), r"k must be in \(0, 1\)"),
    (dict(subjects=["cat", "sandwich"], k=[0.5, 0.3, 0.2]), r"2 subjects but 3 k values"),
    (dict(subjects="cat"), r"subjects must be a list, e.g. \['cat'\]"),
    (dict(subjects=[2.0]), r"a subject is a word or phrase"),
    (dict(subjects=[None]), r"a subject is a word or phrase"),
    (dict(subjects=42), r"subjects must be a list"),
    (dict(subjects=["dog"]), r"'dog' does not occur in prompt"),
    (dict(subjects=["cat#0"]), r"occurrences count from 1"),
    (dict(subjects=["cat#2"]), r"occurrence 2 of 'cat' occurs only 1 time"),
    (dict(subjects=[0]), r"token positions \[0\] outside the prompt's tokens"),
    (dict(subjects=[40]), r"token positions \[40\] outside the prompt's tokens"),
    (dict(mode="asyndm"), r"needs subjects"),
    (dict(mode="async", subjects=["cat"]), r"mode must be one of"),
    (dict(subjects=["cat"], curve="cubic"), r"curve must be one of"),
    (dict(subjects=["cat"], mask_mode="fixed"), r"mask_mode must be one of"),
    (dict(subjects=["cat"], mask_threshold=0), r"mask_threshold must be a finite number"),
    (dict(subjects=["cat"], mask_threshold=float("inf")), r"mask_threshold must be a finite"),
    (dict(subjects=["cat"], k=0.99, num_inference_steps=50), r"allowed 0 < k <= 0\.9"),
    (dict(num_inference_steps="2"), r"num_inference_steps must be a whole number"),
    (dict(num_inference_steps=2.5), r"num_inference_steps must be a whole number"),
    (dict(num_inference_steps=0), r"num_inference_steps must be a whole number >= 1"),
    (dict(num_images_per_prompt=0), r"num_images_per_prompt must be a whole number >= 1"),
    (dict(guidance_scale=float("nan")), r"guidance_scale must be a finite number"),
    (dict(guidance_scale=float("inf")), r"guidance_scale must be a finite number"),
    (dict(generator=0), r"generator must be a torch.Generator"),
    (dict(generator=[0]), r"generator must be a torch.Generator"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), r"latents must be \(B, 4, 16, 16\)"),
    (dict(latents=torch.zeros(4, 16, 16)), r"latents must be \(B, 4, 16, 16\)"),
    (dict(latents="noise"), r"latents must be a tensor"),
    (dict(clip_skip=99), r"clip_skip must be a whole number in \[0, 1\]"),
    (dict(prompt=None), r"Provide either `prompt` or `prompt_embeds`"),
    (dict(prompt=5), r"`prompt` has to be of type `str` or `list`"),
    (dict(subjects=["cat"], mask_mode="static", num_inference_steps="3"),
     r"num_inference_steps must be a whole number"),
]


@pytest.fixture(scope="module")
def pipe(sd_components):
    p = AsynDMPipeline(**sd_components)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def calls(pipe):
    """Counts calls of the UNet (after the text encoder ran, the UNet is the model work)."""
    counts = {"unet": 0}

    def count(*_):
        counts["unet"] += 1

    handle = pipe.unet.register_forward_pre_hook(count)
    yield counts
    handle.remove()


@pytest.mark.parametrize("kwargs, message", CASES, ids=[str(i) for i in range(len(CASES))])
def test_a_mistake_is_one_clear_error_before_any_model_work(pipe, calls, kwargs, message):
    kwargs = {"num_inference_steps": 2, **kwargs}
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises(ValueError, match=message) as err:
        pipe(prompt, output_type="np", **kwargs)
    assert "\n" not in str(err.value).strip()
    assert calls["unet"] == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(subjects="cat"), r"subjects must be a list"),
    (dict(subjects=["cat"], k="big"), r"k must be a number"),
    (dict(subjects=["cat"], mode="fast"), r"mode must be one of"),
])
def test_enable_checks_its_options_before_touching_the_pipeline(pipe, kwargs, message):
    scheduler = pipe.scheduler
    with pytest.raises(ValueError, match=message):
        with asyndm.enable(pipe, **kwargs):
            pass
    assert pipe.scheduler is scheduler and "encode_prompt" not in vars(pipe)

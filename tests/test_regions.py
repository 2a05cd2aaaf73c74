"""A user's mask as AsynDM regions (repair / editing, issue 14): rules, errors, pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import asyndm
from asyndm.masks import BACKGROUND
from asyndm.pipeline import AsynDMPipeline
from asyndm.regions import load_mask, mask_regions, require_regions

PROMPT = "a cat eating a sandwich"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def square_mask(size=32, lo=8, hi=24, value=255):
    m = np.zeros((size, size), np.uint8)
    m[lo:hi, lo:hi] = value
    return m


def test_binary_and_labelled_masks_and_the_half_cover_rule(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(square_mask()).save(path)
    labels = load_mask(path)
    assert labels.shape == (32, 32) and set(np.unique(labels)) == {0, 1}
    grid = mask_regions(labels, (16, 16))  # 2x2 image pixels per latent pixel
    assert grid.shape == (16, 16) and grid[4:12, 4:12].eq(0).all()
    assert (grid == BACKGROUND).sum() == 16 * 16 - 64
    # a region covering exactly half of a latent pixel's footprint joins it; less does not
    half = np.zeros((4, 4), np.int64)
    half[0, 0:2] = 1  # the top half of latent pixel (0, 0) of a 2x2 grid
    half[2, 2] = 1  # a quarter of latent pixel (1, 1)
    assert mask_regions(half, (2, 2)).tolist() == [[0, BACKGROUND], [BACKGROUND, BACKGROUND]]
    two = np.zeros((32, 32), np.uint8)
    two[0:16, 0:8], two[16:32, 24:32] = 100, 200  # two grey values: regions 1 and 2
    grid2 = mask_regions(load_mask(two), (16, 16))
    assert set(grid2.unique().tolist()) == {BACKGROUND, 0, 1}


@pytest.mark.parametrize("bad, message", [
    (np.full((32, 32), 255, np.uint8), "covers the whole picture"),
    (np.linspace(0, 255, 32 * 32).reshape(32, 32).astype(np.uint8), "distinct values"),
    (np.zeros((32, 16), np.uint8) + square_mask(32, 8, 16)[:, :16], "aspect ratio"),
    (np.full((32, 32), 0.5), "whole numbers"),
    (np.zeros((2, 2, 2)), "2-D image"),
])
def test_bad_masks_say_the_rule(bad, message):
    with pytest.raises(ValueError, match=message):
        mask_regions(load_mask(bad), (16, 16))


def test_unreadable_tiny_and_empty_masks(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="junk.png: cannot read it as an image"):
        load_mask(junk)
    dot = np.zeros((32, 32), np.uint8)
    dot[5, 5] = 255  # one image pixel: less than half of any latent pixel
    with pytest.raises(ValueError, match="cover less than half"):
        mask_regions(load_mask(dot), (16, 16))
    with pytest.raises(ValueError, match="is empty"):
        require_regions(load_mask(np.zeros((32, 32), np.uint8)))


def test_the_masked_region_lags_and_the_rest_follows_the_ladder(sd_components):
    pipe = AsynDMPipeline(**sd_components)
    pipe.set_progress_bar_config(disable=True)
    dm = pipe(PROMPT, num_inference_steps=5, output_type="np", generator=_gen())
    out = pipe(PROMPT, region_mask=square_mask(), k=0.5, num_inference_steps=5, eta=0.0,
               output_type="np", generator=_gen(), return_timestep_maps=True)
    tm = out.timestep_maps[:, 0]  # (N, h, w)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:12, 4:12] = True
    ladder = torch.tensor([801, 601, 401, 201, 1])  # DDIM, 5 steps, steps_offset 1
    assert torch.all(tm[:, ~inside] == ladder[:, None])  # the background: the ladder
    assert torch.all(tm[:-1, inside] > ladder[:-1, None])  # the region lags ...
    assert torch.all(tm[-1, inside] == 1)  # ... and ends on time
    assert (out.masks[0] == torch.where(inside, 0, BACKGROUND)).all()
    assert not np.array_equal(out.images, dm.images)
    empty = pipe(PROMPT, region_mask=np.zeros((32, 32), np.uint8), num_inference_steps=5,
                 output_type="np", generator=_gen())
    assert np.array_equal(empty.images, dm.images)  # an all-background mask: the DM image


def test_enable_takes_a_region_mask_with_one_k_per_region(sd):
    two = np.zeros((32, 32), np.uint8)
    two[0:16, 0:16], two[16:32, 16:32] = 1, 2
    with asyndm.enable(sd, region_mask=two, k=[0.2, 0.6]) as run:
        sd(PROMPT, num_inference_steps=4, output_type="np", generator=_gen())
    tm = run.timestep_maps[:, 0]
    assert (tm[1, :8, :8] < tm[1, 8:, 8:]).all()  # the larger k lags more
    with pytest.raises(ValueError, match="2 region"):
        with asyndm.enable(sd, region_mask=two, k=[0.2, 0.6, 0.1]):
            sd(PROMPT, num_inference_steps=2, output_type="np")
    with pytest.raises(ValueError, match="not both"):
        with asyndm.enable(sd, region_mask=two, subjects=["cat"]):
            pass


@pytest.fixture(scope="module")
def sd(sd_components):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**sd_components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

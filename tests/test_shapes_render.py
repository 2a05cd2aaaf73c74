"""The batched renderer: shape, range, determinism, colours where they belong."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyndm.shapes.render import render
from asyndm.shapes.grammar import sample_batch
from asyndm.shapes.world import BG_COLOURS, COLOURS, Background, Scene, SceneObject


def _rgb(name: str) -> torch.Tensor:
    table = COLOURS if name in COLOURS else BG_COLOURS
    return torch.tensor(table[name], dtype=torch.float32) / 255


@pytest.fixture(scope="module")
def scenes():
    return sample_batch(np.random.default_rng(0), 64)[0]


def test_shape_dtype_range(scenes):
    images = render(scenes)
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert render(scenes[:3], size=64).shape == (3, 3, 64, 64)


def test_deterministic_and_independent_of_the_batch(scenes):
    images = render(scenes)
    assert torch.equal(images, render(scenes))
    assert torch.equal(images[7:8], render([scenes[7]]))
    assert torch.equal(images[10:20], render(scenes[10:20]))


def test_plain_background_and_object_colours():
    scene = Scene(Background("plain", ("navy", "navy")),
                  (SceneObject("square", "red", 10.0, 8.0, 8.0),
                   SceneObject("circle", "green", 12.0, 22.0, 22.0)))
    image = render([scene])[0]  # (3, 32, 32)
    assert torch.allclose(image[:, 8, 8], _rgb("red"))
    assert torch.allclose(image[:, 22, 22], _rgb("green"))
    assert torch.allclose(image[:, 0, 31], _rgb("navy"))
    # Anti-aliasing: the circle's rim holds colours between the object and the background.
    rim = image[1, 22, 22 - 6]  # circle edge at x = 16 runs through pixel 15.5..16.5
    assert _rgb("navy")[1] < rim < _rgb("green")[1]


def test_textured_backgrounds():
    dot = (SceneObject("diamond", "cyan", 7.0, 16.0, 16.0),)
    halves = render([Scene(Background("halves", ("white", "black"), "x"), dot)])[0]
    assert torch.allclose(halves[:, 5, 2], _rgb("white"))
    assert torch.allclose(halves[:, 5, 29], _rgb("black"))
    grad = render([Scene(Background("gradient", ("black", "white"), "y"), dot)])[0]
    column = grad[0, :, 2]
    assert torch.all(column[1:] > column[:-1])  # brightens downwards
    stripes = render([Scene(Background("stripes", ("white", "brown"), "x", 8.0, 0.0), dot)])[0]
    row = stripes[0, 2]
    assert torch.allclose(row[1], _rgb("white")[0]) and torch.allclose(row[5], _rgb("brown")[0])
    assert torch.allclose(row[9], _rgb("white")[0])


def test_triangle_points_up():
    scene = Scene(Background("plain", ("white", "white")),
                  (SceneObject("triangle", "blue", 12.0, 16.0, 16.0),))
    alpha = 1 - render([scene])[0, 0]  # red channel drops where the triangle is
    rows = alpha.sum(1)
    assert rows[11] < rows[15] < rows[20]


def test_rejects_empty_batch():
    with pytest.raises(ValueError):
        render([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(scenes):
    cuda = render(scenes, device="cuda")
    assert cuda.device.type == "cuda"
    assert torch.allclose(cuda.cpu(), render(scenes), atol=1e-5)
    assert torch.equal(cuda, render(scenes, device="cuda"))

"""The exact scorer: true renders pass, broken ones fail, corruption is tolerated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from asyndm.shapes.render import render
from asyndm.shapes.score import ScoreResult, corrupt, detect, detect_background, score, to_array
from asyndm.shapes.grammar import parse_prompt, sample_spec
from asyndm.shapes.world import (
    CATEGORIES,
    SHAPES,
    Background,
    Scene,
    SceneObject,
    perturb,
    realize,
)


def _batch(seed: int, per_category: int):
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, c) for c in CATEGORIES for _ in range(per_category)]
    scenes = [realize(spec, rng) for spec in specs]
    return rng, specs, scenes, render(scenes).numpy()


def test_true_renders_are_correct_in_every_category():
    _, specs, _, images = _batch(0, 80)
    for spec, image in zip(specs, images):
        result = score(image, spec)
        assert isinstance(result, ScoreResult) and result.category == spec.category
        assert result.correct, (spec.prompt, result.checks, result.found)


def test_blurred_noisy_renders_are_mostly_correct():
    rng, specs, _, images = _batch(1, 20)
    hits = [score(corrupt(image, rng, blur=0.6, noise=0.04), spec).correct
            for spec, image in zip(specs, images)]
    assert np.mean(hits) >= 0.97


def test_perturbed_scenes_are_rejected():
    rng, specs, scenes, _ = _batch(2, 60)
    broken = [perturb(scene, spec, rng) for scene, spec in zip(scenes, specs)]
    images = render([scene for scene, _ in broken]).numpy()
    for spec, (_, kind), image in zip(specs, broken, images):
        result = score(image, spec)
        assert not result.correct, (spec.prompt, kind, result.found)


def test_detect_reads_a_hand_built_scene():
    objects = tuple(SceneObject(shape, colour, 9.0, x, y) for shape, colour, x, y in (
        ("circle", "red", 7.0, 7.0), ("square", "blue", 24.0, 7.0),
        ("triangle", "yellow", 7.0, 24.0), ("diamond", "purple", 24.0, 24.0)))
    scene = Scene(Background("gradient", ("beige", "navy"), "diagonal"), objects)
    found = detect(render([scene])[0])
    assert sorted((o.shape, o.colour) for o in found) == sorted(
        (o.shape, o.colour) for o in objects)
    for obj in objects:
        hit = next(o for o in found if o.shape == obj.shape)
        assert np.allclose(hit.centroid, obj.centroid, atol=0.2)
    assert detect_background(render([scene])[0]).texture == "gradient"


@pytest.mark.parametrize("background", [
    Background("plain", ("grey", "grey")),
    Background("stripes", ("white", "black"), "diagonal", 6.0, 0.3),
    Background("gradient", ("white", "brown"), "x"),
    Background("halves", ("navy", "beige"), "y"),
])
def test_detect_background(background):
    scene = Scene(background, (SceneObject("circle", "green", 10.0, 12.0, 14.0),))
    found = detect_background(render([scene])[0])
    assert found.texture == background.texture
    assert set(found.colours) == set(background.colours)


def test_image_forms_and_sizes():
    spec = parse_prompt("a cyan square to the left of a red circle")
    scene = realize(spec, np.random.default_rng(5))
    image = render([scene])[0]  # (3, 32, 32)
    hwc = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    forms = [image, image.numpy(), image.permute(1, 2, 0).numpy(), hwc, Image.fromarray(hwc),
             render([scene], size=64)[0], render([scene], size=48)[0]]
    for form in forms:
        assert score(form, spec).correct
    assert to_array(hwc).shape == (32, 32, 3)
    with pytest.raises(ValueError):
        to_array(np.zeros((32, 32)))


def test_checks_name_each_requirement():
    spec = parse_prompt("two red circles on a background with white stripes")
    scene = Scene(Background("stripes", ("white", "navy"), "y", 8.0, 0.0),
                  (SceneObject("circle", "red", 9.0, 8.0, 8.0),
                   SceneObject("circle", "blue", 9.0, 22.0, 22.0)))
    result = score(render([scene])[0], spec)
    assert result.checks == {"object0": False, "no_extra": True, "background_texture": True,
                             "background_colour": True}
    assert not result.correct and len(result.found) == 2


def test_every_shape_survives_small_sizes():
    scenes = [Scene(Background("plain", ("white", "white")),
                    (SceneObject(shape, "green", 7.0, 10.3, 12.6),)) for shape in SHAPES]
    for shape, image in zip(SHAPES, render(scenes)):
        assert [o.shape for o in detect(image)] == [shape]


def test_blank_image_has_no_objects():
    assert detect(torch.full((3, 32, 32), 0.5)) == []

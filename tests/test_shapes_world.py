"""The shapes world: invertible grammar, valid specs, scenes that realise them."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyndm.shapes.grammar import parse_prompt, sample_batch, sample_spec, vocabulary
from asyndm.shapes.world import (
    CANVAS,
    CATEGORIES,
    COLOURS,
    SHAPES,
    Background,
    ObjectSpec,
    PromptSpec,
    Scene,
    SceneObject,
    perturb,
    realize,
    relation_holds,
    satisfies,
)


def test_palettes_and_categories():
    assert len(SHAPES) == 4 and len(set(SHAPES)) == 4
    assert len(COLOURS) == 6
    assert set(CATEGORIES) >= {"single", "two", "counting", "binding", "spatial", "context"}


def test_round_trip_many_seeded_specs():
    rng = np.random.default_rng(0)
    for _ in range(1500):
        spec = sample_spec(rng)
        assert parse_prompt(spec.prompt) == spec


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), category=st.sampled_from(CATEGORIES))
def test_round_trip_property(seed, category):
    spec = sample_spec(np.random.default_rng(seed), category)
    assert spec.category == category
    assert parse_prompt(spec.prompt) == spec


def test_prompts_are_lower_case_words_from_the_vocabulary():
    words = vocabulary()
    assert words == sorted(set(words)) and all(w.isalpha() and w.islower() for w in words)
    rng = np.random.default_rng(1)
    for _ in range(500):
        prompt = sample_spec(rng).prompt
        assert prompt == " ".join(prompt.split())
        assert set(prompt.split()) <= set(words)


def test_subjects_are_whole_word_phrases_in_prompt_order():
    rng = np.random.default_rng(2)
    for _ in range(500):
        spec = sample_spec(rng)
        padded = f" {spec.prompt} "
        positions = [padded.find(f" {s} ") for s in spec.subjects]
        assert all(p >= 0 for p in positions) and positions == sorted(positions)
        assert len(spec.subjects) == len(spec.objects)
        for subject, obj in zip(spec.subjects, spec.objects):
            assert subject.split()[-1] in (obj.shape, obj.shape + "s")


def test_known_prompts_parse_to_their_meaning():
    spec = parse_prompt("a red circle to the left of a blue square on a striped background")
    assert spec.category == "spatial" and spec.relation == "left"
    assert spec.subjects == ("red circle", "blue square")
    assert spec.objects == (ObjectSpec("circle", "red"), ObjectSpec("square", "blue"))
    assert spec.background.texture == "stripes" and spec.background.colour is None
    spec = parse_prompt("a square with a circle to its left")
    assert spec.relation == "right" and [o.shape for o in spec.objects] == ["square", "circle"]
    spec = parse_prompt("three green triangles on a white background")
    assert spec.objects == (ObjectSpec("triangle", "green", 3),)
    assert spec.subjects == ("green triangles",)
    assert (spec.background.texture, spec.background.colour) == ("plain", "white")
    spec = parse_prompt("a circle the same colour as the square")
    assert spec.category == "context" and spec.relation == "same_colour"


@pytest.mark.parametrize("prompt", ["a red circle and a square", "a circle!", "two circle",
                                    "a circle  and a square", "a pink circle", ""])
def test_unknown_prompts_raise_naming_the_prompt(prompt):
    with pytest.raises(ValueError, match="prompt"):
        parse_prompt(prompt)


def test_spec_validation():
    with pytest.raises(ValueError, match="category"):
        PromptSpec("nope", "a circle", ("circle",), (ObjectSpec("circle"),))
    with pytest.raises(ValueError, match="subject"):
        PromptSpec("single", "a circle", ("square",), (ObjectSpec("square"),))
    with pytest.raises(ValueError, match="lower-case"):
        PromptSpec("single", "A circle", ("circle",), (ObjectSpec("circle"),))
    with pytest.raises(ValueError, match="fit category"):  # binding needs two colours
        PromptSpec("binding", "a red circle and a red square", ("red circle", "red square"),
                   (ObjectSpec("circle", "red"), ObjectSpec("square", "red")))
    with pytest.raises(ValueError):
        ObjectSpec("hexagon")
    with pytest.raises(ValueError):
        SceneObject("circle", "red", 10.0, 3.0, 16.0)  # leaves the canvas
    with pytest.raises(ValueError):
        Background("plain", ("white", "black"))


@pytest.mark.parametrize("category", CATEGORIES)
def test_realize_satisfies_its_spec(category):
    rng = np.random.default_rng(CATEGORIES.index(category))
    for _ in range(200):
        spec = sample_spec(rng, category)
        scene = realize(spec, rng)
        assert satisfies(scene, spec)
        objs = scene.objects
        assert len(objs) == sum(o.count for o in spec.objects)
        for i, a in enumerate(objs):
            assert 6.0 <= a.size <= 14.0
            assert a.size / 2 <= min(a.x, a.y) and max(a.x, a.y) <= CANVAS - a.size / 2
            for b in objs[i + 1:]:  # bounding boxes never touch
                reach = (a.size + b.size) / 2
                assert abs(a.x - b.x) > reach or abs(a.y - b.y) > reach


def test_relation_holds_uses_the_dominant_axis():
    assert relation_holds((5, 10), (20, 12), "left")
    assert not relation_holds((5, 10), (20, 30), "left")  # more below than right
    assert relation_holds((5, 10), (20, 30), "above")
    assert not relation_holds((5, 10), (20, 12), "left", margin=14)


def test_perturb_breaks_the_spec():
    rng = np.random.default_rng(3)
    kinds = Counter()
    for _ in range(400):
        spec = sample_spec(rng)
        broken, kind = perturb(realize(spec, rng), spec, rng)
        assert not satisfies(broken, spec)
        kinds[kind] += 1
    assert set(kinds) == {"shape", "remove", "extra", "colour", "relation", "background",
                          "background_colour"}


def test_sample_batch_is_seeded_and_mixes_categories():
    scenes, prompts = sample_batch(np.random.default_rng(4), 600)
    assert len(scenes) == len(prompts) == 600 and all(isinstance(s, Scene) for s in scenes)
    again, _ = sample_batch(np.random.default_rng(4), 600)
    assert again == scenes
    counts = Counter(parse_prompt(p).category for p in prompts)
    assert set(counts) == set(CATEGORIES) and min(counts.values()) > 60
    for scene, prompt in zip(scenes, prompts):
        assert satisfies(scene, parse_prompt(prompt))

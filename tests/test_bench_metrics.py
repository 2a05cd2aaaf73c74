"""Metric plug-ins: the exact shapes scorer, CLIPScore on a tiny local CLIP, the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from asyndm.bench.metrics import (METRICS, ClipScore, MetricOptions, MetricScore,
                                  ShapesMetric, build_metrics, register_metric, score_images)
from asyndm.bench.suites import BenchEntry
from asyndm.shapes.tokenizer import write_clip_tokenizer

WORDS = ["a", "red", "blue", "circle", "square", "cat", "dog"]


def _entry(prompt: str) -> BenchEntry:
    return BenchEntry(prompt_id="p", prompt=prompt, category="c")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    tok = write_clip_tokenizer(WORDS, folder, model_max_length=77)
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=len(tok), max_position_embeddings=77,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)) \
        .save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clipscore_is_a_raw_cosine(tiny_clip):
    metric = ClipScore(MetricOptions(clip_model=str(tiny_clip), batch_size=2))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (48, 40, 3), np.uint8)) for _ in range(3)]
    entries = [_entry("a red circle"), _entry("a blue square"), _entry("a cat")]
    values = metric.score(images, entries)
    assert len(values) == 3 and all(math.isfinite(v) and -1 <= v <= 1 for v in values)
    assert metric.score(images[:1], entries[:1]) == pytest.approx(values[:1], abs=1e-5)
    # the same cosine by hand, from the model's own projections
    model, proc = metric.model, metric.processor
    inp = proc(text=["a cat"], images=[images[2]], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inp)
    img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    assert values[2] == pytest.approx(float((img * txt).sum()), abs=1e-5)


def test_clipscore_needs_a_local_folder(tmp_path):
    with pytest.raises(ValueError, match="--clip-model"):
        ClipScore(MetricOptions(clip_model=None))
    with pytest.raises(ValueError, match="local CLIP"):
        ClipScore(MetricOptions(clip_model=str(tmp_path / "missing")))


def test_shapes_metric_is_the_exact_scorer():
    from asyndm.shapes.render import render
    from asyndm.shapes.grammar import sample_spec
    from asyndm.shapes.world import realize

    rng = np.random.default_rng(3)
    spec = sample_spec(rng, "single")
    pixels = render([realize(spec, rng)])[0]  # (3, 32, 32) in [0, 1]
    image = Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    blank = Image.new("RGB", (32, 32), (130, 130, 130))
    metric = ShapesMetric()
    scores = metric.score([image, blank], [_entry(spec.prompt)] * 2)
    assert [s.value for s in scores] == [1.0, 0.0]
    assert all(scores[0].details["checks"].values())
    assert scores[1].details["found"] == []
    with pytest.raises(ValueError, match="not a ShapesBench prompt"):
        metric.validate([_entry("a cat eating a sandwich")])


def test_registry_and_normalisation(monkeypatch):
    class Brightness:
        name = "brightness"

        def __init__(self, opts):
            pass

        def score(self, images, entries):
            vals = [float(np.asarray(im).mean()) / 255 for im in images]
            return [MetricScore(vals[0], {"note": "x"}), float("nan")][: len(images)]

    monkeypatch.setitem(METRICS, "brightness", Brightness)
    with pytest.raises(ValueError, match="identifier"):
        register_metric("bad name", Brightness)
    metrics = build_metrics(["brightness"], MetricOptions())
    ims = [Image.new("RGB", (4, 4), (255, 255, 255)), Image.new("RGB", (4, 4))]
    out = score_images(metrics, ims, [_entry("x")] * 2)
    assert out == [{"brightness": (1.0, {"note": "x"})}, {"brightness": (None, None)}]
    with pytest.raises(ValueError, match="1 scores for 3 images"):
        score_images([type("One", (), {"name": "one", "score": lambda s, i, e: [1.0]})()],
                     ims + ims[:1], [_entry("x")] * 3)
    with pytest.raises(ValueError, match="unknown metrics"):
        build_metrics(["nope"], MetricOptions())

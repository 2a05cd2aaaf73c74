"""Metric plug-ins: score generated images against their prompts.

A metric is any object with a ``name`` and a ``score`` method (the :class:`Metric`
protocol)::

    score(images: Sequence[PIL.Image.Image], entries: Sequence[BenchEntry])
        -> Sequence[float | MetricScore]      # one per image, in order

``entries[i]`` is the suite entry (prompt, category, subjects, k) of ``images[i]``. Return a
float, or a :class:`MetricScore` to also keep per-image details (JSON-serialisable; stored
in the ``metrics.details`` column). ``None`` / NaN marks an image the metric could not score.
A metric may also define ``validate(entries)``, called once before any image is generated,
to reject prompts it cannot score.

Built-ins (``METRICS``):

* ``shapes``: the exact ShapesBench scorer (:func:`asyndm.shapes.score.score`): 1.0 if the
  image follows the prompt, else 0.0; details hold every check and the objects found.
* ``clipscore``: the raw cosine similarity of CLIP image and text embeddings (not scaled by
  100, not clipped at 0), as the AsynDM paper reports it. It reads a *local* CLIP folder
  (``--clip-model DIR``, e.g. a downloaded ``openai/clip-vit-large-patch14``) with
  safetensors weights; nothing is downloaded.

The AsynDM paper's metrics, for a user with the weights on disk (``MetricOptions.paths``;
never downloaded, safetensors only; see ``docs/paper_protocol.md``):

* ``imagereward``: ImageReward (``paths["imagereward"]``, a folder converted once from
  ``ImageReward.pt``), :mod:`asyndm.bench.metrics_imagereward`;
* ``openclip``: CLIPScore with OpenCLIP ViT-H-14, raw cosine (``paths["openclip"]``),
  :mod:`asyndm.bench.metrics_clip`;
* ``bertscore``: BERTScore F1 of a Qwen2.5-VL caption against the prompt
  (``paths["qwen"]`` and ``paths["bertscore"]``), :mod:`asyndm.bench.metrics_vlm`;
* ``qwenscore``: Qwen2.5-VL's 0-10 rating of prompt alignment (``paths["qwen"]``),
  :mod:`asyndm.bench.metrics_vlm`.

Adding a metric that needs weights you have (ImageReward, a VLM judge, ...): write a class
with ``name`` and ``score`` that loads the weights from a local path in its constructor,
and register a factory before running::

    from asyndm.bench.metrics import MetricOptions, register_metric

    class ImageRewardMetric:
        name = "imagereward"
        def __init__(self, opts: MetricOptions):
            self.model = load_my_imagereward(opts.paths["imagereward"], opts.device)
        def score(self, images, entries):
            return [self.model.score(e.prompt, im) for im, e in zip(images, entries)]

    register_metric("imagereward", ImageRewardMetric)
    run_bench(BenchConfig(..., metrics=("shapes", "imagereward"),
                          metric_paths=(("imagereward", "/weights/ImageReward"),)))

A VLM judge follows the same pattern: ask the model a yes/no question per image and return
1.0 / 0.0 with the answer in ``MetricScore.details``. ``asyndm report`` treats every metric
the same way (means, paired differences, bootstrap intervals).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from .paper_names import PAPER_METRICS
from .suites import BenchEntry

__all__ = ["METRICS", "PAPER_METRICS", "PATH_KEYS", "ClipScore", "Metric", "MetricOptions",
           "MetricScore", "Scores", "ShapesMetric", "build_metrics", "register_metric",
           "score_images"]


@dataclass(frozen=True)
class MetricScore:
    """One image's score and optional JSON-serialisable details."""

    value: float | None
    details: dict[str, Any] | None = None


@runtime_checkable
class Metric(Protocol):
    name: str

    def score(self, images: Sequence[Image.Image],
              entries: Sequence[BenchEntry]) -> Sequence[float | MetricScore]: ...


@dataclass(frozen=True)
class MetricOptions:
    """What metric factories may need: a device and local weight folders."""

    device: str | torch.device = "cpu"
    clip_model: str | None = None
    paths: dict[str, str] = field(default_factory=dict)
    """Local weight folders by key: a metric's name (``imagereward``, ``openclip``,
    ``bertscore``, user-registered ones) or ``qwen``, the VLM of bertscore and qwenscore."""
    batch_size: int = 32


class ShapesMetric:
    """ShapesBench alignment: 1.0 when every check of the prompt's spec passes, else 0.0."""

    name = "shapes"

    def __init__(self, opts: MetricOptions | None = None) -> None:
        from ..shapes.score import score
        from ..shapes.grammar import parse_prompt

        self._score, self._parse = score, parse_prompt
        self._specs: dict[str, Any] = {}

    def _spec(self, prompt: str):
        if prompt not in self._specs:
            try:
                self._specs[prompt] = self._parse(prompt)
            except ValueError as err:
                raise ValueError(f"the shapes metric cannot score {prompt!r}: it is not a "
                                 f"ShapesBench prompt ({err})") from None
        return self._specs[prompt]

    def validate(self, entries: Sequence[BenchEntry]) -> None:
        for e in entries:
            self._spec(e.prompt)

    def score(self, images: Sequence[Image.Image],
              entries: Sequence[BenchEntry]) -> list[MetricScore]:
        out = []
        for image, entry in zip(images, entries, strict=True):
            r = self._score(image, self._spec(entry.prompt))
            details = {"checks": {k: bool(v) for k, v in r.checks.items()},
                       "found": [f"{o.colour} {o.shape}" for o in r.found]}
            if r.background is not None:
                details["background"] = [r.background.texture, *r.background.colours]
            out.append(MetricScore(1.0 if r.correct else 0.0, details))
        return out


class ClipScore:
    """Raw cosine similarity between CLIP image and text embeddings, in [-1, 1]."""

    name = "clipscore"

    def __init__(self, opts: MetricOptions) -> None:
        from transformers import CLIPModel, CLIPProcessor

        folder = opts.clip_model
        if folder is None or not Path(folder).is_dir():
            raise ValueError("clipscore needs a local CLIP model folder (--clip-model DIR with "
                             f"config.json and model.safetensors), got {folder!r}")
        self.model = CLIPModel.from_pretrained(folder, use_safetensors=True,
                                               local_files_only=True).eval().to(opts.device)
        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        self.batch_size = opts.batch_size

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], entries: Sequence[BenchEntry]) -> list[float]:
        out: list[float] = []
        device = self.model.device
        for i in range(0, len(images), self.batch_size):
            ims = [im.convert("RGB") for im in images[i : i + self.batch_size]]
            texts = [e.prompt for e in entries[i : i + self.batch_size]]
            inputs = self.processor(text=texts, images=ims, return_tensors="pt", padding=True,
                                    truncation=True)
            res = self.model(**{k: v.to(device) for k, v in inputs.items()})
            img = torch.nn.functional.normalize(res.image_embeds.float(), dim=-1)  # (B, D)
            txt = torch.nn.functional.normalize(res.text_embeds.float(), dim=-1)  # (B, D)
            out.extend((img * txt).sum(-1).tolist())
        return out


MetricFactory = Callable[[MetricOptions], Metric]


def _lazy(module: str, cls: str) -> MetricFactory:
    """A factory that imports ``module`` (and its heavy dependencies) only when used."""

    def factory(opts: MetricOptions) -> Metric:
        import importlib

        return getattr(importlib.import_module(module, __package__), cls)(opts)

    factory.__qualname__ = f"{module.lstrip('.')}.{cls}"
    return factory


METRICS: dict[str, MetricFactory] = {
    "shapes": ShapesMetric, "clipscore": ClipScore,
    "imagereward": _lazy(".metrics_imagereward", "ImageRewardMetric"),
    "openclip": _lazy(".metrics_clip", "OpenClipScore"),
    "bertscore": _lazy(".metrics_vlm", "BertScoreMetric"),
    "qwenscore": _lazy(".metrics_vlm", "QwenScore"),
}
PATH_KEYS = {"imagereward": ("imagereward",), "openclip": ("openclip",),
             "bertscore": ("qwen", "bertscore"), "qwenscore": ("qwen",)}
"""The ``MetricOptions.paths`` keys each paper metric reads."""


def register_metric(name: str, factory: MetricFactory) -> None:
    """Make ``factory(options) -> Metric`` available as ``name`` (see module docstring)."""
    if not name.isidentifier():
        raise ValueError(f"metric name {name!r} must be an identifier")
    METRICS[name] = factory


def build_metrics(names: Sequence[str], opts: MetricOptions) -> list[Metric]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; available: {sorted(METRICS)}")
    metrics = [METRICS[n](opts) for n in names]
    for n, m in zip(names, metrics):
        if not isinstance(m, Metric) or m.name != n:
            raise ValueError(f"metric factory {n!r} must build a Metric named {n!r}")
    return metrics


def _normalise(value: float | MetricScore | None) -> tuple[float | None, dict | None]:
    if not isinstance(value, MetricScore):
        value = MetricScore(value)
    v = None if value.value is None else float(value.value)
    return (None if v is None or not math.isfinite(v) else v), value.details


Scores = dict[str, tuple[float | None, dict | None]]
"""metric name -> (value or None, details or None), for one image."""


def score_images(metrics: Sequence[Metric], images: Sequence[Image.Image],
                 entries: Sequence[BenchEntry]) -> list[Scores]:
    """Per image: ``{metric name: (value, details)}`` for every metric."""
    per_image: list[Scores] = [{} for _ in images]
    for metric in metrics:
        values = list(metric.score(images, entries))
        if len(values) != len(images):
            raise ValueError(f"metric {metric.name!r} returned {len(values)} scores for "
                             f"{len(images)} images")
        for d, v in zip(per_image, values):
            d[metric.name] = _normalise(v)
    return per_image

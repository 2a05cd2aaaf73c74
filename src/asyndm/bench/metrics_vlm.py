"""Two metrics that ask a local Qwen2.5-VL: ``qwenscore`` and ``bertscore``.

* ``qwenscore``: the VLM is shown the image and asked :data:`RATING_QUESTION` (the prompt
  inserted); the first number of its greedy reply (:func:`parse_rating`) is the score, on
  0-10. A reply without a number in [0, 10] scores ``None`` (not counted); every reply is kept
  in the details. The wording is ours: the AsynDM paper names the metric, not its prompt.
* ``bertscore``: the VLM captions the image (:data:`CAPTION_QUESTION`, greedy, at most
  :data:`CAPTION_TOKENS` new tokens) and the caption is compared with the prompt by
  BERTScore (Zhang et al., ICLR 2020; the ``bert-score`` package): F1 of greedy cosine
  matching of contextual token embeddings (caption = candidate, prompt = reference), no idf,
  no baseline rescaling. The BERT-style model is a local folder (``paths["bertscore"]``; the
  package's English default is ``roberta-large``, scored at its layer 17, :data:`BERT_LAYERS`).

The VLM folder (``paths["qwen"]``, e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``) needs ``config.json``,
safetensors weights, the tokenizer (with its chat template) and ``preprocessor_config.json``.
It is loaded once per process for both metrics, in the dtype of its weights, through
``Qwen2_5_VLForConditionalGeneration``; no remote code. The processor is put together here
(tokenizer + ``Qwen2VLImageProcessorPil``) because transformers' ``Qwen2_5_VLProcessor``
insists on a video processor, which needs torchvision.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .metrics import MetricOptions, MetricScore
from .metrics_local import require_folder
from .suites import BenchEntry

__all__ = ["BERT_LAYERS", "CAPTION_QUESTION", "RATING_QUESTION", "BertScoreMetric", "QwenVL",
           "QwenScore", "default_layers", "load_qwen", "parse_rating"]

RATING_QUESTION = (
    'This image was generated from the text prompt: "{prompt}"\n'
    "How well does the image match the prompt? Check every object, count, colour, "
    "attribute and spatial relation that the prompt names. Answer with a single integer "
    "from 0 (does not match at all) to 10 (matches perfectly) and nothing else."
)
RATING_TOKENS = 8
CAPTION_QUESTION = "Describe this image in one sentence."
CAPTION_TOKENS = 64
BERT_LAYERS = {("roberta", 24, 1024): 17, ("roberta", 12, 768): 10, ("bert", 12, 768): 9,
               ("bert", 24, 1024): 18, ("deberta", 48, 1024): 40}
"""bert-score's layer (its ``model2layers``) for roberta-large / -base, bert-base / -large and
deberta-xlarge, told apart by ``(model_type, num_hidden_layers, hidden_size)`` of the folder's
config; any other model uses its last layer."""

_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?")


def parse_rating(reply: str, low: float = 0.0, high: float = 10.0) -> float | None:
    """The first number in ``reply`` if it lies in ``[low, high]``, else ``None``.

    ``"8"``, ``"Score: 8/10"``, ``"8.5 out of 10"`` give 8, 8 and 8.5; ``"eleven"``,
    ``"12"`` and ``"-1"`` give ``None``. A number glued to a word (``"v2"``) is skipped.
    """
    m = _NUMBER.search(reply)
    if m is None:
        return None
    value = float(m.group())
    return value if low <= value <= high else None


def _chat_template(tokenizer, folder: Path) -> str:
    import json

    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    raise ValueError(f"the Qwen2.5-VL folder {folder} has no chat template (tokenizer_config."
                     "json, chat_template.jinja or chat_template.json)")


class QwenVL:
    """A thin adapter over a local Qwen2.5-VL: one image and one question -> a greedy reply."""

    def __init__(self, folder: Path, device) -> None:
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil)

        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, dtype="auto").eval().to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer.padding_side = "left"  # decoder-only: replies start at one column
        self.images = Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True)
        self.template = _chat_template(self.tokenizer, folder)
        self.image_pad = self.tokenizer.convert_ids_to_tokens(self.model.config.image_token_id)

    @torch.no_grad()
    def ask(self, images: Sequence[Image.Image], questions: Sequence[str],
            max_new_tokens: int) -> list[str]:
        """One greedy reply per (image, question) pair, special tokens stripped."""
        pix = self.images(images=[im.convert("RGB") for im in images], return_tensors="pt")
        merge = self.images.merge_size ** 2
        texts = []
        for grid, q in zip(pix["image_grid_thw"], questions, strict=True):
            chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            text = self.tokenizer.apply_chat_template(chat, chat_template=self.template,
                                                      add_generation_prompt=True,
                                                      tokenize=False)
            # the processor's rule: one pad token per merged patch of this image
            texts.append(text.replace(self.image_pad, self.image_pad * (int(grid.prod()) // merge)))
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        device = self.model.device
        out = self.model.generate(
            input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device),
            pixel_values=pix["pixel_values"].to(device, self.model.dtype),
            image_grid_thw=pix["image_grid_thw"].to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=self.tokenizer.pad_token_id)  # (B, L + new)
        replies = self.tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:],
                                              skip_special_tokens=True)
        return [r.strip() for r in replies]


@functools.lru_cache(maxsize=2)
def _cached_qwen(folder: str, device: str) -> QwenVL:
    return QwenVL(Path(folder), device)


def load_qwen(opts: MetricOptions, metric: str) -> QwenVL:
    """The process's Qwen2.5-VL of ``opts.paths["qwen"]`` (loaded once for both metrics)."""
    folder = require_folder(metric, opts.paths.get("qwen"), "--qwen DIR / paths['qwen']",
                            ["config.json", ("model.safetensors", "model.safetensors.index.json"),
                             "preprocessor_config.json", ("tokenizer.json", "vocab.json")])
    return _cached_qwen(str(folder.resolve()), str(opts.device))


class QwenScore:
    """The VLM's 0-10 rating of how well the image follows the prompt (module docstring)."""

    name = "qwenscore"

    def __init__(self, opts: MetricOptions) -> None:
        self.vlm = load_qwen(opts, self.name)
        self.batch_size = opts.batch_size

    def score(self, images: Sequence[Image.Image],
              entries: Sequence[BenchEntry]) -> list[MetricScore]:
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = entries[i : i + self.batch_size]
            replies = self.vlm.ask(images[i : i + self.batch_size],
                                   [RATING_QUESTION.format(prompt=e.prompt) for e in chunk],
                                   RATING_TOKENS)
            out.extend(MetricScore(parse_rating(r), {"reply": r}) for r in replies)
        return out


class BertScoreMetric:
    """BERTScore F1 between the VLM's caption of the image and the prompt."""

    name = "bertscore"

    def __init__(self, opts: MetricOptions, layers: int | None = None) -> None:
        from bert_score import BERTScorer

        folder = require_folder(self.name, opts.paths.get(self.name),
                                "--bertscore-model DIR / paths['bertscore']",
                                ["config.json", "model.safetensors"])
        self.vlm = load_qwen(opts, self.name)
        if layers is None:
            layers = default_layers(folder)
        # a local folder: bert-score's AutoModel / AutoTokenizer read it, nothing is fetched
        self.scorer = BERTScorer(model_type=str(folder), num_layers=layers, device=str(opts.device),
                                 batch_size=opts.batch_size)
        _prefix_space(self.scorer, folder)
        self.layers, self.batch_size = layers, opts.batch_size

    def score(self, images: Sequence[Image.Image],
              entries: Sequence[BenchEntry]) -> list[MetricScore]:
        captions: list[str] = []
        for i in range(0, len(images), self.batch_size):
            captions += self.vlm.ask(images[i : i + self.batch_size],
                                     [CAPTION_QUESTION] * len(images[i : i + self.batch_size]),
                                     CAPTION_TOKENS)
        p, r, f = self.scorer.score(captions, [e.prompt for e in entries])  # (B,) each
        return [MetricScore(float(fi), {"caption": c, "precision": float(pi), "recall": float(ri)})
                for c, pi, ri, fi in zip(captions, p, r, f)]


def _prefix_space(scorer, folder: Path) -> None:
    """Give byte-level BPE tokenizers (RoBERTa, GPT-2) the leading space bert-score intends.

    bert-score encodes with ``add_prefix_space=True`` for these tokenizers; transformers 5
    ignores that keyword at ``encode`` time, so the first word would lose its ``Ġ`` (another
    token than bert-score's published numbers use). Loading the tokenizer with the option
    restores it.
    """
    from transformers import AutoTokenizer, GPT2Tokenizer, RobertaTokenizer

    tok = scorer._tokenizer  # bert-score keeps its tokenizer here
    if not isinstance(tok, (GPT2Tokenizer, RobertaTokenizer)):
        return
    if tok.encode("a b", add_prefix_space=True) != tok.encode(" a b"):
        scorer._tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=False,
                                                          add_prefix_space=True,
                                                          local_files_only=True)


def default_layers(folder: Path) -> int:
    """bert-score's layer for the model in ``folder`` (:data:`BERT_LAYERS`), else its last."""
    import json

    cfg: dict[str, Any] = json.loads((folder / "config.json").read_text())
    n = int(cfg["num_hidden_layers"])
    return BERT_LAYERS.get((cfg.get("model_type"), n, cfg.get("hidden_size")), n)

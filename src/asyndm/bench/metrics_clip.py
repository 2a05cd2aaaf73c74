"""CLIPScore as the AsynDM paper reports it: raw cosine of OpenCLIP ViT-H-14 embeddings.

Why not the ``open_clip`` package: it needs torchvision, and the only torchvision that matches
torch 2.13 on the package registry is a CUDA build, which does not import beside the CPU torch
(``operator torchvision::nms does not exist``). So the OpenCLIP model is rebuilt here from its
published architecture with transformers' ``CLIPModel`` blocks, which compute the same
network: pre-LayerNorm transformers with GELU, a class token pooled after ``ln_post``, a
causal text transformer pooled at the end-of-text token after ``ln_final``, bias-free
projections. OpenCLIP's checkpoint is converted tensor by tensor (:func:`openclip_to_clip`).

The weights folder (``paths["openclip"]``), e.g. a local copy of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, holds either

* ``open_clip_model.safetensors`` (OpenCLIP's own names) and optionally
  ``open_clip_config.json`` (``{"model_cfg": {...}, "preprocess_cfg": {...}}``; without it the
  ViT-H-14 numbers below), or
* transformers' ``config.json`` + ``model.safetensors`` (that repository ships both forms),

plus the CLIP tokenizer files (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``).
Images are preprocessed as OpenCLIP does (:func:`asyndm.bench.metrics_local.clip_pixels`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .metrics import MetricOptions
from .metrics_local import OPENAI_MEAN, OPENAI_STD, clip_pixels, require_folder
from .suites import BenchEntry

__all__ = ["VIT_H_14", "OpenClipScore", "clip_config", "openclip_to_clip"]

VIT_H_14: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                   "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16,
                 "layers": 24},
}
"""OpenCLIP's ``ViT-H-14`` model config (its ``model_configs/ViT-H-14.json``)."""

_VISION_KEYS = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size",
                "patch_dropout"}  # patch_dropout acts in training only
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
              "hf_tokenizer_name", "tokenizer_kwargs"}  # the tokenizer comes from the folder
_AT_DEFAULT = {"ls_init_value": None, "pool_type": ("tok", "argmax")}


def _check_keys(part: str, cfg: dict, allowed: set[str]) -> None:
    for key, value in cfg.items():
        if key in allowed:
            continue
        ok = _AT_DEFAULT.get(key, object())
        if value is ok or (isinstance(ok, tuple) and value in ok):
            continue
        raise ValueError(f"open_clip {part} setting {key}={value!r} is not supported (only "
                         "plain ViT / text transformer CLIP models are)")


def clip_config(model_cfg: dict[str, Any], eos_token_id: int, pad_token_id: int):
    """transformers ``CLIPConfig`` of an OpenCLIP ``model_cfg`` (a ViT + text transformer)."""
    from transformers import CLIPConfig

    v, t = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
    _check_keys("vision_cfg", v, _VISION_KEYS)
    _check_keys("text_cfg", t, _TEXT_KEYS)
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    width, tw = v["width"], t.get("width", 512)
    return CLIPConfig(
        projection_dim=model_cfg["embed_dim"],
        vision_config=dict(
            hidden_size=width, intermediate_size=int(width * v.get("mlp_ratio", 4.0)),
            num_hidden_layers=v["layers"], num_attention_heads=width // v.get("head_width", 64),
            image_size=v["image_size"], patch_size=v["patch_size"], hidden_act=act,
            projection_dim=model_cfg["embed_dim"]),
        text_config=dict(
            hidden_size=tw, intermediate_size=int(tw * t.get("mlp_ratio", 4.0)),
            num_hidden_layers=t.get("layers", 12), num_attention_heads=t.get("heads", 8),
            vocab_size=t.get("vocab_size", 49408),
            max_position_embeddings=t.get("context_length", 77), hidden_act=act,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None,
            projection_dim=model_cfg["embed_dim"]),
    )


def _blocks(src: dict[str, torch.Tensor], pre: str, dst: str, n: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(n):
        a, b = f"{pre}transformer.resblocks.{i}.", f"{dst}encoder.layers.{i}."
        q, k, v = src[a + "attn.in_proj_weight"].chunk(3)  # (3W, W) -> 3 x (W, W)
        qb, kb, vb = src[a + "attn.in_proj_bias"].chunk(3)
        out.update({b + "self_attn.q_proj.weight": q, b + "self_attn.k_proj.weight": k,
                    b + "self_attn.v_proj.weight": v, b + "self_attn.q_proj.bias": qb,
                    b + "self_attn.k_proj.bias": kb, b + "self_attn.v_proj.bias": vb})
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                             ("mlp.fc2", "mlp.c_proj")):
            for p in ("weight", "bias"):
                out[f"{b}{ours}.{p}"] = src[f"{a}{theirs}.{p}"]
    return out


def openclip_to_clip(src: dict[str, torch.Tensor], n_vision: int,
                     n_text: int) -> dict[str, torch.Tensor]:
    """OpenCLIP state dict -> transformers ``CLIPModel`` state dict (same tensors, renamed;
    fused ``in_proj`` split into q / k / v; ``proj`` matrices transposed into Linear weights)."""
    out = {
        "logit_scale": src["logit_scale"],
        "text_model.embeddings.token_embedding.weight": src["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": src["positional_embedding"],
        "text_model.final_layer_norm.weight": src["ln_final.weight"],
        "text_model.final_layer_norm.bias": src["ln_final.bias"],
        "text_projection.weight": src["text_projection"].T,  # (W, E) -> (E, W)
        "vision_model.embeddings.class_embedding": src["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": src["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": src["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": src["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": src["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": src["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": src["visual.ln_post.bias"],
        "visual_projection.weight": src["visual.proj"].T,  # (W, E) -> (E, W)
    }
    out.update(_blocks(src, "", "text_model.", n_text))
    out.update(_blocks(src, "visual.", "vision_model.", n_vision))
    return {k: v.contiguous() for k, v in out.items()}


def _load(folder: Path, device) -> tuple[Any, Any, int, tuple, tuple]:
    """``(model, tokenizer, image size, mean, std)`` from an OpenCLIP or transformers folder."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPModel

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if (folder / "open_clip_model.safetensors").is_file():
        cfg_path = folder / "open_clip_config.json"
        full = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        model_cfg = full.get("model_cfg", VIT_H_14)
        pre = full.get("preprocess_cfg", {})
        config = clip_config(model_cfg, tokenizer.eos_token_id, tokenizer.pad_token_id or 0)
        state = openclip_to_clip(load_file(folder / "open_clip_model.safetensors"),
                                 config.vision_config.num_hidden_layers,
                                 config.text_config.num_hidden_layers)
        model = CLIPModel(config)
        # position_ids buffers are rebuilt by the model; every weight must come from the file
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{folder / 'open_clip_model.safetensors'} does not fit its "
                             f"config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        size = model_cfg["vision_cfg"]["image_size"]
        mean, std = tuple(pre.get("mean", OPENAI_MEAN)), tuple(pre.get("std", OPENAI_STD))
    else:
        model = CLIPModel.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        size, mean, std = model.config.vision_config.image_size, OPENAI_MEAN, OPENAI_STD
    return model.eval().to(device), tokenizer, int(size), mean, std


class OpenClipScore:
    """Raw cosine of OpenCLIP image and text embeddings (paper: ViT-H-14), in [-1, 1]."""

    name = "openclip"

    def __init__(self, opts: MetricOptions) -> None:
        folder = require_folder(
            self.name, opts.paths.get(self.name), "--openclip DIR / paths['openclip']",
            [("open_clip_model.safetensors", "model.safetensors"),
             ("tokenizer.json", "vocab.json")])
        self.model, self.tokenizer, self.size, self.mean, self.std = _load(folder, opts.device)
        self.batch_size = opts.batch_size

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image],
              prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit image and text embeddings, ``(B, E)`` float32 each."""
        device = self.model.device
        pixels = clip_pixels(images, self.size, self.mean, self.std)  # (B, 3, S, S)
        max_len = self.model.config.text_config.max_position_embeddings
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=max_len, return_tensors="pt")
        out = self.model(input_ids=text.input_ids.to(device),
                         attention_mask=text.attention_mask.to(device),
                         pixel_values=pixels.to(device, self.model.dtype))
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)  # (B, E)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)  # (B, E)
        return img, txt

    def score(self, images: Sequence[Image.Image], entries: Sequence[BenchEntry]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(images), self.batch_size):
            img, txt = self.embed(images[i : i + self.batch_size],
                                  [e.prompt for e in entries[i : i + self.batch_size]])
            out.extend((img * txt).sum(-1).tolist())
        return out

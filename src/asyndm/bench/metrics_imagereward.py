"""ImageReward (Xu et al., NeurIPS 2023) rebuilt on transformers' BLIP blocks.

Why not the ``image-reward`` package: it pins ``timm==0.6.13`` and ``fairscale==0.4.13`` and
needs torchvision (see :mod:`asyndm.bench.metrics_clip` for why torchvision does not install
here), and it unpickles ``ImageReward.pt``. The model is small and published:

1. BLIP's ViT-L/16 at 224 px (24 pre-LayerNorm blocks, width 1024, LayerNorm eps 1e-6, GELU,
   a class token, a final LayerNorm): ``BlipVisionModel``.
2. BLIP's BERT-base text encoder whose every layer cross-attends to all image tokens
   (vocabulary 30524 = bert-base-uncased + ``[DEC]`` + ``[ENC]``): ``BlipTextModel``, run
   bidirectionally (``is_decoder=False``), prompt padded to 35 tokens.
3. The ``[CLS]`` feature through an MLP head 768 -> 1024 -> 128 -> 64 -> 16 -> 1 *without*
   activations (their ReLUs are commented out; dropouts are off in eval), then
   ``(reward - 0.16717362830052426) / 1.0333394966054072``.

Images are preprocessed as CLIP (bicubic resize of the shorter side, centre crop 224, CLIP
mean / std). The weights come from a one-time conversion (:func:`convert_imagereward`):
``ImageReward.pt`` is read with ``torch.load(weights_only=True)`` (tensors only; a pickle
that holds code is refused), renamed, and written as ``model.safetensors`` next to a
``config.json`` and the tokenizer. The metric reads only that folder::

    python -m asyndm.bench.metrics_imagereward ImageReward.pt bert-base-uncased/ weights/imagereward
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .metrics import MetricOptions
from .metrics_local import clip_pixels, require_folder
from .suites import BenchEntry

__all__ = ["FORMAT", "ImageRewardMetric", "ImageRewardModel", "convert_imagereward",
           "imagereward_state_dict"]

FORMAT = "asyndm-imagereward-1"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
_HEAD = (1024, 128, 64, 16, 1)
# their nn.Sequential: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
_HEAD_INDICES = (0, 2, 4, 6, 7)


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + linear head; ``forward`` returns ``(B,)`` rewards."""

    def __init__(self, config: dict[str, Any]) -> None:
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        super().__init__()
        self.config = config
        self.vision = BlipVisionModel(BlipVisionConfig(**config["vision"]))
        text_cfg = BlipTextConfig(**config["text"], is_decoder=True)  # builds cross-attention
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        width, layers = config["text"]["hidden_size"], []
        for i, n in enumerate(_HEAD):
            layers.append(nn.Linear(width, n))
            if i < 3:
                layers.append(nn.Dropout(0.2 if i < 2 else 0.1))
            width = n
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values ``(B, 3, S, S)``, input_ids / attention_mask ``(B, L)`` -> ``(B,)``."""
        image = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1 + N, Dv)
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask,
                         encoder_hidden_states=image, encoder_attention_mask=image_mask,
                         is_decoder=False).last_hidden_state  # (B, L, Dt)
        reward = self.mlp.layers(text[:, 0].float()).squeeze(-1)  # (B,)
        return (reward - self.config["mean"]) / self.config["std"]


_VISION_RENAMES = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.", r"encoder.layers.\1.mlp.\2."),
    (r"norm\.", "post_layernorm."),
]


def _rename_vision(key: str) -> str:
    for pattern, repl in _VISION_RENAMES:
        new, n = re.subn(f"^{pattern}", repl, key)
        if n:
            return new
    raise ValueError(f"unexpected BLIP vision tensor {key!r}")


def imagereward_state_dict(src: dict[str, torch.Tensor]) -> tuple[dict[str, Any],
                                                                   dict[str, torch.Tensor]]:
    """ImageReward's state dict (BLIP names) -> ``(config, our state dict)``.

    The sizes are read from the tensors; the head counts follow BLIP (64 channels per head).
    Tensors of the parts ImageReward's score does not use (ITC projections, momentum
    encoders, the decoder) are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        if key.startswith("blip.visual_encoder."):
            out["vision." + _rename_vision(key[len("blip.visual_encoder."):])] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            out["text." + key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp.layers."):
            out[key] = value
    need = ["vision.embeddings.class_embedding", "vision.embeddings.patch_embedding.weight",
            "text.embeddings.word_embeddings.weight", "mlp.layers.0.weight"]
    for k in need:
        if k not in out:
            raise ValueError(f"not an ImageReward state dict: no tensor for {k}")
    width = out["vision.embeddings.class_embedding"].shape[-1]
    patch = out["vision.embeddings.patch_embedding.weight"].shape[-1]
    n_patches = out["vision.embeddings.position_embedding"].shape[1] - 1
    v_layers = 1 + max(int(k.split(".")[3]) for k in out if k.startswith("vision.encoder."))
    vocab, hidden = out["text.embeddings.word_embeddings.weight"].shape
    t_layers = 1 + max(int(k.split(".")[3]) for k in out if k.startswith("text.encoder."))
    config = {
        "format": FORMAT, "mean": REWARD_MEAN, "std": REWARD_STD, "max_length": MAX_LENGTH,
        "vision": dict(hidden_size=width, num_hidden_layers=v_layers,
                       num_attention_heads=max(1, width // 64), patch_size=patch,
                       intermediate_size=out["vision.encoder.layers.0.mlp.fc1.weight"].shape[0],
                       image_size=patch * round(n_patches ** 0.5), layer_norm_eps=1e-6,
                       hidden_act="gelu"),
        "text": dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=t_layers,
                     num_attention_heads=max(1, hidden // 64), encoder_hidden_size=width,
                     intermediate_size=out["text.encoder.layer.0.intermediate.dense.weight"]
                     .shape[0],
                     max_position_embeddings=out["text.embeddings.position_embeddings.weight"]
                     .shape[0], layer_norm_eps=1e-12, hidden_act="gelu",
                     pad_token_id=0, bos_token_id=None, sep_token_id=None),
    }
    return config, out


def convert_imagereward(checkpoint: str | Path, tokenizer_dir: str | Path,
                        out_dir: str | Path) -> Path:
    """``ImageReward.pt`` + a bert-base-uncased tokenizer -> a safetensors folder.

    ``checkpoint`` is read with ``torch.load(weights_only=True)``: only tensors and plain
    containers load, so a checkpoint that carries code is refused rather than run. The
    tokenizer gets ImageReward's two added tokens (``[DEC]`` as bos, ``[ENC]``).
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    checkpoint, out = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file():
        raise ValueError(f"ImageReward checkpoint {checkpoint} does not exist")
    tok_dir = require_folder("imagereward", str(tokenizer_dir), "the tokenizer folder",
                             [("vocab.txt", "tokenizer.json")])
    src = torch.load(checkpoint, map_location="cpu", weights_only=True)
    src = src.get("state_dict", src) if isinstance(src, dict) else src
    if not isinstance(src, dict):
        raise ValueError(f"{checkpoint} does not hold a state dict")
    config, state = imagereward_state_dict(src)
    model = ImageRewardModel(config)
    model.load_state_dict(state, strict=True)  # every tensor has its place
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != config["text"]["vocab_size"]:
        raise ValueError(f"tokenizer of {tok_dir} has {len(tokenizer)} tokens with [DEC] and "
                         f"[ENC], the checkpoint {config['text']['vocab_size']}")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(out)
    return out


def load_imagereward(folder: Path, device) -> tuple[ImageRewardModel, Any]:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder / 'config.json'} is not a converted ImageReward folder "
                         "(convert ImageReward.pt with python -m asyndm.bench.metrics_imagereward)")
    model = ImageRewardModel(config)
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval().to(device), tokenizer


class ImageRewardMetric:
    """ImageReward score of (prompt, image): a standardised reward, higher is better."""

    name = "imagereward"

    def __init__(self, opts: MetricOptions) -> None:
        folder = require_folder(self.name, opts.paths.get(self.name),
                                "--imagereward DIR / paths['imagereward']",
                                ["config.json", "model.safetensors"])
        self.model, self.tokenizer = load_imagereward(folder, opts.device)
        self.batch_size = opts.batch_size

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], entries: Sequence[BenchEntry]) -> list[float]:
        out: list[float] = []
        cfg, device = self.model.config, next(self.model.parameters()).device
        for i in range(0, len(images), self.batch_size):
            pixels = clip_pixels(images[i : i + self.batch_size], cfg["vision"]["image_size"])
            text = self.tokenizer([e.prompt for e in entries[i : i + self.batch_size]],
                                  padding="max_length", truncation=True,
                                  max_length=cfg["max_length"], return_tensors="pt")
            out.extend(self.model(pixels.to(device), text.input_ids.to(device),
                                  text.attention_mask.to(device)).tolist())
        return out


def main(argv: list[str] | None = None) -> int:
    from ..cli_base import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="python -m asyndm.bench.metrics_imagereward", formatter_class=HelpFormatter,
        description="Convert ImageReward.pt (read with torch.load(weights_only=True)) into "
                    "the safetensors folder the imagereward metric reads.",
        epilog="example:\n  python -m asyndm.bench.metrics_imagereward ImageReward.pt "
               "bert-base-uncased/ weights/imagereward")
    parser.add_argument("checkpoint", help="ImageReward.pt (THUDM/ImageReward)")
    parser.add_argument("tokenizer", help="a local bert-base-uncased tokenizer folder")
    parser.add_argument("out", help="output folder (config.json, model.safetensors, tokenizer)")
    args = parser.parse_args(argv)
    print(convert_imagereward(args.checkpoint, args.tokenizer, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

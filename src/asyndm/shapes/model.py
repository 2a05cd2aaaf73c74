"""The shapes world's own small text-to-image model, built from stock diffusers/transformers parts.

The model works in pixel space: there is no VAE. A 32x32 RGB image in [-1, 1] becomes a
"latent" by the lossless space-to-depth `pixel_unshuffle(x, 2)`, a (B, 12, 16, 16) tensor, and
back by `pixel_shuffle`. Everything else is a standard Stable-Diffusion-shaped model:

| component    | class                                | notes                                 |
|--------------|--------------------------------------|---------------------------------------|
| tokenizer    | transformers ``CLIPTokenizer``       | one token per world word, length 32   |
| text_encoder | transformers ``CLIPTextModel``       | small, trained from scratch           |
| unet         | diffusers ``UNet2DConditionModel``   | 16 -> 8 -> 4, cross-attention at 8, 4 |
| scheduler    | diffusers ``DDIMScheduler``          | v-prediction, squared-cosine betas    |

UNet resolution levels (latent side 16, image side 32):

| level | down block            | up block              | attention map cell |
|-------|-----------------------|-----------------------|--------------------|
| 16x16 | DownBlock2D           | UpBlock2D             | -                  |
| 8x8   | CrossAttnDownBlock2D  | CrossAttnUpBlock2D    | 4x4 image pixels   |
| 4x4   | CrossAttnDownBlock2D  | CrossAttnUpBlock2D    | 8x8 image pixels   |

AsynDM reads its region masks from the 8x8 cross-attention maps.

`MODEL_SIZES` is the registry: "tiny" for tests, "base" for the shipped model
(see `param_count_report`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from asyndm.shapes.tokenizer import write_clip_tokenizer, write_vocab_files

__all__ = [
    "IMAGE_SIZE",
    "LATENT_CHANNELS",
    "LATENT_SIZE",
    "MODEL_SIZES",
    "PATCH",
    "ShapesModelConfig",
    "build_components",
    "build_scheduler",
    "latents_to_pixels",
    "param_count_report",
    "param_counts",
    "pixels_to_latents",
    "save_model_folder",
]

IMAGE_SIZE = 32
PATCH = 2
LATENT_CHANNELS = 3 * PATCH * PATCH
LATENT_SIZE = IMAGE_SIZE // PATCH

_SAVED_PARTS = ("scheduler", "text_encoder", "tokenizer", "unet", "vae")
_ABSENT_PARTS = ("feature_extractor", "image_encoder", "safety_checker")
_SAVE_KWARGS = {"text_encoder": {"safe_serialization": True}, "unet": {"safe_serialization": True}}


@dataclass(frozen=True)
class ShapesModelConfig:
    """Sizes of the UNet and the text encoder; everything else is fixed by the world.

    ``attention_heads`` is the number of heads per UNet level; diffusers' historic argument
    name for it is ``attention_head_dim``. The UNet's ``cross_attention_dim`` is
    ``text_hidden``, and the text encoder's context length is ``max_length``.
    """

    block_out_channels: tuple[int, int, int]
    layers_per_block: int
    attention_heads: tuple[int, int, int]
    norm_num_groups: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    max_length: int = 32

    def __post_init__(self) -> None:
        if len(self.block_out_channels) != 3 or len(self.attention_heads) != 3:
            raise ValueError("block_out_channels and attention_heads need one entry per level (3)")
        for ch, heads in zip(self.block_out_channels, self.attention_heads, strict=True):
            if ch <= 0 or ch % self.norm_num_groups:
                raise ValueError(f"channels {ch} must be positive multiples of norm_num_groups")
            if heads <= 0 or ch % heads:
                raise ValueError(f"channels {ch} must be divisible by attention heads {heads}")
        if self.layers_per_block < 1 or self.text_layers < 1:
            raise ValueError("layers_per_block and text_layers must be >= 1")
        if self.text_hidden % self.text_heads:
            raise ValueError("text_hidden must be divisible by text_heads")
        if self.text_intermediate < 1 or self.max_length < 3:
            raise ValueError("text_intermediate must be >= 1 and max_length >= 3")


MODEL_SIZES: dict[str, ShapesModelConfig] = {
    "tiny": ShapesModelConfig(
        block_out_channels=(16, 16, 16),
        layers_per_block=1,
        attention_heads=(1, 1, 1),
        norm_num_groups=8,
        text_hidden=16,
        text_layers=1,
        text_heads=1,
        text_intermediate=32,
    ),
    "base": ShapesModelConfig(
        block_out_channels=(64, 128, 128),
        layers_per_block=2,
        attention_heads=(2, 4, 4),
        norm_num_groups=32,
        text_hidden=256,
        text_layers=4,
        text_heads=4,
        text_intermediate=1024,
    ),
}


def pixels_to_latents(x: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, 32, 32) in [-1, 1] -> latents (B, 12, 16, 16), losslessly.

    Channel ``c * 4 + dy * 2 + dx`` of the latent holds colour ``c`` at pixel offset
    ``(dy, dx)`` of each 2x2 patch (`torch.nn.functional.pixel_unshuffle`'s order).
    """
    return F.pixel_unshuffle(x, PATCH)  # (B, 12, 16, 16)


def latents_to_pixels(z: torch.Tensor) -> torch.Tensor:
    """Latents (B, 12, 16, 16) -> images (B, 3, 32, 32), the exact inverse of `pixels_to_latents`.
    """
    return F.pixel_shuffle(z, PATCH)  # (B, 3, 32, 32)


def build_scheduler() -> DDIMScheduler:
    """The model's noise schedule and sampler defaults (the same for every size)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def _unet_kwargs(cfg: ShapesModelConfig) -> dict[str, Any]:
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_heads,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cfg.text_hidden,
        resnet_time_scale_shift="default",
    )


def _text_config(cfg: ShapesModelConfig, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        projection_dim=cfg.text_hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_components(
    cfg: ShapesModelConfig, words: Sequence[str], seed: int = 0
) -> dict[str, Any]:
    """Freshly initialised model parts for ``cfg`` and the world vocabulary ``words``.

    Returns a dict with keys ``unet`` (`UNet2DConditionModel`, 12 -> 12 channels at 16x16),
    ``text_encoder`` (`CLIPTextModel`), ``tokenizer`` (`CLIPTokenizer`, one token per word) and
    ``scheduler`` (`DDIMScheduler`), in float32 on the CPU. Initialisation is seeded by
    ``seed`` without touching the global torch RNG.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(words, tmp, model_max_length=cfg.max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_unet_kwargs(cfg))
        text_encoder = CLIPTextModel(_text_config(cfg, tokenizer))
    return {
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": build_scheduler(),
    }


def param_counts(cfg: ShapesModelConfig, vocab_size: int = 1024) -> dict[str, int]:
    """Parameter counts ``{"unet", "text_encoder", "total"}``, built on the meta device.

    ``vocab_size`` only affects the text encoder's token embedding (``vocab_size * text_hidden``
    parameters); the default is a generous bound for the shapes world (512 byte symbols plus the
    merges of a few hundred words).
    """
    text_cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        projection_dim=cfg.text_hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    # The meta device allocates no storage, so even large configs are counted instantly.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_unet_kwargs(cfg))
        text_encoder = CLIPTextModel(text_cfg)
    counts = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
    }
    counts["total"] = counts["unet"] + counts["text_encoder"]
    return counts


def param_count_report(cfg: ShapesModelConfig, vocab_size: int = 1024) -> str:
    """A short Markdown table of parameter counts and fp16 weight sizes, for model cards."""
    counts = param_counts(cfg, vocab_size)
    lines = ["| part | parameters | fp16 MB |", "|---|---:|---:|"]
    for name in ("unet", "text_encoder", "total"):
        n = counts[name]
        lines.append(f"| {name} | {n / 1e6:.2f} M | {2 * n / 1e6:.1f} |")
    fields = ", ".join(f"{k}={v}" for k, v in asdict(cfg).items())
    return "\n".join(lines) + f"\n\nconfig: {fields}\n"


def save_model_folder(
    out_dir: str | Path, components: dict[str, Any], card: str | None = None
) -> Path:
    """Write ``components`` as a standard diffusers ``StableDiffusionPipeline`` folder.

    The folder holds ``model_index.json`` (with ``safety_checker``, ``feature_extractor``
    and ``image_encoder`` set to ``[null, null]`` and ``requires_safety_checker: false``),
    ``vae/`` (a :class:`~asyndm.pixel_vae.PixelShuffleVAE` unless one is given), and
    ``unet/``, ``text_encoder/`` (safetensors),
    ``tokenizer/`` (also with the classic ``vocab.json``/``merges.txt``) and ``scheduler/``.
    ``card``, if given, is written to ``README.md``. Weights are saved in their current dtype.

    Load it part by part (``UNet2DConditionModel.from_pretrained(out_dir, subfolder="unet")``)
    or whole with ``DiffusionPipeline.from_pretrained(out_dir)``; that
    pipeline's constructor switches its scheduler copy to ``clip_sample=False`` (with a
    warning), so load ``DDIMScheduler.from_pretrained(out_dir, subfolder="scheduler")`` to
    keep the clipping that suits pixel-space samples.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written by hand rather than by StableDiffusionPipeline.save_pretrained: that pipeline's
    # constructor rewrites the scheduler to clip_sample=False, which suits latents of a VAE but
    # not our pixels, which really are bounded by [-1, 1].
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "requires_safety_checker": False,
    }
    for name in _ABSENT_PARTS:
        index[name] = [None, None]
    components = dict(components)
    if components.get("vae") is None:  # pixel space: the unshuffle factor of the UNet input
        from ..pixel_vae import PixelShuffleVAE

        factor = round((components["unet"].config.in_channels / 3) ** 0.5)
        components["vae"] = PixelShuffleVAE(factor)
    for name in _SAVED_PARTS:
        part = components[name]
        part.save_pretrained(str(out_dir / name), **_SAVE_KWARGS.get(name, {}))
        index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    # weights may be stored in half precision to halve the folder; computed in float32 as
    # the UNet is (transformers would otherwise load the text encoder in the stored dtype)
    te_config = out_dir / "text_encoder" / "config.json"
    te = json.loads(te_config.read_text("utf-8"))
    te["dtype"] = "float32"
    te_config.write_text(json.dumps(te, indent=2) + "\n", "utf-8")
    index = dict(sorted(index.items()))
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", "utf-8")
    write_vocab_files(components["tokenizer"], out_dir / "tokenizer")
    if card is not None:
        (out_dir / "README.md").write_text(card, encoding="utf-8")
    return out_dir

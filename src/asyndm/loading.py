"""Load a model folder (or hub id) into the matching AsynDM pipeline.

Weights are only ever read as safetensors (``use_safetensors=True``); no remote code runs.
Without ``--model`` the embedded ShapesBench model shipped inside the package is used.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler

EMBEDDED_MODEL_DIR = Path(__file__).parent / "shapes" / "weights" / "shapes-base"
"""The package's own small text-to-image model (see its README.md model card)."""


def embedded_model_path() -> Path:
    if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded model is missing from {EMBEDDED_MODEL_DIR}; reinstall asyndm or "
            "pass --model DIR"
        )
    return EMBEDDED_MODEL_DIR


EMBEDDED_GUIDANCE = 2.0
"""Classifier-free guidance scale of the embedded model: its best on single objects
(guidance sweep in its model card; 7.5 over-saturates it and draws extra objects)."""

SD_GUIDANCE = 7.5
"""Stable Diffusion's usual guidance scale, the default for every other model."""


def default_guidance(model: str | Path | None) -> float:
    """The guidance scale to use when none is given: the embedded model's own, else 7.5."""
    if model is None or Path(model).resolve() == EMBEDDED_MODEL_DIR.resolve():
        return EMBEDDED_GUIDANCE
    return SD_GUIDANCE


def _pipeline_class(model: str):
    index = Path(model) / "model_index.json"
    name = "StableDiffusionPipeline"
    if index.is_file():
        try:
            name = json.loads(index.read_text()).get("_class_name", name)
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{index}: not a valid model_index.json ({err})") from err
    if "StableDiffusion3" in name:
        from .pipeline_sd3 import AsynDMSD3Pipeline

        return AsynDMSD3Pipeline
    if "XL" in name:
        from .pipeline import AsynDMXLPipeline

        return AsynDMXLPipeline
    from .pipeline import AsynDMPipeline

    return AsynDMPipeline


def load_pipeline(
    model: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
):
    """Load ``model`` (a diffusers folder or hub id; ``None`` = embedded) for AsynDM.

    UNet pipelines get a ``DDIMScheduler`` built from the model's scheduler config.
    """
    path = str(embedded_model_path() if model is None else model)
    folder = Path(path)
    if model is not None and folder.exists() and not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers model folder (no model_index.json)")
    cls = _pipeline_class(path)
    pipe = cls.from_pretrained(path, dtype=dtype, use_safetensors=True)
    if hasattr(pipe, "unet") and not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    return pipe.to(device)

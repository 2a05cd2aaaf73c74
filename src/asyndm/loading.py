"""Load a model folder (or hub id) into the matching AsynDM pipeline.

Weights are only ever read as safetensors (``use_safetensors=True``); no remote code runs.
Without ``--model`` the embedded ShapesBench model shipped inside the package is used.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from diffusers import DDIMScheduler

EMBEDDED_MODELS_DIR = Path(__file__).parent / "shapes" / "weights"
EMBEDDED_MODELS = ("shapes-base", "shapes-maps")
"""The package's own small text-to-image models (each folder's README.md is its model card):
``shapes-base``, the default, trained at one timestep per image; ``shapes-maps``, fine-tuned
from it on per-pixel timestep maps (issue 12, docs/async_training.md)."""
EMBEDDED_MODEL_DIR = EMBEDDED_MODELS_DIR / EMBEDDED_MODELS[0]
EMBEDDED_PREFIX = "embedded:"
"""``--model embedded:NAME`` names one of :data:`EMBEDDED_MODELS`."""


def embedded_model_path(name: str = EMBEDDED_MODELS[0]) -> Path:
    """The folder of the embedded model ``name`` (default: ``shapes-base``)."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"no embedded model {name!r}; the embedded models are "
                         f"{', '.join(EMBEDDED_MODELS)}")
    folder = EMBEDDED_MODELS_DIR / name
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded model is missing from {folder}; reinstall asyndm or pass --model DIR"
        )
    return folder


def _embedded(model: str | Path) -> Path | None:
    """The folder ``model`` names if it is ``embedded:NAME`` or an embedded model's folder."""
    if isinstance(model, str) and model.startswith(EMBEDDED_PREFIX):
        return embedded_model_path(model[len(EMBEDDED_PREFIX):] or EMBEDDED_MODELS[0])
    folder = Path(model).resolve()
    return folder if folder.parent == EMBEDDED_MODELS_DIR.resolve() else None


EMBEDDED_GUIDANCE = 2.0
"""Classifier-free guidance scale of the embedded model: its best on single objects
(guidance sweep in its model card; 7.5 over-saturates it and draws extra objects)."""

SD_GUIDANCE = 7.5
"""Stable Diffusion's usual guidance scale, the default for every other model."""


FLUX_GUIDANCE = 3.5
"""FluxPipeline's own default: FLUX.1-dev's embedded guidance (schnell ignores it)."""


def default_guidance(model: str | Path | None) -> float:
    """The guidance scale to use when none is given: the embedded model's own, a Flux
    folder's 3.5, else 7.5."""
    if model is None or _embedded(model) is not None:
        return EMBEDDED_GUIDANCE
    index = Path(model) / "model_index.json"
    try:
        if json.loads(index.read_text()).get("_class_name") == "FluxPipeline":
            return FLUX_GUIDANCE
    except (OSError, ValueError, AttributeError):
        pass
    return SD_GUIDANCE


def _pipeline_class(model: str):
    """The AsynDM pipeline for ``model``'s ``model_index.json``: a folder's, or a hub id's
    from the local cache (never the network: offline its retries take half a minute);
    without either, Stable Diffusion's."""
    index = Path(model) / "model_index.json"
    name = "StableDiffusionPipeline"
    if index.is_file():
        try:
            name = json.loads(index.read_text()).get("_class_name", name)
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{index}: not a valid model_index.json ({err})") from err
    elif not Path(model).exists():
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        before = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():  # diffusers passes hf_hub_download a retired option
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
                config = DiffusionPipeline.load_config(model, local_files_only=True)
            name = config.get("_class_name", name)
        except (OSError, ValueError):
            pass
        finally:
            diffusers_logging.set_verbosity(before)
    if name == "FluxPipeline":
        from .pipeline_flux import AsynDMFluxPipeline

        return AsynDMFluxPipeline
    if "StableDiffusion3" in name:
        from .pipeline_sd3 import AsynDMSD3Pipeline

        return AsynDMSD3Pipeline
    if "XL" in name:
        from .pipeline import AsynDMXLPipeline

        return AsynDMXLPipeline
    from .pipeline import AsynDMPipeline

    return AsynDMPipeline


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` this machine has; a clear ``ValueError`` if not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N, mps or xpu") \
            from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    if dev.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    if backend is None or not backend.is_available():
        raise ValueError(f"device {str(device)!r}: this torch ({torch.__version__}) has no "
                         f"usable {dev.type} device here; use --device cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {str(device)!r}: only {count} {dev.type} device(s) here "
                         f"(0..{count - 1})")
    return dev


_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _check_model_folder(folder: Path) -> None:
    """A local diffusers folder whose weights are all safetensors (pickles can run code)."""
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers model folder (no model_index.json)")
    for part in sorted(p for p in folder.iterdir() if p.is_dir()):
        pickles = [f.name for pattern in _PICKLES for f in part.glob(pattern)]
        if pickles and not any(part.glob("*.safetensors")):
            raise ValueError(
                f"{part} has only pickle weights ({', '.join(sorted(pickles))}); asyndm reads "
                "safetensors only, since loading a pickle can run code. Convert the folder, e.g. "
                "load it once with diffusers and save_pretrained(..., safe_serialization=True)")


def _looks_like_path(model: str) -> bool:
    """True for what can only be a folder: hub ids are ``name`` or ``owner/name``."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1


class _DropPixelVAENotice:
    """diffusers notes that a pixel-space folder's VAE is not an ``AutoencoderKL``; it is
    ``asyndm.PixelShuffleVAE`` on purpose."""

    def filter(self, record) -> bool:
        text = record.getMessage()
        return not (text.startswith("Expected types for vae") and "PixelShuffleVAE" in text)


def _pixel_space(path: str) -> bool:
    index = Path(path) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("vae", [None])[-1] == "PixelShuffleVAE"
    except (OSError, ValueError, AttributeError, IndexError, TypeError):
        return False


def _from_pretrained(cls, path: str, dtype: torch.dtype, local: bool):
    """``cls.from_pretrained`` with safetensors only; loading failures as one ``ValueError``.

    For a pixel-space folder (the embedded model) diffusers' two notices about it are
    hidden: its VAE type, and ``clip_sample`` being turned off, which the AsynDM pipelines
    turn back on for pixel-space models (they are trained with x0 clipping).
    """
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    if not local:  # the hub's retry notices would only repeat the one-line error below
        diffusers_logging.set_verbosity_error()
    handlers = diffusers_logging.get_logger().handlers
    notice = _DropPixelVAENotice()
    pixel = local and _pixel_space(path)
    try:
        with warnings.catch_warnings():
            if pixel:
                warnings.filterwarnings("ignore", message=r"(?s).*has not set the "
                                        "configuration `clip_sample`", category=FutureWarning)
                for h in handlers:
                    h.addFilter(notice)
            return cls.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except OSError as err:
        reason = " ".join(str(err).split())
        if len(reason) > 240:
            reason = reason[:240] + "..."
        if local:
            raise ValueError(f"cannot load the model folder {path}: {reason}") from None
        raise ValueError(
            f"model {path!r} is not a local folder and could not be loaded from the Hugging "
            f"Face hub (no network, no cached copy, or no such model: {reason}); download it "
            f"first (huggingface-cli download {path}) or pass --model DIR") from None
    finally:
        for h in handlers:
            h.removeFilter(notice)
        diffusers_logging.set_verbosity(before)


def check_model(model: str | Path | None) -> str:
    """Where ``model`` loads from (a folder or a hub id), checked as far as can be without
    loading it: an existing folder must be a safetensors diffusers folder."""
    if model is None:
        return str(embedded_model_path())
    if str(model).startswith(EMBEDDED_PREFIX):
        return str(_embedded(str(model)))
    path = str(model)
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"--model {path}: a file, not a diffusers model folder")
        _check_model_folder(folder)
        return str(folder)
    if _looks_like_path(path):
        raise FileNotFoundError(f"--model {path}: no such folder")
    return path


def load_pipeline(
    model: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
):
    """Load ``model`` (a diffusers folder or hub id; ``None`` = embedded) for AsynDM.

    UNet pipelines get a ``DDIMScheduler`` built from the model's scheduler config. Every
    mistake a user can make here (no such folder or hub id, pickle weights, a device this
    machine lacks) raises one ``ValueError`` / ``FileNotFoundError`` before loading.
    """
    dev = check_device(device)
    path = check_model(model)
    cls = _pipeline_class(path)
    pipe = _from_pretrained(cls, path, dtype, local=Path(path).is_dir())
    if hasattr(pipe, "unet") and not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    return pipe.to(dev)


def label_progress(pipe, desc: str, enabled: bool | None = None) -> None:
    """Name what the pipeline's progress bar counts (kept on screen when done)."""
    config = dict(getattr(pipe, "_progress_bar_config", None) or {})
    config.update(desc=desc, leave=True)
    if enabled is not None:
        config["disable"] = not enabled
    pipe.set_progress_bar_config(**config)

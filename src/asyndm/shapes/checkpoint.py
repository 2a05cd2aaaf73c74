"""Training state on disk: checkpoints, initial weights and the exported model folder.

Everything is safetensors plus JSON (no pickles): module and EMA weights as flat
``"<module>.<parameter>"`` tensors, the optimizer state flattened to ``"<index>.<name>"``
tensors with its param groups in ``state.json``, and the torch RNG state as base64 text.
Checkpoints and the exported folder are written to a temporary name and renamed into
place, so an interrupted run always leaves a complete one.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from asyndm.shapes.model import save_model_folder

__all__ = [
    "export_ema_folder",
    "init_from_folder",
    "latest_checkpoint",
    "load_optimizer",
    "load_state_tensors",
    "named_params",
    "optimizer_tensors",
    "rng_b64",
    "rng_from_b64",
    "save_checkpoint",
    "state_tensors",
]


def named_params(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Every parameter of ``modules`` keyed ``"<module>.<parameter>"``."""
    return {f"{m}.{n}": p for m, mod in modules.items() for n, p in mod.named_parameters()}


def state_tensors(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The modules' state dicts, flattened like `named_params`, on the CPU."""
    return {
        f"{m}.{k}": v.detach().cpu().contiguous()
        for m, mod in modules.items()
        for k, v in mod.state_dict().items()
    }


def load_state_tensors(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `state_tensors`: load each module's share of ``tensors`` (strict)."""
    for m, mod in modules.items():
        prefix = f"{m}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        mod.load_state_dict(own)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Flatten an optimizer state into safetensors-able tensors plus JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {
        f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        for i, st in sd["state"].items()
        for k, v in st.items()
    }
    return tensors, sd["param_groups"]


def load_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list
) -> None:
    """Inverse of `optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_b64(state: torch.Tensor) -> str:
    """A torch RNG state (uint8 tensor) as base64 text for ``state.json``."""
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def rng_from_b64(text: str) -> torch.Tensor:
    """Inverse of `rng_b64`."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def save_checkpoint(ckpt_root: Path, step: int, parts: dict[str, Any], state: dict) -> Path:
    """Write checkpoint ``step`` atomically: build it in a temp folder, then rename it in place.

    Older checkpoints are removed only after the new one exists, so a crash at any point
    leaves at least one complete checkpoint.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ("model", "ema", "optimizer"):
        save_file(parts[name], str(tmp / f"{name}.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in ckpt_root.glob("step_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``ckpt_root``, or None."""
    done = sorted(p for p in ckpt_root.glob("step_*") if (p / "state.json").is_file())
    return done[-1] if done else None


def export_ema_folder(
    out_dir: Path, comps: dict[str, Any], ema: dict[str, torch.Tensor], card: str
) -> Path:
    """Save the EMA weights in fp16 as a diffusers folder, replacing ``out_dir/model`` whole."""
    modules = {name: copy.deepcopy(comps[name]).float() for name in ("unet", "text_encoder")}
    for name, p in named_params(modules).items():
        p.data.copy_(ema[name])
    export = dict(comps, **{k: m.half().cpu() for k, m in modules.items()})
    tmp = out_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(tmp, export, card)
    final = out_dir / "model"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def init_from_folder(modules: dict[str, nn.Module], folder: Path) -> None:
    """Start from an exported model folder's weights (e.g. to continue a GPU run on a CPU).

    The optimiser, EMA and step count start fresh; the folder must hold the same architecture
    and vocabulary (a mismatch fails in ``load_state_dict``).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    loaded = {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet",
                                                     use_safetensors=True),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder",
                                                      use_safetensors=True),
    }
    for name, src in loaded.items():
        module = modules[name]
        ref = module.state_dict()
        module.load_state_dict({k: v.to(ref[k].dtype) for k, v in src.state_dict().items()})

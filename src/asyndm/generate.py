"""Importable work behind ``asyndm generate``, ``compare`` and ``demo``.

Image ``i`` of seed ``S`` uses a CPU generator seeded ``S + i`` and is generated on its own
(batch 1), so it depends on its seed only, and image 0 of ``dm`` equals diffusers' own
pipeline for ``generator=torch.Generator().manual_seed(S)``. Every mode of one image starts
from a freshly seeded generator, so the modes share the initial and per-step noise.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .loading import default_guidance, load_pipeline
from .sampler import MASK_MODES, MODES, StepRecord
from .schedules import CURVES
from .viz import comparison_grid, save_timestep_animation

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class GenerateConfig:
    """Resolved settings of one generate / compare run (saved as ``config.json``)."""

    prompt: str
    subjects: tuple[str, ...] = ()
    k: tuple[float, ...] = (0.5,)
    model: str | None = None
    curve: str = "quadratic"
    modes: tuple[str, ...] = ("asyndm",)
    mask_mode: str = "dynamic"
    mask_threshold: float = 1.0
    steps: int = 50
    eta: float = 1.0
    guidance: float | None = None  # None: loading.default_guidance(model)
    seed: int = 0
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    out: str = "out"

    def __post_init__(self) -> None:
        if self.guidance is None:
            object.__setattr__(self, "guidance", default_guidance(self.model))
        if not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        for m in self.modes:
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r}; choose from {MODES}")
        if not self.modes:
            raise ValueError("give at least one mode")
        if self.curve not in CURVES:
            raise ValueError(f"unknown curve {self.curve!r}; choose from {sorted(CURVES)}")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"unknown mask mode {self.mask_mode!r}; choose from {MASK_MODES}")
        if set(self.modes) - {"dm"} and not self.subjects:
            raise ValueError("modes dm_concave and asyndm need --subjects (words of the prompt)")
        if len(self.k) not in (1, max(len(self.subjects), 1)):
            raise ValueError(f"give one k or one per subject ({len(self.subjects)}), "
                             f"got {len(self.k)}")
        if self.steps < 1 or self.num_images < 1:
            raise ValueError("steps and num_images must be >= 1")
        if self.eta < 0 or self.guidance < 0 or self.mask_threshold <= 0:
            raise ValueError("eta and guidance must be >= 0, mask_threshold > 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")

    def k_values(self) -> float | list[float]:
        return self.k[0] if len(self.k) == 1 else list(self.k)


@dataclass
class RunResult:
    """Images per mode (``images[mode][i]``) and the asyndm step records of each image."""

    images: dict[str, list[Image.Image]] = field(default_factory=dict)
    records: dict[str, list[list[StepRecord]]] = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)


def _atomic_save(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_config(cfg: GenerateConfig, out: Path, extra: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    data = asdict(cfg)
    if extra:
        data.update(extra)
    path = out / "config.json"
    tmp = path.with_name("config.json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


def run_modes(cfg: GenerateConfig, pipe=None, keep_records: bool = False) -> RunResult:
    """Generate every image of ``cfg`` in every mode (images written as they finish)."""
    if pipe is None:
        pipe = load_pipeline(cfg.model, cfg.device, DTYPES[cfg.dtype])
    out = Path(cfg.out)
    write_config(cfg, out, {"model_resolved": str(getattr(pipe, "name_or_path", cfg.model))})
    result = RunResult()
    # flow-matching pipelines (SD3) step deterministically and take no eta
    extra = {"eta": cfg.eta} if "eta" in inspect.signature(pipe.__call__).parameters else {}
    for mode in cfg.modes:
        result.images[mode], result.records[mode] = [], []
        for i in range(cfg.num_images):
            records: list[StepRecord] = []
            img = pipe(
                cfg.prompt, subjects=list(cfg.subjects) or None, k=cfg.k_values(), mode=mode,
                curve=cfg.curve, mask_mode=cfg.mask_mode, mask_threshold=cfg.mask_threshold,
                num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, **extra,
                generator=torch.Generator().manual_seed(cfg.seed + i), height=cfg.height,
                width=cfg.width, negative_prompt=cfg.negative_prompt,
                callback=records.append if keep_records else None,
            ).images[0]
            path = out / f"{mode}_seed{cfg.seed + i}.png"
            _atomic_save(img, path)
            result.images[mode].append(img)
            result.records[mode].append(records)
            result.paths.append(path)
    return result


def compare(cfg: GenerateConfig, pipe=None) -> RunResult:
    """All three modes, a side-by-side grid and the AsynDM timestep-map animation(s)."""
    cfg = GenerateConfig(**{**asdict(cfg), "modes": MODES})
    result = run_modes(cfg, pipe, keep_records=True)
    out = Path(cfg.out)
    rows = [[result.images[m][i] for m in MODES] for i in range(cfg.num_images)]
    grid = comparison_grid(rows, ["DM", "DM_concave", "AsynDM"],
                           [f"seed {cfg.seed + i}" for i in range(cfg.num_images)])
    grid_path = out / "compare.png"
    _atomic_save(grid, grid_path)
    result.paths.append(grid_path)
    for i, recs in enumerate(result.records["asyndm"]):
        gif = out / f"timesteps_seed{cfg.seed + i}.gif"
        result.paths.append(save_timestep_animation(recs, gif))
    return result

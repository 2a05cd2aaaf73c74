"""Importable work behind ``asyndm generate``, ``compare`` and ``demo``.

Image ``i`` of seed ``S`` uses a CPU generator seeded ``S + i`` and is generated on its own
(batch 1), so it depends on its seed only, and image 0 of ``dm`` equals diffusers' own
pipeline for ``generator=torch.Generator().manual_seed(S)``. Every mode of one image starts
from a freshly seeded generator, so the modes share the initial and per-step noise.

A mode is ``dm``, ``dm_concave``, ``asyndm`` or one of the competitors of
:mod:`asyndm.methods`, optionally with its parameters (``cfgpp:lam=0.6``, ``seg:scale=3``).
``config.json`` records, per mode, its parameters, whether it used the subjects, and its
cost (model evaluations and seconds per image).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .compile import COMPILE_MODES, compile_denoiser
from .loading import default_guidance, label_progress, load_pipeline
from .methods import (METHOD_NAMES, METHODS, Call, count_model_calls, method_params,
                      params_dict, run_method, split_mode)
from .sampler import MASK_MODES, MODES, StepRecord
from .schedules import CURVES
from .subjects import check_for_pipeline
from .viz import comparison_grid, mode_titles, save_timestep_animation

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


MIN_STEPS = 2
"""One DDIM step from pure noise returns the network's first x0 guess: noise on the embedded
model, a blur on Stable Diffusion. Fewer than two steps are refused rather than drawn."""
MAX_SEED = 2**63 - 1
"""``torch.Generator.manual_seed`` takes a signed 64-bit seed."""


SUBJECT_MODES = ("dm_concave", "asyndm", "attend_excite")
"""Modes that read the subjects; every other mode accepts them and records it did not."""


def parse_mode(spec: str) -> tuple[str, object | None]:
    """``"MODE[:KEY=VALUE,...]"`` -> ``(mode, params)``; ``params`` is ``None`` for dm,
    dm_concave and asyndm (their settings are the run's own options)."""
    mode, items = split_mode(spec)
    if mode in MODES:
        if items:
            raise ValueError(f"mode {spec!r}: {mode} takes no KEY=VALUE options here (its "
                             "settings are --k, --curve, --mask-mode, --mask-threshold)")
        return mode, None
    if mode not in METHODS:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES + METHOD_NAMES}")
    return mode, method_params(mode, items)


def mode_label(spec: str) -> str:
    """A file-name form of a mode spec: ``cfgpp:lam=0.6`` -> ``cfgpp-lam-0.6``."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", spec.strip()).strip("-")


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


@dataclass(frozen=True)
class GenerateConfig:
    """Resolved settings of one generate / compare run (saved as ``config.json``).

    Every check that needs no model runs here, so a mistake is reported before the model
    loads; the ones that need it (subjects against the tokenizer, k against the steps, image
    size against the model) run in :func:`check_with_pipeline` before any file is written.
    """

    prompt: str
    subjects: tuple[str | int, ...] = ()
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
    height: int | None = None  # None: the model's own (recorded resolved in config.json)
    width: int | None = None
    negative_prompt: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    out: str = "out"
    overwrite: bool = False
    compile: str = "off"  # asyndm.compile.COMPILE_MODES: torch.compile of the denoiser

    def __post_init__(self) -> None:
        if self.guidance is None:
            object.__setattr__(self, "guidance", default_guidance(self.model))
        if not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        if not self.modes:
            raise ValueError("give at least one mode")
        parsed = [parse_mode(m) for m in self.modes]
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"each mode once, got {list(self.modes)}")
        if self.curve not in CURVES:
            raise ValueError(f"unknown curve {self.curve!r}; choose from {sorted(CURVES)}")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"unknown mask mode {self.mask_mode!r}; choose from {MASK_MODES}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {self.compile!r}; choose from "
                             f"{COMPILE_MODES}")
        needing = sorted({m for m, _ in parsed if m in SUBJECT_MODES})
        if needing and not self.subjects:
            raise ValueError(f"mode(s) {', '.join(needing)} need --subjects (words of the "
                             "prompt)")
        if len(self.k) not in (1, max(len(self.subjects), 1)):
            raise ValueError(f"give one k or one per subject ({len(self.subjects)}), "
                             f"got {len(self.k)}")
        for name, value in (("guidance", self.guidance), ("eta", self.eta),
                            ("mask_threshold", self.mask_threshold), *(("k", v) for v in self.k)):
            _finite(name, value)
        if not all(0 < v < 1 for v in self.k):
            raise ValueError(f"k must be in (0, 1), got {list(self.k)}")
        if self.steps < MIN_STEPS:
            raise ValueError(f"steps must be >= {MIN_STEPS}, got {self.steps} (one step from "
                             "pure noise returns the model's first guess: noise)")
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if self.mask_threshold <= 0:
            raise ValueError(f"mask_threshold must be > 0, got {self.mask_threshold}")
        for name, size in (("height", self.height), ("width", self.width)):
            if size is not None and size <= 0:
                raise ValueError(f"{name} must be > 0, got {size} (leave it out for the "
                                 "model's own size)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        if not 0 <= self.seed <= MAX_SEED - (self.num_images - 1):
            raise ValueError(f"seeds must be in 0..2**63-1; seed {self.seed} with "
                             f"{self.num_images} image(s) uses {self.seed}.."
                             f"{self.seed + self.num_images - 1}")

    def k_values(self) -> float | list[float]:
        return self.k[0] if len(self.k) == 1 else list(self.k)

    def uses_subjects(self) -> bool:
        return any(parse_mode(m)[0] in SUBJECT_MODES for m in self.modes)


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


OUTPUT_PATTERNS = tuple(f"{m}_seed*.png" for m in MODES + METHOD_NAMES) + tuple(
    f"{m}-*_seed*.png" for m in METHOD_NAMES) + ("compare.png", "timesteps_seed*.gif",
                                                 "config.json")
"""What generate / compare write at the top of ``--out`` (what ``overwrite`` removes)."""


def check_out_dir(out: Path, overwrite: bool = False) -> None:
    """Refuse an ``out`` this run cannot write, or one holding files without ``overwrite``.

    Runs before the model loads, so a mistake costs nothing and writes nothing.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(f"--out {out} already holds {len(held)} file(s) ({shown}); choose a "
                         "new folder, or pass --overwrite to replace an earlier run's files")


def _remove_earlier_outputs(out: Path) -> None:
    for pattern in OUTPUT_PATTERNS:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()


def image_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """``(height, width)`` the pipeline will draw: the model's own where ``None``; a
    ``ValueError`` unless both are positive multiples of the model's latent cell."""
    backbone = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    factor = int(getattr(pipe, "vae_scale_factor", 1))
    cell = factor * int(getattr(backbone.config, "patch_size", None) or 1)
    if type(backbone).__name__ == "FluxTransformer2DModel":
        cell *= 2  # Flux packs 2 x 2 latent patches into one token
    native = getattr(pipe, "default_sample_size", None) or backbone.config.sample_size
    native_hw = tuple(native) if isinstance(native, (list, tuple)) else (native, native)
    h, w = height or native_hw[0] * factor, width or native_hw[1] * factor
    if h % cell or w % cell:
        raise ValueError(f"height and width must be multiples of {cell} for this model, "
                         f"got {h}x{w} (its own size: {native_hw[0] * factor}x"
                         f"{native_hw[1] * factor})")
    return h, w


def check_with_pipeline(cfg: GenerateConfig, pipe) -> tuple[int, int]:
    """The checks that need the loaded model (subjects, k, image size); returns the size."""
    if cfg.uses_subjects():
        check_for_pipeline(pipe, cfg.prompt, list(cfg.subjects), cfg.k_values(), cfg.steps,
                           cfg.curve)
    return image_size(pipe, cfg.height, cfg.width)


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
    """Generate every image of ``cfg`` in every mode (images written as they finish).

    Every mistake is reported before the first file is written: ``out`` and the device
    before the model loads, subjects, k and image size right after.
    """
    out = Path(cfg.out)
    check_out_dir(out, cfg.overwrite)
    if pipe is None:
        pipe = load_pipeline(cfg.model, cfg.device, DTYPES[cfg.dtype])
    if cfg.compile != "off":  # every mode below runs the compiled denoiser
        compile_denoiser(pipe, cfg.compile)
    height, width = check_with_pipeline(cfg, pipe)
    if cfg.overwrite:
        _remove_earlier_outputs(out)
    modes_info = _modes_info(cfg)
    extra_cfg = {"model_resolved": str(getattr(pipe, "name_or_path", cfg.model)),
                 "height": height, "width": width, "threads": torch.get_num_threads(),
                 "modes_resolved": modes_info}
    write_config(cfg, out, extra_cfg)
    positions = _subject_positions(pipe, cfg)
    result = RunResult()
    # flow-matching pipelines (SD3) step deterministically and take no eta
    extra = {"eta": cfg.eta} if "eta" in inspect.signature(pipe.__call__).parameters else {}
    # a one-prompt list, so that diffusers sees prompt and negative prompt of one type
    negative = None if cfg.negative_prompt is None else [cfg.negative_prompt]
    for spec in cfg.modes:
        mode, params = parse_mode(spec)
        result.images[spec], result.records[spec] = [], []
        seconds, evals = 0.0, 0
        for i in range(cfg.num_images):
            seed = cfg.seed + i
            label_progress(pipe, f"{spec} image {i + 1}/{cfg.num_images} (seed {seed}), "
                                 "denoising steps")
            records: list[StepRecord] = []
            start = time.perf_counter()
            with count_model_calls(pipe) as calls:
                if params is None:
                    img = pipe(
                        [cfg.prompt], subjects=list(cfg.subjects) or None, k=cfg.k_values(),
                        mode=mode, curve=cfg.curve, mask_mode=cfg.mask_mode,
                        mask_threshold=cfg.mask_threshold, num_inference_steps=cfg.steps,
                        guidance_scale=cfg.guidance, **extra,
                        generator=torch.Generator().manual_seed(seed), height=height,
                        width=width, negative_prompt=negative,
                        callback=records.append if keep_records else None,
                    ).images[0]
                else:
                    gen = torch.Generator().manual_seed(seed)
                    call = Call(prompt=cfg.prompt, generators=(gen,), steps=cfg.steps,
                                guidance=cfg.guidance, eta=extra.get("eta"), height=height,
                                width=width, negative_prompt=cfg.negative_prompt,
                                subject_positions=positions)
                    img = run_method(pipe, mode, call, params)[0]
            seconds += time.perf_counter() - start
            evals += calls.rows
            path = out / f"{mode_label(spec)}_seed{seed}.png"
            _atomic_save(img, path)
            result.images[spec].append(img)
            result.records[spec].append(records)
            result.paths.append(path)
        modes_info[spec]["model_evals_per_image"] = evals / cfg.num_images
        modes_info[spec]["seconds_per_image"] = round(seconds / cfg.num_images, 4)
    write_config(cfg, out, extra_cfg)  # again, with the costs
    return result


def _modes_info(cfg: GenerateConfig) -> dict[str, dict]:
    """Per mode: its method parameters and whether it reads the subjects."""
    info = {}
    for spec in cfg.modes:
        mode, params = parse_mode(spec)
        info[spec] = {"mode": mode, "params": None if params is None else params_dict(params),
                      "used_subjects": bool(cfg.subjects) and mode in SUBJECT_MODES}
    return info


def _subject_positions(pipe, cfg: GenerateConfig) -> tuple[tuple[int, ...], ...]:
    if not cfg.subjects:
        return ()
    from .subjects import resolve_subjects

    ks = [cfg.k[0]] * len(cfg.subjects) if len(cfg.k) == 1 else list(cfg.k)
    return tuple(s.positions for s in resolve_subjects(pipe.tokenizer, cfg.prompt,
                                                       list(cfg.subjects), ks))


def compare(cfg: GenerateConfig, pipe=None) -> RunResult:
    """DM, DM_concave and AsynDM (plus the competitor modes in ``cfg.modes``), a side-by-side
    grid and the AsynDM timestep-map animation(s)."""
    extra = tuple(m for m in cfg.modes if parse_mode(m)[0] not in MODES)
    cfg = GenerateConfig(**{**asdict(cfg), "modes": MODES + extra})
    result = run_modes(cfg, pipe, keep_records=True)
    out = Path(cfg.out)
    rows = [[result.images[m][i] for m in cfg.modes] for i in range(cfg.num_images)]
    k = "/".join(f"{v:g}" for v in cfg.k)
    subjects = ", ".join(map(str, cfg.subjects))
    header = (f"{cfg.prompt}  [subjects: {subjects}]\n{cfg.steps} DDIM steps, guidance "
              f"{cfg.guidance:g}, eta {cfg.eta:g}, {cfg.mask_mode} masks at "
              f"{cfg.mask_threshold:g} x mean; model: {cfg.model or 'embedded (32x32)'}")
    grid = comparison_grid(
        rows, mode_titles(k, cfg.curve) + [f"{m}\n(asyndm.methods)" for m in extra],
        [f"seed {cfg.seed + i}: all {len(cfg.modes)} modes start from the same noise"
         for i in range(cfg.num_images)], header=header)
    grid_path = out / "compare.png"
    _atomic_save(grid, grid_path)
    result.paths.append(grid_path)
    for i, recs in enumerate(result.records["asyndm"]):
        gif = out / f"timesteps_seed{cfg.seed + i}.gif"
        result.paths.append(save_timestep_animation(
            recs, gif, title=f"AsynDM, seed {cfg.seed + i}: {cfg.prompt}",
            label_names=[str(s) for s in cfg.subjects]))
    return result

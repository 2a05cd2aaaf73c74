"""Region repair and editing with a user's mask (the paper's Fig. 6), and its benchmark.

Three ways to redraw the marked region of a generated image, all paired by seed:

* ``asyndm``: the same seed again, the region lagging on the concave curve and the rest on
  the ordinary schedule (:mod:`asyndm.regions`), so the region is redrawn against an
  already clear context; with a new prompt this is editing;
* ``inpaint``: DM inpainting, RePaint-style (Lugmayr et al. 2022, without resampling
  jumps): after every step the latents outside the mask are replaced by the original
  image's latents forward-noised to the next timestep (fresh noise from a generator seeded
  with the seed), and by the original itself after the last step;
* ``reseed``: the whole image again with another seed (``seed + RESEED_OFFSET``).

The benchmark (:func:`run_repair_bench`) starts from DM images of ShapesBench prompts that
the exact scorer marks wrong, takes as the mask the pixels of the objects that make them
wrong (:func:`offending_mask`), redraws with every method and scores again. Rows are
appended to ``rows.jsonl`` as they finish, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from .masks import BACKGROUND
from .regions import load_mask, mask_regions, require_regions

METHODS = ("asyndm", "inpaint", "reseed")
RESEED_OFFSET = 10_000


@dataclass(frozen=True)
class RepairConfig:
    """Settings shared by every redraw (and recorded with the benchmark's rows)."""

    steps: int = 20
    guidance: float = 2.0
    eta: float = 1.0
    k: float = 0.5
    curve: str = "quadratic"
    dilate: int = 1

    def __post_init__(self) -> None:
        if self.steps < 2 or not 0 < self.k < 1 or self.dilate < 0:
            raise ValueError("steps must be >= 2, k in (0, 1) and dilate >= 0")
        if not (math.isfinite(self.guidance) and self.guidance >= 0 and 0 <= self.eta <= 1):
            raise ValueError("guidance must be finite and >= 0, eta in [0, 1]")


def _call(pipe, prompt: str, seed: int, cfg: RepairConfig, **kw):
    return pipe(prompt, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                eta=cfg.eta, generator=torch.Generator().manual_seed(seed), **kw)


def generate_with_latents(pipe, prompt: str, seed: int, cfg: RepairConfig):
    """The DM image of ``seed`` and its final latents ``(1, C, h, w)``."""
    kept = {}

    def keep(p, i, t, kwargs):
        kept["latents"] = kwargs["latents"]
        return kwargs

    out = _call(pipe, prompt, seed, cfg, mode="dm", callback_on_step_end=keep)
    return out.images[0], kept["latents"]


def _latent_mask(labels: np.ndarray, latents: torch.Tensor) -> torch.Tensor:
    """``(1, 1, h, w)`` float: 1 in the region(s), 0 elsewhere, on the latent grid."""
    grid = mask_regions(labels, tuple(latents.shape[-2:]))  # (h, w)
    return (grid != BACKGROUND).to(latents.dtype)[None, None].to(latents.device)


def repaint_callback(original: torch.Tensor, mask: torch.Tensor, seed: int) -> Callable:
    """A ``callback_on_step_end`` that keeps the outside of ``mask`` on the original's path."""
    noise_gen = torch.Generator().manual_seed(seed)

    def on_step_end(pipe, i, t, kwargs):
        timesteps = pipe.scheduler.timesteps
        if i + 1 < len(timesteps):
            noise = torch.randn(original.shape, generator=noise_gen).to(original)
            known = pipe.scheduler.add_noise(original, noise, timesteps[i + 1:i + 2])
        else:
            known = original
        return {**kwargs, "latents": mask * kwargs["latents"] + (1 - mask) * known}

    return on_step_end


def redraw(pipe, method: str, prompt: str, seed: int, mask, cfg: RepairConfig,
           original_latents: torch.Tensor | None = None,
           k: float | list[float] | None = None) -> Image.Image:
    """Redraw with one of :data:`METHODS` (``mask``: anything :func:`load_mask` reads;
    ``k``: one per region of a labelled mask, default ``cfg.k``)."""
    if method == "asyndm":
        return _call(pipe, prompt, seed, cfg, region_mask=mask, k=cfg.k if k is None else k,
                     curve=cfg.curve).images[0]
    if method == "inpaint":
        if original_latents is None:
            raise ValueError("inpainting needs the original image's latents")
        lat_mask = _latent_mask(load_mask(mask), original_latents)
        return _call(pipe, prompt, seed, cfg, mode="dm",
                     callback_on_step_end=repaint_callback(original_latents, lat_mask, seed)
                     ).images[0]
    if method == "reseed":
        return _call(pipe, prompt, seed + RESEED_OFFSET, cfg, mode="dm").images[0]
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def outside_change(before: Image.Image, after: Image.Image, mask: np.ndarray) -> float:
    """Mean absolute change (0-255 per channel) of the pixels outside ``mask`` ``(H, W)``."""
    a = np.asarray(before, np.float64)
    b = np.asarray(after, np.float64)
    outside = np.asarray(mask) == 0
    return float(np.abs(a - b)[outside].mean()) if outside.any() else 0.0


def offending_mask(result, spec, dilate: int = 1) -> np.ndarray | None:
    """``(H, W)`` uint8 mask (0 / 255) of the objects that make a scored image wrong.

    Offending objects (the documented definition): detected objects that match no object
    of the prompt, and the surplus of those that match (the smallest beyond the asked
    count). ``None`` when there is none: an image wrong only through a missing object, a
    relation or the background has nothing to redraw in place.
    """
    from .shapes.score import matches

    found = result.found
    matched, surplus = set(), []
    for want in spec.objects:
        group = sorted((j for j, o in enumerate(found) if matches(o, want.shape, want.colour)),
                       key=lambda j: -found[j].area)
        matched.update(group[:want.count])
        surplus += group[want.count:]
    offending = [j for j in range(len(found)) if j not in matched]
    offending = sorted(set(offending) | set(surplus))
    if not offending or any(found[j].region is None for j in offending):
        return None
    region = np.logical_or.reduce([found[j].region for j in offending])
    if dilate:
        region = ndimage.binary_dilation(region, iterations=dilate)
    return (region * 255).astype(np.uint8)


def overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """``image`` with the masked pixels tinted magenta (for the before / mask / after rows)."""
    rgb = np.asarray(image.convert("RGB"), np.float64)
    m = (np.asarray(mask) > 0)[..., None]
    tint = np.array([255.0, 0.0, 255.0])
    return Image.fromarray(np.where(m, 0.5 * rgb + 0.5 * tint, rgb).astype(np.uint8))


def run_repair_bench(pipe, entries: Sequence, seeds: Sequence[int], cfg: RepairConfig,
                     out: str | Path, progress: Callable | None = None) -> list[dict]:
    """Redraw every wrong DM image of ``entries`` x ``seeds`` with every method.

    Args:
        entries: objects with ``prompt`` and ``category`` (ShapesBench suite entries).
        out: folder for ``rows.jsonl``, ``config.json`` and the images of each case.

    Returns every row: one per (prompt, seed) with ``status`` (``correct``, ``no_region``
    or ``repaired``) and, for repaired cases, one ``fixed`` / ``outside_change`` per method.
    """
    from .shapes.grammar import parse_prompt
    from .shapes.score import score

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    config = {"repair": asdict(cfg), "seeds": list(seeds), "methods": list(METHODS),
              "prompts": [e.prompt for e in entries]}
    cfg_path = out / "config.json"
    if cfg_path.is_file() and json.loads(cfg_path.read_text()) != config:
        raise ValueError(f"{out} holds a repair run with other settings; use a new folder")
    cfg_path.write_text(json.dumps(config, indent=2))
    rows_path = out / "rows.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] \
        if rows_path.is_file() else []
    done = {(r["prompt"], r["seed"]) for r in rows}
    todo = [(e, s) for e in entries for s in seeds if (e.prompt, s) not in done]
    for n, (entry, seed) in enumerate(todo):
        if progress is not None:
            progress(n, len(todo), entry.prompt, seed)
        spec = parse_prompt(entry.prompt)
        before, latents = generate_with_latents(pipe, entry.prompt, seed, cfg)
        row = {"prompt": entry.prompt, "category": entry.category, "seed": seed}
        result = score(before, spec)
        mask = None if result.correct else offending_mask(result, spec, cfg.dilate)
        if result.correct or mask is None:
            row["status"] = "correct" if result.correct else "no_region"
        else:
            require_regions(load_mask(mask))
            row.update(status="repaired", mask_area=float((mask > 0).mean()))
            stem = f"{len(rows):04d}"
            images = {"before": before, "mask": overlay(before, mask)}
            for method in METHODS:
                after = redraw(pipe, method, entry.prompt, seed, mask, cfg, latents)
                row[f"{method}_fixed"] = bool(score(after, spec).correct)
                row[f"{method}_outside_change"] = outside_change(before, after, mask)
                images[method] = after
            strip = Image.new("RGB", (before.width * len(images), before.height))
            for i, im in enumerate(images.values()):
                strip.paste(im.convert("RGB"), (i * before.width, 0))
            strip.save(out / "images" / f"{stem}.png")
            row["image"] = f"images/{stem}.png"
        rows.append(row)
        with rows_path.open("a") as f:  # one line per case: an interrupted run resumes
            f.write(json.dumps(row) + "\n")
    return rows


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def summarise(rows: list[dict], n_resamples: int = 2000) -> dict:
    """Fix rates with 95 % Wilson intervals, paired differences with 95 % bootstrap
    intervals (cases grouped by prompt) and mean outside-mask change, per method."""
    from .bench.report import paired_bootstrap_ci

    cases = [r for r in rows if r["status"] == "repaired"]
    summary = {"cases": len(cases), "dm_images": len(rows),
               "dm_correct": sum(r["status"] == "correct" for r in rows),
               "no_region": sum(r["status"] == "no_region" for r in rows), "methods": {}}
    for m in METHODS:
        fixed = sum(r[f"{m}_fixed"] for r in cases)
        change = [r[f"{m}_outside_change"] for r in cases]
        summary["methods"][m] = {
            "fixed": fixed, "rate": fixed / len(cases) if cases else math.nan,
            "ci": _wilson(fixed, len(cases)),
            "outside_change": float(np.mean(change)) if change else math.nan}
    prompts = sorted({r["prompt"] for r in cases})
    for other in METHODS[1:]:
        diffs = [np.array([float(r["asyndm_fixed"]) - float(r[f"{other}_fixed"])
                           for r in cases if r["prompt"] == p]) for p in prompts]
        mean = float(np.mean(np.concatenate(diffs))) if diffs else math.nan
        summary[f"asyndm_minus_{other}"] = {
            "mean": mean, "ci": paired_bootstrap_ci(diffs, n_resamples=n_resamples)}
    return summary

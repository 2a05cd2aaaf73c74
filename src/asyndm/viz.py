"""Pictures of a run: comparison grids and the timestep-map animation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

from .sampler import StepRecord

_LABEL_COLOURS = np.array(
    [[40, 40, 40], [228, 26, 28], [55, 126, 184], [77, 175, 74], [152, 78, 163], [255, 127, 0]],
    dtype=np.uint8,
)


def _text(img: Image.Image, xy: tuple[int, int], text: str) -> None:
    draw = ImageDraw.Draw(img)
    x, y = xy
    draw.text((x + 1, y + 1), text, fill=(0, 0, 0))
    draw.text((x, y), text, fill=(255, 255, 255))


def comparison_grid(
    rows: Sequence[Sequence[Image.Image]],
    column_titles: Sequence[str],
    row_titles: Sequence[str] | None = None,
    cell: int = 192,
    captions: Sequence[Sequence[str]] | None = None,
) -> Image.Image:
    """A labelled grid: one row per image/prompt, one column per mode.

    Each row gets its title as a full-width band above it, and each cell an optional caption
    under it (e.g. the scorer's verdict). Small images (the embedded model's 32x32) are
    upscaled with nearest neighbour so pixels stay visible.
    """
    n_rows, n_cols = len(rows), len(column_titles)
    head = 18
    band = 16 if row_titles is not None else 0
    foot = 16 if captions is not None else 0
    row_h = band + cell + foot
    grid = Image.new("RGB", (n_cols * cell, head + n_rows * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(column_titles):
        draw.text((c * cell + 4, 3), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        top = head + r * row_h
        if row_titles is not None:
            draw.rectangle((0, top, n_cols * cell, top + band - 1), fill=(235, 235, 235))
            draw.text((4, top + 2), row_titles[r], fill=(0, 0, 0))
        for c, img in enumerate(row):
            resample = Image.NEAREST if img.width < cell else Image.BICUBIC
            grid.paste(img.convert("RGB").resize((cell, cell), resample), (c * cell, top + band))
            if captions is not None and captions[r][c]:
                draw.text((c * cell + 4, top + band + cell + 2), captions[r][c], fill=(0, 0, 0))
    return grid


def timestep_frame(
    t_map: torch.Tensor, labels: torch.Tensor | None, step: int, num_steps: int,
    num_train_timesteps: int = 1000, cell: int = 192,
) -> Image.Image:
    """One animation frame: the ``(h, w)`` timestep map as a heatmap, next to the regions."""
    t = t_map.detach().float().cpu().numpy() / max(num_train_timesteps - 1, 1)
    heat = (colormaps["viridis"](np.clip(t, 0, 1))[..., :3] * 255).astype(np.uint8)
    panels = [Image.fromarray(heat)]
    if labels is not None:
        lab = labels.detach().cpu().numpy() + 1
        panels.append(Image.fromarray(_LABEL_COLOURS[lab % len(_LABEL_COLOURS)]))
    frame = Image.new("RGB", (cell * len(panels), cell + 18), (255, 255, 255))
    for i, p in enumerate(panels):
        frame.paste(p.resize((cell, cell), Image.NEAREST), (i * cell, 18))
    draw = ImageDraw.Draw(frame)
    tmin, tmax = int(t_map.min()), int(t_map.max())
    draw.text((4, 3), f"step {step + 1}/{num_steps}  t in [{tmin}, {tmax}]", fill=(0, 0, 0))
    if labels is not None:
        draw.text((cell + 4, 3), "regions (grey = background)", fill=(0, 0, 0))
    return frame


def save_timestep_animation(
    records: Sequence[StepRecord], path: str | Path, index: int = 0,
    num_train_timesteps: int = 1000, frame_ms: int = 250,
) -> Path:
    """Write a GIF of sample ``index``'s timestep map (and regions) over the steps."""
    if not records:
        raise ValueError("no step records to animate")
    frames = [
        timestep_frame(r.timesteps[index], None if r.labels is None else r.labels[index],
                       r.step, r.num_steps, num_train_timesteps)
        for r in records
    ]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                   duration=frame_ms, loop=0)
    tmp.replace(path)
    return path

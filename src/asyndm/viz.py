"""Pictures of a run: comparison grids and the timestep-map animation.

Both explain themselves: a grid carries a header (model, steps, guidance, k), column titles
that say what each mode does, a title per row and a caption per cell; an animation frame
carries the prompt, a colour bar of the timesteps it shows and a legend of the regions.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

from .sampler import StepRecord

BACKGROUND_COLOUR = (205, 205, 205)
"""Region colour of background pixels: a light grey, far from every subject colour."""
_SUBJECT_COLOURS = ((228, 26, 28), (55, 126, 184), (77, 175, 74), (152, 78, 163),
                    (255, 127, 0), (166, 86, 40))
_LINE = 12  # px per line of PIL's default font
_CHAR = 6  # px per character, rounded up


def _lines(text: str, width_px: int) -> list[str]:
    """``text`` wrapped to ``width_px`` (explicit newlines kept)."""
    cols = max(8, (width_px - 8) // _CHAR)
    return [w for part in text.split("\n") for w in (textwrap.wrap(part, cols) or [""])]


def _write(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: Sequence[str],
           fill=(0, 0, 0)) -> None:
    for i, line in enumerate(lines):
        draw.text((xy[0], xy[1] + i * _LINE), line, fill=fill)


def comparison_grid(
    rows: Sequence[Sequence[Image.Image]],
    column_titles: Sequence[str],
    row_titles: Sequence[str] | None = None,
    cell: int = 192,
    captions: Sequence[Sequence[str]] | None = None,
    header: str | None = None,
) -> Image.Image:
    """A labelled grid: one row per image/prompt, one column per mode.

    ``header`` (wrapped) heads the grid; column titles may span several lines (``"\\n"``);
    each row gets its title as a full-width band above it, and each cell an optional caption
    under it (e.g. the scorer's verdict). Small images (the embedded model's 32x32) are
    upscaled with nearest neighbour so pixels stay visible.
    """
    n_rows, n_cols = len(rows), len(column_titles)
    width = n_cols * cell
    head_lines = _lines(header, width) if header else []
    titles = [_lines(t, cell) for t in column_titles]
    top = 4 + _LINE * len(head_lines) + (4 if head_lines else 0)
    head = top + _LINE * max(len(t) for t in titles) + 6
    bands = [_lines(t, width) for t in row_titles] if row_titles is not None else None
    foot = _LINE + 4 if captions is not None else 0
    heights = [(_LINE * len(bands[r]) + 4 if bands else 0) + cell + foot for r in range(n_rows)]
    grid = Image.new("RGB", (width, head + sum(heights)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    _write(draw, (4, 4), head_lines, fill=(60, 60, 60))
    for c, lines in enumerate(titles):
        _write(draw, (c * cell + 4, top), lines)
    y = head
    for r, row in enumerate(rows):
        if bands is not None:
            band = _LINE * len(bands[r]) + 4
            draw.rectangle((0, y, width, y + band - 1), fill=(235, 235, 235))
            _write(draw, (4, y + 2), bands[r])
            y += band
        for c, img in enumerate(row):
            resample = Image.NEAREST if img.width < cell else Image.BICUBIC
            grid.paste(img.convert("RGB").resize((cell, cell), resample), (c * cell, y))
            if captions is not None and captions[r][c]:
                draw.text((c * cell + 4, y + cell + 2), captions[r][c], fill=(0, 0, 0))
        y += cell + foot
    return grid


def mode_titles(k: str, curve: str = "quadratic") -> list[str]:
    """Column titles of DM | DM_concave | AsynDM that say what each mode does."""
    return ["DM\nplain DDIM: every pixel\non the scheduler's steps",
            f"DM_concave\nevery pixel on the\n{curve} curve, k={k}",
            f"AsynDM\nsubject pixels lag on\nthe {curve} curve (k={k}),\nthe rest plain DDIM"]


def _label_colours(n: int) -> np.ndarray:
    """``(n + 1, 3)`` uint8: row 0 the background, row ``s + 1`` subject ``s``."""
    subjects = [_SUBJECT_COLOURS[s % len(_SUBJECT_COLOURS)] for s in range(n)]
    return np.array([BACKGROUND_COLOUR, *subjects], dtype=np.uint8)


def timestep_frame(
    t_map: torch.Tensor, labels: torch.Tensor | None, step: int, num_steps: int,
    num_train_timesteps: int = 1000, cell: int = 192, title: str | None = None,
    label_names: Sequence[str] | None = None,
) -> Image.Image:
    """One animation frame: the ``(h, w)`` timestep map as a heatmap, next to the regions.

    The heatmap's colours span this frame's own range ``[min t, max t]`` (a colour bar under
    it gives the numbers), so the few tens of timesteps between subject and background pixels
    stay visible at every step; ``label_names`` name the region colours in a legend.
    """
    t = t_map.detach().float().cpu().numpy()
    tmin, tmax = int(t.min()), int(t.max())
    span = max(tmax - tmin, 1)
    cmap = colormaps["viridis"]
    heat = (cmap(np.clip((t - tmin) / span, 0, 1))[..., :3] * 255).astype(np.uint8)
    panels = [Image.fromarray(heat)]
    names = list(label_names or [])
    if labels is not None:
        lab = labels.detach().cpu().numpy()
        n = max(len(names), int(lab.max()) + 1, 0)
        panels.append(Image.fromarray(_label_colours(n)[lab + 1]))
    width = cell * len(panels)
    title_lines = _lines(title, width) if title else []
    top = 4 + _LINE * (len(title_lines) + 1) + 4
    legend_rows = 1 + len(names) if labels is not None else 0
    bottom = 4 + max(2 * _LINE + 14, legend_rows * (_LINE + 2)) + 4
    frame = Image.new("RGB", (width, top + cell + bottom), (255, 255, 255))
    draw = ImageDraw.Draw(frame)
    _write(draw, (4, 4), title_lines)
    draw.text((4, 4 + _LINE * len(title_lines)),
              f"step {step + 1}/{num_steps}   timestep map (t of {num_train_timesteps})"
              + ("   regions" if labels is not None else ""), fill=(60, 60, 60))
    for i, p in enumerate(panels):
        frame.paste(p.resize((cell, cell), Image.NEAREST), (i * cell, top))
    # colour bar of this frame's range under the heatmap
    y = top + cell + 4
    bar = (cmap(np.linspace(0, 1, cell - 8))[:, :3] * 255).astype(np.uint8)
    frame.paste(Image.fromarray(np.repeat(bar[None], 10, axis=0)), (4, y))
    draw.text((4, y + 12), f"t={tmin}", fill=(0, 0, 0))
    right = f"t={tmax}" if tmax > tmin else "(all pixels at one t)"
    draw.text((cell - 4 - _CHAR * len(right), y + 12), right, fill=(0, 0, 0))
    draw.text((4, y + 12 + _LINE), f"spread: {tmax - tmin} timesteps", fill=(60, 60, 60))
    if labels is not None:
        colours = _label_colours(len(names))
        for r, name in enumerate(["background", *names]):
            yy = y + r * (_LINE + 2)
            draw.rectangle((cell + 4, yy + 1, cell + 14, yy + 11),
                           fill=tuple(int(v) for v in colours[r]), outline=(0, 0, 0))
            draw.text((cell + 20, yy), name, fill=(0, 0, 0))
    return frame


def save_timestep_animation(
    records: Sequence[StepRecord], path: str | Path, index: int = 0,
    num_train_timesteps: int = 1000, frame_ms: int = 250, title: str | None = None,
    label_names: Sequence[str] | None = None,
) -> Path:
    """Write a GIF of sample ``index``'s timestep map (and regions) over the steps.

    ``title`` (e.g. the prompt) heads every frame; ``label_names`` name the subjects.
    """
    if not records:
        raise ValueError("no step records to animate")
    frames = [
        timestep_frame(r.timesteps[index], None if r.labels is None else r.labels[index],
                       r.step, r.num_steps, num_train_timesteps, title=title,
                       label_names=label_names)
        for r in records
    ]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                   duration=frame_ms, loop=0)
    tmp.replace(path)
    return path

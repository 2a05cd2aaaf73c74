"""A user's mask as AsynDM regions (the paper's Fig. 6: repair and editing), as pure functions.

A *region mask* is an image or an array the size of the picture (any resolution with the
picture's aspect ratio): ``0`` is background, each other value one region. Two forms are
accepted, and nothing else (so an anti-aliased or JPEG-compressed mask is refused, not
silently misread):

* binary: the values ``{0, 1}`` or ``{0, 255}`` (an ``L`` / ``1`` PNG, a bool array): one
  region;
* labelled: ``0`` plus at most :data:`MAX_REGIONS` other integer values, one region each in
  ascending order of value (give each its own ``k``).

Resizing to the latent grid (the documented rule): a latent pixel belongs to the region
that covers at least half of its footprint in the mask (area average), the background
otherwise; with several regions the one covering most of it wins. A region that covers no
latent pixel that way is an error (too small for the grid), and so is a mask that leaves no
background (nothing would follow the ordinary schedule). A mask with no region at all is
plain sampling (the pipelines then reproduce the DM image); :func:`require_regions` is the
check for callers that want a region, such as ``asyndm repair``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .masks import BACKGROUND
from .state import Subjects
from .subjects import k_values

MAX_REGIONS = 8
"""The most regions one mask may label."""

ASPECT_TOLERANCE = 0.02
"""How far (relative) a mask's aspect ratio may be from the picture's."""


def load_mask(source) -> np.ndarray:
    """A mask as a ``(H, W)`` int64 array of region numbers ``0 .. R`` (0 = background).

    Args:
        source: a path to an image file, a PIL image, a numpy array or a tensor
            ``(H, W)`` (or ``(1, H, W)``) of a binary or labelled mask (module docstring).
    """
    name = "the mask"
    if isinstance(source, (str, Path)):
        name = str(source)
        try:
            with Image.open(source) as im:
                im.load()
                source = im.copy()
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"{name}: cannot read it as an image ({err})") from None
    if isinstance(source, Image.Image):
        if source.mode not in ("1", "L", "P", "I", "I;16"):
            source = source.convert("L")  # an RGB mask: its grey levels
        source = np.asarray(source)
    arr = source.detach().cpu().numpy() if torch.is_tensor(source) else np.asarray(source)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"{name}: a mask is a 2-D image (H, W), got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    values = np.unique(arr)
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)) or \
            values.min() < 0:
        raise ValueError(f"{name}: mask values must be whole numbers >= 0 (0 background); "
                         f"got {values[:6].tolist()}...")
    if len(values) > MAX_REGIONS + 1:
        raise ValueError(
            f"{name}: {len(values)} distinct values; a mask is binary (0 and 1, or 0 and "
            f"255) or labels at most {MAX_REGIONS} regions (0 plus one value each). An "
            "anti-aliased or JPEG mask has many: threshold it and save it as PNG")
    # 0 stays background; the other values become regions 1 .. R in ascending order
    labels = np.searchsorted(values, arr).astype(np.int64)  # (H, W)
    if values[0] != 0:
        labels += 1
    return labels


def regions_for_call(region_mask, subjects, mode: str) -> tuple[str, torch.Tensor | None]:
    """A pipeline call's ``region_mask``: its ``(H, W)`` region numbers and the mode to run.

    ``None`` stays ``None``; a mask with no region runs plain sampling (``"dm"``, the DM
    image); subjects and a mask together are an error.
    """
    if region_mask is None:
        return mode, None
    if subjects:
        raise ValueError("give subjects (attention masks) or region_mask, not both")
    regions = torch.as_tensor(load_mask(region_mask))  # (H, W) region numbers
    if int(regions.max()) == 0:  # no region: plain sampling (the DM image)
        return "dm", None
    return mode, regions


def require_regions(labels: np.ndarray, name: str = "the mask") -> int:
    """The number of regions of a :func:`load_mask` result; an empty mask is an error."""
    n = int(np.max(labels))
    if n == 0:
        raise ValueError(f"{name} is empty (all background): mark the region to redraw with "
                         "non-zero pixels")
    return n


def mask_regions(labels: np.ndarray | torch.Tensor, grid: tuple[int, int],
                 image_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """A ``(H, W)`` region-number mask on the latent grid, as AsynDM labels.

    Args:
        labels: from :func:`load_mask`.
        grid: the latent ``(h, w)``.
        image_hw: the picture's ``(H, W)`` for the aspect-ratio check (default: ``grid``).

    Returns:
        ``(h, w)`` int64: :data:`~asyndm.masks.BACKGROUND` or the region index ``0 .. R-1``.
    """
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n_regions = int(lab.max())
    ref_h, ref_w = image_hw or grid
    ratio, want = lab.shape[1] / lab.shape[0], ref_w / ref_h
    if abs(ratio / want - 1) > ASPECT_TOLERANCE:
        raise ValueError(f"the mask is {lab.shape[1]}x{lab.shape[0]} (w x h), not the "
                         f"picture's aspect ratio ({ref_w}x{ref_h}); draw it on the picture")
    if n_regions == 0:  # no region: every pixel on the ordinary schedule
        return torch.full(grid, BACKGROUND, dtype=torch.long)
    one_hot = F.one_hot(lab, n_regions + 1).permute(2, 0, 1)[None].float()  # (1, R+1, H, W)
    cover = F.adaptive_avg_pool2d(one_hot, grid)[0] if lab.shape != grid else one_hot[0]
    best_cover, best = cover[1:].max(dim=0)  # (h, w) over the regions
    out = torch.where(best_cover >= 0.5, best, torch.full_like(best, BACKGROUND))
    if bool((out != BACKGROUND).all()):
        raise ValueError("the mask covers the whole picture: leave a background that follows "
                         "the ordinary schedule (mask less than all of it)")
    missing = sorted(set(range(n_regions)) - set(out.unique().tolist()))
    if missing:
        raise ValueError(f"region(s) {[m + 1 for m in missing]} of the mask cover less than "
                         f"half of any latent pixel of the {grid[0]}x{grid[1]} grid: draw "
                         "them larger")
    return out


def region_subjects(k: float | list[float], n_regions: int, bsz: int,
                    device: torch.device | str | None = None) -> Subjects:
    """:class:`~asyndm.state.Subjects` for user regions: one strength per region, no tokens."""
    ks = k_values(k, n_regions, "region(s) in the mask")
    if not all(0 < v < 1 for v in ks):
        raise ValueError(f"k must be in (0, 1) for every region, got {ks}")
    k_t = torch.tensor([ks] * bsz, device=device)  # (B, R)
    zeros = torch.zeros(bsz, n_regions, dtype=torch.long, device=device)
    return Subjects(positions=zeros[:, :1], weights=torch.zeros(bsz, n_regions, 1, device=device),
                    k=k_t, first_position=zeros)

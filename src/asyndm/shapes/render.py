"""Batched, anti-aliased, deterministic rendering of world scenes with torch.

Every pixel is shaded from signed distances: an object's coverage is
``clamp(0.5 - sdf / pixel, 0, 1)``, a linear ramp one pixel wide centred on the edge, and
background bands and halves are anti-aliased the same way. All work is elementwise tensor
maths over a ``(B, K, H, W)`` grid (K = MAX_OBJECTS slots), so the same scenes give
bit-identical images on a given device, whatever else is in the batch.

Speed at 32 px, batches of 256 random training scenes (``_bench``), on this project's shared
2-core CPU with torch 2.13: about 6,000 images/s with one torch thread and about 11,000 with
both cores when the machine is otherwise idle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .world import AXES, BG_COLOURS, CANVAS, COLOURS, MAX_OBJECTS, SHAPES, TEXTURES, Scene

__all__ = ["render"]

_FAR = 1e4  # signed distance used for empty object slots: never covers a pixel


def _pack(scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
    """Scene parameters as arrays: background ``(B,)`` / ``(B, 2, 3)``, objects ``(B, K)``."""
    b, k = len(scenes), MAX_OBJECTS
    out = {
        "texture": np.zeros(b, np.int64), "axis": np.zeros(b, np.int64),
        "period": np.ones(b, np.float32), "phase": np.zeros(b, np.float32),
        "bg": np.zeros((b, 2, 3), np.float32),
        "shape": np.zeros((b, k), np.int64), "size": np.zeros((b, k), np.float32),
        "x": np.full((b, k), _FAR, np.float32), "y": np.full((b, k), _FAR, np.float32),
        "colour": np.zeros((b, k, 3), np.float32),
    }
    for i, scene in enumerate(scenes):
        bg = scene.background
        out["texture"][i] = TEXTURES.index(bg.texture)
        out["axis"][i] = AXES.index(bg.axis)
        out["period"][i], out["phase"][i] = bg.period, bg.phase
        out["bg"][i] = [BG_COLOURS[c] for c in bg.colours]
        for j, obj in enumerate(scene.objects):
            out["shape"][i, j] = SHAPES.index(obj.shape)
            out["size"][i, j], out["x"][i, j], out["y"][i, j] = obj.size, obj.x, obj.y
            out["colour"][i, j] = COLOURS[obj.colour]
    out["bg"] /= 255.0
    out["colour"] /= 255.0
    return out


def _coverage(sdf: torch.Tensor, pixel: float) -> torch.Tensor:
    """Area coverage from a signed distance (negative inside), ramped over one pixel."""
    return (0.5 - sdf / pixel).clamp(0.0, 1.0)


def _object_sdf(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
                half: torch.Tensor) -> torch.Tensor:
    """Signed distance to each slot's shape; all args broadcast to ``(B, K, H, W)``.

    ``half`` is half the bounding-box side. Triangles point up (y grows downwards).
    """
    ax, ay = dx.abs(), dy.abs()
    circle = torch.sqrt(dx * dx + dy * dy) - half
    qx, qy = ax - half, ay - half
    square = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(
        qx, qy).clamp(max=0)
    diamond = (ax + ay - half) / math.sqrt(2.0)
    # Triangle: apex (0, -half), base corners (+-half, half); the slanted edges have outward
    # normals (+-2, -1) / sqrt(5).
    triangle = torch.maximum(dy - half, (2 * ax - dy - half) / math.sqrt(5.0))
    table = torch.stack([circle, square, triangle, diamond])  # (S, B, K, H, W)
    order = [SHAPES.index(s) for s in ("circle", "square", "triangle", "diamond")]
    index = torch.tensor(order, device=shape.device)[shape]  # (B, K) position in the stack
    index = index[None, :, :, None, None].expand(1, *circle.shape)  # (1, B, K, H, W)
    return torch.gather(table, 0, index)[0]  # (B, K, H, W)


def _background(p: dict[str, torch.Tensor], xs: torch.Tensor, pixel: float) -> torch.Tensor:
    """Background images ``(B, 3, H, W)``: the weight of colour 1 per texture, then a blend."""
    x, y = xs[None, None, :], xs[None, :, None]  # (1, 1, W), (1, H, 1)
    axis = p["axis"][:, None, None]  # (B, 1, 1)
    # Coordinate along the axis of change, and the same coordinate scaled to [0, 1].
    q = torch.where(axis == 0, x, torch.where(axis == 1, y, (x + y) / math.sqrt(2.0)))
    span = torch.where(axis == 2, 2 * CANVAS / math.sqrt(2.0), CANVAS)  # (B, 1, 1)
    period = p["period"][:, None, None]
    frac = torch.remainder(q / period + p["phase"][:, None, None], 1.0)
    # Distance (positive inside the colour-1 band) to the nearest band edge, bands at [.5, 1).
    band = (0.25 - (torch.remainder(frac - 0.25, 1.0) - 0.5).abs()) * period
    weights = torch.stack([
        torch.zeros_like(q),  # plain
        _coverage(-band, pixel),  # stripes
        q / span,  # gradient
        _coverage(CANVAS / 2 - q, pixel),  # halves
    ])  # (T, B, H, W)
    w = torch.gather(weights, 0, p["texture"][None, :, None, None].expand(1, *q.shape))
    w = w[0][:, None]  # (B, 1, H, W)
    c0, c1 = p["bg"][:, 0, :, None, None], p["bg"][:, 1, :, None, None]  # (B, 3, 1, 1)
    return c0 * (1 - w) + c1 * w


def _alpha(scenes: Sequence[Scene], size: int, device):
    """The packed scenes, the pixel grid and every object slot's coverage ``(B, K, H, W)``."""
    if not scenes:
        raise ValueError("render needs at least one scene")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    p = {k: torch.from_numpy(v).to(dev) for k, v in _pack(scenes).items()}
    pixel = CANVAS / size
    xs = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) * pixel  # (W,)
    dx = xs[None, None, None, :] - p["x"][:, :, None, None]  # (B, K, 1, W)
    dy = xs[None, None, :, None] - p["y"][:, :, None, None]  # (B, K, H, 1)
    dx, dy = torch.broadcast_tensors(dx, dy)  # (B, K, H, W)
    half = (p["size"] / 2)[:, :, None, None]  # (B, K, 1, 1)
    return p, xs, pixel, _coverage(_object_sdf(p["shape"], dx, dy, half), pixel)


def render(scenes: Sequence[Scene], size: int = 32,
           device: torch.device | str | None = None) -> torch.Tensor:
    """Draw ``scenes`` as a float32 tensor ``(B, 3, size, size)`` with values in [0, 1].

    Canvas units are scaled to ``size`` pixels; pixel ``i`` covers canvas
    ``[i, i + 1) * CANVAS / size``. Deterministic: equal scenes give bit-identical images.
    """
    p, xs, pixel, alpha = _alpha(scenes, size, device)
    image = _background(p, xs, pixel)  # (B, 3, H, W)
    for k in range(MAX_OBJECTS):
        a = alpha[:, k, None]  # (B, 1, H, W)
        image = image * (1 - a) + p["colour"][:, k, :, None, None] * a
    return image.clamp(0.0, 1.0)


def object_masks(scenes: Sequence[Scene], size: int = 32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``(B, size, size)`` bool: the pixels at least half covered by some object."""
    _, _, _, alpha = _alpha(scenes, size, device)
    return alpha.amax(dim=1) >= 0.5  # (B, H, W)


def _bench(batch: int = 256, repeats: int = 10) -> float:
    """Images per second for ``render`` on random training scenes (CPU)."""
    import time

    from .grammar import sample_batch

    scenes, _ = sample_batch(np.random.default_rng(0), batch)
    render(scenes)
    start = time.perf_counter()
    for _ in range(repeats):
        render(scenes)
    return batch * repeats / (time.perf_counter() - start)

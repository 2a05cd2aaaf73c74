"""Exact alignment scoring: read objects and background back from an image, check a spec.

Detection relies on the world's palette split (world.py): object colours are saturated,
background colours nearly grey. For a pixel ``p`` let ``v(p) = p - mean(p)`` be its chroma
vector; mixing an object colour with a grey scales ``v`` without turning it, so the hue of
``v`` names the colour even on anti-aliased or blurred edges.

1. Denoise lightly (gaussian, sigma ``_SMOOTH``) and give each pixel the palette colour of
   nearest hue and a crude opacity ``a = v(p) . v(c) / |v(c)|^2``; ``a >= 0.5`` is foreground.
2. Connected components (8-neighbour) per colour; drop those under ``MIN_AREA`` pixels.
3. Per component, a soft opacity ``alpha`` on the component and a ``_RING``-pixel ring: each
   pixel is un-mixed as ``alpha * c + (1 - alpha) * g`` with ``c`` the object's own core colour
   and ``g`` whichever nearby background colour explains it best (stripes offer two).
   Area and centroid are sums over ``alpha``, which a symmetric blur leaves unchanged.
4. Shape from two moments of ``alpha`` about the centroid, normalised by the area, whose
   numerators an isotropic gaussian blur leaves unchanged (z = dx + i dy, y downwards):
   ``skew = E[dy^3] / area^1.5`` (upward triangle -0.021, symmetric shapes 0) and
   ``quad = Re E[z^4] / area^2`` (square -1/60, circle 0, diamond +1/60).
5. Background, on pixels at least ``_RING`` pixels from any object: the spread of colours
   along their principal axis (plain or not), then a linear fit (gradient), a two-halves
   fit (halves) or a sinusoid (stripes); colours are the BG_COLOURS pair whose mixtures
   explain the pixels best.

All geometry is reported in canvas units (``world.CANVAS`` = 32); images of another size are
box-resampled to 32 x 32 first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from .world import BG_COLOURS, CANVAS, COLOURS, SPATIAL_RELATIONS, PromptSpec, relation_holds

__all__ = ["DetectedBackground", "DetectedObject", "ScoreResult", "corrupt", "detect",
           "detect_background", "score", "to_array"]

_SIZE = int(CANVAS)
_SMOOTH = 0.6  # gaussian sigma (px) before segmentation: noise std drops ~2.5x
_FG_OPACITY = 0.5  # crude opacity threshold for foreground pixels
MIN_AREA = 10.0  # components with fewer pixels are specks (smallest object: ~24 px)
_RING = 2  # pixels around a component included in its soft measures
_BG_REACH = 5  # background candidates for un-mixing come from this far around an object
_CANDIDATES = 24  # at most this many background candidates per object
_MIN_CLEAR = 16  # fewer background pixels than this: the background is unknown
# Shape thresholds, fitted on clean, blurred and noisy renders (scripts/validate_scorer.py).
_SKEW_TRIANGLE = -0.008  # E[dy^3] / area^1.5 below: triangle (ideal -0.021, others 0)
_QUAD_SQUARE = -0.006  # Re E[dz^4] / area^2 below: square (ideal -1/60, circle 0)
_QUAD_DIAMOND = 0.009  # Re E[dz^4] / area^2 above: diamond (ideal +1/60)
# Background thresholds on the projected colour s (0..1 units, one grey level = 1/255).
_BG_SMOOTH = 0.8  # gaussian sigma (px) for the spread and the bands
_BG_FIT_SMOOTH = 1.5  # gaussian sigma (px) for the linear and two-halves fits
_PLAIN_RANGE = 0.15  # 2..98 % spread below: plain
_FIT_R2 = 0.85  # a linear / step fit explaining this much variance: gradient / halves
_PAIR_SLACK = 0.25  # share of a colour pair's segment that may go unused at either end
_STRIPE_PERIODS = np.arange(5.0, 10.01, 0.5)  # px; the world draws 6 and 8 (at 32 px)
_STRIPE_R2 = 0.5  # a sinusoid along x, y or the diagonal explaining this much: stripes

_PALETTE = np.array(list(COLOURS.values()), np.float64) / 255.0  # (C, 3)
_PALETTE_V = _PALETTE - _PALETTE.mean(1, keepdims=True)  # (C, 3) chroma vectors
_PALETTE_UNIT = _PALETTE_V / np.linalg.norm(_PALETTE_V, axis=1, keepdims=True)
_BG_PALETTE = np.array(list(BG_COLOURS.values()), np.float64) / 255.0  # (G, 3)


@dataclass(frozen=True)
class DetectedObject:
    """An object read from an image: ``centroid`` (x, y) and ``area`` in canvas units."""

    shape: str
    colour: str
    centroid: tuple[float, float]
    area: float
    quad: float = field(default=0.0, compare=False)  # shape features, see the module doc
    skew: float = field(default=0.0, compare=False)
    region: np.ndarray | None = field(default=None, compare=False, repr=False)
    """``(H, W)`` bool: the image pixels the object owns (its segment and a ring around it)."""


@dataclass(frozen=True)
class DetectedBackground:
    """The background read from an image: ``texture`` in TEXTURES or "unknown", and the
    BG_COLOURS names found: one for plain, the pair (in BG_COLOURS order) for stripes,
    gradient and halves, none for unknown."""

    texture: str
    colours: tuple[str, ...]


@dataclass(frozen=True)
class ScoreResult:
    """Whether an image follows a spec: ``correct`` is the conjunction of ``checks``.

    Check names: ``object{i}`` (exactly ``count`` detections match ``spec.objects[i]``),
    ``no_extra`` (no other detections), ``relation``, ``background_texture`` and
    ``background_colour`` (present only when the spec has them).
    """

    correct: bool
    category: str
    checks: dict[str, bool]
    found: tuple[DetectedObject, ...]
    background: DetectedBackground | None = None


def to_array(image: Any) -> np.ndarray:
    """An image as float64 ``(32, 32, 3)`` in [0, 1].

    Accepts a PIL image, a ``(3, H, W)`` or ``(H, W, 3)`` array or torch tensor (float in
    [0, 1] or uint8); other sizes are box-resampled to 32 x 32.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    elif hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or 3 not in (arr.shape[0], arr.shape[-1]):
        raise ValueError(f"expected a (3, H, W) or (H, W, 3) image, got shape {arr.shape}")
    if arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)  # (H, W, 3)
    arr = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    h, w = arr.shape[:2]
    if (h, w) != (_SIZE, _SIZE):
        if h % _SIZE == 0 and w % _SIZE == 0:
            arr = arr.reshape(_SIZE, h // _SIZE, _SIZE, w // _SIZE, 3).mean((1, 3))
        else:
            planes = [np.asarray(Image.fromarray(arr[..., i].astype(np.float32), mode="F")
                                 .resize((_SIZE, _SIZE), Image.BOX)) for i in range(3)]
            arr = np.stack(planes, -1).astype(np.float64)
    return np.clip(arr, 0.0, 1.0)


def corrupt(image: Any, rng: np.random.Generator, blur: float = 0.7,
            noise: float = 0.05) -> np.ndarray:
    """``image`` as ``(32, 32, 3)`` after a gaussian blur of ``blur`` px and additive gaussian
    noise of std ``noise``, clipped to [0, 1]: the defects of a small generative model."""
    img = to_array(image)
    if blur > 0:
        img = ndimage.gaussian_filter(img, (blur, blur, 0))
    return np.clip(img + rng.normal(0.0, noise, img.shape), 0.0, 1.0)


def _segment(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the nearest-hue palette index ``(H, W)`` and foreground mask ``(H, W)``."""
    smooth = ndimage.gaussian_filter(img, (_SMOOTH, _SMOOTH, 0), mode="nearest")
    v = smooth - smooth.mean(-1, keepdims=True)  # (H, W, 3) chroma vectors
    colour = np.argmax(v @ _PALETTE_UNIT.T, axis=-1)  # (H, W): nearest hue
    opacity = np.einsum("hwk,hwk->hw", v, _PALETTE_V[colour]) / (
        _PALETTE_V[colour] ** 2).sum(-1)
    return colour, opacity >= _FG_OPACITY


def _components(colour: np.ndarray, fg: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Labels ``(H, W)`` (0 = none) of components of one colour, and each one's colour."""
    labels = np.zeros(colour.shape, np.int64)
    colours: list[int] = []
    eight = np.ones((3, 3), bool)
    for c in range(len(COLOURS)):
        lab, n = ndimage.label(fg & (colour == c), structure=eight)
        for i in range(1, n + 1):
            part = lab == i
            if part.sum() >= MIN_AREA:
                colours.append(c)
                labels[part] = len(colours)
    return labels, colours


def _classify(alpha: np.ndarray) -> tuple[str, float, float]:
    """The shape for a soft mask ``(H, W)``, with its two moment features (see module doc)."""
    ys, xs = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]].astype(np.float64)
    mass = alpha.sum()
    z = (xs - (alpha * xs).sum() / mass) + 1j * (ys - (alpha * ys).sum() / mass)  # (H, W)
    skew = float((alpha * z.imag ** 3).sum() / mass / mass ** 1.5)
    quad = float(((alpha * z ** 4).sum() / mass).real / mass ** 2)
    if skew < _SKEW_TRIANGLE:
        shape = "triangle"
    elif quad < _QUAD_SQUARE:
        shape = "square"
    elif quad > _QUAD_DIAMOND:
        shape = "diamond"
    else:
        shape = "circle"
    return shape, quad, skew


def detect(image: Any) -> list[DetectedObject]:
    """The objects in ``image`` (any form ``to_array`` takes), by colour (COLOURS order)
    and then in raster order of their first pixel."""
    img = to_array(image)
    return _detect(img)[0]


def _unmix(pixels: np.ndarray, colour: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Opacity ``(N,)`` of ``colour`` in each pixel ``(N, 3)``, taking for each pixel the
    background candidate ``(M, 3)`` that best explains it as ``a * colour + (1 - a) * g``."""
    diff = colour[None] - candidates  # (M, 3)
    rel = pixels[:, None] - candidates[None]  # (N, M, 3)
    a = np.clip((rel * diff[None]).sum(-1) / np.maximum((diff ** 2).sum(-1), 1e-6), 0, 1)
    residual = ((rel - a[..., None] * diff[None]) ** 2).sum(-1)  # (N, M)
    return a[np.arange(len(pixels)), residual.argmin(1)]


def _spread(colours: np.ndarray, k: int = _CANDIDATES) -> np.ndarray:
    """At most ``k`` of ``colours`` ``(M, 3)``, evenly spaced in rank along their principal
    axis: background colours near one object vary along one line (a gradient or two bands)."""
    if len(colours) <= k:
        return colours
    centred = colours - colours.mean(0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    order = np.argsort(centred @ axis)
    return colours[order[np.linspace(0, len(colours) - 1, k).round().astype(int)]]


def _detect(img: np.ndarray) -> tuple[list[DetectedObject], np.ndarray]:
    """Objects, and the mask ``(H, W)`` of pixels clear of every object (for the background)."""
    colour, fg = _segment(img)
    labels, colours = _components(colour, fg)
    clear = ~ndimage.binary_dilation(labels > 0, iterations=_RING)
    if clear.sum() < _MIN_CLEAR:  # nearly all object: measure against whatever is left
        clear = labels == 0
    smooth = ndimage.gaussian_filter(img, (_SMOOTH, _SMOOTH, 0), mode="nearest")
    # Ring pixels belong to the nearest component, so close neighbours do not share mass.
    dist, obj_at = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    owner = np.where(dist <= _RING, labels[obj_at[0], obj_at[1]], 0)  # (H, W)
    found = []
    scale = CANVAS / img.shape[0]
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]] + 0.5  # (H, W) pixel centres
    for k, c in enumerate(colours, start=1):
        core = img[labels == k]  # (n, 3)
        strength = (core - core.mean(-1, keepdims=True)) @ _PALETTE_UNIT[c]
        c_obs = np.median(core[strength >= np.quantile(strength, 0.5)], axis=0)
        region = owner == k
        # Background candidates: clear pixels near the object (stripes give two colours).
        near = ndimage.binary_dilation(region, iterations=_BG_REACH) & clear
        candidates = _spread(smooth[near] if near.any() else smooth[clear])
        if not len(candidates):  # no background at all: un-mix against mid grey
            candidates = np.full((1, 3), 0.5)
        alpha = np.zeros(region.shape)
        alpha[region] = _unmix(smooth[region], c_obs, candidates)
        mass = alpha.sum()
        if mass < MIN_AREA / 2:  # its colour is the background's own: nothing stands out
            continue
        shape, quad, skew = _classify(alpha)
        centroid = (float((alpha * xs).sum() / mass * scale),
                    float((alpha * ys).sum() / mass * scale))
        found.append(DetectedObject(shape, tuple(COLOURS)[c], centroid,
                                    float(mass * scale ** 2), quad, skew, region))
    return found, clear


def _nearest_bg(rgb: np.ndarray) -> str:
    """The BG_COLOURS name nearest to an RGB colour (0..1)."""
    return tuple(BG_COLOURS)[int(np.argmin(((_BG_PALETTE - rgb) ** 2).sum(-1)))]


def _r2(s: np.ndarray, fit: np.ndarray) -> float:
    """Share of the variance of ``s`` explained by ``fit``."""
    total = ((s - s.mean()) ** 2).sum()
    return float(1 - ((s - fit) ** 2).sum() / max(total, 1e-12))


def detect_background(image: Any) -> DetectedBackground:
    """The background texture and colours of ``image`` (any form ``to_array`` takes)."""
    img = to_array(image)
    return _background(img, _detect(img)[1])


def _masked_smooth(img: np.ndarray, clear: np.ndarray, sigma: float) -> np.ndarray:
    """``img`` ``(H, W, 3)`` smoothed over the pixels ``clear`` only (normalised convolution),
    so object colours do not leak into the background."""
    weight = ndimage.gaussian_filter(clear.astype(np.float64), sigma)
    blurred = ndimage.gaussian_filter(img * clear[..., None], (sigma, sigma, 0))
    return blurred / np.maximum(weight, 1e-6)[..., None]


def _background(img: np.ndarray, clear: np.ndarray) -> DetectedBackground:
    """Texture and colours from the pixels ``clear`` ``(H, W)`` of objects.

    The spread of colours (smoothed at ``_BG_SMOOTH`` px) tells plain from textured; a linear
    or two-halves fit (smoothed more, at ``_BG_FIT_SMOOTH``, against noise) explaining
    ``_FIT_R2`` of the variance names a gradient or halves; a strong sinusoid, stripes.
    Colours: the nearest for plain, else the pair that explains the mixtures (_best_pair).
    """
    if clear.sum() < _MIN_CLEAR:
        return DetectedBackground("unknown", ())
    raw = img[clear]  # (N, 3)
    pix = _masked_smooth(img, clear, _BG_SMOOTH)[clear]  # (N, 3)
    ys, xs = np.nonzero(clear)
    xs, ys = (xs + 0.5) / img.shape[1], (ys + 0.5) / img.shape[0]  # (N,) in [0, 1]
    mean = pix.mean(0)
    axis = np.linalg.svd(pix - mean, full_matrices=False)[2][0]  # principal colour direction
    s = (pix - mean) @ axis  # (N,)
    lo, hi = np.quantile(s, [0.02, 0.98])
    if hi - lo < _PLAIN_RANGE:
        return DetectedBackground("plain", (_nearest_bg(np.median(raw, 0)),))
    s_fit = (_masked_smooth(img, clear, _BG_FIT_SMOOTH)[clear] - mean) @ axis  # (N,)
    design = np.stack([np.ones_like(xs), xs, ys], 1)  # (N, 3)
    linear = _r2(s_fit, design @ np.linalg.lstsq(design, s_fit, rcond=None)[0])
    step = max((_r2(s_fit, np.where(side, s_fit[side].mean(), s_fit[~side].mean()))
                for side in (xs >= 0.5, ys >= 0.5) if side.any() and not side.all()),
               default=-1.0)
    if max(linear, step) >= _FIT_R2:
        texture = "gradient" if linear >= step else "halves"
    elif _periodic_r2(s, xs * img.shape[1], ys * img.shape[0]) >= _STRIPE_R2:
        texture = "stripes"
    else:
        return DetectedBackground("unknown", ())
    return DetectedBackground(texture, _best_pair(pix))


def _periodic_r2(s: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> float:
    """The most variance of ``s`` (N,) that one sinusoid of a period in ``_STRIPE_PERIODS``
    along x, y or the diagonal explains; pixel coordinates ``xs``, ``ys`` (N,)."""
    best = 0.0
    for q in (xs, ys, (xs + ys) / np.sqrt(2.0)):
        for period in _STRIPE_PERIODS:
            phase = 2 * np.pi * q / period
            design = np.stack([np.ones_like(q), np.cos(phase), np.sin(phase)], 1)  # (N, 3)
            best = max(best, _r2(s, design @ np.linalg.lstsq(design, s, rcond=None)[0]))
    return best


def _best_pair(pix: np.ndarray) -> tuple[str, str]:
    """The two BG_COLOURS whose mixtures best explain the colours ``pix`` ``(N, 3)``.

    Cost: mean squared distance from each colour to the segment between the pair, plus a
    penalty where the colours leave more than ``_PAIR_SLACK`` of either end of the segment
    unused. The slack tolerates bands whose centres are never pure after blur; the penalty
    stops a long segment (white to black) from explaining a short one (white to grey).
    """
    names = tuple(BG_COLOURS)
    best, best_cost = (names[0], names[1]), np.inf
    for i, j in combinations(range(len(names)), 2):
        a, d = _BG_PALETTE[i], _BG_PALETTE[j] - _BG_PALETTE[i]
        length2 = float(d @ d)
        t = (pix - a) @ d / length2  # (N,) position along the segment
        off = pix - a - np.clip(t, 0, 1)[:, None] * d  # (N, 3)
        lo, hi = np.quantile(t, [0.01, 0.99])
        unused = max(lo - _PAIR_SLACK, 0.0) ** 2 + max(1 - _PAIR_SLACK - hi, 0.0) ** 2
        cost = (off ** 2).sum(-1).mean() + unused * length2
        if cost < best_cost:
            best, best_cost = (names[i], names[j]), cost
    return best


def matches(obj: DetectedObject, shape: str, colour: str | None) -> bool:
    return obj.shape == shape and (colour is None or obj.colour == colour)


def score(image: Any, spec: PromptSpec) -> ScoreResult:
    """Check ``image`` against every requirement of ``spec`` (see ScoreResult for checks)."""
    img = to_array(image)
    found, clear = _detect(img)
    checks: dict[str, bool] = {}
    groups = []
    for i, want in enumerate(spec.objects):
        group = [o for o in found if matches(o, want.shape, want.colour)]
        checks[f"object{i}"] = len(group) == want.count
        groups.append(group)
    checks["no_extra"] = len(found) == sum(o.count for o in spec.objects)
    if spec.relation is not None:
        ok = all(len(g) == 1 for g in groups[:2])
        if ok and spec.relation in SPATIAL_RELATIONS:
            ok = relation_holds(groups[0][0].centroid, groups[1][0].centroid, spec.relation)
        elif ok:
            same = groups[0][0].colour == groups[1][0].colour
            ok = same == (spec.relation == "same_colour")
        checks["relation"] = ok
    detected_bg = None
    if spec.background is not None:
        detected_bg = _background(img, clear)
        checks["background_texture"] = detected_bg.texture == spec.background.texture
        if spec.background.colour is not None:
            checks["background_colour"] = spec.background.colour in detected_bg.colours
    return ScoreResult(all(checks.values()), spec.category, checks, tuple(found), detected_bg)


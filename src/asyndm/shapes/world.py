"""The synthetic compositional world: scenes, prompt specs, realisation, perturbation.

A scene is a 32 x 32 canvas (``CANVAS`` units; the renderer may draw it at any pixel size) with
a textured background and 1 to 4 flat-coloured objects. Object colours (``COLOURS``) are
saturated and background colours (``BG_COLOURS``) are nearly grey, so "is this pixel part of
an object, and of which colour" is a question of chroma and hue that a scorer answers exactly.

Prompts are lower-case words separated by single spaces; a `PromptSpec` holds a prompt and
everything it requires. The grammar that writes and parses prompts (one template of a
category in ``CATEGORIES`` plus an optional background phrase) is `asyndm.shapes.grammar`.

Conventions (all coordinates in canvas units, x to the right, y downwards):

* ``SceneObject.x, .y`` is the centre of the object's square bounding box of side ``size``;
  a triangle points up, so its centroid lies ``size / 6`` below that centre.
* ``PromptSpec.relation`` holds between ``objects[0]`` and ``objects[1]`` in prompt order:
  "left" means objects[0] is left of objects[1]; "same_colour" / "different_colour" compare
  their colours. Spatial relations are judged on centroids along the dominant axis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "BG_COLOURS",
    "CANVAS",
    "CATEGORIES",
    "COLOURS",
    "NUMBERS",
    "RELATIONS",
    "SHAPES",
    "SPATIAL_RELATIONS",
    "TEXTURES",
    "AXES",
    "Background",
    "BackgroundSpec",
    "ObjectSpec",
    "PromptSpec",
    "Scene",
    "SceneObject",
    "perturb",
    "realize",
    "relation_holds",
    "satisfies",
]

CANVAS = 32.0
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
# Six saturated hues at least 43 degrees apart, so hue alone names the colour even where an
# edge pixel is mixed with the (nearly grey) background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "yellow": (235, 205, 25),
    "green": (40, 180, 50),
    "cyan": (30, 190, 210),
    "blue": (45, 75, 225),
    "purple": (170, 50, 220),
}
# Background colours have chroma (max - min) <= 50 / 255, objects >= 140 / 255.
BG_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "grey": (130, 130, 130),
    "black": (25, 25, 25),
    "beige": (220, 205, 170),
    "brown": (110, 85, 60),
    "navy": (35, 45, 85),
}
TEXTURES: tuple[str, ...] = ("plain", "stripes", "gradient", "halves")
# The direction along which a background's colour changes: "x" (left to right), "y" (top to
# bottom) or "diagonal" (top-left to bottom-right). Halves use "x" or "y" only.
AXES: tuple[str, ...] = ("x", "y", "diagonal")
NUMBERS: dict[str, int] = {"two": 2, "three": 3, "four": 4}
SPATIAL_RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
RELATIONS: tuple[str, ...] = SPATIAL_RELATIONS + ("same_colour", "different_colour")
CATEGORIES: tuple[str, ...] = ("single", "two", "counting", "binding", "spatial", "context")
STRIPE_PERIODS: tuple[float, ...] = (6.0, 8.0)
MAX_OBJECTS = 4
MIN_SIZE = 7.0
# Two background colours drawn together must differ by at least this RGB distance (0..255),
# so that a textured background is never mistaken for a plain one.
MIN_BG_PAIR_DISTANCE = 80.0
# Realised objects keep this much space (canvas units) from the border and between their boxes.
EDGE_MARGIN = 1.0
OBJECT_GAP = 2.0
# A spatial relation is realised with the dominant-axis offset exceeding the other by this.
RELATION_MARGIN = 3.0
# Size range (canvas units) for scenes with 1, 2, 3 and 4 objects.
_SIZE_RANGE = {1: (8.0, 14.0), 2: (7.0, 13.0), 3: (7.0, 11.0), 4: (7.0, 10.0)}


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Background:
    """A background: ``texture`` in TEXTURES drawn with ``colours`` (names in BG_COLOURS).

    plain: ``colours[0]`` everywhere (``colours[1]`` must equal it). stripes: bands of width
    ``period / 2`` along ``axis``, ``colours[0]`` where ``frac(q / period + phase) < 0.5``.
    gradient: linear from ``colours[0]`` (low end of ``axis``) to ``colours[1]``. halves:
    ``colours[0]`` on the left (axis "x") or top (axis "y") half.
    """

    texture: str
    colours: tuple[str, str]
    axis: str = "x"
    period: float = 8.0
    phase: float = 0.0

    def __post_init__(self) -> None:
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; expected one of {TEXTURES}")
        if len(self.colours) != 2 or any(c not in BG_COLOURS for c in self.colours):
            raise ValueError(f"colours must be two names from BG_COLOURS, got {self.colours}")
        if (self.texture == "plain") != (self.colours[0] == self.colours[1]):
            need = "equal" if self.texture == "plain" else "different"
            raise ValueError(f"a {self.texture} background needs {need} colours: {self.colours}")
        if self.axis not in AXES or (self.texture == "halves" and self.axis == "diagonal"):
            raise ValueError(f"axis {self.axis!r} is not valid for {self.texture}")
        if not self.period > 0 or not 0.0 <= self.phase < 1.0:
            raise ValueError(f"need period > 0 and 0 <= phase < 1, got {self.period}, {self.phase}")


@dataclass(frozen=True)
class SceneObject:
    """One flat object: ``shape`` in SHAPES, ``colour`` in COLOURS, bounding-box side ``size``
    and box centre ``(x, y)`` in canvas units; the box must lie inside the canvas."""

    shape: str
    colour: str
    size: float
    x: float
    y: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        if not self.size > 0:
            raise ValueError(f"size must be positive, got {self.size}")
        h = self.size / 2
        if min(self.x, self.y) - h < 0 or max(self.x, self.y) + h > CANVAS:
            raise ValueError(f"object box ({self.x}, {self.y}, size {self.size}) leaves the canvas")

    @property
    def centroid(self) -> tuple[float, float]:
        """The centre of mass ``(x, y)``: a triangle's lies a sixth of its height below centre."""
        dy = self.size / 6 if self.shape == "triangle" else 0.0
        return (self.x, self.y + dy)


@dataclass(frozen=True)
class Scene:
    """A background and 1..MAX_OBJECTS objects (drawn in order; realize never overlaps them)."""

    background: Background
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1..{MAX_OBJECTS} objects, got {len(self.objects)}")


# ----------------------------------------------------------------------------- prompt specs


@dataclass(frozen=True)
class ObjectSpec:
    """A requirement for ``count`` objects of ``shape``; ``colour`` None means any colour."""

    shape: str
    colour: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if not 1 <= self.count <= MAX_OBJECTS:
            raise ValueError(f"count must be in 1..{MAX_OBJECTS}, got {self.count}")


@dataclass(frozen=True)
class BackgroundSpec:
    """A background requirement: its ``texture``; ``colour`` (if any) must be one of its
    colours (plain: the colour; stripes, halves: either colour; gradient: either end)."""

    texture: str
    colour: str | None = None

    def __post_init__(self) -> None:
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}")
        if self.colour is not None and self.colour not in BG_COLOURS:
            raise ValueError(f"unknown background colour {self.colour!r}")


_WORDS = re.compile(r"[a-z]+(?: [a-z]+)*")


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and everything the scorer checks.

    ``subjects`` has one phrase per entry of ``objects`` (both in prompt order), each a run of
    whole words of ``prompt``: "red circle" where the colour word directly precedes the shape,
    otherwise the shape word ("circle", or "circles" for a count). The scene must contain
    exactly the objects listed (counts exact, nothing else), ``relation`` must hold between
    objects[0] and objects[1], and the background must match ``background`` when given.
    """

    category: str
    prompt: str
    subjects: tuple[str, ...]
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: BackgroundSpec | None = None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; expected one of {CATEGORIES}")
        if not _WORDS.fullmatch(self.prompt):
            raise ValueError(f"prompt must be lower-case words and single spaces: {self.prompt!r}")
        if len(self.subjects) != len(self.objects) or not self.objects:
            raise ValueError(f"need one subject per object: {self.subjects} vs {self.objects}")
        padded, start = f" {self.prompt} ", 0
        for subject in self.subjects:
            at = padded.find(f" {subject} ", start)
            if at < 0:
                raise ValueError(f"subject {subject!r} is not a phrase of {self.prompt!r} "
                                 "(after the previous subject)")
            start = at + len(subject) + 1
        if sum(o.count for o in self.objects) > MAX_OBJECTS:
            raise ValueError(f"at most {MAX_OBJECTS} objects in all, got {self.objects}")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; expected one of {RELATIONS}")
        _check_category(self)


def _check_category(spec: PromptSpec) -> None:
    """Raise ValueError unless ``spec``'s objects and relation fit its category."""
    objs, rel = spec.objects, spec.relation
    pair = len(objs) == 2 and objs[0].shape != objs[1].shape and all(o.count == 1 for o in objs)
    ok = {
        "single": len(objs) == 1 and objs[0].count == 1 and rel is None,
        "two": pair and all(o.colour is None for o in objs) and rel is None,
        "counting": len(objs) == 1 and objs[0].count >= 2 and rel is None,
        "binding": pair and None not in (objs[0].colour, objs[1].colour)
        and objs[0].colour != objs[1].colour and rel is None,
        "spatial": pair and rel in SPATIAL_RELATIONS,
        "context": pair and rel in ("same_colour", "different_colour")
        and (None in (objs[0].colour, objs[1].colour)
             or (objs[0].colour == objs[1].colour) == (rel == "same_colour")),
    }[spec.category]
    if not ok:
        raise ValueError(f"objects {objs} and relation {rel!r} do not fit category "
                         f"{spec.category!r} ({spec.prompt!r})")


# ----------------------------------------------------------------------------- realisation


def _bg_distance(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(BG_COLOURS[a], BG_COLOURS[b])))


def _realize_background(spec: BackgroundSpec | None, rng: np.random.Generator) -> Background:
    """A random background meeting ``spec`` (any background when None)."""
    texture = spec.texture if spec else TEXTURES[int(rng.integers(len(TEXTURES)))]
    names = tuple(BG_COLOURS)
    first = spec.colour if spec and spec.colour else names[int(rng.integers(len(names)))]
    if texture == "plain":
        return Background("plain", (first, first))
    others = [n for n in names if _bg_distance(first, n) >= MIN_BG_PAIR_DISTANCE]
    second = others[int(rng.integers(len(others)))]
    if rng.random() < 0.5:  # the named colour may be either one of the pair
        first, second = second, first
    axes = AXES[:2] if texture == "halves" else AXES
    axis = axes[int(rng.integers(len(axes)))]
    if texture != "stripes":
        return Background(texture, (first, second), axis)
    period = STRIPE_PERIODS[int(rng.integers(len(STRIPE_PERIODS)))]
    return Background(texture, (first, second), axis, period, float(rng.random()))


def _object_colours(spec: PromptSpec, rng: np.random.Generator) -> list[list[str]]:
    """Colours for every object of every ObjectSpec, meeting the colour relations."""
    names = tuple(COLOURS)

    def pick(unlike: str | None = None) -> str:
        return _other(names, unlike, rng) if unlike else names[int(rng.integers(len(names)))]

    if spec.relation == "same_colour":
        shared = next((o.colour for o in spec.objects if o.colour), None) or pick()
        return [[shared] for _ in spec.objects]
    if spec.relation == "different_colour":
        a, b = spec.objects[0].colour, spec.objects[1].colour
        a = a or pick(b)
        return [[a], [b or pick(a)]]
    return [[o.colour or pick() for _ in range(o.count)] for o in spec.objects]


def _boxes_apart(a: SceneObject, b: SceneObject) -> bool:
    """True when the bounding boxes of ``a`` and ``b`` are at least OBJECT_GAP apart."""
    reach = (a.size + b.size) / 2 + OBJECT_GAP
    return abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str,
                   margin: float = 0.0) -> bool:
    """Whether centroid ``a`` is ``relation`` of centroid ``b``: the offset along the named
    axis exceeds the offset along the other axis by more than ``margin``."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along = {"left": dx, "right": -dx, "above": dy, "below": -dy}[relation]
    across = abs(dy) if relation in ("left", "right") else abs(dx)
    return along - across > margin


def _place(items: list[tuple[str, str]], relation: str | None,
           rng: np.random.Generator) -> tuple[SceneObject, ...]:
    """Random non-overlapping objects for ``(shape, colour)`` items, meeting a spatial relation
    between the first two (which are then the only items)."""
    n = len(items)
    lo, hi = _SIZE_RANGE[n]
    for _ in range(1000):
        placed: list[SceneObject] = []
        for shape, colour in items:
            size = float(rng.uniform(lo, hi))
            span = CANVAS - 2 * EDGE_MARGIN - size
            for _ in range(50):
                x, y = EDGE_MARGIN + size / 2 + rng.random(2) * span
                obj = SceneObject(shape, colour, size, float(x), float(y))
                if all(_boxes_apart(obj, other) for other in placed):
                    placed.append(obj)
                    break
            else:
                break
        if len(placed) < n:
            continue
        if relation in SPATIAL_RELATIONS and not relation_holds(
                placed[0].centroid, placed[1].centroid, relation, RELATION_MARGIN):
            continue
        return tuple(placed)
    raise RuntimeError(f"could not place {items} with relation {relation!r}")


def realize(spec: PromptSpec, rng: np.random.Generator) -> Scene:
    """A random scene that satisfies ``spec``: exactly its objects (colours drawn where the
    prompt leaves them free), inside the canvas, bounding boxes OBJECT_GAP apart, the relation
    met with RELATION_MARGIN to spare, and a background meeting ``spec.background``."""
    colours = _object_colours(spec, rng)
    items = [(o.shape, c) for o, cs in zip(spec.objects, colours) for c in cs]
    relation = spec.relation if spec.relation in SPATIAL_RELATIONS else None
    objects = _place(items, relation, rng)
    return Scene(_realize_background(spec.background, rng), objects)


# ----------------------------------------------------------------------------- ground truth


def satisfies(scene: Scene, spec: PromptSpec) -> bool:
    """Whether ``scene`` meets ``spec`` symbolically: the truth that ``score`` estimates from
    pixels (spatial relations on centroids, no margin)."""
    groups = [[o for o in scene.objects
               if o.shape == want.shape and want.colour in (None, o.colour)]
              for want in spec.objects]
    if any(len(g) != want.count for g, want in zip(groups, spec.objects)):
        return False
    if len(scene.objects) != sum(want.count for want in spec.objects):
        return False
    if spec.relation in SPATIAL_RELATIONS:
        if not relation_holds(groups[0][0].centroid, groups[1][0].centroid, spec.relation):
            return False
    elif spec.relation is not None:
        same = groups[0][0].colour == groups[1][0].colour
        if same != (spec.relation == "same_colour"):
            return False
    bg = spec.background
    if bg is not None and (scene.background.texture != bg.texture
                           or bg.colour not in (None, *scene.background.colours)):
        return False
    return True


def _other(options: tuple[str, ...], not_this: str, rng: np.random.Generator) -> str:
    rest = [o for o in options if o != not_this]
    return rest[int(rng.integers(len(rest)))]


def _perturbations(scene: Scene, spec: PromptSpec, rng: np.random.Generator) -> dict[str, Scene]:
    """Candidate scenes that each break ``spec`` in one way, by kind (some may be missing)."""
    objs = list(scene.objects)
    out: dict[str, Scene] = {}
    i = int(rng.integers(len(objs)))
    out["shape"] = Scene(scene.background, tuple(
        objs[:i] + [replace(objs[i], shape=_other(SHAPES, objs[i].shape, rng))] + objs[i + 1:]))
    if len(objs) > 1:
        out["remove"] = Scene(scene.background, tuple(objs[:i] + objs[i + 1:]))
    if len(objs) < MAX_OBJECTS:
        want = spec.objects[int(rng.integers(len(spec.objects)))]
        for _ in range(200):
            size = float(rng.uniform(MIN_SIZE, 10.0))
            x, y = EDGE_MARGIN + size / 2 + rng.random(2) * (CANVAS - 2 * EDGE_MARGIN - size)
            colour = want.colour or tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
            extra = SceneObject(want.shape, colour, size, float(x), float(y))
            if all(_boxes_apart(extra, o) for o in objs):
                out["extra"] = Scene(scene.background, tuple(objs + [extra]))
                break
    named = [k for k, o in enumerate(objs)
             if any(w.colour == o.colour and w.shape == o.shape for w in spec.objects)]
    if spec.relation in ("same_colour", "different_colour"):
        colour = (_other(tuple(COLOURS), objs[0].colour, rng)
                  if spec.relation == "same_colour" else objs[0].colour)
        out["colour"] = Scene(scene.background, (objs[0], replace(objs[1], colour=colour)))
    elif named:
        k = named[int(rng.integers(len(named)))]
        recoloured = replace(objs[k], colour=_other(tuple(COLOURS), objs[k].colour, rng))
        out["colour"] = Scene(scene.background, tuple(objs[:k] + [recoloured] + objs[k + 1:]))
    if spec.relation in SPATIAL_RELATIONS:
        (ax, ay), (bx, by) = objs[0].centroid, objs[1].centroid
        try:  # swap the centroids; skipped where a box would leave the canvas
            a = replace(objs[0], x=bx, y=by - (objs[0].centroid[1] - objs[0].y))
            b = replace(objs[1], x=ax, y=ay - (objs[1].centroid[1] - objs[1].y))
            if _boxes_apart(a, b):
                out["relation"] = Scene(scene.background, (a, b))
        except ValueError:
            pass
    if spec.background is not None:
        texture = _other(TEXTURES, spec.background.texture, rng)
        out["background"] = Scene(_realize_background(BackgroundSpec(texture), rng), scene.objects)
        if spec.background.colour is not None:
            for _ in range(100):
                bg = _realize_background(BackgroundSpec(spec.background.texture), rng)
                if spec.background.colour not in bg.colours:
                    out["background_colour"] = Scene(bg, scene.objects)
                    break
    return out


def perturb(scene: Scene, spec: PromptSpec, rng: np.random.Generator) -> tuple[Scene, str]:
    """A scene made from ``scene`` by one random change that breaks ``spec``, and its kind:
    "shape", "remove", "extra", "colour", "relation", "background" or "background_colour"
    (kinds that cannot break this spec are not drawn). For testing that a scorer says no."""
    options = {k: s for k, s in _perturbations(scene, spec, rng).items()
               if not satisfies(s, spec)}
    kind = sorted(options)[int(rng.integers(len(options)))]
    return options[kind], kind

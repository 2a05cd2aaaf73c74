"""The shapes world's prompt grammar: templates, sampling, parsing, vocabulary.

Each prompt is one template of a category (a core phrase with slots for shapes, plural
shapes, colours, optional colours and number words) plus an optional background phrase.
The grammar is unambiguous: ``parse_prompt(spec.prompt) == spec`` for every spec that
``sample_spec`` can return, and ``vocabulary()`` lists every word a prompt may contain (the
tokenizer's vocabulary). The specs themselves (`PromptSpec`, `ObjectSpec`,
`BackgroundSpec`) and the scenes that realise them live in `asyndm.shapes.world`;
``sample_batch`` joins the two into training pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .world import (
    BG_COLOURS,
    CATEGORIES,
    COLOURS,
    NUMBERS,
    PLURALS,
    SHAPES,
    BackgroundSpec,
    ObjectSpec,
    PromptSpec,
    Scene,
    realize,
)

__all__ = ["parse_prompt", "sample_batch", "sample_spec", "vocabulary"]

_P_BACKGROUND_PHRASE = 0.5
_P_OPTIONAL_COLOUR = 0.5


@dataclass(frozen=True)
class _Template:
    """A core phrase with slots: {sK} shape, {pK} plural shape, {cK} colour, {cK?} optional
    colour, {nK} number word (K = object 1 or 2 in prompt order); ``relation`` as in PromptSpec.
    """

    category: str
    text: str
    relation: str | None = None


_SPATIAL_PHRASES = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
# "a square with a circle to its left" puts the square (first object) right of the circle.
_SPATIAL_TRAILING = {"right": "to its left", "left": "to its right", "below": "above it",
                     "above": "below it"}

_TEMPLATES: tuple[_Template, ...] = (
    _Template("single", "a {c1?} {s1}"),
    _Template("single", "one {c1?} {s1}"),
    _Template("single", "a single {c1?} {s1}"),
    _Template("single", "a {s1} that is {c1}"),
    _Template("single", "a {s1} coloured {c1}"),
    _Template("two", "a {s1} and a {s2}"),
    _Template("two", "one {s1} and one {s2}"),
    _Template("two", "a {s1} with a {s2}"),
    _Template("counting", "{n1} {c1?} {p1}"),
    _Template("counting", "exactly {n1} {c1?} {p1}"),
    _Template("counting", "{n1} {p1} that are {c1}"),
    _Template("binding", "a {c1} {s1} and a {c2} {s2}"),
    _Template("binding", "one {c1} {s1} and one {c2} {s2}"),
    _Template("binding", "a {c1} {s1} with a {c2} {s2}"),
    _Template("binding", "a {s1} that is {c1} and a {s2} that is {c2}"),
    *(_Template("spatial", f"a {{c1?}} {{s1}} {phrase} a {{c2?}} {{s2}}", rel)
      for rel, phrases in _SPATIAL_PHRASES.items() for phrase in phrases),
    *(_Template("spatial", f"a {{c1?}} {{s1}} with a {{c2?}} {{s2}} {phrase}", rel)
      for rel, phrase in _SPATIAL_TRAILING.items()),
    _Template("context", "a {s1} the same colour as the {s2}", "same_colour"),
    _Template("context", "a {s1} coloured like the {s2}", "same_colour"),
    _Template("context", "a {s1} and a {s2} of the same colour", "same_colour"),
    _Template("context", "a {c1} {s1} and a {s2} of the same colour", "same_colour"),
    _Template("context", "a {s1} and a {s2} of different colours", "different_colour"),
    _Template("context", "a {s1} in a different colour from the {s2}", "different_colour"),
)

# Background phrases: (text, texture); the slot {b} is a background colour.
_BG_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("on a {b} background", "plain"),
    ("on a plain {b} background", "plain"),
    ("on a plain background", "plain"),
    ("on a striped background", "stripes"),
    ("on a striped {b} background", "stripes"),
    ("on a background with {b} stripes", "stripes"),
    ("on a gradient background", "gradient"),
    ("on a {b} gradient background", "gradient"),
    ("on a two tone background", "halves"),
    ("on a background that is half {b}", "halves"),
)

_SLOT = re.compile(r"\{([cspnb])(\d?)(\??)\}")


def _slot_words(kind: str) -> tuple[str, ...]:
    """The words a slot of ``kind`` (c, s, p, n, b) may hold."""
    return {"c": tuple(COLOURS), "s": SHAPES, "p": tuple(PLURALS.values()),
            "n": tuple(NUMBERS), "b": tuple(BG_COLOURS)}[kind]


@lru_cache(maxsize=None)
def _regex(text: str) -> re.Pattern[str]:
    """A regex matching ``text``'s phrases followed by one space, one named group per slot."""
    parts = []
    for token in text.split(" "):
        m = _SLOT.fullmatch(token)
        if m is None:
            parts.append(re.escape(token) + " ")
            continue
        kind, index, optional = m.groups()
        group = f"(?P<{kind}{index}>{'|'.join(_slot_words(kind))}) "
        parts.append(f"(?:{group})?" if optional else group)
    return re.compile("".join(parts))


def _words(text: str, slots: dict[str, str | None]) -> list[tuple[str, str]]:
    """``(token, word)`` for each word of ``text`` filled with ``slots``; empty optional slots
    (holding None) give no word."""
    out = []
    for token in text.split(" "):
        m = _SLOT.fullmatch(token)
        word = token if m is None else slots.get(m.group(1) + m.group(2))
        if word is not None:
            out.append((token, word))
    return out


def _fill(text: str, slots: dict[str, str | None]) -> str:
    """``text`` with every slot replaced by its word; optional slots holding None vanish."""
    return " ".join(word for _, word in _words(text, slots))


def _subject(text: str, slots: dict[str, str | None], index: str) -> str:
    """Object ``index``'s subject phrase: its shape word, with its colour if directly before."""
    words = _words(text, slots)
    for i, (token, word) in enumerate(words):
        if token in (f"{{s{index}}}", f"{{p{index}}}"):
            if i > 0 and words[i - 1][0] in (f"{{c{index}}}", f"{{c{index}?}}"):
                return f"{words[i - 1][1]} {word}"
            return word
    raise AssertionError(f"template {text!r} has no shape slot {index}")


def _build(template: _Template, slots: dict[str, str | None],
           bg: tuple[str, str] | None, bg_colour: str | None) -> PromptSpec:
    """The spec for ``template`` filled with ``slots`` plus optional background phrase ``bg``."""
    prompt = _fill(template.text, slots)
    background = None
    if bg is not None:
        prompt += " " + _fill(bg[0], {"b": bg_colour})
        background = BackgroundSpec(bg[1], bg_colour)
    indices = [i for i in "12" if f"s{i}" in slots or f"p{i}" in slots]
    objects, subjects = [], []
    for i in indices:
        shape = slots.get(f"s{i}") or _SINGULAR[slots[f"p{i}"]]  # type: ignore[index]
        count = NUMBERS[slots[f"n{i}"]] if slots.get(f"n{i}") else 1  # type: ignore[index]
        objects.append(ObjectSpec(shape, slots.get(f"c{i}"), count))
        subjects.append(_subject(template.text, slots, i))
    return PromptSpec(template.category, prompt, tuple(subjects), tuple(objects),
                      template.relation, background)


_SINGULAR = {p: s for s, p in PLURALS.items()}


def sample_spec(rng: np.random.Generator, category: str | None = None) -> PromptSpec:
    """A random prompt spec of ``category`` (uniform over CATEGORIES when None).

    Templates are uniform within the category; a background phrase is added with probability
    1/2, an optional colour word with probability 1/2 each. Two-object prompts always name two
    different shapes; binding names two different colours.
    """
    if category is None:
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    templates = _BY_CATEGORY[category]
    template = templates[int(rng.integers(len(templates)))]
    shapes = rng.permutation(len(SHAPES))[:2]
    colours = rng.permutation(len(COLOURS))[:2]
    slots: dict[str, str | None] = {}
    for m in _SLOT.finditer(template.text):
        kind, index, optional = m.groups()
        i = int(index) - 1
        if kind == "s":
            slots[f"s{index}"] = SHAPES[shapes[i]]
        elif kind == "p":
            slots[f"p{index}"] = PLURALS[SHAPES[shapes[i]]]
        elif kind == "n":
            slots[f"n{index}"] = tuple(NUMBERS)[int(rng.integers(len(NUMBERS)))]
        elif kind == "c":
            use = not optional or rng.random() < _P_OPTIONAL_COLOUR
            slots[f"c{index}"] = tuple(COLOURS)[colours[i]] if use else None
    bg, bg_colour = None, None
    if rng.random() < _P_BACKGROUND_PHRASE:
        bg = _BG_TEMPLATES[int(rng.integers(len(_BG_TEMPLATES)))]
        if "{b}" in bg[0]:
            bg_colour = tuple(BG_COLOURS)[int(rng.integers(len(BG_COLOURS)))]
    return _build(template, slots, bg, bg_colour)


_BY_CATEGORY: dict[str, tuple[_Template, ...]] = {
    c: tuple(t for t in _TEMPLATES if t.category == c) for c in CATEGORIES
}


def parse_prompt(prompt: str) -> PromptSpec:
    """The spec of a prompt of the grammar; raises ValueError (naming it) for any other."""
    text = prompt + " "
    found: list[PromptSpec] = []
    for bg in (None, *_BG_TEMPLATES):
        core, bg_colour = text, None
        if bg is not None:
            m = re.search(r"(?:^| )" + _regex(bg[0]).pattern + r"$", text)
            if m is None:
                continue
            core, bg_colour = text[: m.start()] + " ", m.groupdict().get("b")
        for template in _TEMPLATES:
            m = _regex(template.text).fullmatch(core)
            if m is not None:
                found.append(_build(template, m.groupdict(), bg, bg_colour))
    if len(found) != 1:
        why = "is not in the grammar" if not found else f"is ambiguous ({len(found)} parses)"
        raise ValueError(f"prompt {prompt!r} {why}")
    return found[0]


def vocabulary() -> list[str]:
    """Every word any prompt can contain, sorted and unique."""
    words: set[str] = set()
    for text in [t.text for t in _TEMPLATES] + [b[0] for b in _BG_TEMPLATES]:
        for token in text.split(" "):
            m = _SLOT.fullmatch(token)
            words.update(_slot_words(m.group(1)) if m else (token,))
    return sorted(words)



def sample_batch(rng: np.random.Generator, n: int) -> tuple[list[Scene], list[str]]:
    """``n`` (scene, prompt) pairs for training, categories uniform, each scene realising its
    prompt (the prompt describes every object in it)."""
    scenes, prompts = [], []
    for _ in range(n):
        spec = sample_spec(rng)
        scenes.append(realize(spec, rng))
        prompts.append(spec.prompt)
    return scenes, prompts

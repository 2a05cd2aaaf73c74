"""Benchmark variants: a sampling mode plus the settings it runs with.

A variant is written on the command line as ``MODE[:KEY=VALUE,KEY=VALUE,...]``:

| key       | value                                      | allowed for        | default       |
|-----------|--------------------------------------------|--------------------|---------------|
| ``curve`` | ``quadratic``, ``piecewise``, ``exponential`` | dm_concave, asyndm | quadratic  |
| ``k``     | curve strength in (0, 1), for all subjects | dm_concave, asyndm | prompt's k    |
| ``mask``  | ``dynamic`` or ``static``                  | asyndm             | dynamic       |
| ``thr``   | mask threshold (> 0)                       | asyndm             | 1.0           |
| ``guidance`` | CFG scale of this variant (>= 0)        | all but cfgpp      | ``--guidance``|
| ``name``  | the variant's name in results and plots    | all                | see below     |

Examples: ``dm``, ``asyndm:curve=piecewise,k=0.5``, ``asyndm:mask=static,thr=1.2,name=static``.

The competitors of :mod:`asyndm.methods` (``cfgpp``, ``s_cfg``, ``z_sampling``, ``seg``,
``pag``, ``attend_excite``) take their own parameters as keys (the fields of their parameter
dataclass, e.g. ``cfgpp:lam=0.6``, ``seg:scale=3,sigma=10``, ``z_sampling:zigzag=10``,
``attend_excite:scale_factor=10``) plus ``guidance`` and ``name``; the table's other keys do
not apply to them. ``guidance`` tunes a method whose strength is the CFG scale (S-CFG,
Z-Sampling's gamma_1) without changing the other variants' (``s_cfg:guidance=4``); CFG++
refuses it (its ``lam`` replaces the CFG scale).

Without ``name=`` a variant is named by its mode plus the options that differ from the
defaults, in the order of the table (``asyndm:curve=piecewise,k=0.5``); so ``--modes dm
dm_concave asyndm`` gives the variants ``dm``, ``dm_concave`` and ``asyndm``. Names are
what the result store keys on, so the same name must always mean the same settings.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from ..methods import METHOD_NAMES, METHODS, method_params, params_dict
from ..sampler import MASK_MODES, MODES
from ..schedules import CURVES

__all__ = ["DEFAULT_CURVE", "DEFAULT_K", "DEFAULT_MASK_MODE", "DEFAULT_MASK_THRESHOLD",
           "Variant", "default_variants", "parse_variant", "variant_dirname"]

# The pipeline's own defaults (AsynDMPipeline.__call__); a test keeps them equal.
DEFAULT_CURVE = "quadratic"
DEFAULT_K = 0.5
"""k of subjects when neither the variant nor the prompt gives one."""
DEFAULT_MASK_MODE = "dynamic"
DEFAULT_MASK_THRESHOLD = 1.0

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=,:+-]{0,79}")
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEYS = ("curve", "k", "mask", "thr", "guidance", "name")
_ALLOWED = {"dm": {"guidance", "name"}, "dm_concave": {"curve", "k", "guidance", "name"},
            "asyndm": set(_KEYS)}
_NO_GUIDANCE = {"cfgpp": "its lam replaces the CFG scale"}
SUBJECT_MODES = ("dm_concave", "asyndm", "attend_excite")
ALL_MODES = MODES + METHOD_NAMES


@dataclass(frozen=True)
class Variant:
    """One benchmarked method.

    Attributes:
        name: key of the variant in the store, reports and plots.
        mode: one of :data:`asyndm.sampler.MODES`.
        curve: concave curve of subject pixels (``dm_concave``, ``asyndm``).
        k: curve strength for every subject, or ``None`` to use each prompt's own k.
        mask_mode: ``"dynamic"`` or ``"static"`` (``asyndm``).
        mask_threshold: multiple of the spatial mean that claims a pixel (``asyndm``).
        params: a competitor's ``(key, value)`` parameters as given (``()``: its defaults).
        guidance: this variant's CFG scale, or ``None`` for the run's ``--guidance``.
    """

    name: str
    mode: str
    curve: str = DEFAULT_CURVE
    k: float | None = None
    mask_mode: str = DEFAULT_MASK_MODE
    mask_threshold: float = DEFAULT_MASK_THRESHOLD
    params: tuple[tuple[str, str], ...] = ()
    guidance: float | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"variant name {self.name!r} must be 1-80 characters of "
                             "letters, digits and _.=,:+- starting with a letter or digit")
        if self.mode not in ALL_MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {ALL_MODES}")
        if self.params and self.mode not in METHODS:
            raise ValueError(f"variant {self.name!r}: mode {self.mode} takes no method "
                             "parameters")
        if self.mode in METHODS:
            self.method_params()  # validates
        if self.curve not in CURVES:
            raise ValueError(f"unknown curve {self.curve!r}; choose from {sorted(CURVES)}")
        if self.k is not None and not (math.isfinite(self.k) and 0 < self.k < 1):
            raise ValueError(f"variant {self.name!r}: k must be in (0, 1), got {self.k}")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"unknown mask mode {self.mask_mode!r}; choose from {MASK_MODES}")
        if not (math.isfinite(self.mask_threshold) and self.mask_threshold > 0):
            raise ValueError(f"variant {self.name!r}: thr must be > 0, got {self.mask_threshold}")
        if self.guidance is not None:
            if not (math.isfinite(self.guidance) and self.guidance >= 0):
                raise ValueError(f"variant {self.name!r}: guidance must be >= 0, got "
                                 f"{self.guidance}")
            if self.mode in _NO_GUIDANCE:
                raise ValueError(f"variant {self.name!r}: {self.mode} takes no guidance "
                                 f"({_NO_GUIDANCE[self.mode]})")

    def guidance_or(self, shared: float) -> float:
        """The CFG scale this variant runs with when the run's is ``shared``."""
        return shared if self.guidance is None else self.guidance

    @property
    def needs_subjects(self) -> bool:
        return self.mode in SUBJECT_MODES

    def method_params(self):
        """The competitor's parameter dataclass (``None`` for dm, dm_concave, asyndm)."""
        return method_params(self.mode, dict(self.params)) if self.mode in METHODS else None

    def settings(self) -> dict[str, Any]:
        """The settings that decide this variant's images (stored with every result)."""
        own = {} if self.guidance is None else {"guidance": self.guidance}
        if self.mode in METHODS:
            return {"name": self.name, "mode": self.mode,
                    "params": params_dict(self.method_params()), **own}
        data = asdict(self)
        # dm / asyndm settings stay as stores before the methods and guidance= saw them
        del data["params"], data["guidance"]
        return {**data, **own}


def _canonical_name(mode: str, opts: dict[str, str]) -> str:
    shown = [f"{key}={opts[key]}" for key in _KEYS if key in opts and key != "name"]
    return mode + (":" + ",".join(shown) if shown else "")


def parse_variant(text: str) -> Variant:
    """Parse ``MODE[:KEY=VALUE,...]`` (see the module docstring) into a :class:`Variant`."""
    mode, _, rest = text.strip().partition(":")
    if mode not in ALL_MODES:
        raise ValueError(f"variant {text!r}: unknown mode {mode!r}; choose from {ALL_MODES}")
    if mode in METHODS:
        return _parse_method(text, mode, rest)
    opts: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise ValueError(f"variant {text!r}: expected KEY=VALUE, got {item!r}")
        if key not in _KEYS:
            raise ValueError(f"variant {text!r}: unknown key {key!r}; keys are {_KEYS}")
        if key not in _ALLOWED[mode]:
            raise ValueError(f"variant {text!r}: {key!r} has no effect in mode {mode!r}")
        if key in opts:
            raise ValueError(f"variant {text!r}: {key!r} given twice")
        opts[key] = value
    try:
        k = float(opts["k"]) if "k" in opts else None
        thr = float(opts["thr"]) if "thr" in opts else DEFAULT_MASK_THRESHOLD
        guidance = _guidance(opts)
    except ValueError as err:
        raise ValueError(f"variant {text!r}: {err}") from None
    if "k" in opts:
        opts["k"] = f"{k:g}"
    if "thr" in opts:
        opts["thr"] = f"{thr:g}"
    return Variant(
        name=opts.get("name", _canonical_name(mode, opts)), mode=mode,
        curve=opts.get("curve", DEFAULT_CURVE), k=k,
        mask_mode=opts.get("mask", DEFAULT_MASK_MODE), mask_threshold=thr, guidance=guidance,
    )


def _guidance(opts: dict[str, str]) -> float | None:
    """``opts``' ``guidance`` as a float (shown as ``%g`` in the name), or ``None``."""
    if "guidance" not in opts:
        return None
    value = float(opts["guidance"])
    opts["guidance"] = f"{value:g}"
    return value


def _parse_method(text: str, mode: str, rest: str) -> Variant:
    """A competitor's variant: its parameter keys plus ``guidance`` and ``name``."""
    fields = [f for f in method_params(mode).__dataclass_fields__]
    opts: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise ValueError(f"variant {text!r}: expected KEY=VALUE, got {item!r}")
        if key not in ("guidance", "name") and key not in fields:
            raise ValueError(f"variant {text!r}: unknown key {key!r}; {mode} keys are "
                             f"{tuple(fields) + ('guidance', 'name')}")
        if key in opts:
            raise ValueError(f"variant {text!r}: {key!r} given twice")
        opts[key] = value
    name = opts.pop("name", None)
    try:
        guidance = _guidance(opts)
        shown_guidance = [f"guidance={opts.pop('guidance')}"] if guidance is not None else []
        params = method_params(mode, opts)
    except ValueError as err:
        raise ValueError(f"variant {text!r}: {err}") from None
    resolved = params_dict(params)
    shown = [f"{k}={_show(resolved[k])}" for k in fields if k in opts] + shown_guidance
    return Variant(name=name or mode + (":" + ",".join(shown) if shown else ""), mode=mode,
                   params=tuple((k, opts[k]) for k in fields if k in opts), guidance=guidance)


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def default_variants(modes: tuple[str, ...] | list[str]) -> tuple[Variant, ...]:
    """One variant per mode with the default settings, named after the mode."""
    return tuple(parse_variant(m) for m in modes)


def variant_dirname(name: str) -> str:
    """A file-name-safe, collision-free form of a variant name (bounded length)."""
    if _PLAIN.fullmatch(name):
        return name
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:48] or "variant"
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"

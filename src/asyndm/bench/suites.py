"""Prompt suites: the built-in ShapesBench suite or a JSON prompt file, validated.

``load_suite(spec)`` accepts

* a built-in name (``BUILTIN_SUITES``): ``"shapes"`` is :func:`asyndm.shapes.suite.load_suite`;
  a path to a ShapesBench suite file (a JSON object with ``"version"`` and ``"entries"``) is
  read by that function too;
* a path to a JSON list of prompt strings, the paper's format. If ``<stem>_item.json`` lies
  beside it, every prompt needs an entry there::

      {"item_idx": {"a cat eating a sandwich": [1, 4]},   # one index per subject
       "item_k":   {"a cat eating a sandwich": [0.7, 0.7]}}  # k per subject

  The indices are used as the paper's code uses them: index ``i`` is token position
  ``i + 1`` (:func:`asyndm.subjects.paper_positions`), even where a word splits into several
  tokens. Without an item file the prompts have no subjects (``dm`` only).
* a path to a JSON list of objects
  ``{"prompt": str, "subjects": [...], "k": float or [float per subject], "category": str}``
  where only ``prompt`` is required and a subject is a word or phrase (``"cat"``,
  ``"cat#2"``), a token position (int) or a list of token positions.

Prompts are untrusted text: they are checked (type, length, no control characters), never
interpreted, and only reach file names through :func:`slug`. A file's entries get the file's
stem as category unless they name one. Every validation error names the file and the entry
(index and prompt).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..shapes.suite import SUITES as SHAPES_SUITES
from ..shapes.suite import load_suite as load_shapes_suite

__all__ = ["BUILTIN_SUITES", "BenchEntry", "Suite", "SuiteError", "load_suite", "slug"]

BUILTIN_SUITES = tuple(SHAPES_SUITES)
MAX_PROMPT_CHARS = 2000
MAX_FILE_BYTES = 64 * 2**20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CATEGORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
_OBJECT_KEYS = {"prompt", "subjects", "k", "category"}

Subject = str | int | tuple[int, ...]


class SuiteError(ValueError):
    """A prompt suite that cannot be used; the message names the file and entry."""


@dataclass(frozen=True)
class BenchEntry:
    """One prompt of a suite.

    Attributes:
        prompt_id: stable key (slug + hash of suite, prompt, category, subjects and k), also
            the prompt's image folder name.
        subjects: words / phrases, token positions (int) or tuples of token positions.
        k: one curve strength per subject, or ``None`` (the variant's or the default k).
    """

    prompt_id: str
    prompt: str
    category: str
    subjects: tuple[Subject, ...] = ()
    k: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Suite:
    name: str
    source: str
    """``builtin:NAME`` or the resolved path of the prompt file."""
    entries: tuple[BenchEntry, ...]
    digest: str
    """sha256 of the entries, so a changed suite is noticed."""
    kind: str = "prompts"
    """``"shapes"`` for ShapesBench suites (scored by the ``shapes`` metric by default)."""


def slug(text: str, max_len: int = 40) -> str:
    """Lower-case ASCII letters, digits and single dashes, at most ``max_len`` characters."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].rstrip("-")
    return s or "x"


def _short(prompt: Any) -> str:
    text = prompt if isinstance(prompt, str) else repr(prompt)
    return repr(text[:60] + "..." if len(text) > 60 else text)


def _fail(source: str, index: int | None, prompt: Any, problem: str) -> SuiteError:
    where = f"{source}: entry {index} ({_short(prompt)})" if index is not None else source
    return SuiteError(f"{where}: {problem}")


def _check_prompt(source: str, i: int, prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise _fail(source, i, prompt, f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise _fail(source, i, prompt, "prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _fail(source, i, prompt, f"prompt longer than {MAX_PROMPT_CHARS} characters")
    if _CONTROL.search(prompt):
        raise _fail(source, i, prompt, "prompt contains control characters")
    return prompt


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_subjects(source: str, i: int, prompt: str, subjects: Any) -> tuple[Subject, ...]:
    if not isinstance(subjects, list):
        raise _fail(source, i, prompt, "subjects must be a list")
    out: list[Subject] = []
    for s in subjects:
        if isinstance(s, str) and s.strip() and len(s) <= 200 and not _CONTROL.search(s):
            out.append(s)
        elif _is_int(s) and s >= 1:
            out.append(s)
        elif isinstance(s, list) and s and all(_is_int(p) and p >= 1 for p in s):
            out.append(tuple(s))
        else:
            raise _fail(source, i, prompt, f"bad subject {s!r}: expected a word or phrase, a "
                        "token position >= 1, or a non-empty list of token positions")
    return tuple(out)


def _check_k(source: str, i: int, prompt: str, k: Any, n: int) -> tuple[float, ...] | None:
    if k is None:
        return None
    if n == 0:
        raise _fail(source, i, prompt, "k given without subjects")
    ks = [k] * n if isinstance(k, (int, float)) and not isinstance(k, bool) else k
    if not isinstance(ks, list) or len(ks) != n:
        raise _fail(source, i, prompt, f"k must be a number or a list of {n} numbers "
                    f"(one per subject), got {k!r}")
    for v in ks:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not (ok and 0 < v < 1):
            raise _fail(source, i, prompt, f"k values must be numbers in (0, 1), got {v!r}")
    return tuple(float(v) for v in ks)


def _check_category(source: str, i: int, prompt: str, category: Any) -> str:
    if not (isinstance(category, str) and _CATEGORY.fullmatch(category)):
        raise _fail(source, i, prompt, f"category {category!r} must be 1-40 letters, digits "
                    "or _.- starting with a letter or digit")
    return category


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise SuiteError(f"{path}: no such prompt file (built-in suites: {BUILTIN_SUITES})")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise SuiteError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SuiteError(f"{path}: not valid JSON ({err})") from None


def _paper_items(path: Path, prompts: list[str]) -> list[tuple[tuple[Subject, ...],
                                                               tuple[float, ...] | None]]:
    """Subjects and k of each prompt from ``<stem>_item.json``, or none without that file."""
    from ..subjects import paper_positions  # imports torch: only for files that need it

    item_path = path.with_name(f"{path.stem}_item.json")
    if not item_path.is_file():
        return [((), None)] * len(prompts)
    items = _read_json(item_path)
    src = str(item_path)
    if not (isinstance(items, dict) and isinstance(items.get("item_idx"), dict)
            and isinstance(items.get("item_k"), dict)):
        raise SuiteError(f"{src}: expected an object with 'item_idx' and 'item_k' objects "
                         "keyed by prompt")
    out = []
    for i, prompt in enumerate(prompts):
        if prompt not in items["item_idx"] or prompt not in items["item_k"]:
            raise _fail(src, i, prompt, "no item_idx / item_k entry for this prompt of "
                        f"{path.name}")
        idx = items["item_idx"][prompt]
        if not (isinstance(idx, list) and idx and all(_is_int(p) and p >= 0 for p in idx)):
            raise _fail(src, i, prompt, f"item_idx must be a non-empty list of word "
                        f"indices >= 0, got {idx!r}")
        k = _check_k(src, i, prompt, items["item_k"][prompt], len(idx))
        out.append((tuple(paper_positions(idx)), k))
    return out


def _prompt_id(suite: str, prompt: str, category: str, subjects: tuple, k: tuple | None,
               seen: dict[str, int]) -> str:
    key = json.dumps([suite, prompt, category, subjects, k])
    pid = f"{slug(prompt)}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    seen[pid] = seen.get(pid, 0) + 1
    return pid if seen[pid] == 1 else f"{pid}-{seen[pid]}"


def _suite(name: str, source: str, rows: list[tuple[str, str, tuple, tuple | None]],
           kind: str = "prompts") -> Suite:
    seen: dict[str, int] = {}
    entries = tuple(BenchEntry(_prompt_id(name, p, c, s, k, seen), p, c, s, k)
                    for p, c, s, k in rows)
    if not entries:
        raise SuiteError(f"{source}: the suite has no prompts")
    digest = hashlib.sha256(json.dumps([(e.prompt_id, e.prompt, e.category, e.subjects, e.k)
                                        for e in entries]).encode()).hexdigest()
    return Suite(name=name, source=source, entries=entries, digest=digest, kind=kind)


def _load_shapes(name: str, source: str, spec: str) -> Suite:
    rows = []
    for i, e in enumerate(load_shapes_suite(spec)):
        prompt = _check_prompt(source, i, e.prompt)
        subjects = _check_subjects(source, i, prompt, list(e.subjects))
        k = _check_k(source, i, prompt, list(e.k), len(subjects)) if e.k else None
        rows.append((prompt, _check_category(source, i, prompt, e.category), subjects, k))
    return _suite(name, source, rows, kind="shapes")


def _load_file(path: Path) -> Suite:
    data = _read_json(path)
    src = str(path)
    if isinstance(data, dict) and "entries" in data and "version" in data:
        name = data.get("name")
        return _load_shapes(slug(name if isinstance(name, str) else path.stem), src, str(path))
    if not isinstance(data, list):
        raise SuiteError(f"{src}: expected a JSON list of prompts or of prompt objects")
    name = slug(path.stem, 40)
    default_category = name if _CATEGORY.fullmatch(name) else "prompts"
    rows = []
    if all(isinstance(x, str) for x in data):
        prompts = [_check_prompt(src, i, p) for i, p in enumerate(data)]
        for prompt, (subjects, k) in zip(prompts, _paper_items(path, prompts)):
            rows.append((prompt, default_category, subjects, k))
        return _suite(name, src, rows)
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise _fail(src, i, obj, "expected an object like {\"prompt\": ..., \"subjects\": "
                        "[...], \"k\": ...} (do not mix strings and objects)")
        prompt = _check_prompt(src, i, obj.get("prompt"))
        unknown = sorted(set(obj) - _OBJECT_KEYS)
        if unknown:
            raise _fail(src, i, prompt, f"unknown keys {unknown}; allowed: "
                        f"{sorted(_OBJECT_KEYS)}")
        subjects = _check_subjects(src, i, prompt, obj.get("subjects", []))
        k = _check_k(src, i, prompt, obj.get("k"), len(subjects))
        category = _check_category(src, i, prompt, obj.get("category", default_category))
        rows.append((prompt, category, subjects, k))
    return _suite(name, src, rows)


def load_suite(spec: str | Path) -> Suite:
    """Load and validate a suite: a built-in name or a prompt file (module docstring)."""
    if isinstance(spec, str) and spec in BUILTIN_SUITES:
        return _load_shapes(spec, f"builtin:{spec}", spec)
    return _load_file(Path(spec).expanduser().resolve())

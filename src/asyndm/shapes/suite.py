"""ShapesBench: a fixed, versioned prompt suite for the embedded shapes world.

``shapesbench_v1.json`` (next to this module) was generated once by ``build_suite()`` with its
defaults and is committed; it never changes. Regenerating (``python -m asyndm.shapes.suite
--check``) must reproduce it byte for byte; a changed grammar gets a new version, not an edit.

File format::

    {"name": "shapes", "version": "v1", "seed": 0, "per_category": 24,
     "entries": [{"prompt": "...", "category": "...", "subjects": ["..."], "k": [0.3]}, ...]}

``subjects`` are phrases of whole words of the prompt, in prompt order (world.PromptSpec);
``k`` holds one value per subject (AsynDM's per-subject curve parameter, default 0.3).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .grammar import parse_prompt, sample_spec
from .world import CATEGORIES

__all__ = ["DEFAULT_K", "SUITES", "SuiteEntry", "build_suite", "load_suite", "suite_json"]

DEFAULT_K = 0.3
VERSION = "v1"
SUITES: dict[str, Path] = {"shapes": Path(__file__).with_name("shapesbench_v1.json")}
_SEED = 0
_PER_CATEGORY = 24


@dataclass(frozen=True)
class SuiteEntry:
    """One benchmark prompt: its category, subject phrases and one ``k`` per subject."""

    prompt: str
    category: str
    subjects: tuple[str, ...]
    k: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.k:
            object.__setattr__(self, "k", (DEFAULT_K,) * len(self.subjects))
        if not self.prompt or self.prompt != self.prompt.strip():
            raise ValueError(f"prompt must be non-empty without outer spaces: {self.prompt!r}")
        if not self.subjects:
            raise ValueError(f"no subjects for {self.prompt!r}")
        padded = f" {self.prompt} "
        for subject in self.subjects:
            if not subject or f" {subject} " not in padded:
                raise ValueError(f"subject {subject!r} is not a run of whole words of "
                                 f"{self.prompt!r}")
        if len(self.k) != len(self.subjects):
            raise ValueError(f"need one k per subject: {self.k} for {self.subjects}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in self.k):
            raise ValueError(f"k values must be finite and positive: {self.k}")


def build_suite(seed: int = _SEED, per_category: int = _PER_CATEGORY) -> list[SuiteEntry]:
    """``per_category`` distinct prompts per category, drawn with ``sample_spec`` from one
    seeded generator; categories in CATEGORIES order."""
    rng = np.random.default_rng(seed)
    entries: list[SuiteEntry] = []
    for category in CATEGORIES:
        seen: set[str] = set()
        while len(seen) < per_category:
            spec = sample_spec(rng, category)
            if spec.prompt not in seen:
                seen.add(spec.prompt)
                entries.append(SuiteEntry(spec.prompt, category, spec.subjects))
    return entries


def suite_json(entries: list[SuiteEntry], seed: int = _SEED,
               per_category: int = _PER_CATEGORY) -> str:
    """The suite file's exact text: JSON with one entry per line, for readable diffs."""
    head = {"name": "shapes", "version": VERSION, "seed": seed, "per_category": per_category}
    rows = [json.dumps({"prompt": e.prompt, "category": e.category,
                        "subjects": list(e.subjects), "k": list(e.k)}) for e in entries]
    return (json.dumps(head)[:-1] + ',\n "entries": [\n  ' + ",\n  ".join(rows)
            + "\n ]\n}\n")


def _entry(raw: object, path: Path, index: int) -> SuiteEntry:
    """A validated entry, or ValueError naming the file and the entry index."""
    where = f"{path}: entry {index}"
    if not isinstance(raw, dict) or not {"prompt", "category", "subjects"} <= raw.keys():
        raise ValueError(f"{where}: need an object with prompt, category and subjects")
    try:
        entry = SuiteEntry(raw["prompt"], raw["category"], tuple(raw["subjects"]),
                           tuple(raw.get("k", ())))
        spec = parse_prompt(entry.prompt)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err
    if (spec.category, spec.subjects) != (entry.category, entry.subjects):
        raise ValueError(f"{where}: the grammar gives category {spec.category!r} and subjects "
                         f"{spec.subjects}, the file {entry.category!r} and {entry.subjects}")
    return entry


def load_suite(name: str = "shapes") -> list[SuiteEntry]:
    """The entries of suite ``name`` (a key of SUITES or a path to a suite file), validated:
    version "v1", and every prompt parses to its stated category and subjects."""
    path = SUITES[name] if name in SUITES else Path(name)
    if not path.is_file():
        raise ValueError(f"unknown suite {name!r}: not one of {sorted(SUITES)} nor a file")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError(f"{path}: expected a JSON object with \"version\": \"{VERSION}\"")
    raw = doc.get("entries")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: \"entries\" must be a non-empty list")
    return [_entry(r, path, i) for i, r in enumerate(raw)]


def main() -> None:
    """Write or check the committed suite file."""
    parser = argparse.ArgumentParser(
        description="Regenerate ShapesBench v1 (the committed file must never change).",
        epilog="example: python -m asyndm.shapes.suite --check")
    parser.add_argument("--write", action="store_true", help="(re)write the suite file")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless the committed file equals a fresh build")
    args = parser.parse_args()
    text, path = suite_json(build_suite()), SUITES["shapes"]
    if args.write:
        path.write_text(text, encoding="utf-8")
    if args.check and path.read_text(encoding="utf-8") != text:
        raise SystemExit(f"{path} differs from build_suite()")


if __name__ == "__main__":
    main()

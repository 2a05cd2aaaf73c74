"""Measure the ShapesWorld scorer against ground truth and write docs/scorer_validation.md.

For every category, N random specs are realised and rendered, then scored:

* accepted: the scorer passes the true image (clean, mildly and strongly corrupted);
* rejected: the scorer fails a scene changed in one way that breaks the spec (world.perturb);
* agreement: against a second random spec of the same category, the scorer's verdict equals
  the symbolic truth (world.satisfies), so it can pass neither by always saying yes nor no.

Example (about two minutes on two CPU cores):
    python scripts/validate_scorer.py --n 500 --out docs/scorer_validation.md
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

from asyndm.shapes.render import render
from asyndm.shapes.score import corrupt, score
from asyndm.shapes.grammar import sample_spec
from asyndm.shapes.world import CATEGORIES, perturb, realize, satisfies

# Corruptions: (name, gaussian blur sigma in px, additive noise std).
LEVELS = (("clean", 0.0, 0.0), ("mild", 0.5, 0.03), ("strong", 0.7, 0.05))


def _pct(hits: list[bool]) -> str:
    return f"{100.0 * np.mean(hits):.1f}" if hits else "-"


def validate(n: int, seed: int) -> tuple[dict[str, dict[str, list[bool]]], dict[str, list[bool]]]:
    """Per category, lists of per-item outcomes by column; and rejection by perturbation kind."""
    rng = np.random.default_rng(seed)
    table: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    kinds: dict[str, list[bool]] = defaultdict(list)
    for category in CATEGORIES:
        specs = [sample_spec(rng, category) for _ in range(n)]
        scenes = [realize(spec, rng) for spec in specs]
        broken = [perturb(scene, spec, rng) for scene, spec in zip(scenes, specs)]
        others = [sample_spec(rng, category) for _ in range(n)]
        images = render(scenes).numpy()
        wrong = render([scene for scene, _ in broken]).numpy()
        row = table[category]
        for i, spec in enumerate(specs):
            for name, blur, noise in LEVELS:
                image = corrupt(images[i], rng, blur, noise) if blur else images[i]
                row[f"accept {name}"].append(score(image, spec).correct)
            for name, blur, noise in (LEVELS[0], LEVELS[2]):
                image = corrupt(wrong[i], rng, blur, noise) if blur else wrong[i]
                rejected = not score(image, spec).correct
                row[f"reject {name}"].append(rejected)
                kinds[f"{broken[i][1]} ({name})"].append(rejected)
            truth = satisfies(scenes[i], others[i])
            row["agree"].append(score(images[i], others[i]).correct == truth)
            row["mismatch true"].append(truth)
    return table, kinds


def report(table: dict[str, dict[str, list[bool]]], kinds: dict[str, list[bool]], n: int,
           seed: int, seconds: float) -> str:
    """The validation tables as a markdown document."""
    cols = ["accept clean", "accept mild", "accept strong", "reject clean", "reject strong",
            "agree"]
    lines = [
        "# ShapesWorld scorer validation", "",
        "Measured by `scripts/validate_scorer.py`; regenerate this file with", "",
        f"    python scripts/validate_scorer.py --n {n} --seed {seed} "
        "--out docs/scorer_validation.md", "",
        "Per category, N random specs (`grammar.sample_spec`) are realised (`world.realize`),",
        "rendered at 32 px (`render.render`) and scored (`score.score`). Columns:", "",
        "* **accept clean / mild / strong**: the true image passes; mild adds a gaussian blur",
        "  of 0.5 px and noise of std 0.03, strong a blur of 0.7 px and noise of std 0.05",
        "  (`score.corrupt`). The requirement is >= 99 % on clean images.",
        "* **reject clean / strong**: the scene changed in one way that breaks the spec",
        "  (`world.perturb`: a shape, colour, object removed or added, relation swapped,",
        "  background texture or colour) fails.",
        "* **agree**: the true image scored against a second random spec of the same category",
        "  gives the symbolic truth (`world.satisfies`), whichever it is.", "",
        "| category | N | " + " | ".join(f"{c} %" for c in cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    totals: dict[str, list[bool]] = defaultdict(list)
    for category, row in table.items():
        lines.append(f"| {category} | {n} | " + " | ".join(_pct(row[c]) for c in cols) + " |")
        for c in cols:
            totals[c] += row[c]
    lines.append(f"| all | {n * len(table)} | "
                 + " | ".join(_pct(totals[c]) for c in cols) + " |")
    true_share = np.mean([t for row in table.values() for t in row["mismatch true"]])
    lines += ["", f"In the agreement column {100 * true_share:.1f} % of the (scene, second spec)"
              " pairs truly match.", "", "Rejection by kind of perturbation:", "",
              "| perturbation | N | rejected % |", "|---|---|---|"]
    for kind in sorted(kinds):
        lines.append(f"| {kind} | {len(kinds[kind])} | {_pct(kinds[kind])} |")
    lines += ["", f"Seed {seed}; {seconds:.0f} s on the project's 2-core CPU."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="specs per category")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    args = parser.parse_args()
    start = time.perf_counter()
    table, kinds = validate(args.n, args.seed)
    text = report(table, kinds, args.n, args.seed, time.perf_counter() - start)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

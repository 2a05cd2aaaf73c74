"""Two embedded models side by side on the same (prompt, seed) pairs (issue 12's tables).

Reads the ``rows*.jsonl`` of two ``scripts/oracle_masks.py`` runs (same suite, same seeds,
each model drawing every variant from the same noise) and writes Markdown:

1. per model, exact accuracy per category and variant with the difference to that model's
   DM and its paired 95 % interval (two-stage bootstrap: prompts, then seeds);
2. the second model minus the first, per variant (the same pairs, the same noise): does a
   variant gain more over DM on the second model than on the first (a difference of
   differences, paired per (prompt, seed));
3. the shipping check of issue 12: the second model's DM on single objects >= 90 % and its
   all-prompt DM accuracy not below the first model's 95 % interval.

    python scripts/compare_models.py runs/eval_base runs/eval_maps --names shipped maps
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from asyndm.bench.report import paired_bootstrap_ci

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the run format's own script
from oracle_masks import VARIANTS  # noqa: E402
from oracle_masks import read_rows as _read_rows  # noqa: E402

CATEGORIES = ("single", "two", "counting", "spatial", "binding", "context")


def read_rows(run: Path) -> dict[tuple[str, int], dict]:
    """``(prompt, seed) -> row`` of a run folder (every ``rows*.jsonl``)."""
    rows = _read_rows(run)
    if not rows:
        raise SystemExit(f"{run}: no rows*.jsonl (is it a scripts/oracle_masks.py run folder?)")
    return {(row["prompt"], int(row["seed"])): row for row in rows}


def _by_prompt(pairs: list[tuple[str, int]], value) -> list[np.ndarray]:
    """One array of ``value(pair)`` per prompt (the bootstrap's groups)."""
    groups: dict[str, list[float]] = {}
    for pair in pairs:
        groups.setdefault(pair[0], []).append(float(value(pair)))
    return [np.array(g) for g in groups.values()]


def _pairs(rows: dict, category: str) -> list[tuple[str, int]]:
    return sorted(k for k, r in rows.items() if category in ("all", r["category"]))


def _cell(mean: float, lo: float, hi: float) -> str:
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def model_table(rows: dict, name: str) -> list[str]:
    out = [f"**{name}**: exact accuracy, and the difference to its own DM [95 % interval]", "",
           "| category | n | " + " | ".join(VARIANTS) + " |",
           "|---|---:|" + "---:|" * len(VARIANTS)]
    for cat in (*CATEGORIES, "all"):
        pairs = _pairs(rows, cat)
        if not pairs:
            continue
        dm = np.mean([rows[p]["dm"] for p in pairs])
        cells = [f"{dm:.3f}"]
        for v in VARIANTS[1:]:
            acc = np.mean([rows[p][v] for p in pairs])
            diff = _by_prompt(pairs, lambda p: rows[p][v] - rows[p]["dm"])
            cells.append(f"{acc:.3f} ({_cell(acc - dm, *paired_bootstrap_ci(diff))})")
        out.append(f"| {cat} | {len(pairs)} | " + " | ".join(cells) + " |")
    return out + [""]


def gain_table(first: dict, second: dict, names: tuple[str, str]) -> list[str]:
    """Per variant and category: (second - its DM) - (first - its DM), paired."""
    a, b = names
    out = [f"**{b} - {a}**: DM's difference, then each variant's gain over DM on {b} minus its "
           f"gain on {a} (paired per (prompt, seed)) [95 % interval]", "",
           "| category | n | dm | " + " | ".join(VARIANTS[1:]) + " |",
           "|---|---:|" + "---:|" * len(VARIANTS)]
    for cat in (*CATEGORIES, "all"):
        pairs = [p for p in _pairs(first, cat) if p in second]
        if not pairs:
            continue
        diff = _by_prompt(pairs, lambda p: second[p]["dm"] - first[p]["dm"])
        cells = [_cell(np.concatenate(diff).mean(), *paired_bootstrap_ci(diff))]
        for v in VARIANTS[1:]:
            dd = _by_prompt(pairs, lambda p: (second[p][v] - second[p]["dm"])
                            - (first[p][v] - first[p]["dm"]))
            cells.append(_cell(np.concatenate(dd).mean(), *paired_bootstrap_ci(dd)))
        out.append(f"| {cat} | {len(pairs)} | " + " | ".join(cells) + " |")
    return out + [""]


def shipping_check(first: dict, second: dict, names: tuple[str, str]) -> list[str]:
    a, b = names
    single = _pairs(second, "single")
    single_acc = np.mean([second[p]["dm"] for p in single])
    every = _pairs(first, "all")
    lo, hi = paired_bootstrap_ci(_by_prompt(every, lambda p: first[p]["dm"]))
    acc_a = np.mean([first[p]["dm"] for p in every])
    acc_b = np.mean([second[p]["dm"] for p in _pairs(second, "all")])
    ok = single_acc >= 0.9 and acc_b >= lo
    return [f"Shipping check: {b}'s DM on single objects {single_acc:.1%} (needs >= 90 %); its "
            f"all-prompt DM {acc_b:.1%} against {a}'s {acc_a:.1%}"
            f" [95 % interval {lo:.1%}, {hi:.1%}] (needs >= {lo:.1%}): "
            f"{'passes' if ok else 'fails'}.", ""]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first", type=Path, help="run folder of the first model (the reference)")
    p.add_argument("second", type=Path, help="run folder of the second model")
    p.add_argument("--names", nargs=2, default=("first", "second"), metavar=("A", "B"))
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = p.parse_args(argv)
    first, second = read_rows(args.first), read_rows(args.second)
    names = tuple(args.names)
    missing = sorted(set(first) ^ set(second))
    lines = [f"{len(first)} and {len(second)} (prompt, seed) pairs; {len(missing)} in only one "
             "run." if missing else f"{len(first)} (prompt, seed) pairs in both runs.", ""]
    lines += model_table(first, names[0]) + model_table(second, names[1])
    lines += gain_table(first, second, names) + shipping_check(first, second, names)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

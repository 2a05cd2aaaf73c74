"""Report a benchmark run: ``report.md``, ``results.csv`` and plots, from its store.

For every metric, suite, category (plus ``all``) and variant the report gives the mean score
and, against a baseline variant (``dm``), the *paired* difference: for each (prompt, seed)
that both variants scored, ``score(variant) - score(baseline)``; both images start from the
same noise, so prompt and seed effects cancel. Its 95% interval is a two-stage (cluster)
percentile bootstrap: resample prompts with replacement, then the seeds of each drawn prompt
with replacement, and take the mean of the drawn differences; ``N_RESAMPLES`` resamples from
a seeded numpy generator, so a report is reproducible. Resampling prompts (not pairs) keeps
the seeds of one prompt together, which gives honest, wider intervals when the outcome
depends mostly on the prompt.

Outputs (in the run folder): ``report.md``; ``results.csv`` (one row per metric x suite x
category x variant); ``diff_<metric>.png`` (differences with intervals); ``examples.png``
(runs where the variants disagree most: one row per (prompt, seed), one column per variant).
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .store import CONFIG_NAME, DB_NAME, Store
from .suites import slug

__all__ = ["N_RESAMPLES", "ReportFiles", "paired_bootstrap_ci", "write_report"]

N_RESAMPLES = 2000
LEVEL = 0.95
_MAX_CELLS = 4_000_000  # bootstrap draws per numpy chunk


@dataclass(frozen=True)
class ReportFiles:
    report: Path
    csv: Path
    plots: tuple[Path, ...]
    examples: Path | None


def paired_bootstrap_ci(diffs_by_prompt: list[np.ndarray], n_resamples: int = N_RESAMPLES,
                        seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """Two-stage percentile bootstrap interval of the mean paired difference.

    Args:
        diffs_by_prompt: one array of per-seed differences per prompt (empty ones ignored).
    Returns:
        ``(low, high)``; ``(nan, nan)`` without data.
    """
    groups = [np.asarray(g, np.float64) for g in diffs_by_prompt if len(g)]
    if not groups:
        return math.nan, math.nan
    n = np.array([len(g) for g in groups])  # (P,) seeds per prompt
    p, m = len(groups), int(n.max())
    table = np.zeros((p, m))  # (P, M) differences, zero-padded
    for j, g in enumerate(groups):
        table[j, : len(g)] = g
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    chunk = max(1, _MAX_CELLS // (p * m))
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        pick = rng.integers(0, p, size=(b, p))  # (b, P) drawn prompts
        n_pick = n[pick]  # (b, P) their seed counts
        seeds = (rng.random((b, p, m)) * n_pick[..., None]).astype(np.int64)  # (b, P, M)
        vals = table[pick[..., None], seeds]  # (b, P, M)
        keep = np.arange(m) < n_pick[..., None]  # (b, P, M): a prompt draws n_j seeds
        stats[start : start + b] = (vals * keep).sum((1, 2)) / keep.sum((1, 2))
    tail = (1 - level) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail])
    return float(lo), float(hi)


def _md(text: str) -> str:
    """Escape untrusted text for a Markdown table cell or line."""
    out = " ".join(str(text).split())
    for ch in "\\`*_[]<>|#!$":
        out = out.replace(ch, "\\" + ch)
    return out


def _code(text: str) -> str:
    """Untrusted text as Markdown inline code (where escapes would show literally)."""
    return "`" + " ".join(str(text).split()).replace("`", "'") + "`"


def _tex_safe(text: str) -> str:
    """Keep matplotlib from reading ``$...$`` in untrusted text as mathtext."""
    return text.replace("$", r"\$")


def _fmt(x: float, digits: int = 3) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _load(store: Store):
    results = store.results()
    by_id = {r["id"]: r for r in results}
    scores: dict[str, dict[tuple, float]] = defaultdict(dict)
    for r in store.metric_values():
        if r["value"] is not None and r["result_id"] in by_id:
            row = by_id[r["result_id"]]
            scores[r["name"]][(row["suite"], row["prompt_id"], row["seed"], row["variant"])] = \
                r["value"]
    return results, scores


def _variant_order(results, config: dict) -> list[str]:
    order = list(config.get("resolved", {}).get("variants", {}))
    for r in sorted(results, key=lambda r: r["id"]):
        if r["variant"] not in order:
            order.append(r["variant"])
    present = {r["variant"] for r in results}
    return [v for v in order if v in present]


def _summary(metric: str, suite: str, category: str, variant: str, baseline: str,
             sel: dict[tuple, float], n_resamples: int, seed: int) -> dict | None:
    """One table row: mean of ``variant``, paired difference against ``baseline``.

    ``sel`` maps ``(suite, prompt_id, seed, variant)`` to the scores of one category.
    """
    mine = {k[1:3]: v for k, v in sel.items() if k[3] == variant}  # (prompt_id, seed) -> v
    if not mine:
        return None
    row = {"metric": metric, "suite": suite, "category": category, "variant": variant,
           "n": len(mine), "mean": float(np.mean(list(mine.values()))), "baseline": baseline,
           "n_pairs": 0, "diff": math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "better": 0, "worse": 0}
    base = {k[1:3]: v for k, v in sel.items() if k[3] == baseline}
    pairs = [(pid, mine[(pid, s)] - base[(pid, s)]) for pid, s in mine if (pid, s) in base]
    if variant == baseline or not pairs:
        return row
    by_prompt: dict[str, list[float]] = defaultdict(list)
    for pid, d in pairs:
        by_prompt[pid].append(d)
    diffs = np.array([d for _, d in pairs])
    lo, hi = paired_bootstrap_ci(list(by_prompt.values()), n_resamples, seed)
    row.update(n_pairs=len(pairs), diff=float(diffs.mean()), ci_low=lo, ci_high=hi,
               better=int((diffs > 0).sum()), worse=int((diffs < 0).sum()))
    return row


def _table(results, scores, variants: list[str], baseline: str, n_resamples: int,
           seed: int) -> list[dict]:
    """Rows per metric x suite x category (plus "all" when there are several) x variant."""
    cat_of = {(r["suite"], r["prompt_id"]): r["category"] for r in results}
    rows = []
    for metric in sorted(scores):
        vals = scores[metric]
        for suite in sorted({k[0] for k in vals}):
            in_suite = {k: v for k, v in vals.items() if k[0] == suite}
            cats = sorted({cat_of[(suite, k[1])] for k in in_suite})
            for cat in [*cats, "all"] if len(cats) > 1 else cats:
                sel = {k: v for k, v in in_suite.items()
                       if cat == "all" or cat_of[(suite, k[1])] == cat}
                for variant in variants:
                    row = _summary(metric, suite, cat, variant, baseline, sel, n_resamples,
                                   seed)
                    if row is not None:
                        rows.append(row)
    return rows


def _plot_diffs(rows: list[dict], metric: str, baseline: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["metric"] == metric and r["n_pairs"] > 0]
    if not sel:
        return None
    groups = list(dict.fromkeys((r["suite"], r["category"]) for r in sel))
    variants = list(dict.fromkeys(r["variant"] for r in sel))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(variants) / 2)),
                                    3.6))
    for j, v in enumerate(variants):
        xs, ys, err = [], [], [[], []]
        for i, g in enumerate(groups):
            r = next((r for r in sel if (r["suite"], r["category"]) == g
                      and r["variant"] == v), None)
            if r is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(r["diff"])
            err[0].append(max(0.0, r["diff"] - r["ci_low"]))
            err[1].append(max(0.0, r["ci_high"] - r["diff"]))
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=_tex_safe(v))
    ax.axhline(0, color="black", linewidth=0.8)
    labels = [_tex_safe(c if len({s for s, _ in groups}) == 1 else f"{s}/{c}")
              for s, c in groups]
    ax.set_xticks(range(len(groups)), labels, rotation=30 if len(groups) > 4 else 0,
                  ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel(_tex_safe(f"{metric}: difference vs {baseline}"))
    ax.set_title(f"mean paired difference, {int(LEVEL * 100)}% bootstrap CI", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _examples(results, scores, variants: list[str], metric: str, n: int) -> list[dict]:
    """Units whose variants' scores differ most (one per prompt)."""
    vals = scores.get(metric, {})
    units: dict[tuple, dict[str, float]] = defaultdict(dict)
    for (suite, pid, seed, variant), v in vals.items():
        units[(suite, pid, seed)][variant] = v
    by_key = {(r["suite"], r["prompt_id"], r["seed"], r["variant"]): r for r in results}
    ranked = []
    for unit, per in units.items():
        if all(v in per for v in variants):
            spread = max(per.values()) - min(per.values())
            if spread > 0:
                ranked.append((-spread, unit))
    out, seen = [], set()
    for _, unit in sorted(ranked):
        if unit[:2] in seen:
            continue
        seen.add(unit[:2])
        out.append({"unit": unit, "scores": units[unit],
                    "rows": {v: by_key[(*unit, v)] for v in variants}})
        if len(out) == n:
            break
    return out


def _plot_examples(examples: list[dict], variants: list[str], metric: str, root: Path,
                   path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows, cols = len(examples), len(variants)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 1.6, 2.0 * rows), squeeze=False)
    for i, ex in enumerate(examples):
        for j, v in enumerate(variants):
            ax = axes[i][j]
            file = root / ex["rows"][v]["image"]
            if file.is_file():
                with Image.open(file) as im:
                    ax.imshow(np.asarray(im.convert("RGB")), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(_tex_safe(v), fontsize=9)
            ax.set_xlabel(f"{metric} {ex['scores'][v]:.3g}", fontsize=8)
        prompt = ex["rows"][variants[0]]["prompt"]
        label = textwrap.fill(prompt[:90], 22) + f"\nseed {ex['unit'][2]}"
        axes[i][0].set_ylabel(_tex_safe(label), fontsize=7, rotation=0, ha="right",
                              va="center", labelpad=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write_csv(rows: list[dict], path: Path) -> None:
    fields = ["metric", "suite", "category", "variant", "n", "mean", "baseline", "n_pairs",
              "diff", "ci_low", "ci_high", "better", "worse", "model_evals", "seconds"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(r[k], float) and math.isnan(r[k]) else r[k])
                        for k in fields})


def _cost(results, variants: list[str]) -> dict[str, dict]:
    """Per variant: images, mean denoiser evaluations and seconds per image (nan if the store
    predates the evaluation counts)."""
    out = {}
    for v in variants:
        mine = [r for r in results if r["variant"] == v]
        evals = [r["model_evals"] for r in mine if r["model_evals"] is not None]
        out[v] = {"images": len(mine),
                  "model_evals": float(np.mean(evals)) if evals else math.nan,
                  "seconds": float(np.mean([r["seconds"] for r in mine])) if mine else math.nan}
    return out


def write_report(out_dir: str | Path, *, baseline: str = "dm", n_resamples: int = N_RESAMPLES,
                 seed: int = 0, examples: int = 6) -> ReportFiles:
    """Write ``report.md``, ``results.csv`` and the plots of the run in ``out_dir``."""
    if n_resamples < 1:
        raise ValueError(f"resamples must be >= 1 (2000 is usual), got {n_resamples}")
    if examples < 0:
        raise ValueError(f"examples must be >= 0, got {examples}")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not the run folder of asyndm bench")
    if not (root / DB_NAME).is_file():
        raise FileNotFoundError(f"{root} holds no benchmark results ({DB_NAME} is missing)")
    config_path = root / CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    with Store(root) as store:
        results, scores = _load(store)
    variants = _variant_order(results, config)
    rows = _table(results, scores, variants, baseline, n_resamples, seed)
    cost = _cost(results, variants)
    for r in rows:
        r.update(model_evals=cost[r["variant"]]["model_evals"],
                 seconds=cost[r["variant"]]["seconds"])
    csv_path = root / "results.csv"
    _write_csv(rows, csv_path)
    plots = tuple(p for m in sorted(scores)
                  if (p := _plot_diffs(rows, m, baseline, root / f"diff_{slug(m)}.png")))
    headline = "shapes" if "shapes" in scores else (sorted(scores)[0] if scores else None)
    chosen = _examples(results, scores, variants, headline, examples) if headline else []
    grid = (_plot_examples(chosen, variants, headline, root, root / "examples.png")
            if chosen else None)

    lines = ["# AsynDM benchmark report", ""]
    res = config.get("resolved", {})
    cfg = config.get("config", {})
    if config:
        lines += [f"- model: {_code(res.get('model', '?'))}",
                  f"- suite: {_md(res.get('suite', {}).get('source', '?'))}",
                  f"- steps {cfg.get('steps')}, guidance {cfg.get('guidance')}, "
                  f"eta {cfg.get('eta')}, seeds {len(res.get('seeds', []))} per prompt"]
        for name, settings in res.get("variants", {}).items():
            lines.append(f"- variant {_code(name)}: " + ", ".join(
                f"{_md(k)}={_md(v)}" for k, v in settings.items() if k != "name"))
    missing = sum(not (root / r["image"]).is_file() for r in results)
    lines += [f"- images recorded: {len(results)}"
              + (f" ({missing} image files missing)" if missing else ""), ""]
    lines += ["## Method", "",
              f"Differences are paired against {_code(baseline)} over the (prompt, seed) pairs "
              "both variants scored (same initial noise). Intervals: "
              f"{int(LEVEL * 100)}% two-stage percentile bootstrap (prompts, then seeds "
              f"within prompts, with replacement), {n_resamples} resamples, numpy seed "
              f"{seed}. better / worse: pairs where the variant scored higher / lower.", ""]
    if baseline not in variants:
        lines += [f"No results of the baseline {_code(baseline)}: no differences.", ""]
    if not scores:
        lines += ["No metric values recorded (run `asyndm bench` with `--metrics`).", ""]
    for metric in sorted(scores):
        lines += [f"## {_md(metric)}", "",
                  f"| suite | category | variant | n | mean | diff vs {_md(baseline)} "
                  f"| {int(LEVEL * 100)}% CI | better / worse | evals / image | s / image |",
                  "|---|---|---|---:|---:|---:|---|---|---:|---:|"]
        for r in (r for r in rows if r["metric"] == metric):
            ci = f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if r["n_pairs"] else ""
            bw = f"{r['better']} / {r['worse']}" if r["n_pairs"] else ""
            lines.append(f"| {_md(r['suite'])} | {_md(r['category'])} | {_md(r['variant'])} "
                         f"| {r['n']} | {_fmt(r['mean'])} | {_fmt(r['diff'])} | {ci} | {bw} "
                         f"| {_fmt(r['model_evals'], 1)} | {_fmt(r['seconds'])} |")
        plot = root / f"diff_{slug(metric)}.png"
        if plot in plots:
            lines += ["", f"![{_md(metric)} differences]({plot.name})"]
        lines.append("")
    lines += ["## Cost", "", "Denoiser evaluations (batch rows: CFG is 2 per step) and wall "
              "seconds per image, as recorded by the run.", "",
              "| variant | images | model evals / image | seconds / image |",
              "|---|---:|---:|---:|"]
    for v in variants:
        c = cost[v]
        lines.append(f"| {_md(v)} | {c['images']} | {_fmt(c['model_evals'], 1)} "
                     f"| {_fmt(c['seconds'])} |")
    lines.append("")
    if grid is not None:
        lines += ["## Examples where the variants disagree", "",
                  f"By {_code(headline)}; one row per (prompt, seed), one column per variant.",
                  "", f"![examples]({grid.name})", ""]
        for ex in chosen:
            prompt = ex["rows"][variants[0]]["prompt"]
            per = ", ".join(f"{_md(v)} {ex['scores'][v]:.3g}" for v in variants)
            lines.append(f"1. {_md(prompt)} (seed {ex['unit'][2]}): {per}")
        lines.append("")
    report = root / "report.md"
    report.write_text("\n".join(lines))
    return ReportFiles(report=report, csv=csv_path, plots=plots, examples=grid)

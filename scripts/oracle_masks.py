"""Oracle masks on ShapesBench: does AsynDM help on the embedded model when its masks are right?

Issue 12's questions (the masks, separately from the schedule; and, with ``--model``, a
model trained on timestep maps). For every prompt and seed of ShapesBench v1 a model draws
one image per variant from the same noise:

* ``dm``: plain DDIM;
* ``dm_concave``: every pixel on the concave curve (the suite's k, as ``asyndm bench``);
* ``asyndm``: AsynDM with its dynamic attention masks (the suite's subjects and k);
* ``asyndm_strong``: the same with every subject's k = ``--strong-k`` (0.7: the strongest
  lag of the first bench run, docs/results.md);
* ``oracle``: AsynDM whose regions are the *true* pixels of each subject, the oracle being
  the DM image of the same seed: subject ``i``'s region is the pixels the exact scorer's
  segmentation gives the detected objects that match ``spec.objects[i]`` (as many as the
  prompt asks, the largest first), with the suite's ``k`` for that subject. Where DM drew
  no object for a subject there is nothing to point at, and that subject gets no region;
  where it drew none for any subject the oracle run is plain DM. So the oracle knows where
  DM put each subject, not where the prompt wants it: it bounds what better-placed masks on
  DM's own layout can give, not what a perfect layout would.

Every image is scored by the exact scorer; rows are appended to ``rows.jsonl`` (an
interrupted run resumes; ``--shard i/n`` processes write ``rows.i.jsonl`` side by side and
any of them, or ``--report-only``, reports on all) and ``report.md`` gives exact accuracy
per variant and category with paired 95 % bootstrap intervals of the differences to DM
(grouped by prompt).

    python scripts/oracle_masks.py --seeds 2 --out runs/oracle_v1
    python scripts/oracle_masks.py --model runs/async/model --first-seed 8 --seeds 6 \
        --shard 0/2 --out runs/async_eval   # and --shard 1/2 beside it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from asyndm.bench.report import paired_bootstrap_ci
from asyndm.loading import load_pipeline
from asyndm.repair import RepairConfig
from asyndm.shapes.grammar import parse_prompt
from asyndm.shapes.score import matches, score
from asyndm.shapes.suite import load_suite

VARIANTS = ("dm", "dm_concave", "asyndm", "asyndm_strong", "oracle")


def oracle_regions(result, spec, ks) -> tuple[np.ndarray | None, list[float]]:
    """``(H, W)`` labelled mask (subject regions 1..R) of the DM image and one k each."""
    labels = np.zeros(result.found[0].region.shape if result.found else (32, 32), np.uint8)
    region_k: list[float] = []
    for want, k in zip(spec.objects, ks):
        group = sorted((o for o in result.found if matches(o, want.shape, want.colour)),
                       key=lambda o: -o.area)[:want.count]
        if not group:
            continue
        region_k.append(float(k))
        for obj in group:
            labels[obj.region] = len(region_k)
    return (labels if region_k else None), region_k


def _shard(text: str) -> tuple[int, int]:
    i, n = (int(x) for x in text.split("/"))
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard wants i/n with 0 <= i < n, got {text!r}")
    return i, n


def read_rows(out: Path) -> list[dict]:
    """The rows of every ``rows*.jsonl`` in ``out`` (a bad line: a one-line exit naming it)."""
    rows = []
    for path in sorted(out.glob("rows*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row["prompt"], int(row["seed"])
            except (ValueError, KeyError, TypeError) as err:
                raise SystemExit(f"{path}, line {n}: not a result row ({err})") from None
            rows.append(row)
    return rows


def _prompt_rows(pipe, entry, seeds: list[int], cfg: RepairConfig,
                 strong_k: float) -> list[dict]:
    """Every variant's exact-scorer verdict for one prompt and each of ``seeds``, plus the
    oracle's bookkeeping. The seeds of a variant are drawn as one batch (one generator per
    image, so each image is its seed's, up to round-off); the oracle's regions differ per
    seed, so its images are drawn one at a time."""
    spec = parse_prompt(entry.prompt)
    kw = dict(num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, eta=cfg.eta)

    def draw(batch_seeds, **extra):
        return pipe([entry.prompt] * len(batch_seeds),
                    generator=[torch.Generator().manual_seed(s) for s in batch_seeds],
                    **kw, **extra).images

    subjects = [list(entry.subjects)] * len(seeds)  # one list per prompt of the batch
    images = {
        "dm": draw(seeds, mode="dm"),
        "dm_concave": draw(seeds, mode="dm_concave", subjects=subjects, k=list(entry.k)),
        "asyndm": draw(seeds, subjects=subjects, k=list(entry.k)),
        "asyndm_strong": draw(seeds, subjects=subjects, k=[strong_k] * len(entry.subjects)),
        "oracle": [],
    }
    rows = []
    for j, seed in enumerate(seeds):
        dm = score(images["dm"][j], spec)
        labels, region_k = oracle_regions(dm, spec, entry.k)
        oracle = images["dm"][j]
        if labels is not None:
            try:
                oracle = draw([seed], region_mask=labels, k=region_k)[0]
            except ValueError as err:  # a region too small for the 16x16 grid: plain DM
                print(f"  oracle mask refused ({err}); the oracle image is DM's", flush=True)
                region_k = []
        row = {"dm": dm.correct,
               **{v: score(images[v][j], spec).correct for v in VARIANTS[1:-1]},
               "oracle": score(oracle, spec).correct}
        rows.append({"prompt": entry.prompt, "category": entry.category, "seed": seed, **row,
                     "oracle_regions": len(region_k), "subjects": len(spec.objects)})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="model folder (default: the embedded model as shipped)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    p.add_argument("--first-seed", type=int, default=0, help="seeds first .. first+N-1")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--strong-k", type=float, default=0.7, help="k of asyndm_strong")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="draw only the I-th of every N prompts (default 0/1)")
    p.add_argument("--report-only", action="store_true", help="write report.md and stop")
    p.add_argument("--out", required=True, help="run folder (resumes)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = RepairConfig(steps=args.steps)  # guidance 2.0 (the embedded model's), eta 1.0
    shard, shards = args.shard
    rows_path = out / ("rows.jsonl" if shards == 1 else f"rows.{shard}.jsonl")
    done = {(r["prompt"], r["seed"]) for r in read_rows(out)}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    todo = [(e, [s for s in seeds if (e.prompt, s) not in done])
            for j, e in enumerate(load_suite("shapes")) if j % shards == shard]
    todo = [(e, s) for e, s in todo if s]
    if todo and not args.report_only:
        pipe = load_pipeline(args.model, progress=False)
        for n, (entry, todo_seeds) in enumerate(todo):
            print(f"[{n + 1}/{len(todo)}] seeds {todo_seeds}: {entry.prompt}", flush=True)
            rows = _prompt_rows(pipe, entry, todo_seeds, cfg, args.strong_k)
            with rows_path.open("a") as f:
                f.write("".join(json.dumps(row) + "\n" for row in rows))
    rows = read_rows(out)
    (out / "report.md").write_text(report(rows, args))
    print(out / "report.md")


def report(rows: list[dict], args) -> str:
    cats = sorted({r["category"] for r in rows})
    model = args.model or "the embedded model as shipped"
    seeds = sorted({r["seed"] for r in rows})
    model_arg = f" --model {args.model}" if args.model else ""
    lines = [f"# AsynDM and oracle masks on ShapesBench ({model})", "",
             f"Command: `python scripts/oracle_masks.py{model_arg}"
             f" --first-seed {args.first_seed} --seeds {args.seeds} --steps {args.steps}"
             f" --strong-k {args.strong_k} --out {args.out}`; seeds {seeds[0]}-{seeds[-1]}, "
             f"{len(rows)} images per variant. Exact accuracy; differences to DM paired by "
             "seed, 95 % bootstrap over prompts; better / worse counts (prompt, seed) pairs.",
             "", "| category | variant | n | exact | diff vs dm | 95 % CI | better / worse |",
             "|---|---|---:|---:|---:|---|---|"]
    for cat in [*cats, "all"]:
        sel = [r for r in rows if cat in ("all", r["category"])]
        prompts = sorted({r["prompt"] for r in sel})
        dm = np.mean([r["dm"] for r in sel])
        lines.append(f"| {cat} | dm | {len(sel)} | {dm:.3f} | | | |")
        for v in VARIANTS[1:]:
            diffs = [np.array([float(r[v]) - float(r["dm"]) for r in sel if r["prompt"] == q])
                     for q in prompts]
            lo, hi = paired_bootstrap_ci(diffs)
            acc = np.mean([r[v] for r in sel])
            better = sum(r[v] and not r["dm"] for r in sel)
            worse = sum(r["dm"] and not r[v] for r in sel)
            lines.append(f"| {cat} | {v} | {len(sel)} | {acc:.3f} | {acc - dm:+.3f} | "
                         f"[{lo:+.3f}, {hi:+.3f}] | {better} / {worse} |")
    with_regions = sum(r["oracle_regions"] == r["subjects"] for r in rows)
    lines += ["", f"The oracle had a region for every subject in {with_regions} of "
              f"{len(rows)} images (DM drew an object for each subject there).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

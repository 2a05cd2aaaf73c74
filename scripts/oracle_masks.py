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
from asyndm.repair import RepairConfig, generate_with_latents
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


def _read_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("rows*.jsonl")):
        rows += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return rows


def _images(pipe, entry, seed: int, cfg: RepairConfig, strong_k: float) -> dict[str, bool]:
    """Every variant's exact-scorer verdict for one (prompt, seed), plus oracle bookkeeping."""
    spec = parse_prompt(entry.prompt)
    dm_image, _ = generate_with_latents(pipe, entry.prompt, seed, cfg)
    dm = score(dm_image, spec)
    kw = dict(num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, eta=cfg.eta)

    def draw(**extra):
        return pipe(entry.prompt, generator=torch.Generator().manual_seed(seed),
                    **kw, **extra).images[0]

    subjects = list(entry.subjects)
    images = {
        "dm_concave": draw(mode="dm_concave", subjects=subjects, k=list(entry.k)),
        "asyndm": draw(subjects=subjects, k=list(entry.k)),
        "asyndm_strong": draw(subjects=subjects, k=[strong_k] * len(subjects)),
    }
    labels, region_k = oracle_regions(dm, spec, entry.k)
    images["oracle"] = dm_image
    if labels is not None:
        try:
            images["oracle"] = draw(region_mask=labels, k=region_k)
        except ValueError as err:  # a region too small for the 16x16 grid: plain DM
            print(f"  oracle mask refused ({err}); the oracle image is DM's", flush=True)
            region_k = []
    row = {"dm": dm.correct, **{v: score(im, spec).correct for v, im in images.items()}}
    return {**row, "oracle_regions": len(region_k), "subjects": len(spec.objects)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="model folder (default: the embedded model as shipped)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    p.add_argument("--first-seed", type=int, default=0, help="seeds first .. first+N-1")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--strong-k", type=float, default=0.7, help="k of asyndm_strong")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="draw only the I-th of every N (prompt, seed) pairs (default 0/1)")
    p.add_argument("--report-only", action="store_true", help="write report.md and stop")
    p.add_argument("--out", required=True, help="run folder (resumes)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = RepairConfig(steps=args.steps)  # guidance 2.0 (the embedded model's), eta 1.0
    shard, shards = args.shard
    rows_path = out / ("rows.jsonl" if shards == 1 else f"rows.{shard}.jsonl")
    done = {(r["prompt"], r["seed"]) for r in _read_rows(out)}
    pairs = [(e, s) for e in load_suite("shapes")
             for s in range(args.first_seed, args.first_seed + args.seeds)]
    todo = [(e, s) for j, (e, s) in enumerate(pairs)
            if j % shards == shard and (e.prompt, s) not in done]
    if todo and not args.report_only:
        pipe = load_pipeline(args.model, progress=False)
        for n, (entry, seed) in enumerate(todo):
            print(f"[{n + 1}/{len(todo)}] seed {seed}: {entry.prompt}", flush=True)
            row = {"prompt": entry.prompt, "category": entry.category, "seed": seed,
                   **_images(pipe, entry, seed, cfg, args.strong_k)}
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
    rows = _read_rows(out)
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

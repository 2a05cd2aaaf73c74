"""``asyndm repair``, ``asyndm edit`` and ``asyndm repair-bench``: thin commands over
:mod:`asyndm.repair`. Every check that needs no model (mask, settings, ``--out``) runs
before the model loads, and nothing is written before all checks passed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_base import CURVE_NAMES, MODEL_HELP, add_threads_option

REPAIR_METHODS = ("asyndm", "inpaint", "reseed")
_CAPTIONS = {"before": "before (DM, seed S)", "mask": "the mask",
             "asyndm": "AsynDM: same seed, region lagging",
             "inpaint": "DM inpainting (RePaint-style)", "reseed": "DM, another seed"}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--k", type=float, nargs="+", default=[0.5],
                   help="curve strength of the region(s) in (0, 1): one, or one per region")
    p.add_argument("--curve", choices=CURVE_NAMES, default="quadratic",
                   help="concave curve of the region's pixels")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps, at least 2")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta in [0, 1]")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: 2.0 for the embedded model, 7.5 otherwise)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    add_threads_option(p)


def add_repair_arguments(p: argparse.ArgumentParser, edit: bool = False) -> None:
    p.add_argument("--prompt", required=True,
                   help="the new prompt" if edit else "the prompt of the image to repair")
    if edit:
        p.add_argument("--source-prompt", required=True,
                       help="the prompt the original image was drawn from")
    p.add_argument("--seed", type=int, required=True,
                   help="the seed of the original image (a CPU generator, as generate uses)")
    p.add_argument("--mask", required=True,
                   help="mask image: 0 = keep, non-zero = redraw (binary, or up to 8 grey "
                        "values for regions with their own --k); any size with the image's "
                        "aspect ratio")
    p.add_argument("--methods", nargs="+", choices=REPAIR_METHODS, default=list(REPAIR_METHODS),
                   help="redraws to make, side by side")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    _add_common(p)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per prompt")
    p.add_argument("--category", action="append", default=None,
                   help="only these ShapesBench categories (repeatable; default: all)")
    p.add_argument("--out", required=True,
                   help="run folder; running again with the same settings resumes")
    _add_common(p)


def _config(args):
    from .loading import default_guidance
    from .repair import RepairConfig

    guidance = default_guidance(args.model) if args.guidance is None else args.guidance
    k = args.k[0] if len(args.k) == 1 else list(args.k)
    cfg = RepairConfig(steps=args.steps, guidance=guidance, eta=args.eta,
                       k=args.k[0], curve=args.curve)
    return cfg, k


def run_repair(args, edit: bool = False) -> int:
    """``asyndm repair`` / ``asyndm edit``: before, mask overlay and every redraw."""
    import numpy as np
    from PIL import Image

    from .generate import _atomic_save, check_out_dir
    from .loading import load_pipeline
    from .regions import load_mask, mask_regions, require_regions
    from .repair import generate_with_latents, overlay, redraw
    from .viz import comparison_grid

    # 1. every check that needs no model
    cfg, k = _config(args)
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    labels = load_mask(args.mask)
    n_regions = require_regions(labels, args.mask)
    if isinstance(k, list) and len(k) != n_regions:
        raise ValueError(f"{args.mask} has {n_regions} region(s) but {len(k)} --k values")
    out = Path(args.out)
    check_out_dir(out, args.overwrite)
    # 2. the model, then the checks that need it (the mask on its grid)
    pipe = load_pipeline(args.model, device=args.device, progress=False)
    source = args.source_prompt if edit else args.prompt
    before, latents = generate_with_latents(pipe, source, args.seed, cfg)
    mask_regions(labels, tuple(latents.shape[-2:]), (before.height, before.width))
    mask = (np.asarray(Image.fromarray(labels.astype("uint8")).resize(before.size,
                                                                        Image.NEAREST)) > 0)
    # 3. the redraws, with the new prompt when editing
    images = {"before": before, "mask": overlay(before, mask)}
    for method in args.methods:
        images[method] = redraw(pipe, method, args.prompt, args.seed, labels, cfg, latents, k)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, im in images.items():
        path = out / f"{name}.png"
        _atomic_save(im, path)
        paths.append(path)
    titles = [_CAPTIONS[n].replace("seed S", f"seed {args.seed}") for n in images]
    header = (f"{'edit' if edit else 'repair'}: {args.prompt!r}" +
              (f" (from {source!r})" if edit else "") + f", seed {args.seed}, k {args.k}")
    grid = comparison_grid([list(images.values())], titles, header=header)
    _atomic_save(grid, out / "compare.png")
    paths.append(out / "compare.png")
    settings = {"command": "edit" if edit else "repair", "prompt": args.prompt,
                "source_prompt": source, "seed": args.seed, "mask": str(args.mask),
                "k": args.k, "methods": args.methods, "model": args.model,
                "steps": cfg.steps, "guidance": cfg.guidance, "eta": cfg.eta,
                "curve": cfg.curve}
    (out / "config.json").write_text(json.dumps(settings, indent=2))
    for path in paths:
        print(path)
    return 0


def run_repair_bench_cli(args) -> int:
    """``asyndm repair-bench``: the ShapesBench repair benchmark, resumable, and its report."""
    from tqdm import tqdm

    from .loading import load_pipeline
    from .repair import run_repair_bench, summarise
    from .shapes.suite import load_suite

    cfg, k = _config(args)
    if isinstance(k, list):
        raise ValueError("repair-bench takes one --k (every mask has one region)")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    entries = load_suite("shapes")
    if args.category:
        known = sorted({e.category for e in entries})
        unknown = sorted(set(args.category) - set(known))
        if unknown:
            raise ValueError(f"unknown categories {unknown}; ShapesBench has {known}")
        entries = [e for e in entries if e.category in args.category]
    pipe = load_pipeline(args.model, device=args.device, progress=False)
    bar = tqdm(desc="repair-bench: DM images checked", unit="image", leave=True)

    def progress(n, total, prompt, seed):
        bar.total = total
        bar.n = n
        bar.set_postfix_str(f"seed {seed}: {prompt[:40]}")
        bar.refresh()

    rows = run_repair_bench(pipe, entries, list(range(args.seeds)), cfg, args.out, progress)
    bar.close()
    summary = summarise(rows)
    out = Path(args.out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    examples_grid(rows, out).save(out / "examples.png")
    (out / "report.md").write_text(report_markdown(summary, rows, cfg, args))
    print(out / "report.md")
    return 0


def examples_grid(rows: list[dict], out: Path, n: int = 6):
    """The first ``n`` repaired cases (in run order, not picked), each method's verdict."""
    from PIL import Image

    from .viz import comparison_grid

    cases = [r for r in rows if r["status"] == "repaired"][:n]
    grid_rows, captions = [], []
    for r in cases:
        with Image.open(out / r["image"]) as strip:
            w = strip.height
            grid_rows.append([strip.crop((i * w, 0, (i + 1) * w, w)).copy()
                              for i in range(strip.width // w)])
        captions.append(["", "", *("fixed" if r[f"{m}_fixed"] else "still wrong"
                                   for m in REPAIR_METHODS)])
    titles = ["before (DM)", "mask", *(_CAPTIONS[m] for m in REPAIR_METHODS)]
    return comparison_grid(grid_rows, titles, [f"{r['prompt']} (seed {r['seed']})"
                                               for r in cases], cell=128, captions=captions,
                           header="The first repaired cases of the run, with the exact "
                                  "scorer's verdict on each redraw")


def report_markdown(summary: dict, rows: list[dict], cfg, args) -> str:
    """The benchmark's table in Markdown (fix rates, intervals, outside-mask change)."""
    lines = [
        "# Region repair on ShapesBench (embedded model)" if args.model is None
        else f"# Region repair on ShapesBench ({args.model})", "",
        f"Command: `asyndm repair-bench --seeds {args.seeds} --out {args.out}"
        + "".join(f" --category {c}" for c in args.category or []) + "`", "",
        f"DM images: {summary['dm_images']} ({summary['dm_correct']} already correct, "
        f"{summary['no_region']} wrong with no offending object to mask: a missing object, "
        f"a relation or the background); repaired cases: {summary['cases']}. Settings: "
        f"{cfg.steps} steps, guidance {cfg.guidance}, eta {cfg.eta}, k {cfg.k} "
        f"({cfg.curve}), mask = the offending objects' pixels dilated by {cfg.dilate} px.",
        "", "| method | fixed | rate | 95 % interval | outside-mask change (0-255) |",
        "|---|---:|---:|---|---:|"]
    for m, v in summary["methods"].items():
        lo, hi = v["ci"]
        lines.append(f"| {m} | {v['fixed']} / {summary['cases']} | {v['rate']:.1%} | "
                     f"{lo:.1%} - {hi:.1%} | {v['outside_change']:.2f} |")
    lines += ["", "| paired difference (cases grouped by prompt) | mean | 95 % bootstrap |",
              "|---|---:|---|"]
    for other in REPAIR_METHODS[1:]:
        d = summary[f"asyndm_minus_{other}"]
        lines.append(f"| asyndm - {other} | {d['mean']:+.1%} | "
                     f"{d['ci'][0]:+.1%} - {d['ci'][1]:+.1%} |")
    lines += ["", "Each case's strip (before, mask, asyndm, inpaint, reseed) is in "
              "`images/`, listed in `rows.jsonl`; `examples.png` shows the first cases.", ""]
    return "\n".join(lines)

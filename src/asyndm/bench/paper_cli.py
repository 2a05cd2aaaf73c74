"""Thin ``asyndm paper`` subcommand: the paper's protocol (see :mod:`asyndm.bench.paper`)."""

from __future__ import annotations

import argparse

from ..cli_base import DTYPE_NAMES, HelpFormatter, add_threads_option

__all__ = ["PAPER_EXAMPLE", "add_paper_arguments", "run_paper_cli"]

PAPER_EXAMPLE = """\
weights: --weights DIR holding imagereward/ (converted once, see docs/paper_protocol.md),
  CLIP-ViT-H-14-laion2B-s32B-b79K/, Qwen2.5-VL-7B-Instruct/ and roberta-large/; or give each
  folder with --imagereward, --openclip, --qwen, --bertscore-model

example (8 GPUs; run the same line again to resume; the report is written at the end):
  accelerate launch --num_processes 8 -m asyndm.bench paper \\
      --model weights/stable-diffusion-2-1-base --weights weights --out out/paper

a quick look on one GPU (2 prompts per set, 2 seeds, dm and asyndm, no paper metrics):
  asyndm paper --model weights/stable-diffusion-2-1-base --limit 2 --seeds 2 \\
      --methods dm asyndm --metrics --out out/paper-quick
"""


def _shard(text: str) -> tuple[int, int]:
    from .cli import _shard as parse

    return parse(text)


def add_paper_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``paper`` options to ``parser`` (also sets its formatter and example)."""
    # torch-free names: --help stays instant
    from .paper_names import PAPER_METHODS, PAPER_METRICS, PAPER_SUITES

    parser.formatter_class = HelpFormatter
    parser.epilog = PAPER_EXAMPLE
    p = parser
    p.add_argument("--model", required=True,
                   help="local diffusers folder of SD 2.1-base (stabilityai/stable-diffusion-2-"
                        "1-base) or another SD model")
    p.add_argument("--out", default="out/paper",
                   help="run folder: one bench run per prompt set, paper_table.md")
    p.add_argument("--suites", nargs="+", choices=PAPER_SUITES, default=list(PAPER_SUITES),
                   help="the paper's prompt sets to run")
    p.add_argument("--methods", nargs="+", default=None, metavar="MODE",
                   help=f"methods (default: those of {', '.join(PAPER_METHODS)} that this "
                        "version registers)")
    p.add_argument("--metrics", nargs="*", default=list(PAPER_METRICS), metavar="METRIC",
                   help="metrics to score with: the paper's, or shapes, clipscore or one you "
                        "registered (none: images only)")
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="folder with the metric weights under their usual names (above)")
    p.add_argument("--imagereward", default=None, metavar="DIR",
                   help="converted ImageReward folder (default: DIR/imagereward of --weights)")
    p.add_argument("--openclip", default=None, metavar="DIR",
                   help="OpenCLIP ViT-H-14 folder (default: from --weights)")
    p.add_argument("--qwen", default=None, metavar="DIR",
                   help="Qwen2.5-VL folder for bertscore and qwenscore (default: from --weights)")
    p.add_argument("--bertscore-model", default=None, metavar="DIR",
                   help="roberta-large folder for bertscore (default: from --weights)")
    p.add_argument("--seeds", type=int, default=32, help="images (seeds) per prompt")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images (seeds of one prompt) per pipeline call")
    p.add_argument("--device", default="auto",
                   help="torch device; auto: the process's accelerator under accelerate launch")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="network dtype")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N prompts of each set (default: all 40)")
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="run only work units I, I+N, ... (default: from accelerate launch)")
    p.add_argument("--no-report", action="store_true",
                   help="do not write the reports at the end")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_threads_option(p)


def run_paper_cli(args: argparse.Namespace) -> int:
    """Run ``asyndm paper`` from parsed arguments; returns the exit status."""
    from .paper import PaperConfig, run_paper

    paths = {k: v for k, v in (("imagereward", args.imagereward), ("openclip", args.openclip),
                               ("qwen", args.qwen), ("bertscore", args.bertscore_model))
             if v is not None}
    config = PaperConfig(
        model=args.model, out=args.out, suites=tuple(args.suites),
        methods=None if args.methods is None else tuple(args.methods),
        metrics=tuple(args.metrics), weights=args.weights, paths=tuple(sorted(paths.items())),
        seeds=args.seeds, first_seed=args.first_seed, steps=args.steps, guidance=args.guidance,
        eta=args.eta, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        limit=args.limit, shard=args.shard, report=not args.no_report)
    if config.missing_methods:
        print(f"asyndm paper: not registered in this version, not run: "
              f"{', '.join(config.missing_methods)}")
    try:
        s = run_paper(config, progress=not args.no_progress)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    for suite, r in s.runs.items():
        index, count = r.shard
        print(f"paper {suite} {index + 1}/{count}: {r.total} images, {r.done_before} already "
              f"done, {r.generated} generated")
    if s.table is not None:
        print(s.table)
    return 0

"""Thin ``asyndm bench`` and ``asyndm report`` subcommands: parse, build a config, call."""

from __future__ import annotations

import argparse

from ..cli_base import ALL_MODES, DTYPE_NAMES, MODEL_HELP, MODES, HelpFormatter, add_threads_option

__all__ = ["add_bench_arguments", "add_report_arguments", "run_bench_cli", "run_report_cli"]

BENCH_EXAMPLE = """\
variants: MODE[:KEY=VALUE,...] with keys curve, k, mask (dynamic|static), thr, name,
  e.g. asyndm:curve=piecewise,k=0.5 or asyndm:mask=static,thr=1.2,name=static;
  the competitors take their own keys (docs/methods.md), e.g. cfgpp:lam=0.6, seg:scale=3,
  pag:scale=3, s_cfg:rate_max=3, z_sampling:zigzag=10, attend_excite:scale_factor=20

example (the embedded model on ShapesBench, then the report):
  asyndm bench --suite shapes --modes dm dm_concave asyndm \\
      --variant asyndm:curve=piecewise --seeds 4 --steps 25 --out out/bench
  asyndm report out/bench

several processes (GPUs; on a CPU-only machine add --multi_gpu and --device cpu):
  accelerate launch --num_processes 2 -m asyndm.bench bench --suite shapes --out out/bench
"""

REPORT_EXAMPLE = """\
example:
  asyndm report out/bench --baseline dm --resamples 2000
"""


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from None
    if not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"need 0 <= I < N, got {text!r}")
    return shard


def _metric_path(text: str) -> tuple[str, str]:
    key, eq, path = text.partition("=")
    if not eq or not key.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=DIR such as qwen=weights/qwen, "
                                         f"got {text!r}")
    return key.strip(), path.strip()


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` (also sets its formatter and example)."""
    parser.formatter_class = HelpFormatter
    parser.epilog = BENCH_EXAMPLE
    p = parser
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--suite", default="shapes",
                   help="built-in suite name (shapes) or a JSON prompt file: a list of "
                        "prompts (paper format, with <stem>_item.json beside it) or of "
                        '{"prompt", "subjects", "k", "category"} objects')
    p.add_argument("--modes", nargs="*", choices=ALL_MODES, default=list(MODES),
                   metavar="MODE",
                   help="modes to run with default settings (one variant each): "
                        + ", ".join(ALL_MODES))
    p.add_argument("--variant", dest="variants", action="append", default=[],
                   metavar="MODE[:KEY=VALUE,...]",
                   help="an extra variant (repeatable); syntax below")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: 2.0 for the embedded model, "
                        "7.5 for any other)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (the paper uses 1.0)")
    p.add_argument("--out", default="out/bench",
                   help="run folder: results.sqlite, images/, bench_config.json; running "
                        "again resumes")
    p.add_argument("--metrics", nargs="*", default=None,
                   help="metrics to score with (shapes, clipscore; the paper's imagereward, "
                        "openclip, bertscore, qwenscore) (default: shapes for the shapes "
                        "suite, none otherwise)")
    p.add_argument("--clip-model", default=None,
                   help="local CLIP model folder (safetensors) for the clipscore metric")
    p.add_argument("--metric-path", dest="metric_paths", action="append", default=[],
                   type=_metric_path, metavar="KEY=DIR",
                   help="a local weights folder of a metric (repeatable): imagereward=, "
                        "openclip=, qwen= (bertscore, qwenscore), bertscore= "
                        "(docs/paper_protocol.md) (default: none)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="images (seeds of one prompt) per pipeline call")
    p.add_argument("--device", default="auto",
                   help="torch device; auto: the process's accelerator under accelerate "
                        "launch, else the machine's, else cpu")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                   help="network dtype")
    p.add_argument("--category", dest="categories", action="append", default=None,
                   metavar="NAME", help="only prompts of this category (repeatable; default: all)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N prompts of the suite (default: all)")
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="run only work units I, I+N, ... (default: from accelerate launch, else all)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_threads_option(p)


def run_bench_cli(args: argparse.Namespace) -> int:
    """Run ``asyndm bench`` from parsed arguments; returns the exit status."""
    from .runner import BenchConfig, run_bench
    from .variants import default_variants, parse_variant

    variants = default_variants(args.modes) + tuple(parse_variant(v) for v in args.variants)
    config = BenchConfig(
        suite=args.suite, out=args.out, model=args.model, variants=variants, seeds=args.seeds,
        first_seed=args.first_seed, steps=args.steps, guidance=args.guidance, eta=args.eta,
        metrics=None if args.metrics is None else tuple(args.metrics),
        clip_model=args.clip_model, metric_paths=tuple(args.metric_paths),
        batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, shard=args.shard, limit=args.limit,
        categories=None if args.categories is None else tuple(args.categories),
    )
    try:
        s = run_bench(config, progress=not args.no_progress)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    index, count = s.shard
    print(f"bench {index + 1}/{count}: {s.total} images, {s.done_before} already done, "
          f"{s.generated} generated" + (f", {s.rescored} rescored" if s.rescored else "")
          + f"; report: asyndm report {s.out}")
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``report`` options to ``parser`` (also sets its formatter and example)."""
    from .report import N_RESAMPLES

    parser.formatter_class = HelpFormatter
    parser.epilog = REPORT_EXAMPLE
    parser.add_argument("out", metavar="DIR", help="run folder of asyndm bench")
    parser.add_argument("--baseline", default="dm",
                        help="variant the paired differences are taken against")
    parser.add_argument("--resamples", type=int, default=N_RESAMPLES,
                        help="bootstrap resamples of the confidence intervals")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--examples", type=int, default=6,
                        help="rows of examples.png (units where the variants disagree)")


def run_report_cli(args: argparse.Namespace) -> int:
    """Run ``asyndm report`` from parsed arguments; returns the exit status."""
    from .report import write_report

    files = write_report(args.out, baseline=args.baseline, n_resamples=args.resamples,
                         seed=args.seed, examples=args.examples)
    for path in (files.report, files.csv, *files.plots, files.examples):
        if path is not None:
            print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m asyndm.bench {bench,report,paper} ...`` (also under ``accelerate launch -m``)."""
    from ..cli import run_parsed

    parser = argparse.ArgumentParser(prog="python -m asyndm.bench", formatter_class=HelpFormatter,
                                     description="Benchmark AsynDM variants on a prompt suite.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="generate, score and record images")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench_cli)
    report = sub.add_parser("report", help="report.md, results.csv and plots")
    add_report_arguments(report)
    report.set_defaults(func=run_report_cli)
    from .paper_cli import add_paper_arguments, run_paper_cli

    paper = sub.add_parser("paper", help="the AsynDM paper's protocol (asyndm paper --help)")
    add_paper_arguments(paper)
    paper.set_defaults(func=run_paper_cli)
    return run_parsed(parser.parse_args(argv))

"""The ``asyndm`` command line: parse, build a config, call a library function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .sampler import MASK_MODES, MODES
from .schedules import CURVES

_FMT = argparse.ArgumentDefaultsHelpFormatter


def _add_generation_options(p: argparse.ArgumentParser, modes_default: Sequence[str]) -> None:
    p.add_argument("--model", default=None,
                   help="diffusers model folder or hub id (default: the embedded model)")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--subjects", nargs="+", default=[],
                   help="subject words/phrases of the prompt ('cat', 'red car', 'cat#2' for "
                        "the 2nd occurrence) or raw token positions (integers)")
    p.add_argument("--k", type=float, nargs="+", default=[0.5],
                   help="curve strength: one value, or one per subject")
    p.add_argument("--curve", choices=sorted(CURVES), default="quadratic",
                   help="concave curve of subject pixels")
    if modes_default is not None:
        p.add_argument("--mode", dest="modes", action="append", choices=MODES, default=None,
                       help="mode(s) to run; repeat for several "
                            f"(default: {' '.join(modes_default)})")
    p.add_argument("--mask-mode", choices=MASK_MODES, default="dynamic",
                   help="dynamic: previous step's attention; static: from a DM run of the seed")
    p.add_argument("--mask-threshold", type=float, default=1.0,
                   help="a pixel joins a subject at this multiple of the map's spatial mean")
    p.add_argument("--steps", type=int, default=50, help="number of DDIM steps")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (the paper uses 1.0)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: 2.0 for the embedded model, "
                        "7.5 for any other)")
    p.add_argument("--seed", type=int, default=0, help="image i uses a CPU generator seeded S+i")
    p.add_argument("--num-images", type=int, default=1, help="images per mode")
    p.add_argument("--height", type=int, default=None, help="image height (default: model's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: model's)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for guidance")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="network dtype")
    p.add_argument("--out", default="out", help="output folder")


def _parse_subjects(words: Sequence[str]) -> tuple:
    return tuple(int(w) if w.isdigit() else w for w in words)


def _config_from_args(args, modes: Sequence[str]):
    from .generate import GenerateConfig

    return GenerateConfig(
        prompt=args.prompt, subjects=_parse_subjects(args.subjects), k=tuple(args.k),
        model=args.model, curve=args.curve, modes=tuple(modes), mask_mode=args.mask_mode,
        mask_threshold=args.mask_threshold, steps=args.steps, eta=args.eta,
        guidance=args.guidance, seed=args.seed, num_images=args.num_images,
        height=args.height, width=args.width, negative_prompt=args.negative_prompt,
        device=args.device, dtype=args.dtype, out=args.out,
    )


def _cmd_generate(args) -> int:
    from .generate import run_modes

    cfg = _config_from_args(args, args.modes or ["asyndm"])
    result = run_modes(cfg)
    for path in result.paths:
        print(path)
    return 0


def _cmd_compare(args) -> int:
    from .generate import compare

    result = compare(_config_from_args(args, MODES))
    for path in result.paths:
        print(path)
    return 0


def _cmd_schedule(args) -> int:
    from diffusers import DDIMScheduler

    from .schedules import SchedulePlan, state_trajectory

    sched = DDIMScheduler(num_train_timesteps=args.num_train_timesteps,
                          steps_offset=args.steps_offset, timestep_spacing=args.spacing)
    plan = SchedulePlan.from_scheduler(sched, args.steps, args.curve)
    traj = state_trajectory(plan, args.k)
    if args.json:
        print(json.dumps(traj))
    else:
        print(f"{'step':>4} {'background':>11} {'region':>9}")
        for i, (b, r) in enumerate(zip(traj["background"], traj["region"])):
            print(f"{i:>4} {b:>11.2f} {r:>9.2f}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    for path in run_demo(args.out, steps=args.steps, device=args.device):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyndm", description="Asynchronous denoising (AsynDM) for text-to-image diffusion.",
        formatter_class=_FMT,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate images in one or more modes",
                       formatter_class=_FMT, epilog="example: asyndm generate --prompt "
                       "'a red circle left of a blue square' --subjects circle square "
                       "--mode dm --mode asyndm --steps 20 --out out/gen")
    _add_generation_options(p, ["asyndm"])
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("compare", help="DM | DM_concave | AsynDM grid and timestep animation",
                       formatter_class=_FMT, epilog="example: asyndm compare --prompt "
                       "'a red circle left of a blue square' --subjects circle square "
                       "--steps 20 --num-images 2 --out out/compare")
    _add_generation_options(p, None)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("schedule", help="print the per-step states of the curves",
                       formatter_class=_FMT,
                       epilog="example: asyndm schedule --curve quadratic --k 0.5 "
                              "--steps 50 --json")
    p.add_argument("--curve", choices=sorted(CURVES), default="quadratic", help="subject curve")
    p.add_argument("--k", type=float, default=0.5, help="curve strength")
    p.add_argument("--steps", type=int, default=50, help="number of steps")
    p.add_argument("--num-train-timesteps", type=int, default=1000, help="scheduler's T")
    p.add_argument("--steps-offset", type=int, default=1, help="scheduler's steps_offset")
    p.add_argument("--spacing", default="leading", choices=["leading", "trailing", "linspace"],
                   help="scheduler's timestep_spacing")
    p.add_argument("--json", action="store_true",
                   help='print {"background": [...], "region": [...]}')
    p.set_defaults(func=_cmd_schedule)

    p = sub.add_parser("demo", help="comparison grid + animation on the embedded model",
                       formatter_class=_FMT, epilog="example: asyndm demo --out out/demo")
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--device", default="cpu", help="torch device")
    p.set_defaults(func=_cmd_demo)

    from .bench.cli import (add_bench_arguments, add_report_arguments, run_bench_cli,
                            run_report_cli)
    from .shapes.train_cli import add_arguments as add_train_arguments
    from .shapes.train_cli import run as run_train

    p = sub.add_parser("train-shapes", help="train the embedded ShapesBench model",
                       formatter_class=_FMT)
    add_train_arguments(p)
    p.set_defaults(func=run_train)
    p = sub.add_parser("bench", help="benchmark modes/variants on a prompt suite",
                       formatter_class=_FMT)
    add_bench_arguments(p)
    p.set_defaults(func=run_bench_cli)
    p = sub.add_parser("report", help="report.md, results.csv and plots of a bench run",
                       formatter_class=_FMT)
    add_report_arguments(p)
    p.set_defaults(func=run_report_cli)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # user mistakes: one clear line, no stack trace
        print(f"asyndm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"asyndm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

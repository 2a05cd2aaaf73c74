"""The ``asyndm`` command line: parse, build a config, call a library function.

Only the chosen subcommand's options are built, and torch, diffusers and the library are
imported only once a command runs, so ``asyndm --help`` and argument errors answer at once.
A user mistake ends in one line on stderr and exit status 2, before any file is written.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack

from .cli_base import (ALL_MODES, CURVE_NAMES, DTYPE_NAMES, EMBEDDED_MODELS, MASK_MODES,
                       MODE_HELP, MODEL_HELP, MODES, HelpFormatter, add_threads_option,
                       quiet_foreign_notices, torch_threads)
from .compile import COMPILE_MODES

EMBEDDED_GUIDANCE_TEXT = "2.0 for the embedded model, 7.5 for any other"


def _mode_spec(text: str) -> str:
    """``MODE[:KEY=VALUE,...]`` whose MODE is known (its options are checked by the config)."""
    name = text.strip().partition(":")[0]
    if name not in ALL_MODES:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from "
                                         f"{', '.join(ALL_MODES)})")
    return text.strip()


def _add_generation_options(p: argparse.ArgumentParser, modes_default: str | None) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--subjects", nargs="+", default=[],
                   help="subject words/phrases of the prompt ('cat', 'red car', 'cat#2' for "
                        "the 2nd occurrence; counted from 1) or raw token positions "
                        "(integers, 1 = the first token after the start token)")
    p.add_argument("--k", type=float, nargs="+", default=[0.5],
                   help="curve strength in (0, 1): one value, or one per subject")
    p.add_argument("--curve", choices=CURVE_NAMES, default="quadratic",
                   help="concave curve of subject pixels")
    if modes_default is not None:
        p.add_argument("--mode", dest="modes", action="append", default=None, type=_mode_spec,
                       metavar="MODE[:KEY=VALUE,...]",
                       help=f"mode to run; repeat for several (default: {modes_default}). "
                            + MODE_HELP)
    else:
        p.add_argument("--mode", dest="modes", action="append", default=None, type=_mode_spec,
                       metavar="MODE[:KEY=VALUE,...]",
                       help="a competitor to add as a column after DM, DM_concave and AsynDM; "
                            "repeat for several (default: none). " + MODE_HELP)
    p.add_argument("--mask-mode", choices=MASK_MODES, default="dynamic",
                   help="dynamic: previous step's attention; static: from a DM run of the seed")
    p.add_argument("--mask-threshold", type=float, default=1.0,
                   help="a pixel joins a subject at this multiple of the map's spatial mean")
    p.add_argument("--compile", choices=COMPILE_MODES, default="off",
                   help="torch.compile the denoiser (reduce-overhead: CUDA graphs on a GPU); "
                        "compiles once per kind of step, worth it for many images")
    p.add_argument("--steps", type=int, default=50,
                   help="number of DDIM steps, at least 2 (one step from pure noise returns "
                        "the model's first guess: noise on the embedded model)")
    p.add_argument("--eta", type=float, default=1.0,
                   help="DDIM eta in [0, 1] (the paper uses 1.0)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale (default: {EMBEDDED_GUIDANCE_TEXT})")
    p.add_argument("--seed", type=int, default=0,
                   help="image i uses a CPU generator seeded S+i (0 <= S+i < 2**63)")
    p.add_argument("--num-images", type=int, default=1, help="images per mode")
    p.add_argument("--height", type=int, default=None,
                   help="image height (default: the model's; the embedded model: 32)")
    p.add_argument("--width", type=int, default=None,
                   help="image width (default: the model's; the embedded model: 32)")
    p.add_argument("--negative-prompt", default=None,
                   help="negative prompt for guidance (default: none, the empty prompt)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="network dtype")
    p.add_argument("--out", default="out",
                   help="output folder; it must be empty or new unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, first removing the images, GIFs and "
                        "config.json an earlier run left there (other files stay)")
    add_threads_option(p)


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
        device=args.device, dtype=args.dtype, out=args.out, overwrite=args.overwrite,
        compile=args.compile,
    )


def _cmd_generate(args) -> int:
    from .generate import run_modes

    result = run_modes(_config_from_args(args, args.modes or ["asyndm"]))
    for path in result.paths:
        print(path)
    return 0


def _cmd_compare(args) -> int:
    from .generate import compare

    result = compare(_config_from_args(args, MODES + tuple(args.modes or ())))
    for path in result.paths:
        print(path)
    return 0


def _cmd_schedule(args) -> int:
    from diffusers import DDIMScheduler

    from .schedules import SchedulePlan, state_trajectory

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
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

    for path in run_demo(args.out, steps=args.steps, device=args.device, model=args.model):
        print(path)
    return 0


def _add_generate(p: argparse.ArgumentParser) -> None:
    _add_generation_options(p, "asyndm")
    p.set_defaults(func=_cmd_generate)


def _add_compare(p: argparse.ArgumentParser) -> None:
    _add_generation_options(p, None)
    p.set_defaults(func=_cmd_compare)


def _add_schedule(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve", choices=CURVE_NAMES, default="quadratic", help="subject curve")
    p.add_argument("--k", type=float, default=0.5, help="curve strength")
    p.add_argument("--steps", type=int, default=50, help="number of steps")
    p.add_argument("--num-train-timesteps", type=int, default=1000, help="scheduler's T")
    p.add_argument("--steps-offset", type=int, default=1, help="scheduler's steps_offset")
    p.add_argument("--spacing", default="leading", choices=["leading", "trailing", "linspace"],
                   help="scheduler's timestep_spacing")
    p.add_argument("--json", action="store_true",
                   help='print {"background": [...], "region": [...]}')
    p.set_defaults(func=_cmd_schedule)


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo",
                   help="output folder (its compare.png and timesteps_*.gif are replaced)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps, at least 2")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--model", default="embedded:shapes-base", choices=[
        "embedded:" + name for name in EMBEDDED_MODELS], help="which embedded model draws")
    add_threads_option(p)
    p.set_defaults(func=_cmd_demo)


def _add_train(p: argparse.ArgumentParser) -> None:
    from .shapes.train_cli import add_arguments, run

    add_arguments(p)
    p.set_defaults(func=run)


def _add_bench(p: argparse.ArgumentParser) -> None:
    from .bench.cli import add_bench_arguments, run_bench_cli

    add_bench_arguments(p)
    p.set_defaults(func=run_bench_cli)


def _add_report(p: argparse.ArgumentParser) -> None:
    from .bench.cli import add_report_arguments, run_report_cli

    add_report_arguments(p)
    p.set_defaults(func=run_report_cli)


def _add_repair(p: argparse.ArgumentParser) -> None:
    from .repair_cli import add_repair_arguments, run_repair

    add_repair_arguments(p)
    p.set_defaults(func=run_repair)


def _add_edit(p: argparse.ArgumentParser) -> None:
    from .repair_cli import add_repair_arguments, run_repair

    add_repair_arguments(p, edit=True)
    p.set_defaults(func=lambda args: run_repair(args, edit=True))


def _add_repair_bench(p: argparse.ArgumentParser) -> None:
    from .repair_cli import add_bench_arguments, run_repair_bench_cli

    add_bench_arguments(p)
    p.set_defaults(func=run_repair_bench_cli)


def _add_paper(p: argparse.ArgumentParser) -> None:
    from .bench.paper_cli import add_paper_arguments, run_paper_cli

    add_paper_arguments(p)
    p.set_defaults(func=run_paper_cli)


_EXAMPLES = {
    "generate": "example:\n  asyndm generate "
                "--prompt 'a red circle to the left of a blue square' \\\n"
                "      --subjects 'red circle' 'blue square' --mode dm --mode asyndm "
                "--mode cfgpp:lam=0.6 --steps 20 --out out/gen",
    "compare": "example:\n  asyndm compare "
               "--prompt 'a red circle to the left of a blue square' \\\n"
               "      --subjects 'red circle' 'blue square' --steps 20 --num-images 2 "
               "--out out/compare",
    "schedule": "example:\n  asyndm schedule --curve quadratic --k 0.5 --steps 50 --json",
    "demo": "example:\n  asyndm demo --out out/demo",
    "repair": "example:\n  asyndm repair --prompt 'a red circle' --seed 3 --mask mask.png "
              "--out out/repair",
    "edit": "example:\n  asyndm edit --source-prompt 'a red circle' --prompt 'a blue circle' "
            "--seed 3 --mask mask.png --out out/edit",
    "repair-bench": "example:\n  asyndm repair-bench --seeds 2 --out runs/repair",
}

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "generate": ("generate images in one or more modes", _add_generate),
    "compare": ("DM | DM_concave | AsynDM grid and timestep animation", _add_compare),
    "schedule": ("print the per-step states of the curves", _add_schedule),
    "demo": ("comparison grid + animation on the embedded model", _add_demo),
    "train-shapes": ("train the embedded ShapesBench model", _add_train),
    "bench": ("benchmark modes/variants on a prompt suite", _add_bench),
    "report": ("report.md, results.csv and plots of a bench run", _add_report),
    "repair": ("redraw a masked region of a generated image (same seed)", _add_repair),
    "edit": ("redraw a masked region with a new prompt (same seed)", _add_edit),
    "repair-bench": ("repair benchmark: wrong DM images, their offending objects masked",
                     _add_repair_bench),
    "paper": ("the AsynDM paper's protocol: every method and metric on its four prompt sets",
              _add_paper),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``asyndm`` parser; with ``only`` given, only that subcommand gets its options
    (``""``: none, enough for ``asyndm --help`` and for a mistyped command)."""
    parser = argparse.ArgumentParser(
        prog="asyndm", formatter_class=HelpFormatter,
        description="Asynchronous denoising (AsynDM) for text-to-image diffusion.\nWithout "
                    "--model every command uses the embedded model (32x32 images, CPU).",
        epilog="example: asyndm demo --out out/demo     (then see: asyndm generate --help)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, add) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter,
                           epilog=_EXAMPLES.get(name))
        if only is None or only == name:
            add(p)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


# what a user's mistake raises; anything else is a bug and keeps its traceback
_USER_ERRORS = (ValueError, OSError, sqlite3.DatabaseError)


def run_parsed(args: argparse.Namespace) -> int:
    """Run a parsed command: its ``--threads`` (if it has one), one line per user mistake."""
    try:
        with quiet_foreign_notices(), ExitStack() as stack:
            if "threads" in vars(args):  # commands without the option keep torch's own
                stack.enter_context(torch_threads(args.threads))
            return int(args.func(args) or 0)
    except _USER_ERRORS as err:
        text = " ".join(str(err).split()) or type(err).__name__
        print(f"asyndm {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = "; run it again to resume" if args.command in ("bench", "paper") else ""
        print(f"asyndm {args.command}: interrupted{resume}", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_parsed(build_parser(only=_command_of(argv) or "").parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

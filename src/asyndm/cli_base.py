"""What the subcommands share before any heavy import: choice names, help, ``--threads``.

Nothing here imports torch or diffusers, so ``asyndm --help`` and argument errors answer at
once. The names repeat the library's registries (``asyndm.sampler.MODES``,
``asyndm.methods.METHODS``, ``asyndm.schedules.CURVES``); ``tests/test_cli.py`` and
``tests/test_methods.py`` check that they stay equal.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

MODES = ("dm", "dm_concave", "asyndm")
METHOD_NAMES = ("cfgpp", "s_cfg", "z_sampling", "seg", "pag", "attend_excite")
"""The competitors of ``asyndm.methods.METHODS`` (a test keeps the two equal)."""
ALL_MODES = MODES + METHOD_NAMES
MODE_HELP = ("MODE[:KEY=VALUE,...] with MODE one of " + ", ".join(ALL_MODES) + "; KEY=VALUE "
             "sets a competitor's parameters, e.g. cfgpp:lam=0.6, seg:scale=3, "
             "z_sampling:zigzag=10 (see docs/methods.md)")
MASK_MODES = ("dynamic", "static")
EMBEDDED_MODELS = ("shapes-base", "shapes-maps")
"""``asyndm.loading.EMBEDDED_MODELS`` (a test keeps the two equal)."""
MODEL_HELP = ("diffusers model folder, hub id, or embedded:NAME for an embedded model ("
              + ", ".join(EMBEDDED_MODELS) + "; shapes-maps is trained on per-pixel timestep "
              "maps) (default: the embedded model shapes-base)")
CURVE_NAMES = ("exponential", "piecewise", "quadratic")
DTYPE_NAMES = ("float32", "float16", "bfloat16")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show each default once, and keep descriptions and examples as written.

    A help text that already says its default (``(default: ...)``) is left alone; ``None``,
    ``False`` and empty defaults are not shown (the help says what they mean).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if ("default" in text or not action.option_strings or d is argparse.SUPPRESS
                or d is None or d is False or d == []):
            return text
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
        return f"{text} (default: {shown.replace('%', '%%')})"


def default_threads() -> int:
    """CPU threads when ``--threads`` is not given: ``$OMP_NUM_THREADS`` if set, else half
    the CPUs this process may use (at least 1), so that work elsewhere on the machine does
    not make torch's threads spin-wait on each other (1 on a 2-core machine)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // 2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=_positive_int, default=None,
        help="torch CPU threads (default: $OMP_NUM_THREADS if set, else half the CPUs, at "
             f"least 1; here {default_threads()}). On a machine busy with other work more "
             "threads than free cores make torch far slower (see benchmarks/README.md)")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the body with ``threads`` torch CPU threads (``None``: :func:`default_threads`),
    then restore the previous count (``main`` may be called in-process, e.g. by tests)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


class _DropTorchvisionNotice:
    """transformers announces at import that it falls back to PIL image processors when
    torchvision is missing; that is how asyndm uses them, so the notice is noise."""

    def filter(self, record) -> bool:
        return "requires torchvision" not in record.getMessage()


@contextmanager
def quiet_foreign_notices() -> Iterator[None]:
    """Hide transformers' torchvision notices while a command runs."""
    from transformers.utils import logging as hf_logging

    handlers = hf_logging.get_logger().handlers
    noise = _DropTorchvisionNotice()
    for h in handlers:
        h.addFilter(noise)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(noise)

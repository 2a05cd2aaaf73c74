"""``asyndm train-shapes``: train the shapes world's text-to-image model (a thin wrapper).

Every option maps one-to-one onto a `asyndm.shapes.train.TrainConfig` field, whose defaults
are the only defaults.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from asyndm.shapes.model import MODEL_SIZES
from asyndm.shapes.train import ResumeError, TrainConfig, train

__all__ = ["DESCRIPTION", "EPILOG", "add_arguments", "config_from_args", "run"]

DESCRIPTION = """\
Train the small pixel-space text-to-image model of the shapes world from scratch,
on scenes rendered on the fly. Checkpoints are resumable (--resume), and the EMA
weights are exported in fp16 as a diffusers model folder OUT/model."""
EPILOG = """\
On a GPU use bf16 (the default), a large batch and CPU data workers:
  asyndm train-shapes --out runs/shapes --device cuda --minutes 7 --batch-size 256 --num-workers 12

example (a one-minute CPU smoke run):
  asyndm train-shapes --out runs/shapes-smoke --size tiny --batch-size 32 --minutes 1"""

_D = TrainConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train-shapes`` options to ``parser`` (and its description and epilog)."""
    parser.description = parser.description or DESCRIPTION
    parser.epilog = EPILOG
    if parser.formatter_class is argparse.HelpFormatter:
        # Keep the example commands on one line each, as they must be typed.
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    a = parser.add_argument
    a("--out", required=True, metavar="DIR", help="run folder for checkpoints, logs and model/")
    a("--resume", action="store_true",
      help="continue from the newest checkpoint in --out (default: off, refuse to overwrite)")
    a("--size", choices=sorted(MODEL_SIZES), default=_D.size,
      help="model size from the registry (default: %(default)s)")
    a("--minutes", type=float, default=_D.minutes,
      help="training time budget in minutes, summed over resumed runs (default: %(default)s)")
    a("--max-steps", type=int, default=_D.max_steps,
      help="stop after this many optimiser steps in total (default: %(default)s = no limit)")
    a("--device", default=_D.device,
      help="torch device to train on, e.g. cpu, cuda, cuda:1 (default: %(default)s)")
    a("--batch-size", type=int, default=_D.batch_size,
      help="images per optimiser step (default: %(default)s)")
    a("--seed", type=int, default=_D.seed,
      help="seed of the initialisation and of the data stream (default: %(default)s)")
    a("--lr", type=float, default=_D.lr,
      help="AdamW learning rate after warm-up (default: %(default)s)")
    a("--warmup-steps", type=int, default=_D.warmup_steps,
      help="steps of linear learning-rate warm-up (default: %(default)s)")
    a("--weight-decay", type=float, default=_D.weight_decay,
      help="AdamW weight decay (default: %(default)s)")
    a("--grad-clip", type=float, default=_D.grad_clip,
      help="gradient-norm clipping threshold (default: %(default)s)")
    a("--ema-decay", type=float, default=_D.ema_decay,
      help="decay of the exported EMA weights (default: %(default)s)")
    a("--cfg-dropout", type=float, default=_D.cfg_dropout,
      help="probability that a prompt is replaced by '' for classifier-free guidance "
      "(default: %(default)s)")
    a("--checkpoint-every-minutes", type=float, default=_D.checkpoint_every_minutes,
      help="minutes between checkpoints; one is also written at the end (default: %(default)s)")
    a("--log-every", type=int, default=_D.log_every,
      help="steps between loss readings, the only host-device syncs (default: %(default)s)")
    a("--bf16", action=argparse.BooleanOptionalAction, default=_D.bf16,
      help="bfloat16 autocast, the fast path on CPU and GPU (default: %(default)s)")
    a("--num-workers", type=int, default=_D.num_workers,
      help="data worker processes that sample and render batches (default: %(default)s = "
      "in the training process)")
    a("--render-on-device", action=argparse.BooleanOptionalAction, default=_D.render_on_device,
      help="render the scenes on --device instead of in the data workers (default: %(default)s)")
    a("--compile", action=argparse.BooleanOptionalAction, default=_D.compile,
      help="torch.compile the UNet (default: %(default)s)")
    a("--init-from", default=_D.init_from, metavar="MODEL_DIR",
      help="start from the weights of an exported model folder, fresh optimiser "
      "(default: %(default)s = random init)")
    a("--timestep-maps", default=_D.timestep_maps, metavar="SHARED,ASYNDM,SMOOTH",
      help="weights of the per-image timestep-map kinds: one shared t (today's training), "
      "AsynDM-shaped maps (objects lagging on the quadratic curve, k in [0.1, 0.7]) and "
      "smooth random maps; see asyndm.shapes.timestep_maps (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` named by parsed ``train-shapes`` arguments."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def run(args: argparse.Namespace) -> int:
    """Run ``train-shapes``; returns the process exit status (2 for a refused configuration)."""
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        print(f"asyndm train-shapes: error: {err}", file=sys.stderr)
        return 2
    try:
        train(cfg, args.out, resume=args.resume)
    except ResumeError as err:
        print(f"asyndm train-shapes: error: {err}", file=sys.stderr)
        return 2
    return 0

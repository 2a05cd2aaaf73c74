"""Plot the loss of a model trained in stages (runs chained with --init-from) as one curve.

Each stage's ``losses.csv`` (written by ``asyndm train-shapes``) is drawn against the images
seen since the first stage began, with a dashed line where a stage starts.

    python scripts/plot_training_stages.py runs/embedded/stage1 runs/embedded/stage2 \
        runs/embedded/stage3 --out src/asyndm/shapes/weights/shapes-base/loss_curve.png
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_losses(run: Path) -> list[dict[str, float]]:
    path = run / "losses.csv"
    if not path.is_file():
        raise SystemExit(f"{path}: no losses.csv (is {run} an `asyndm train-shapes` run folder?)")
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _settings(run: Path) -> str:
    """'lr 0.0004, batch 256' from the run's train_config.json, or the folder name."""
    try:
        cfg = json.loads((run / "train_config.json").read_text(encoding="utf-8"))
        return f"lr {cfg['lr']:g}, batch {cfg['batch_size']}"
    except (OSError, ValueError, KeyError, TypeError):
        return run.name


def plot_stages(runs: list[Path], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=120)
    offset = 0.0
    for i, run in enumerate(runs):
        rows = read_losses(run)
        if i:
            ax.axvline(offset / 1e6, color="grey", ls="--", lw=0.8)
        ax.plot([(offset + r["images"]) / 1e6 for r in rows], [r["loss"] for r in rows],
                lw=1.2, label=f"stage {i + 1}: {_settings(run)}")
        offset += rows[-1]["images"] if rows else 0.0
    ax.set_xlabel("images seen (millions)")
    ax.set_ylabel("v-prediction MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders, first stage first")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args()
    plot_stages(args.runs, args.out)
    print(args.out)


if __name__ == "__main__":
    main()

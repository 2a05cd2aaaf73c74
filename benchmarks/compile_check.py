"""``torch.compile`` with the real backend on the embedded model: graphs and agreement.

Runs the embedded model through ``AsynDMPipeline`` eager, then with
:func:`asyndm.compile_denoiser` (``--mode``, inductor by default), for DM and AsynDM, and
prints per call the graphs compiled so far (dynamo's counter), the wall time (the first
call of each kind includes compiling) and the largest difference from the eager latents.
A second AsynDM call and one with another step count must compile nothing. Speed is not
the point on a CPU (see ``bench_sd21.py --compile`` on a GPU).

example: python benchmarks/compile_check.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from torch._dynamo.utils import counters

import asyndm
from asyndm.compile import COMPILE_MODES
from asyndm.pipeline import AsynDMPipeline

PROMPT = "a red circle to the left of a blue square"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=COMPILE_MODES[1:], default="default",
                   help="torch.compile mode")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per call")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pipe = AsynDMPipeline.from_pretrained(asyndm.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)

    def run(mode: str, steps: int = args.steps) -> torch.Tensor:
        subjects = None if mode == "dm" else ["red circle", "blue square"]
        return pipe(PROMPT, subjects=subjects, mode=mode, num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    with torch.no_grad():
        eager = {m: run(m) for m in ("dm", "asyndm")}
        torch._dynamo.reset()  # count from nothing compiled (the cache is per process)
        counters.clear()
        asyndm.compile_denoiser(pipe, args.mode, backend=args.backend)
        rows = {}
        for name, mode, steps in (("dm", "dm", args.steps), ("asyndm", "asyndm", args.steps),
                                  ("asyndm again", "asyndm", args.steps),
                                  (f"asyndm, {args.steps + 5} steps", "asyndm",
                                   args.steps + 5)):
            start = time.perf_counter()
            out = run(mode, steps)
            seconds = time.perf_counter() - start
            diff = (out - eager[mode]).abs().max().item() if steps == args.steps else None
            rows[name] = {"graphs": counters["stats"]["unique_graphs"], "s": seconds,
                          "max_diff": diff}
            shown = "-" if diff is None else f"{diff:.2e}"
            print(f"{name:18s} graphs so far {rows[name]['graphs']:2d}   {seconds:7.1f} s   "
                  f"max |compiled - eager| {shown}")
    return rows


if __name__ == "__main__":
    main()

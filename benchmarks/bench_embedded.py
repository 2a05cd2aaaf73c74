"""DM vs AsynDM through the full ``AsynDMPipeline`` on the embedded ShapesBench model.

The embedded model (``asyndm.loading.load_pipeline(None)``) runs at its native size: 32x32
pixels, ``(12, 16, 16)`` "latents", no VAE. Where its trained weights are missing, a
randomly initialised model of the same architecture (``MODEL_SIZES["base"]``) stands in; the
output says which one ran. Settings: 25 steps (the demo's), guidance 7.5 (CFG on; its cost
does not depend on the scale), eta 1.0.

``pipe(..., mode="dm")`` and ``pipe(..., mode="asyndm")`` run interleaved in one process
(see ``harness.py``); the script prints the medians and the ratio ``asyndm / dm`` of the
wall time per step (from diffusers' ``callback_on_step_end``), end to end (the whole ``__call__``:
prompt encoding, sampling, decoding, PIL conversion) and the peak memory.

example: python benchmarks/bench_embedded.py --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (PeakMemory, Run, format_summary, interior_steps, interleave,  # noqa: E402
                     memory_kind, parse_dtype, summarise, synchronize)

PROMPT = "a red circle and a blue square"
SUBJECTS = ("circle", "square")
SUBJECT_K = (0.5, 0.3)
MODES = ("dm", "asyndm")


def load_embedded(source: str, size: str, device: torch.device, dtype: torch.dtype):
    """``(pipeline, description)``: the trained embedded model, or a random one of ``size``.

    ``source``: ``"auto"`` (trained if present, else random), ``"trained"`` or ``"random"``.
    """
    if source in ("auto", "trained"):
        from asyndm.loading import load_pipeline

        try:
            pipe = load_pipeline(None, device=device, dtype=dtype, progress=False)
            return pipe, "embedded model (trained weights)"
        except FileNotFoundError:
            if source == "trained":
                raise
    try:
        from asyndm.shapes.model import MODEL_SIZES, build_components
        from asyndm.shapes.grammar import vocabulary
    except ImportError as err:
        raise RuntimeError("no embedded model and no asyndm.shapes.model to build one") from err
    from asyndm.pipeline import AsynDMPipeline

    parts = build_components(MODEL_SIZES[size], vocabulary())
    pipe = AsynDMPipeline(vae=None, safety_checker=None, feature_extractor=None, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype), f"random-init '{size}' architecture (no weights)"


def run_benchmark(pipe, *, steps: int = 25, repeats: int = 5, guidance_scale: float = 7.5,
                  eta: float = 1.0, warmup: bool = True, seed: int = 0, log=print) -> dict:
    """Measure ``pipe(mode="dm")`` against ``pipe(mode="asyndm")`` interleaved."""
    device = pipe.unet.device

    def call_once(mode: str, n_steps: int) -> Run:
        stamps: list[tuple[float, float]] = []  # (wall, cpu) after each step

        def on_step(pipeline, i, t, kwargs):  # diffusers' own step callback: dm untouched
            synchronize(device)
            stamps.append((time.perf_counter(), time.process_time()))
            return kwargs

        generator = torch.Generator().manual_seed(seed)  # as ``asyndm generate`` does
        with PeakMemory(device) as mem:
            start = (time.perf_counter(), time.process_time())
            pipe(PROMPT, subjects=list(SUBJECTS), k=list(SUBJECT_K), mode=mode,
                 num_inference_steps=n_steps, guidance_scale=guidance_scale, eta=eta,
                 generator=generator, callback_on_step_end=on_step)
            synchronize(device)
            total, total_cpu = time.perf_counter() - start[0], time.process_time() - start[1]
        edges = [start, *stamps]
        wall = [b[0] - a[0] for a, b in zip(edges, edges[1:])]
        cpu = [b[1] - a[1] for a, b in zip(edges, edges[1:])]
        return Run(total, wall, mem.peak, mem.work, total_cpu, cpu)

    log(f"device {device}, dtype {str(pipe.unet.dtype).removeprefix('torch.')}, "
        f"{steps} steps, guidance {guidance_scale}, eta {eta}, {repeats} repeats")
    if warmup:
        for mode in MODES:
            call_once(mode, 3)
    runs = interleave({m: (lambda m=m: call_once(m, steps)) for m in MODES}, repeats, log)
    summary = summarise(runs, steps=interior_steps(steps))
    summary.update(
        benchmark="embedded", device=str(device),
        dtype=str(pipe.unet.dtype).removeprefix("torch."), steps=steps, repeats=repeats,
        guidance_scale=guidance_scale, eta=eta, memory=memory_kind(device),
    )
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="example: python benchmarks/bench_embedded.py --repeats 5 --threads 1",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps per run (demo: 25)")
    p.add_argument("--repeats", type=int, default=5, help="measured runs per mode")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (demo: 7.5)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (demo: 1.0)")
    p.add_argument("--model", choices=("auto", "trained", "random"), default="auto",
                   help="trained embedded weights, a random model, or trained if present")
    p.add_argument("--size", default="base", help="MODEL_SIZES entry of a random model")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; 1 on a shared CPU)")
    p.add_argument("--no-warmup", action="store_true", help="skip the 3-step warm-up runs")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, load the model, measure, print; return the results."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    pipe, model = load_embedded(args.model, args.size, device, dtype)
    print(f"model: {model}")
    results = run_benchmark(pipe, steps=args.steps, repeats=args.repeats,
                            guidance_scale=args.guidance, eta=args.eta,
                            warmup=not args.no_warmup, seed=args.seed)
    results.update(model=model, threads=torch.get_num_threads())
    print(format_summary(results, results["memory"]))
    print("step: median over steps 2..N-2 (AsynDM's per-pixel steps); total: whole __call__")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

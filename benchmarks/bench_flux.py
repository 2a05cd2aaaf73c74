"""DM vs AsynDM through the full ``AsynDMFluxPipeline`` on a tiny random FLUX.1 built in code.

No FLUX.1 weights can be downloaded here, so the model is the test suite's tiny random Flux
(``tests/flux_fixtures.py``: CLIP, T5 encoder, sentencepiece-style T5 tokenizer, a one-level
VAE and a ``FluxTransformer2DModel``), sized by ``--size``:

* ``tiny``: the tests' transformer (2 double- + 2 single-stream blocks, width 16);
* ``small``: 4 double- + 8 single-stream blocks, 4 heads of 32 (width 128): heavier blocks,
  so the per-token bookkeeping weighs less, as on the real 19 + 38 blocks of width 3072.

Settings follow FLUX.1's own: dev (guidance embedding 3.5, dynamic shifting by image size)
at 28 steps, or ``--variant schnell`` (no guidance, shift 1) at 4 steps; the image is
``--grid`` x ``--grid`` tokens (32: FLUX.1's token grid at 512 px), T5 length 512 (dev) or
256 (schnell), the pipeline defaults. ``pipe(..., mode="dm")`` and ``pipe(..., mode="asyndm")``
run interleaved in one process (``harness.py``); the script prints medians and the ratios
``asyndm / dm`` of the wall time per step (diffusers' ``callback_on_step_end``), end to end
(the whole ``__call__``: both text encoders, sampling, VAE decode) and peak memory.
``--adapters`` measures the adapters alone instead (:func:`adapter_costs`).

example: python benchmarks/bench_flux.py --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

from harness import (PeakMemory, Run, format_summary, interior_steps, interleave,  # noqa: E402
                     memory_kind, parse_dtype, summarise, synchronize)

PROMPT = "a hedgehog eating a sandwich on a table"
SUBJECTS = ("hedgehog", "sandwich")
SUBJECT_K = (0.5, 0.3)
MODES = ("dm", "asyndm")
SIZES = {
    "tiny": {},
    "small": dict(num_layers=4, num_single_layers=8, attention_head_dim=32,
                  num_attention_heads=4, axes_dims_rope=(8, 12, 12)),
}
VARIANTS = {"dev": dict(steps=28, guidance=3.5, text_len=512),
            "schnell": dict(steps=4, guidance=0.0, text_len=256)}


def build_pipeline(size: str, variant: str, device: torch.device, dtype: torch.dtype):
    """An ``AsynDMFluxPipeline`` over the tests' tiny random Flux components."""
    from conftest import WORDS
    from flux_fixtures import flux_components

    from asyndm.pipeline_flux import AsynDMFluxPipeline
    from asyndm.shapes.tokenizer import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        clip = write_clip_tokenizer(WORDS, tmp, model_max_length=77)
    parts = flux_components(clip, dev=variant == "dev", **SIZES[size])
    pipe = AsynDMFluxPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def run_benchmark(pipe, *, steps: int, grid: int, guidance: float, text_len: int,
                  repeats: int = 5, warmup: bool = True, seed: int = 0, log=print) -> dict:
    """Measure ``pipe(mode="dm")`` against ``pipe(mode="asyndm")`` interleaved."""
    device = pipe.transformer.device
    side = 2 * grid * pipe.vae_scale_factor  # pixels: one token is a 2 x 2 latent patch

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
                 num_inference_steps=n_steps, guidance_scale=guidance, height=side,
                 width=side, max_sequence_length=text_len, generator=generator,
                 callback_on_step_end=on_step)
            synchronize(device)
            total, total_cpu = time.perf_counter() - start[0], time.process_time() - start[1]
        edges = [start, *stamps]
        wall = [b[0] - a[0] for a, b in zip(edges, edges[1:])]
        cpu = [b[1] - a[1] for a, b in zip(edges, edges[1:])]
        return Run(total, wall, mem.peak, mem.work, total_cpu, cpu)

    dtype = str(pipe.transformer.dtype).removeprefix("torch.")
    log(f"device {device}, dtype {dtype}, {steps} steps, {grid}x{grid} tokens, T5 length "
        f"{text_len}, guidance {guidance}, {repeats} repeats")
    if warmup:
        for mode in MODES:
            call_once(mode, 3)
    runs = interleave({m: (lambda m=m: call_once(m, steps)) for m in MODES}, repeats, log)
    summary = summarise(runs, steps=interior_steps(steps))
    summary.update(benchmark="flux", device=str(device), dtype=dtype, steps=steps, grid=grid,
                   text_len=text_len, guidance_scale=guidance, repeats=repeats,
                   memory=memory_kind(device))
    return summary


def adapter_costs(transformer, grid: int, text_len: int, repeats: int = 12) -> dict:
    """Process CPU ms of one transformer call: plain, with the capture, with a per-token map.

    The adapters alone, no pipeline: ``none`` / ``capture`` / ``recompute`` (the capture
    without reusing the processor's queries and keys) and ``plain`` / ``per_token`` (a map
    with two timesteps, the top-left third of the grid lagging), interleaved, medians.
    """
    from asyndm.adapters.flux import FluxAttentionCapture, FluxPerTokenTimestep

    ids = torch.zeros(grid, grid, 3)
    ids[..., 1] = torch.arange(grid)[:, None]
    ids[..., 2] = torch.arange(grid)[None, :]
    gen = torch.Generator().manual_seed(0)
    dim = transformer.config.joint_attention_dim
    kw = dict(hidden_states=torch.randn(1, grid * grid, transformer.config.in_channels,
                                        generator=gen),
              encoder_hidden_states=torch.randn(1, text_len, dim, generator=gen),
              pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim,
                                             generator=gen),
              img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text_len, 3),
              timestep=torch.tensor([0.5]), return_dict=False)
    if transformer.config.guidance_embeds:
        kw["guidance"] = torch.tensor([3.5])
    t_map = torch.full((1, grid, grid), 0.5)
    t_map[:, :grid // 3, :grid // 3] = 0.7
    positions = torch.tensor([[1, 2, 5]])

    @torch.no_grad()
    def call(case: str) -> float:
        cap = None
        if case in ("capture", "recompute"):
            cap = FluxAttentionCapture(transformer, (grid, grid)).install()
            if case == "recompute":
                for handle in cap._handles:
                    handle.remove()
            cap.start(positions)
        per_token = FluxPerTokenTimestep(transformer).install() if case == "per_token" else None
        args = {**kw, "timestep": t_map} if per_token is not None else kw
        start = time.process_time()
        transformer(**args)
        if cap is not None:
            cap.stop()
        took = time.process_time() - start
        if cap is not None:
            cap.remove()
        if per_token is not None:
            per_token.remove()
        return took

    cases = ["none", "capture", "recompute", "plain", "per_token"]
    times: dict[str, list[float]] = {c: [] for c in cases}
    for r in range(repeats):
        for case in cases if r % 2 == 0 else cases[::-1]:
            times[case].append(call(case))
    return {c: 1000 * statistics.median(v) for c, v in times.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="example: python benchmarks/bench_flux.py --repeats 5 --threads 1",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="transformer size")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="dev",
                   help="FLUX.1 dev (guidance embedding) or schnell (none)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per run (default: dev 28, schnell 4)")
    p.add_argument("--grid", type=int, default=32, help="image tokens per side")
    p.add_argument("--repeats", type=int, default=5, help="measured runs per mode")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; 1 on a shared CPU)")
    p.add_argument("--no-warmup", action="store_true", help="skip the 3-step warm-up runs")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--adapters", action="store_true",
                   help="instead: one transformer call's CPU ms with and without each adapter")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, build the model, measure, print; return the results."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    settings = VARIANTS[args.variant]
    pipe = build_pipeline(args.size, args.variant, device, dtype)
    model = f"random-init Flux '{args.size}' ({args.variant})"
    print(f"model: {model}")
    if args.adapters:
        costs = adapter_costs(pipe.transformer, args.grid, settings["text_len"], args.repeats)
        print("one transformer call, process CPU ms (medians): " +
              ", ".join(f"{c} {ms:.1f}" for c, ms in costs.items()))
        return {"adapters_ms": costs, "model": model}
    results = run_benchmark(pipe, steps=args.steps or settings["steps"], grid=args.grid,
                            guidance=settings["guidance"], text_len=settings["text_len"],
                            repeats=args.repeats, warmup=not args.no_warmup, seed=args.seed)
    results.update(model=model, threads=torch.get_num_threads())
    print(format_summary(results, results["memory"]))
    print("step: median over steps 2..N-2 (AsynDM's per-token steps); total: whole __call__")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

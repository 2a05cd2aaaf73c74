"""DM vs AsynDM (and optionally the naive adapters) on the Stable Diffusion 2.1-base UNet.

The UNet is built from SD 2.1-base's published config with random weights (offline; speed
and memory do not depend on the weights). Text conditioning is random prompt embeddings
``(B, 77, 1024)``, so no text encoder is needed. Both modes run diffusers' own
``StableDiffusionPipeline.__call__`` (``prompt_embeds``, ``output_type="latent"``, DDIM):
``dm`` untouched, ``asyndm`` inside :class:`asyndm.hooks.AsynDMHooks` (what
``asyndm.enable`` and ``AsynDMPipeline`` install): two subjects at token positions 2 and 5
with k 0.5 and 0.3, dynamic masks, classifier-free guidance (batch 2B through the UNet).
``naive`` is the same with the naive adapters of ``naive.py``.

Modes run interleaved in one process (see ``harness.py``); the script prints the medians
and the ratios ``asyndm / dm`` (and ``naive / dm`` with ``--naive``) of the wall and CPU time
per step (steps 2 .. N-2, where AsynDM's maps are per-pixel: use at least 4 steps), end to
end (the whole sampling run, adapters installed and removed included), the peak memory and
the working-memory increment.

example: python benchmarks/bench_sd21.py --steps 4 --repeats 2 --naive --threads 1
         python benchmarks/bench_sd21.py --device cuda --dtype float16 --steps 10 --repeats 6
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (PeakMemory, Run, format_summary, interior_steps,  # noqa: E402
                     interleave, memory_kind, parse_dtype, summarise, synchronize)
from naive import NaiveAttentionCapture, NaivePerPixelTimestep  # noqa: E402

from asyndm.adapters.attention import AttentionCapture  # noqa: E402
from asyndm.adapters.unet import PerPixelTimestep  # noqa: E402
from asyndm.compile import COMPILE_MODES, compile_denoiser  # noqa: E402
from asyndm.hooks import AsynDMHooks  # noqa: E402
from asyndm.schedulers import AsynRun  # noqa: E402
from asyndm.state import Subjects  # noqa: E402

# stabilityai/stable-diffusion-2-1-base, unet/config.json (the entries that differ from
# diffusers' UNet2DConditionModel defaults, plus the ones the issue names).
SD21_BASE_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=False,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
)

# stabilityai/stable-diffusion-2-1-base, scheduler/scheduler_config.json, as a DDIM scheduler.
SD21_BASE_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

SUBJECT_POSITIONS = (2, 5)
SUBJECT_K = (0.5, 0.3)

ADAPTERS = {
    "asyndm": (AttentionCapture, PerPixelTimestep),
    "naive": (NaiveAttentionCapture, NaivePerPixelTimestep),
}
"""AsynDM variants: mode name -> (attention capture class, per-pixel timestep class)."""
MODES = ("dm", *ADAPTERS)


def build_sd21_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD 2.1-base's UNet with seeded random weights, float32 on the CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**SD21_BASE_UNET).eval()


def make_subjects(batch_size: int, device: torch.device) -> Subjects:
    """Two one-token subjects at :data:`SUBJECT_POSITIONS` with :data:`SUBJECT_K`."""
    n = len(SUBJECT_POSITIONS)
    positions = torch.tensor([SUBJECT_POSITIONS] * batch_size, device=device)  # (B, P)
    weights = torch.eye(n, device=device).expand(batch_size, n, n).clone()  # (B, S, P)
    k = torch.tensor([SUBJECT_K] * batch_size, device=device)  # (B, S)
    return Subjects(positions=positions, weights=weights, k=k, first_position=positions.clone())


def run_benchmark(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    *,
    modes: tuple[str, ...] = ("dm", "asyndm"),
    adapters: dict | None = None,
    steps: int = 4,
    repeats: int = 2,
    warmup: bool = True,
    batch_size: int = 1,
    guidance_scale: float = 7.5,
    eta: float = 1.0,
    seq_len: int = 77,
    latent_hw: tuple[int, int] | None = None,
    seed: int = 0,
    compile_mode: str = "off",
    compile_backend: str = "inductor",
    log=print,
) -> dict:
    """Measure ``modes`` interleaved on ``unet`` (already on its device and dtype).

    ``"dm"`` is plain sampling (no hooks, the UNet's own processors); every other mode is
    AsynDM with the adapter pair ``adapters[mode]`` (default :data:`ADAPTERS`). With
    ``compile_mode`` (:data:`asyndm.compile.COMPILE_MODES`) ``dm`` and ``asyndm`` also run
    with the UNet compiled (:func:`asyndm.compile_denoiser`), as ``dm-c`` and ``asyndm-c``,
    interleaved with the eager ones; their warm-up runs are whole runs (every graph is
    compiled before the timing) and the ratios add ``asyndm-c/dm-c``.

    Returns the :func:`harness.summarise` dict plus the settings and, per mode, the number
    of distinct timesteps of each step's map (a sanity check that AsynDM's maps are
    non-uniform, i.e. that the per-pixel path really ran).
    """
    adapters = ADAPTERS if adapters is None else adapters
    if "dm" not in modes or set(modes) - {"dm", *adapters}:
        raise ValueError(f"modes must include 'dm' and come from {('dm', *adapters)}, "
                         f"got {modes}")
    if compile_mode != "off":
        modes = (*modes, "dm-c", "asyndm-c")
    device, dtype = unet.device, unet.dtype
    cfg = unet.config
    latent_hw = latent_hw or (cfg.sample_size, cfg.sample_size)
    gen = torch.Generator(device=device).manual_seed(seed)
    embeds = torch.randn(2 * batch_size, seq_len, cfg.cross_attention_dim, generator=gen,
                         device=device, dtype=dtype)  # (2B, L, D): [negative; positive]
    negative, positive = embeds.chunk(2)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    factor = pipe.vae_scale_factor
    distinct: dict[str, list[int]] = {}

    def sample_once(mode: str, n_steps: int) -> Run:
        stamps: list[tuple[float, float]] = []  # (wall, cpu) after each step
        seen: list[torch.Tensor] = []  # the timestep (map) of each model call
        compile_denoiser(pipe, compile_mode if mode.endswith("-c") else "off",
                         backend=compile_backend)
        mode = mode.removesuffix("-c")

        def on_step(pipeline, i, t, kwargs):
            synchronize(device)
            stamps.append((time.perf_counter(), time.process_time()))
            return kwargs

        def count(module, args, kwargs):  # counted after the run: no sync in the timing
            seen.append(kwargs.get("timestep", args[1:2] and args[1]))

        call = dict(prompt_embeds=positive, negative_prompt_embeds=negative, eta=eta,
                    num_inference_steps=n_steps, guidance_scale=guidance_scale,
                    height=latent_hw[0] * factor, width=latent_hw[1] * factor,
                    output_type="latent", callback_on_step_end=on_step,
                    generator=torch.Generator(device=device).manual_seed(seed + 1))
        # registered first, with prepend: runs after AsynDM's map hook, before the adapters
        handle = unet.register_forward_pre_hook(count, with_kwargs=True, prepend=True)
        with PeakMemory(device) as mem:
            start = (time.perf_counter(), time.process_time())
            with ExitStack() as stack:
                if mode != "dm":
                    run = AsynRun(mode="asyndm", capture=True, keep_records=False)
                    stack.enter_context(AsynDMHooks(pipe, run, list(SUBJECT_POSITIONS),
                                                    list(SUBJECT_K),
                                                    unet_adapters=adapters[mode]))
                pipe(**call)
            synchronize(device)
            total, total_cpu = time.perf_counter() - start[0], time.process_time() - start[1]
        handle.remove()
        distinct[mode] = [int(torch.unique(t).numel()) for t in seen[:n_steps]]
        edges = [start, *stamps]
        wall = [b[0] - a[0] for a, b in zip(edges, edges[1:])]
        cpu = [b[1] - a[1] for a, b in zip(edges, edges[1:])]
        return Run(total, wall, mem.peak, mem.work, total_cpu, cpu)

    log(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, latents {latent_hw}, "
        f"batch {batch_size} (x2 with CFG), {steps} steps, {repeats} repeats, modes {modes}")
    if warmup:
        for mode in modes:
            # kernels, allocator pools, one-time caches; compiled: every graph
            sample_once(mode, steps if mode.endswith("-c") else 1)
    runs = interleave({m: (lambda m=m: sample_once(m, steps)) for m in modes}, repeats, log)
    compile_denoiser(pipe, "off")
    summary = summarise(runs, steps=interior_steps(steps))
    if compile_mode != "off":
        compiled = summarise({m: runs[m] for m in ("dm-c", "asyndm-c")}, baseline="dm-c",
                             steps=interior_steps(steps))
        summary["ratios"].update(compiled["ratios"])
    summary.update(
        benchmark="sd21", device=str(device), dtype=str(dtype).removeprefix("torch."),
        latent_hw=list(latent_hw), batch_size=batch_size, steps=steps, repeats=repeats,
        guidance_scale=guidance_scale, eta=eta, memory=memory_kind(device),
        distinct_timesteps=distinct, compile=compile_mode,
    )
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="example: python benchmarks/bench_sd21.py --steps 4 --repeats 2 --naive",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    p.add_argument("--steps", type=int, default=4,
                   help="DDIM steps per run (>= 4 for a per-pixel step)")
    p.add_argument("--repeats", type=int, default=2, help="measured runs per mode")
    p.add_argument("--batch-size", type=int, default=1, help="images per run (x2 with CFG)")
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels (/8)")
    p.add_argument("--naive", action="store_true", help="add the naive adapters as a mode")
    p.add_argument("--compile", choices=COMPILE_MODES, default="off",
                   help="also run dm and asyndm with the UNet compiled in this mode")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--no-warmup", action="store_true", help="skip the 1-step warm-up runs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; 1 on a shared CPU)")
    p.add_argument("--seed", type=int, default=0, help="weights and noise seed")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def main(argv: list[str] | None = None, unet: UNet2DConditionModel | None = None) -> dict:
    """Parse ``argv``, build the UNet (unless given), measure, print; return the results."""
    args = build_parser().parse_args(argv)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = "given UNet"
    if unet is None:
        model = "SD 2.1-base UNet, random weights"
        t0 = time.perf_counter()
        unet = build_sd21_unet(args.seed)
        print(f"built SD 2.1-base UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M "
              f"parameters, random weights) in {time.perf_counter() - t0:.1f} s")
    unet = unet.to(device=device)
    if unet.dtype != dtype:
        unet = unet.to(dtype=dtype)
    side = args.resolution // 8
    results = run_benchmark(
        unet, DDIMScheduler(**SD21_BASE_SCHEDULER),
        modes=MODES if args.naive else ("dm", "asyndm"), steps=args.steps,
        repeats=args.repeats, warmup=not args.no_warmup, batch_size=args.batch_size,
        latent_hw=(side, side), seed=args.seed, compile_mode=args.compile,
        compile_backend=args.compile_backend,
    )
    results.update(model=model, threads=torch.get_num_threads())
    print(format_summary(results, results["memory"]))
    print("step: median over steps 2..N-2 (AsynDM's per-pixel steps); total: whole run")
    print(f"distinct timesteps per step: {results['distinct_timesteps']}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

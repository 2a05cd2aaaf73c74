"""Where AsynDM's per-step overhead over DM goes: one UNet call, variant by variant.

Each variant is one guided UNet call (CFG, batch 2B) on SD 2.1-base's UNet:

==============  ==========================================================================
``dm``          no adapters, scalar timestep (what DM runs)
``capture``     ``AttentionCapture`` installed and recording, scalar timestep
``per-pixel``   ``PerPixelTimestep`` installed, a two-region timestep map
``asyndm``      both (what AsynDM runs at a per-pixel step)
``naive``       the naive adapters of ``naive.py``
==============  ==========================================================================

plus the sampler's own bookkeeping (``sample()`` with a stub model that returns at once):
``loop dm`` and ``loop asyndm``; and whole steps of diffusers' own ``StableDiffusionPipeline``
(``prompt_embeds``, latents out, :data:`PIPE_STEPS` DDIM steps, per step): ``pipeline dm``
untouched and ``pipeline asyndm`` inside ``asyndm.hooks.AsynDMHooks``, everything AsynDM
adds per step on the path users run (adapters, scheduler, hooks, masks). For each it
prints the number of aten operators run and of those that launch a kernel (exact, from a ``TorchDispatchMode``; on a GPU that the host
cannot keep busy every operator costs host time), and the median wall and process-CPU time
of interleaved calls (adapters installed outside the timed region, as once per run).

example: python benchmarks/profile_overhead.py --device cuda --dtype float16 --iters 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sd21 import (ADAPTERS, SD21_BASE_SCHEDULER, SUBJECT_K,  # noqa: E402
                        SUBJECT_POSITIONS, build_sd21_unet, make_subjects)
from harness import parse_dtype, synchronize  # noqa: E402

from asyndm.denoise import DenoiseOutput, UNetDenoiser  # noqa: E402
from asyndm.hooks import AsynDMHooks  # noqa: E402
from asyndm.sampler import sample  # noqa: E402
from asyndm.schedulers import AsynRun  # noqa: E402
from asyndm.schedules import SchedulePlan  # noqa: E402
from asyndm.step import StepConfig  # noqa: E402

VARIANTS = {
    # name: (adapter pair from bench_sd21.ADAPTERS or None, use capture, use a timestep map)
    "dm": (None, False, False),
    "capture": ("asyndm", True, False),
    "per-pixel": ("asyndm", False, True),
    "asyndm": ("asyndm", True, True),
    "naive": ("naive", True, True),
}


PIPE_STEPS = 6
"""Steps of the pipeline rows (steps 2..4 per-pixel; 0, 1 and 5 have uniform maps)."""

VIEW_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.unsqueeze", "aten.squeeze", "aten.expand",
    "aten.slice", "aten.select", "aten.t", "aten.transpose", "aten.permute", "aten.alias",
    "aten.as_strided", "aten._reshape_alias", "aten.detach", "aten.lift_fresh",
})
"""Operators that only make a view (no kernel launch on a GPU)."""


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _median_ms(calls: dict[str, Callable], iters: int, device) -> dict[str, tuple[float, float]]:
    """Median ``(wall ms, process CPU ms)`` per variant.

    ``calls[name]()`` is a context manager giving a thunk: adapters are installed and removed
    outside the timed region, as they are once per sampling run.
    """
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in calls}
    names = list(calls)
    for r in range(iters):
        for name in names if r % 2 == 0 else names[::-1]:
            with calls[name]() as fn:
                synchronize(device)
                start, cpu = time.perf_counter(), time.process_time()
                fn()
                synchronize(device)
                times[name].append((time.perf_counter() - start, time.process_time() - cpu))
    return {n: (1e3 * statistics.median(w for w, _ in t), 1e3 * statistics.median(c for _, c in t))
            for n, t in times.items()}


def profile(unet, *, latent_hw, iters: int = 20, variants=None, log=print) -> dict:
    """Op counts and median ms per variant; see the module docstring."""
    variants = VARIANTS if variants is None else variants
    device, dtype = unet.device, unet.dtype
    cfg = unet.config
    gen = torch.Generator(device=device).manual_seed(0)
    embeds = torch.randn(2, 77, cfg.cross_attention_dim, generator=gen, device=device,
                         dtype=dtype)  # (2, L, D): [negative; positive], batch 1
    x = torch.randn(1, cfg.in_channels, *latent_hw, generator=gen, device=device, dtype=dtype)
    subj = make_subjects(1, device)
    h, w = latent_hw
    t_map = torch.full((1, h, w), 601, device=device)  # (B, h, w): background on the ladder
    t_map[:, h // 4: 3 * h // 4, w // 8: w // 2] = 721  # a lagging subject region
    t_scalar = torch.tensor(601, device=device)

    calls: dict[str, Callable] = {}

    def make_call(adapters, use_capture, use_map):
        @contextmanager
        def installed():
            with torch.no_grad(), ExitStack() as inner:
                capture = None
                if adapters is not None:
                    capture_cls, timestep_cls = ADAPTERS[adapters]
                    if use_capture:
                        capture = inner.enter_context(capture_cls(unet, latent_hw))
                    if use_map:
                        inner.enter_context(timestep_cls(unet))
                denoise = UNetDenoiser(unet, embeds, 7.5, None, capture, subj.positions)
                yield lambda: denoise(x, t_map if use_map else t_scalar, capture=use_capture)
        return installed

    for name, (adapters, use_capture, use_map) in variants.items():
        calls[name] = make_call(adapters, use_capture, use_map)

    # the sampler's bookkeeping, with a stub model
    sched = DDIMScheduler(**SD21_BASE_SCHEDULER)
    plan = SchedulePlan.from_scheduler(sched, 10, "quadratic")
    step_cfg = StepConfig.from_scheduler(sched, 1.0)
    hm, wm = h // 4, w // 4
    attn = torch.rand(1, 2, hm, wm, generator=gen, device=device)  # (B, P, hm, wm)
    eps = torch.randn_like(x)

    def stub(xx, t, capture=False):
        return DenoiseOutput(model_output=eps, attention=attn if capture else None)

    noise_gen = torch.Generator(device=device).manual_seed(1)

    def noise_fn(shape, dt, dev):
        return torch.randn(shape, generator=noise_gen, device=dev, dtype=dt)

    def make_loop(mode):
        @contextmanager
        def ready():
            yield lambda: sample(stub, x, plan, sched.alphas_cumprod, sched.final_alpha_cumprod,
                                 step_cfg, mode=mode, subjects=subj, noise_fn=noise_fn)
        return ready

    for mode in ("dm", "asyndm"):
        calls[f"loop {mode}"] = make_loop(mode)

    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(**SD21_BASE_SCHEDULER),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    negative, positive = embeds.chunk(2)

    def make_pipeline(mode):
        @contextmanager
        def ready():
            with ExitStack() as inner:
                if mode == "asyndm":
                    run = AsynRun(mode="asyndm", capture=True, keep_records=False)
                    inner.enter_context(AsynDMHooks(pipe, run, list(SUBJECT_POSITIONS),
                                                    list(SUBJECT_K)))
                yield lambda: pipe(prompt_embeds=positive, negative_prompt_embeds=negative,
                                   num_inference_steps=PIPE_STEPS, eta=1.0, output_type="latent",
                                   height=h * pipe.vae_scale_factor,
                                   width=w * pipe.vae_scale_factor,
                                   generator=torch.Generator(device=device).manual_seed(0))
        return ready

    for mode in ("dm", "asyndm"):
        calls[f"pipeline {mode}"] = make_pipeline(mode)

    counts = {}
    for name, ctx in calls.items():
        with ctx() as fn:
            fn()  # warm-up; a second call counts what every later step runs
            with OpCounter() as counter:
                fn()
        counts[name] = (sum(counter.ops.values()),
                        sum(n for op, n in counter.ops.items() if op not in VIEW_OPS))
    nan = (float("nan"), float("nan"))
    ms = _median_ms(calls, iters, device) if iters > 0 else {n: nan for n in calls}
    rows = {}
    for name in calls:
        # the loop runs 10 steps, the pipeline PIPE_STEPS
        per = 10 if name.startswith("loop") else PIPE_STEPS if name.startswith("pipe") else 1
        rows[name] = {"aten_ops": counts[name][0] / per, "kernels": counts[name][1] / per,
                      "ms": ms[name][0] / per, "cpu_ms": ms[name][1] / per}
    log(f"{'variant':12s} {'aten ops':>8s} {'+ops':>5s} {'kernels':>8s} {'+kern':>6s} "
        f"{'ms':>8s} {'+ms':>7s} {'cpu ms':>8s} {'+cpu ms':>8s}"
        "   (+: over dm; loop, pipeline: per step)")
    for name, r in rows.items():
        b = rows[f"{name.split()[0]} dm" if " " in name else "dm"]
        log(f"{name:12s} {r['aten_ops']:8.0f} {r['aten_ops'] - b['aten_ops']:5.0f} "
            f"{r['kernels']:8.0f} {r['kernels'] - b['kernels']:6.0f} "
            f"{r['ms']:8.2f} {r['ms'] - b['ms']:7.2f} {r['cpu_ms']:8.2f} "
            f"{r['cpu_ms'] - b['cpu_ms']:8.2f}")
    return rows


def main(argv: list[str] | None = None, unet=None) -> dict:
    """Parse ``argv``, build SD 2.1-base's UNet (unless given), profile, print; return rows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels (/8)")
    p.add_argument("--iters", type=int, default=20,
                   help="timed calls per variant (0: count operators only)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; 1 on a shared CPU)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    unet = build_sd21_unet() if unet is None else unet
    unet = unet.to(device=device)
    if unet.dtype != dtype:
        unet = unet.to(dtype=dtype)
    side = args.resolution // 8
    return profile(unet, latent_hw=(side, side), iters=args.iters)


if __name__ == "__main__":
    main()

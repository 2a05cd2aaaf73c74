"""Where AsynDM's per-step overhead over DM goes: operators and host synchronisations.

Each UNet variant is one guided UNet call (CFG, batch 2B) on SD 2.1-base's UNet, with the
capture reading the subject maps of the conditional rows as the pipeline's hooks do:

==============  ==========================================================================
``dm``          no adapters, scalar timestep (what DM runs)
``capture``     ``AttentionCapture`` installed and recording, scalar timestep
``per-pixel``   ``PerPixelTimestep`` installed, a two-region timestep map
``asyndm``      both (what AsynDM runs at a per-pixel step)
``naive``       the naive adapters of ``naive.py``
==============  ==========================================================================

plus the sampler's own bookkeeping (``sample()`` with a stub model that returns at once):
``loop dm`` and ``loop asyndm``; and diffusers' own ``StableDiffusionPipeline``
(``prompt_embeds``, latents out, :data:`PIPE_STEPS` DDIM steps): ``pipeline dm`` untouched and
``pipeline asyndm`` inside ``asyndm.hooks.AsynDMHooks``, everything AsynDM adds on the path
users run (adapters, scheduler, hooks, masks). The pipeline rows are split at the steps
(``callback_on_step_end``): ``per step`` is the mean over steps 1 .. N-1, ``first step`` the
first (the run's one-off work: subjects, the embedding tables, the capture's folded keys).

Operators are aten operators (exact, from a ``TorchDispatchMode``; ``kernels`` leaves out
those that only make a view): on a GPU that the host cannot keep busy every operator costs
host time. Host synchronisations are the calls that wait for an accelerator (counted with a
``TorchFunctionMode`` on any device, the counts do not depend on it): a tensor read on the
host (``item``, ``tolist``, ``bool`` / ``int`` / ``float``, ``numpy``, ``cpu``), and operators
whose output size depends on the data (``unique``, ``nonzero``, ``masked_select``, boolean
indexing). Times are medians of interleaved calls (adapters installed outside the timed
region, as once per run).

With ``--compile MODE`` the pipeline rows run again with the denoiser compiled
(:func:`asyndm.compile_denoiser`): the graphs compiled by the first call of each mode, and
those compiled by a second call with another step count (0: no step-to-step recompilation);
operators inside compiled graphs are not counted (they run as fused kernels).

example: python benchmarks/profile_overhead.py --resolution 128 --iters 0 --threads 1
         python benchmarks/profile_overhead.py --device cuda --dtype float16 --compile default
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
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sd21 import (ADAPTERS, SD21_BASE_SCHEDULER, SUBJECT_K,  # noqa: E402
                        SUBJECT_POSITIONS, build_sd21_unet, make_subjects)
from harness import parse_dtype, synchronize  # noqa: E402

from asyndm.compile import COMPILE_MODES, compile_denoiser  # noqa: E402
from asyndm.denoise import DenoiseOutput  # noqa: E402
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
"""Steps of the pipeline rows (steps 2..4 per-pixel; 0, 1 uniform maps; nothing lags at 5)."""

VIEW_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.unsqueeze", "aten.squeeze", "aten.expand",
    "aten.slice", "aten.select", "aten.t", "aten.transpose", "aten.permute", "aten.alias",
    "aten.as_strided", "aten._reshape_alias", "aten.detach", "aten.lift_fresh",
})
"""Operators that only make a view (no kernel launch on a GPU)."""


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside the ``with`` block, per ``step``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.step = 0
        self.per_step: Counter[int] = Counter()  # aten operators
        self.kernels_per_step: Counter[int] = Counter()  # those that are not views

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        self.per_step[self.step] += 1
        self.kernels_per_step[self.step] += name not in VIEW_OPS
        return func(*args, **(kwargs or {}))


SYNC_CALLS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__",
                        "numpy", "cpu", "unique", "unique_consecutive", "nonzero",
                        "masked_select", "argwhere"})
"""Tensor calls that wait for an accelerator (a host read, or a data-dependent size)."""


class SyncCounter(TorchFunctionMode):
    """Counts host synchronisations inside the ``with`` block, per ``step`` (see the module
    docstring for what counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.per_step: Counter[int] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        bool_index = (name == "__getitem__" and len(args) > 1 and torch.is_tensor(args[1])
                      and args[1].dtype == torch.bool)
        if name in SYNC_CALLS or bool_index:
            self.per_step[self.step] += 1
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


def _unet_calls(unet, latent_hw, variants) -> tuple[dict[str, Callable], dict[str, int]]:
    """The UNet-call variants and the sampler-loop rows (see the module docstring), with
    how many steps each call runs."""
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

    x_in, t_in = torch.cat([x, x]), torch.cat([t_map, t_map])  # (2B, ...): CFG's batch

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

                def call():  # as AsynDMHooks calls it: subject maps of the conditional rows
                    if capture is not None:
                        capture.start(subj.positions, slice(1, 2), subj.weights, text=embeds)
                    out = unet(x_in, t_in if use_map else t_scalar, encoder_hidden_states=embeds)
                    return capture.stop() if capture is not None else out
                if use_map:
                    call()  # the run's tables, made once per install: outside the timing
                yield call
        return installed

    for name, (adapters, use_capture, use_map) in variants.items():
        calls[name] = make_call(adapters, use_capture, use_map)

    # the sampler's bookkeeping, with a stub model
    sched = DDIMScheduler(**SD21_BASE_SCHEDULER)
    plan = SchedulePlan.from_scheduler(sched, 10, "quadratic")
    step_cfg = StepConfig.from_scheduler(sched, 1.0)
    attn = torch.rand(1, 2, h // 4, w // 4, generator=gen, device=device)  # (B, P, hm, wm)
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
    steps = {n: 10 if n.startswith("loop") else 1 for n in calls}
    return calls, steps


def _pipeline(unet, latent_hw):
    """``(pipe, call(mode, steps, counters))``: diffusers' own pipeline on ``unet``."""
    device, dtype = unet.device, unet.dtype
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(**SD21_BASE_SCHEDULER),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device=device).manual_seed(0)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen, device=device,
                         dtype=dtype)
    negative, positive = embeds.chunk(2)
    h, w = latent_hw

    def call(mode: str, steps: int = PIPE_STEPS, counters=()) -> None:
        def next_step(p, i, t, kw):
            for c in counters:
                c.step = i + 1
            return {}

        with ExitStack() as inner:
            if mode == "asyndm":
                run = AsynRun(mode="asyndm", capture=True, keep_records=False)
                inner.enter_context(AsynDMHooks(pipe, run, list(SUBJECT_POSITIONS),
                                                list(SUBJECT_K)))
            pipe(prompt_embeds=positive, negative_prompt_embeds=negative,
                 num_inference_steps=steps, eta=1.0, output_type="latent",
                 height=h * pipe.vae_scale_factor, width=w * pipe.vae_scale_factor,
                 generator=torch.Generator(device=device).manual_seed(0),
                 callback_on_step_end=next_step)

    return pipe, call


def _per_step(counts: Counter, steps: int) -> tuple[float, float]:
    """``(first step, mean of the later steps)`` of per-step counts."""
    later = [counts[i] for i in range(1, steps)]
    return counts[0], sum(later) / len(later)


def profile(unet, *, latent_hw, iters: int = 20, variants=None, log=print,
            compile_mode: str = "off", compile_backend="inductor") -> dict:
    """Operator and sync counts and median ms per row; see the module docstring."""
    variants = VARIANTS if variants is None else variants
    device = unet.device
    calls, steps = _unet_calls(unet, latent_hw, variants)
    rows: dict[str, dict] = {}
    with torch.no_grad():
        for name, ctx in calls.items():
            with ctx() as fn:
                fn()  # warm-up; a second call counts what every later call runs
                with OpCounter() as ops:
                    fn()
            per = steps[name]
            rows[name] = {"aten_ops": sum(ops.ops.values()) / per,
                          "kernels": sum(n for o, n in ops.ops.items() if o not in VIEW_OPS) / per}
        pipe, call = _pipeline(unet, latent_hw)
        for mode in ("dm", "asyndm"):
            call(mode)  # warm-up
            ops, syncs = OpCounter(), SyncCounter()
            with ops, syncs:
                call(mode, counters=(ops, syncs))
            first, later = _per_step(ops.per_step, PIPE_STEPS)
            rows[f"pipeline {mode}"] = {
                "aten_ops": later, "kernels": _per_step(ops.kernels_per_step, PIPE_STEPS)[1],
                "first_aten_ops": first, "syncs": _per_step(syncs.per_step, PIPE_STEPS)[1],
                "first_syncs": syncs.per_step[0],
                "steps_aten_ops": [ops.per_step[i] for i in range(PIPE_STEPS)],
                "steps_syncs": [syncs.per_step[i] for i in range(PIPE_STEPS)]}
            calls[f"pipeline {mode}"] = _thunk(call, mode)
            steps[f"pipeline {mode}"] = PIPE_STEPS
        _time(rows, calls, steps, iters, device)
        if compile_mode != "off":
            calls, steps = {}, {}
            rows.update(_compiled_rows(pipe, call, compile_mode, compile_backend, calls, steps))
            _time(rows, calls, steps, iters, device)
            compile_denoiser(pipe, "off")
    _report(rows, log)
    return rows


def _time(rows: dict, calls: dict, steps: dict, iters: int, device) -> None:
    """Median wall / CPU ms per call (per step for the loop and pipeline rows) into rows."""
    nan = (float("nan"), float("nan"))
    ms = _median_ms(calls, iters, device) if iters > 0 else {n: nan for n in calls}
    for name in calls:
        rows[name]["ms"], rows[name]["cpu_ms"] = (v / steps[name] for v in ms[name])


def _thunk(call, mode: str):
    @contextmanager
    def ready():
        yield lambda: call(mode)
    return ready


def _compiled_rows(pipe, call, mode: str, backend, calls: dict, steps: dict) -> dict:
    """Graphs compiled per pipeline mode, and by a second call with more steps."""
    from torch._dynamo.utils import counters

    rows = {}
    torch._dynamo.reset()  # count from nothing compiled (the cache is per process)
    compile_denoiser(pipe, mode, backend=backend)
    for name in ("dm", "asyndm"):
        before = counters["stats"]["unique_graphs"]
        call(name)
        first = counters["stats"]["unique_graphs"] - before
        call(name, steps=PIPE_STEPS + 3)  # other maps at other steps
        again = counters["stats"]["unique_graphs"] - before - first
        breaks = sum(counters["graph_break"].values())
        rows[f"compiled {name}"] = {"graphs": first, "recompiled": again, "graph_breaks": breaks}
        calls[f"compiled {name}"] = _thunk(call, name)
        steps[f"compiled {name}"] = PIPE_STEPS
    return rows


def _report(rows: dict, log) -> None:
    log(f"{'row':16s} {'aten ops':>8s} {'+ops':>6s} {'+%':>6s} {'kernels':>8s} {'+kern':>6s} "
        f"{'syncs':>5s} {'ms':>8s} {'cpu ms':>8s}   (+: over dm; loop, pipeline: per step)")
    for name, r in rows.items():
        if name.startswith("compiled"):
            log(f"{name:16s} graphs compiled: {r['graphs']}, by a second call with more steps: "
                f"{r['recompiled']}, graph breaks: {r['graph_breaks']}, ms/step {r['ms']:.2f}")
            continue
        b = rows[f"{name.split()[0]} dm" if " " in name else "dm"]
        more = r["aten_ops"] - b["aten_ops"]
        syncs = f"{r['syncs']:5.1f}" if "syncs" in r else f"{'':5s}"
        log(f"{name:16s} {r['aten_ops']:8.0f} {more:6.0f} {100 * more / b['aten_ops']:6.1f} "
            f"{r['kernels']:8.0f} {r['kernels'] - b['kernels']:6.0f} {syncs} "
            f"{r['ms']:8.2f} {r['cpu_ms']:8.2f}")
    for mode in ("dm", "asyndm"):
        r = rows[f"pipeline {mode}"]
        log(f"pipeline {mode}, steps 0..{PIPE_STEPS - 1}: aten ops {r['steps_aten_ops']}, "
            f"host syncs {r['steps_syncs']}")


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
    p.add_argument("--compile", choices=COMPILE_MODES, default="off",
                   help="also run the pipeline rows with the denoiser compiled in this mode")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    unet = build_sd21_unet() if unet is None else unet
    unet = unet.to(device=device)
    if unet.dtype != dtype:
        unet = unet.to(dtype=dtype)
    side = args.resolution // 8
    return profile(unet, latent_hw=(side, side), iters=args.iters, compile_mode=args.compile,
                   compile_backend=args.compile_backend)


if __name__ == "__main__":
    main()

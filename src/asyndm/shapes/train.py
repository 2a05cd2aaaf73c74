"""Train the shapes model from scratch on an endless, seeded stream of rendered scenes.

Objective (v-prediction, pixel-space latents ``z0 = pixel_unshuffle(x0, 2)``):

| symbol | meaning                                                     |
|--------|-------------------------------------------------------------|
| t      | timestep, uniform over ``0 .. 999``                         |
| a_t    | ``alphas_cumprod[t]`` of the model's DDIM scheduler         |
| z_t    | ``sqrt(a_t) z0 + sqrt(1 - a_t) eps``, ``eps ~ N(0, I)``      |
| v      | ``sqrt(a_t) eps - sqrt(1 - a_t) z0``                         |
| loss   | ``mean((unet(z_t, t, text_encoder(prompt)) - v) ** 2)``      |

With ``timestep_maps`` other than ``"1,0,0"`` each image draws a per-pixel timestep map
``t (16, 16)`` from a mixture (`asyndm.shapes.timestep_maps`), ``a_t`` is gathered per
pixel, the UNet takes the map through `asyndm.adapters.unet.PerPixelTimestep` (the
sampler's own adapter) and the MSE is per pixel at each pixel's level.

A prompt is replaced by ``""`` with probability ``cfg_dropout`` so the model also learns the
unconditional prediction that classifier-free guidance needs.

Reproducibility: everything random about step ``k`` (scenes, prompt dropout, noise, timesteps)
is drawn from generators seeded by ``(seed, k)``, so the data stream does not depend on the
number of data workers, and a resumed run sees exactly the batches it would have seen. The
learning rate and EMA decay are functions of the step, and the optimizer and EMA states are
checkpointed, so a resumed run continues the same trajectory (bit-exact on the CPU).

Outputs in ``out_dir``: ``train_config.json``, ``checkpoints/step_XXXXXXXX/`` (model, ema and
optimizer safetensors + ``state.json``), ``losses.csv``, ``loss_curve.png``, ``summary.json``
and the exported fp16 EMA model folder ``model/`` (on-disk formats: `asyndm.shapes.checkpoint`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from asyndm.adapters.unet import PerPixelTimestep
from asyndm.shapes.checkpoint import (
    export_ema_folder,
    init_from_folder,
    latest_checkpoint,
    load_optimizer,
    load_state_tensors,
    named_params,
    optimizer_tensors,
    rng_b64,
    rng_from_b64,
    save_checkpoint,
    state_tensors,
)
from asyndm.shapes.model import (
    IMAGE_SIZE,
    MODEL_SIZES,
    build_components,
    param_count_report,
    param_counts,
    pixels_to_latents,
)
from asyndm.shapes.timestep_maps import (
    MapMixture,
    draw_maps,
    noisy_and_velocity,
    region_trajectories,
)

__all__ = [
    "DataSource",
    "ResumeError",
    "TrainBatch",
    "TrainConfig",
    "lr_at",
    "ema_decay_at",
    "make_batch",
    "train",
    "world_source",
]

# Fields that define the training trajectory; a resumed run must not change them.
_TRAJECTORY_FIELDS = (
    "size", "seed", "batch_size", "lr", "warmup_steps", "weight_decay", "grad_clip",
    "ema_decay", "cfg_dropout", "timestep_maps",
)


class ResumeError(RuntimeError):
    """The run folder and the request disagree: checkpoints exist without ``resume``, or the
    checkpoint was made with other trajectory settings or another world vocabulary."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; the one source of the CLI's defaults.

    ``minutes`` and ``max_steps`` are totals over a run and its resumptions: the run stops at
    whichever comes first. ``num_workers`` data processes render batches on the CPU; with
    ``render_on_device`` the workers only sample scenes and the training device renders them.
    """

    size: str = "base"
    seed: int = 0
    batch_size: int = 256
    lr: float = 3e-4
    warmup_steps: int = 500
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    minutes: float = 10.0
    max_steps: int | None = None
    checkpoint_every_minutes: float = 5.0
    log_every: int = 25
    device: str = "cpu"
    bf16: bool = True
    num_workers: int = 0
    render_on_device: bool = False
    compile: bool = False
    init_from: str | None = None
    timestep_maps: str = "1,0,0"

    def __post_init__(self) -> None:
        if not self.mixture.synchronous and self.compile:
            raise ValueError("compile is not supported with timestep maps (the per-pixel "
                             "adapter's hooks are installed around every step)")
        if self.init_from is not None and not (Path(self.init_from) / "model_index.json").is_file():
            raise ValueError(f"init_from={self.init_from!r} is not a model folder "
                             "(no model_index.json)")
        if self.size not in MODEL_SIZES:
            raise ValueError(f"size must be one of {sorted(MODEL_SIZES)}, got {self.size!r}")
        if self.batch_size < 1 or self.log_every < 1 or self.num_workers < 0:
            raise ValueError("batch_size and log_every must be >= 1, num_workers >= 0")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be > 0; warmup_steps, weight_decay >= 0")
        if not 0.0 <= self.ema_decay < 1.0 or not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError("ema_decay and cfg_dropout must be in [0, 1)")
        if self.minutes <= 0 or self.checkpoint_every_minutes <= 0:
            raise ValueError("minutes and checkpoint_every_minutes must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1 or None")
        torch.device(self.device)  # raises on a malformed device string

    @property
    def mixture(self) -> MapMixture:
        """The parsed ``timestep_maps`` (parsing validates it, on creation too)."""
        return MapMixture.parse(self.timestep_maps)


@dataclass(frozen=True)
class DataSource:
    """The world the model learns: where vocabulary, scenes and pixels come from.

    ``sample_batch(rng, n) -> (scenes, prompts)``; ``render(scenes, size, device) -> (n, 3,
    size, size)`` float32 in [0, 1]; ``vocabulary()`` lists every word a prompt may contain.
    The callables must be picklable (module-level functions) to reach data workers.
    """

    vocabulary: Callable[[], list[str]]
    sample_batch: Callable[[np.random.Generator, int], tuple[list[Any], list[str]]]
    render: Callable[..., torch.Tensor]
    objects: Callable[..., torch.Tensor] | None = None  # (B, size, size) bool object pixels


def world_source() -> DataSource:
    """The shapes world (`asyndm.shapes.grammar`, `.world` and `.render`)."""
    from asyndm.shapes import grammar, render

    return DataSource(grammar.vocabulary, grammar.sample_batch, render.render,
                      render.object_masks)


@dataclass(frozen=True)
class TrainBatch:
    """One step's inputs. ``pixels`` is None until rendered (``render_on_device``)."""

    pixels: torch.Tensor | None  # (B, 3, 32, 32) in [-1, 1]
    input_ids: torch.Tensor  # (B, L) int64
    noise: torch.Tensor  # (B, 12, 16, 16)
    timesteps: torch.Tensor  # (B,) int64, or (B, 16, 16) per-pixel maps
    scenes: list[Any] | None = None

    def pin_memory(self) -> TrainBatch:
        """Page-locked copy, called by the DataLoader so host-to-device copies can overlap."""
        pixels = None if self.pixels is None else self.pixels.pin_memory()
        return replace(
            self,
            pixels=pixels,
            input_ids=self.input_ids.pin_memory(),
            noise=self.noise.pin_memory(),
            timesteps=self.timesteps.pin_memory(),
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> TrainBatch:
        pixels = None if self.pixels is None else self.pixels.to(device, non_blocking=non_blocking)
        return replace(
            self,
            pixels=pixels,
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            noise=self.noise.to(device, non_blocking=non_blocking),
            timesteps=self.timesteps.to(device, non_blocking=non_blocking),
        )


def _step_seed(seed: int, step: int, stream: int) -> int:
    """A 64-bit seed for one random stream of one step, independent across (seed, step)."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0])


def make_batch(
    source: DataSource,
    tokenizer: Any,
    seed: int,
    step: int,
    batch_size: int,
    cfg_dropout: float,
    num_train_timesteps: int = 1000,
    render: bool = True,
    maps: tuple[MapMixture, torch.Tensor] | None = None,
) -> TrainBatch:
    """The batch of training step ``step``: a pure function of ``(seed, step)`` and the world.

    Scenes come from a numpy generator seeded by ``(seed, step, 0)``; prompt dropout, noise and
    timesteps from a torch generator seeded by ``(seed, step, 1)``. With ``render=False`` the
    scenes are returned unrendered for the training device to render. With ``maps``
    (a mixture and its `region_trajectories` table) the timesteps are per-pixel maps drawn
    from a third generator seeded by ``(seed, step, 2)``; without, batches are unchanged.
    """
    rng = np.random.default_rng(_step_seed(seed, step, 0))
    scenes, prompts = source.sample_batch(rng, batch_size)
    gen = torch.Generator().manual_seed(_step_seed(seed, step, 1))
    drop = torch.rand(batch_size, generator=gen) < cfg_dropout
    prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # (B, L)
    noise = torch.randn(batch_size, 12, IMAGE_SIZE // 2, IMAGE_SIZE // 2, generator=gen)
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=gen)
    if maps is not None:
        if source.objects is None:
            raise ValueError("timestep maps need a data source that gives object pixels")
        objects = source.objects(scenes, size=IMAGE_SIZE // 2, device=None)  # (B, 16, 16)
        map_gen = torch.Generator().manual_seed(_step_seed(seed, step, 2))
        timesteps, _ = draw_maps(map_gen, objects, maps[0], maps[1], num_train_timesteps)
    if not render:
        return TrainBatch(None, ids, noise, timesteps, scenes=list(scenes))
    pixels = source.render(scenes, size=IMAGE_SIZE, device=None).float() * 2.0 - 1.0
    return TrainBatch(pixels, ids, noise, timesteps)


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless batches from ``start``; worker ``w`` of ``n`` makes steps ``start + w + k n``.

    The DataLoader reads its workers round-robin, so the batches arrive in step order.
    """

    def __init__(self, source: DataSource, tokenizer: Any, cfg: TrainConfig, start: int,
                 maps: tuple[MapMixture, torch.Tensor] | None = None):
        self.source, self.tokenizer, self.cfg, self.start = source, tokenizer, cfg, start
        self.maps = maps

    def __iter__(self) -> Iterator[TrainBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        step = self.start + worker
        while True:
            yield make_batch(
                self.source, self.tokenizer, self.cfg.seed, step, self.cfg.batch_size,
                self.cfg.cfg_dropout, render=not self.cfg.render_on_device, maps=self.maps,
            )
            step += workers


def _worker_init(_: int) -> None:
    # Each data worker is already one of many processes; tokenizer threads would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _batches(
    source: DataSource, tokenizer: Any, cfg: TrainConfig, start: int, device: torch.device,
    maps: tuple[MapMixture, torch.Tensor] | None = None,
) -> Iterator[TrainBatch]:
    stream = _BatchStream(source, tokenizer, cfg, start, maps)
    if cfg.num_workers == 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=device.type != "cpu",  # page-locked copies only help accelerators
        prefetch_factor=4,
        worker_init_fn=_worker_init,
    )
    return iter(loader)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step ``step``: linear warm-up over ``warmup_steps``, then constant."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay of step ``step``, ramped up so early averages are not dominated by the init."""
    return min(decay, (1.0 + step) / (10.0 + step))


def _write_losses(out_dir: Path, history: Sequence[dict], log_every: int) -> None:
    """losses.csv and loss_curve.png from the logged windows (written atomically)."""
    tmp = out_dir / ".losses.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "images", "loss", "img_per_s", "seconds"])
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, out_dir / "losses.csv")
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"v-prediction MSE (mean over {log_every} steps)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / ".loss_curve.tmp.png")
    plt.close(fig)
    os.replace(out_dir / ".loss_curve.tmp.png", out_dir / "loss_curve.png")


def _model_card(cfg: TrainConfig, vocab_size: int, summary: dict) -> str:
    origin = ("from scratch" if cfg.init_from is None
              else f"further from the weights in `{cfg.init_from}`")
    return (
        "# asyndm shapes model\n\n"
        "A small pixel-space text-to-image model for the asyndm shapes world (32x32 RGB,\n"
        "latents = `pixel_unshuffle(image, 2)`, shape (B, 12, 16, 16); no VAE), trained "
        f"{origin} with `asyndm train-shapes`. Weights are the EMA weights, stored in fp16.\n\n"
        f"{param_count_report(MODEL_SIZES[cfg.size], vocab_size)}\n"
        "## Training\n\n"
        f"- steps: {summary['steps']}, images seen: {summary['images_seen']}\n"
        f"- training time: {summary['train_seconds'] / 60:.1f} min on `{cfg.device}`, "
        f"throughput {summary['img_per_s']:.0f} images/s\n"
        f"- final loss (v-prediction MSE): {summary['final_loss']}\n"
        f"- config: `{json.dumps(asdict(cfg))}`\n\n"
        "## Loading\n\n"
        "```python\nfrom asyndm.pipeline import AsynDMPipeline\n"
        "pipe = AsynDMPipeline.from_pretrained(path, use_safetensors=True)\n```\n"
    )


def train(
    cfg: TrainConfig, out_dir: str | Path, resume: bool = False, source: DataSource | None = None
) -> Path:
    """Train (or, with ``resume``, continue training) the shapes model; return its folder.

    Args:
        cfg: the run's configuration; with ``resume`` its trajectory fields (size, seed,
            batch size, optimiser and EMA settings, dropout) must equal the checkpoint's.
        out_dir: the run folder (see the module docstring for its contents).
        resume: continue from the newest checkpoint in ``out_dir`` (a fresh start if none).
            Without it, an ``out_dir`` that already holds checkpoints is refused.
        source: the data world; the shapes world when None.

    Returns:
        ``out_dir / "model"``, the exported fp16 EMA model folder.

    Raises:
        ResumeError: see its docstring.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = source or world_source()
    device = torch.device(cfg.device)
    words = sorted(set(source.vocabulary()))
    comps = build_components(MODEL_SIZES[cfg.size], words, seed=cfg.seed)
    modules: dict[str, nn.Module] = {
        "unet": comps["unet"].to(device).train(),
        "text_encoder": comps["text_encoder"].to(device).train(),
    }
    params = named_params(modules)
    opt = torch.optim.AdamW(
        params.values(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay,
        fused=device.type != "cpu",
    )
    if cfg.init_from is not None:
        init_from_folder(modules, Path(cfg.init_from))
    ema = {k: p.detach().float().clone() for k, p in params.items()}
    scheduler = comps["scheduler"]

    step, seconds, history = 0, 0.0, []
    ckpt_root = out_dir / "checkpoints"
    latest = latest_checkpoint(ckpt_root)
    if latest is not None and not resume:
        raise ResumeError(f"{out_dir} already holds checkpoints; resume or use another folder")
    if resume and latest is not None:
        step, seconds, history, ema = _restore(latest, cfg, words, modules, opt, device)
    else:
        torch.manual_seed(cfg.seed)
    (out_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1), "utf-8")

    mixture = cfg.mixture
    maps, adapter = None, None
    if not mixture.synchronous:  # per-pixel levels through the sampler's own adapter,
        # installed around each step's forward only, so checkpoints keep the UNet's own names
        maps = (mixture, region_trajectories(scheduler, mixture)[1])
        adapter = PerPixelTimestep(modules["unet"], scheduler.config.num_train_timesteps)
    unet = torch.compile(modules["unet"]) if cfg.compile else modules["unet"]
    text_encoder = modules["text_encoder"]
    ema_keys = list(params)
    ema_list, param_list = [ema[k] for k in ema_keys], [params[k] for k in ema_keys]
    batches = _batches(source, comps["tokenizer"], cfg, step, device, maps)
    max_steps = cfg.max_steps if cfg.max_steps is not None else math.inf
    budget_s = cfg.minutes * 60.0

    def save(now_step: int, now_seconds: float) -> None:
        opt_tensors, groups = optimizer_tensors(opt)
        ema_cpu = {k: v.detach().cpu().contiguous() for k, v in ema.items()}
        state = {
            "step": now_step, "images_seen": now_step * cfg.batch_size,
            "train_seconds": now_seconds, "param_groups": groups, "history": history,
            "torch_rng": rng_b64(torch.get_rng_state()), "words": words, "config": asdict(cfg),
        }
        parts = {"model": state_tensors(modules), "ema": ema_cpu, "optimizer": opt_tensors}
        save_checkpoint(ckpt_root, now_step, parts, state)
        _write_losses(out_dir, history, cfg.log_every)

    bar = tqdm(total=None if max_steps == math.inf else max_steps, initial=step, unit="step")
    t0 = time.monotonic()
    window_t, window_loss, window_n = t0, torch.zeros((), device=device), 0
    next_ckpt = seconds + cfg.checkpoint_every_minutes * 60.0
    elapsed = seconds
    while step < max_steps and elapsed < budget_s:
        batch = next(batches).to(device, non_blocking=True)
        if batch.pixels is None:
            pixels = source.render(batch.scenes, size=IMAGE_SIZE, device=device)
            batch = replace(batch, pixels=pixels.float() * 2.0 - 1.0)
        loss = _train_step(unet, text_encoder, scheduler, opt, batch, step, cfg, device,
                           adapter)
        with torch.no_grad():
            torch._foreach_lerp_(ema_list, param_list, 1.0 - ema_decay_at(step, cfg.ema_decay))
        window_loss += loss
        window_n += 1
        step += 1
        bar.update(1)
        elapsed = seconds + time.monotonic() - t0
        if step % cfg.log_every == 0 or step >= max_steps or elapsed >= budget_s:
            # The only host sync: one .item() per logged window, not one per step.
            mean_loss = window_loss.item() / window_n
            now = time.monotonic()
            rate = window_n * cfg.batch_size / max(now - window_t, 1e-9)
            history.append({
                "step": step, "images": step * cfg.batch_size, "loss": mean_loss,
                "img_per_s": rate, "seconds": seconds + now - t0,
            })
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}")
            window_t, window_loss, window_n = now, torch.zeros((), device=device), 0
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss became {mean_loss} at step {step}")
        if elapsed >= next_ckpt:
            save(step, elapsed)
            next_ckpt = elapsed + cfg.checkpoint_every_minutes * 60.0
    bar.close()
    save(step, elapsed)

    summary = _summary(cfg, step, elapsed, history, len(comps["tokenizer"]))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    card = _model_card(cfg, len(comps["tokenizer"]), summary)
    folder = export_ema_folder(out_dir, comps, ema, card)
    tqdm.write(
        f"trained {step} steps ({step * cfg.batch_size} images) in {elapsed / 60:.1f} min, "
        f"{summary['img_per_s']:.0f} images/s; final loss {summary['final_loss']}; "
        f"model: {folder}"
    )
    return folder


def _restore(
    ckpt: Path, cfg: TrainConfig, words: list[str], modules: dict[str, nn.Module],
    opt: torch.optim.Optimizer, device: torch.device,
) -> tuple[int, float, list[dict], dict[str, torch.Tensor]]:
    """Load checkpoint ``ckpt`` into ``modules`` and ``opt``; return step, seconds, log, EMA."""
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    _check_resumable(cfg, state, words)
    load_state_tensors(modules, load_file(str(ckpt / "model.safetensors"), str(device)))
    opt_tensors = load_file(str(ckpt / "optimizer.safetensors"), str(device))
    load_optimizer(opt, opt_tensors, state["param_groups"])
    torch.set_rng_state(rng_from_b64(state["torch_rng"]))
    ema = load_file(str(ckpt / "ema.safetensors"), str(device))
    return state["step"], state["train_seconds"], state["history"], ema


def _train_step(
    unet: Callable, text_encoder: nn.Module, scheduler: Any, opt: torch.optim.Optimizer,
    batch: TrainBatch, step: int, cfg: TrainConfig, device: torch.device,
    adapter: PerPixelTimestep | None = None,
) -> torch.Tensor:
    """One optimiser step; returns the detached loss without reading it (no host sync)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        with adapter if adapter is not None else contextlib.nullcontext():
            loss = _v_loss(unet, text_encoder, scheduler, batch)
    loss.backward()
    params = [p for group in opt.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _v_loss(unet: Callable, text_encoder: nn.Module, scheduler: Any, batch: TrainBatch):
    """v-prediction MSE of one batch (see the module docstring), returned as a float32 scalar."""
    z0 = pixels_to_latents(batch.pixels)  # (B, 12, 16, 16)
    if batch.timesteps.dim() == 3:  # (B, 16, 16) maps: every pixel at its own level
        z_t, v = noisy_and_velocity(z0, batch.noise, batch.timesteps, scheduler.alphas_cumprod)
    else:
        z_t = scheduler.add_noise(z0, batch.noise, batch.timesteps)
        v = scheduler.get_velocity(z0, batch.noise, batch.timesteps)
    context = text_encoder(batch.input_ids).last_hidden_state  # (B, L, D)
    pred = unet(z_t, batch.timesteps, encoder_hidden_states=context).sample  # (B, 12, 16, 16)
    return F.mse_loss(pred.float(), v.float())


def _summary(cfg: TrainConfig, step: int, seconds: float, history: list, vocab: int) -> dict:
    # Throughput excludes the first window, which pays for warm-up (allocations, compilation).
    rates = [h["img_per_s"] for h in history[1:]] or [h["img_per_s"] for h in history] or [0.0]
    return {
        "steps": step,
        "images_seen": step * cfg.batch_size,
        "train_seconds": seconds,
        "img_per_s": statistics.median(rates),
        "final_loss": history[-1]["loss"] if history else None,
        "params": param_counts(MODEL_SIZES[cfg.size], vocab),
        "config": asdict(cfg),
    }


def _check_resumable(cfg: TrainConfig, state: dict, words: list[str]) -> None:
    saved = state["config"]
    default = TrainConfig()  # a field older checkpoints lack had its default then
    changed = [f for f in _TRAJECTORY_FIELDS
               if saved.get(f, getattr(default, f)) != getattr(cfg, f)]
    if changed:
        raise ResumeError(f"cannot resume with changed settings: {changed}")
    if state["words"] != words:
        raise ResumeError("cannot resume: the world vocabulary changed since the checkpoint")


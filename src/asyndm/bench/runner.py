"""Run a benchmark: every (prompt, seed) of a suite through every variant, resumably.

Work is cut into *units*, one per (prompt, seed), ordered prompt-major. For each unit every
variant runs from a CPU generator seeded with the unit's seed, so the variants of a unit share
their initial and per-step noise and their scores can be compared in pairs. Up to
``batch_size`` pending seeds of one prompt run as one pipeline call, one generator per
image: an image's noise depends on its seed only, but batched kernels round differently, so
the same seed in a batch of another size can differ in the last bit (measured: one uint8
value). ``batch_size`` is therefore pinned in the store like the other settings, and each
row records the size of the call that made it (a resumed partial batch may be smaller).

Every variant's pipeline call is counted (:func:`asyndm.methods.count_model_calls`): each row
records its seconds and denoiser evaluations per image and the call's forward calls. The
competitors of :mod:`asyndm.methods` run through :func:`asyndm.methods.run_method` with the
same generators; those that read no subjects get none (their rows record ``subjects: null``).

Resuming is by construction (see :mod:`asyndm.bench.store`): what the store has is skipped,
so a killed run started again continues where it stopped and a finished run does nothing.
The settings that decide images (model, steps, guidance, eta, dtype, batch size, each
variant's settings) are pinned in the store on the first run; a later run with other values
is refused. One process per shard may run on a folder at a time: a second one started on
the same shard is refused (a lock file per shard), so work is never done twice.

Sharding: under ``accelerate launch --num_processes N`` process ``i`` (accelerate's
``PartialState``) takes units ``i, i + N, i + 2N, ...``; all processes write into the one
store. ``BenchConfig.shard`` sets ``(i, N)`` by hand instead (e.g. for SLURM arrays). On a
CPU-only machine ``accelerate launch --cpu`` starts a single process; several CPU processes
need ``accelerate launch --multi_gpu --num_processes N -m asyndm.bench bench --device cpu``
(or ``torchrun --nproc_per_node N``), which accelerate then runs with gloo.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler
from PIL import Image
from tqdm.auto import tqdm

from ..generate import MAX_SEED, MIN_STEPS
from ..loading import default_guidance
from ..methods import METHODS, Call, count_model_calls, run_method
from ..sampler import MODES
from ..schedules import SchedulePlan
from ..subjects import resolve_subjects
from .metrics import Metric, MetricOptions, build_metrics, score_images
from .store import (CONFIG_NAME, ResultRow, Store, remove_stale_temp_files, shard_lock,
                    write_image_atomic)
from .suites import BenchEntry, Suite, load_suite
from .variants import DEFAULT_K, Variant, default_variants, variant_dirname

__all__ = ["CONFIG_NAME", "BenchConfig", "BenchSummary", "run_bench"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark run needs; saved, resolved, as ``bench_config.json``.

    Attributes:
        suite: built-in suite name (``"shapes"``) or path of a prompt file.
        out: run folder (``results.sqlite``, ``images/``, the saved config).
        model: diffusers model folder or hub id; ``None`` = the embedded model.
        variants: the methods compared; the report's baseline is usually ``dm``.
        seeds: seeds per prompt: ``first_seed, ..., first_seed + seeds - 1``.
        metrics: metric names; ``None`` = ``("shapes",)`` for ShapesBench suites, else none.
        clip_model: local CLIP folder for ``clipscore``.
        metric_paths: ``(name, folder)`` weight folders of user-registered metrics.
        batch_size: images (seeds of one prompt) per pipeline call.
        device: torch device, or ``"auto"`` (the process's device under accelerate, else
            the machine's accelerator, else CPU).
        categories: only the prompts of these categories (``None`` = all); applied
            before ``limit``.
        limit: only the first ``limit`` prompts of the suite.
        shard: ``(index, count)``: run units ``index::count``; ``None`` = from accelerate.
    """

    suite: str
    out: str
    model: str | None = None
    variants: tuple[Variant, ...] = field(default_factory=lambda: default_variants(MODES))
    seeds: int = 4
    first_seed: int = 0
    steps: int = 50
    guidance: float | None = None  # None: loading.default_guidance(model)
    eta: float = 1.0
    metrics: tuple[str, ...] | None = None
    clip_model: str | None = None
    metric_paths: tuple[tuple[str, str], ...] = ()
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "float32"
    categories: tuple[str, ...] | None = None
    limit: int | None = None
    shard: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.guidance is None:
            object.__setattr__(self, "guidance", default_guidance(self.model))
        if not self.variants:
            raise ValueError("give at least one variant")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if self.seeds < 1 or self.first_seed < 0:
            raise ValueError("seeds must be >= 1 and first_seed >= 0")
        if self.first_seed + self.seeds - 1 > MAX_SEED:
            raise ValueError(f"seeds must be in 0..2**63-1; first_seed {self.first_seed} with "
                             f"{self.seeds} seeds goes to {self.first_seed + self.seeds - 1}")
        if self.steps < MIN_STEPS:
            raise ValueError(f"steps must be >= {MIN_STEPS}, got {self.steps}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if not (math.isfinite(self.eta) and 0 <= self.eta <= 1):
            raise ValueError(f"eta must be in [0, 1], got {self.eta:g}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.categories is not None and not self.categories:
            raise ValueError("categories must name at least one category (None: all)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise ValueError(f"shard must be (index, count) with 0 <= index < count, "
                             f"got {self.shard}")


@dataclass(frozen=True)
class BenchSummary:
    """What one process did: ``total`` images in its shard, of which ``done_before`` were
    already in the store and ``generated`` were made now; ``rescored`` metric backfills."""

    out: Path
    shard: tuple[int, int]
    total: int
    done_before: int
    generated: int
    rescored: int


def _has_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6; older: pass --device
    return acc is not None and acc.is_available()


def _default_device() -> torch.device:
    return torch.accelerator.current_accelerator() if _has_accelerator() else torch.device("cpu")


def _placement(config: BenchConfig) -> tuple[int, int, torch.device]:
    """This process's shard ``(index, count)`` and device."""
    if config.shard is not None:
        device = _default_device() if config.device == "auto" else torch.device(config.device)
        return config.shard[0], config.shard[1], device
    from accelerate import PartialState

    cpu = config.device == "cpu" or (config.device == "auto" and not _has_accelerator())
    state = PartialState(cpu=cpu)
    device = state.device
    if config.device != "auto":
        asked = torch.device(config.device)
        # a bare device type under several processes means "this process's one"
        if not (state.num_processes > 1 and asked.index is None
                and asked.type == state.device.type):
            device = asked
    return state.process_index, state.num_processes, device


def _model_key(model: str | None) -> str:
    if model is None:
        return "embedded"
    return str(Path(model).resolve()) if Path(model).exists() else model


def _metric_names(config: BenchConfig, suite: Suite) -> tuple[str, ...]:
    if config.metrics is not None:
        return tuple(config.metrics)
    return ("shapes",) if suite.kind == "shapes" else ()


def _subject_settings(entry: BenchEntry, variant: Variant) -> tuple[list | None, list | None]:
    """Subjects and per-subject k the pipeline gets (``None`` for ``dm``)."""
    if not variant.needs_subjects:
        return None, None
    subjects = [list(s) if isinstance(s, tuple) else s for s in entry.subjects]
    if variant.k is not None:
        k = [variant.k] * len(subjects)
    else:
        k = list(entry.k) if entry.k is not None else [DEFAULT_K] * len(subjects)
    return subjects, k


def _preflight(pipe, suite: Suite, entries: tuple[BenchEntry, ...], config: BenchConfig,
               metrics: list[Metric], progress: bool = True) -> None:
    """Fail before any model work on what a prompt, variant or metric gets wrong.

    Each prompt's subjects are resolved once and each (curve, k) is checked once, so a
    million-entry suite takes minutes, with a progress bar past 10,000 entries.
    """
    needing = [v for v in config.variants if v.needs_subjects]
    ddim = isinstance(pipe.scheduler, DDIMScheduler)  # flow pipelines check their own k
    plans = {v.curve: SchedulePlan.from_scheduler(pipe.scheduler, config.steps, v.curve)
             for v in needing} if ddim else {}
    checked: set[tuple[str, float]] = set()
    bar = tqdm(entries, desc="checking prompts and subjects", unit="prompt", file=sys.stderr,
               disable=not progress or len(entries) < 10_000 or not needing, leave=False)
    for i, entry in enumerate(bar):
        where = f"suite {suite.source}: entry {i} ({entry.prompt[:60]!r})"
        for v in needing:
            subjects, k = _subject_settings(entry, v)
            if not subjects:
                raise ValueError(f"{where} has no subjects, which variant {v.name!r} (mode "
                                 f"{v.mode}) needs; add subjects or benchmark only dm")
            try:
                if v is needing[0]:  # the positions are the same for every variant
                    resolve_subjects(pipe.tokenizer, entry.prompt, subjects, k)
                for kk in k:
                    if (v.curve, kk) not in checked:
                        if ddim:
                            plans[v.curve].validate_k(kk)
                        elif not 0 < kk < 1:
                            raise ValueError(f"k must be in (0, 1), got {kk}")
                        checked.add((v.curve, kk))
            except ValueError as err:
                raise ValueError(f"{where}, variant {v.name!r}: {err}") from None
    for m in metrics:
        check = getattr(m, "validate", None)
        if check is not None:
            check(entries)


def _resolved(config: BenchConfig, suite: Suite, metrics: tuple[str, ...], count: int,
              device: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    from .. import __version__

    return {
        "config": asdict(config),
        "resolved": {
            "model": _model_key(config.model),
            "suite": {"name": suite.name, "source": suite.source, "digest": suite.digest,
                      "prompts": len(suite.entries)},
            "seeds": list(range(config.first_seed, config.first_seed + config.seeds)),
            "metrics": list(metrics),
            "variants": {v.name: v.settings() for v in config.variants},
            "device": str(device),
            "num_processes": count,
        },
        "versions": {"asyndm": __version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__},
    }


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _batches(units: list[tuple[BenchEntry, int]],
             size: int) -> Iterator[tuple[BenchEntry, list[int]]]:
    """Consecutive units of one prompt, ``size`` seeds at a time."""
    i = 0
    while i < len(units):
        entry, seeds = units[i][0], []
        while i < len(units) and units[i][0] is entry and len(seeds) < size:
            seeds.append(units[i][1])
            i += 1
        yield entry, seeds


class _Worker:
    """Generates, scores and records the images of one shard."""

    def __init__(self, pipe, store: Store, suite: Suite, config: BenchConfig,
                 metrics: list[Metric], worker_id: str) -> None:
        self.pipe, self.store, self.suite, self.config = pipe, store, suite, config
        self.metrics, self.worker_id = metrics, worker_id
        self.model = _model_key(config.model)
        # DDIM pipelines take eta; flow-matching ones (SD3) have no eta to give
        params = inspect.signature(pipe.__call__).parameters.values()
        self.eta = {"eta": config.eta} if any(
            p.name == "eta" or p.kind is p.VAR_KEYWORD for p in params) else {}

    def image_path(self, entry: BenchEntry, seed: int, variant: Variant) -> str:
        return f"images/{entry.prompt_id}/s{seed}_{variant_dirname(variant.name)}.png"

    def _method_images(self, entry: BenchEntry, variant: Variant, seeds: list[int],
                       subjects: list | None, k: list | None) -> list:
        positions = () if subjects is None else tuple(
            s.positions for s in resolve_subjects(self.pipe.tokenizer, entry.prompt, subjects, k))
        call = Call(prompt=entry.prompt,
                    generators=tuple(torch.Generator().manual_seed(s) for s in seeds),
                    steps=self.config.steps, guidance=variant.guidance_or(self.config.guidance),
                    eta=self.eta.get("eta"), subject_positions=positions)
        return run_method(self.pipe, variant.mode, call, variant.method_params())

    def run(self, entry: BenchEntry, variant: Variant, seeds: list[int]) -> None:
        cfg = self.config
        subjects, k = _subject_settings(entry, variant)
        guidance = variant.guidance_or(cfg.guidance)
        extra = {} if subjects is None else {"subjects": subjects, "k": k}
        start = time.perf_counter()
        with count_model_calls(self.pipe) as calls:
            if variant.mode in METHODS:
                images = self._method_images(entry, variant, seeds, subjects, k)
            else:
                images = self.pipe(
                    entry.prompt, mode=variant.mode, curve=variant.curve,
                    mask_mode=variant.mask_mode, mask_threshold=variant.mask_threshold,
                    num_inference_steps=cfg.steps, guidance_scale=guidance,
                    num_images_per_prompt=len(seeds),
                    generator=[torch.Generator().manual_seed(s) for s in seeds],
                    output_type="pil", **self.eta, **extra,
                ).images
        seconds = (time.perf_counter() - start) / len(seeds)
        scores = score_images(self.metrics, images, [entry] * len(images))
        rows = []
        for seed, image, score in zip(seeds, images, scores, strict=True):
            rel = self.image_path(entry, seed, variant)
            digest = write_image_atomic(image, self.store.root / rel)  # before its row
            settings = {**variant.settings(), "subjects": subjects, "k": k, "seed": seed,
                        "steps": cfg.steps, "guidance": guidance,
                        "eta": self.eta.get("eta"),
                        "model": self.model, "dtype": cfg.dtype}
            rows.append(ResultRow(
                prompt_id=entry.prompt_id, seed=seed, variant=variant.name,
                suite=self.suite.name, category=entry.category, prompt=entry.prompt,
                settings=settings, image=rel, image_sha256=digest, seconds=seconds,
                batch_size=len(seeds), worker=self.worker_id, metrics=score,
                model_evals=calls.per_image(len(seeds)) if calls.counted else None,
                model_calls=calls.calls if calls.counted else None))
        self.store.add_results(rows)

    def rescore(self, units: set[tuple[str, int]], by_id: dict[str, BenchEntry]) -> int:
        """Add metrics that recorded results lack (a metric added on a later run)."""
        done = 0
        for metric in self.metrics:
            rows = [r for r in self.store.missing_metrics(metric.name)
                    if (r["prompt_id"], r["seed"]) in units]
            for i in range(0, len(rows), 64):
                chunk, images, entries, ids = rows[i : i + 64], [], [], []
                for r in chunk:
                    path = self.store.root / r["image"]
                    if not path.is_file():
                        warnings.warn(f"{path} is recorded but missing; not scored")
                        continue
                    with Image.open(path) as im:
                        images.append(im.convert("RGB"))
                    entries.append(by_id[r["prompt_id"]])
                    ids.append(r["id"])
                scores = score_images([metric], images, entries)
                self.store.add_metrics(dict(zip(ids, scores)))
                done += len(ids)
        return done


def _select(suite: Suite, config: BenchConfig) -> list[BenchEntry]:
    """The suite's entries that ``config.categories`` and ``config.limit`` keep, in order."""
    entries = list(suite.entries)
    if config.categories is not None:
        present = sorted({e.category for e in entries})
        unknown = sorted(set(config.categories) - set(present))
        if unknown:
            raise ValueError(f"suite {suite.name!r} has no category {', '.join(unknown)}; "
                             f"its categories: {', '.join(present)}")
        entries = [e for e in entries if e.category in config.categories]
    return entries[: config.limit]


def run_bench(config: BenchConfig, *, pipe=None, progress: bool = True) -> BenchSummary:
    """Run (or resume) the benchmark of ``config`` in this process's shard.

    ``pipe`` is an already loaded AsynDM pipeline to use instead of loading
    ``config.model`` (its settings are still recorded under ``config.model``).
    """
    index, count, device = _placement(config)
    suite = load_suite(config.suite)
    entries = _select(suite, config)
    metric_names = _metric_names(config, suite)
    out = Path(config.out)
    if pipe is None:
        from ..loading import load_pipeline

        pipe = load_pipeline(config.model, device, DTYPES[config.dtype], progress=False)
    opts = MetricOptions(device=device, clip_model=config.clip_model,
                         paths=dict(config.metric_paths))
    metrics = build_metrics(metric_names, opts)
    _preflight(pipe, suite, entries, config, metrics, progress)

    with Store(out) as store, shard_lock(out, index, count):
        store.ensure_meta("generation", {"model": _model_key(config.model), "steps": config.steps,
                                         "guidance": config.guidance, "eta": config.eta,
                                         "dtype": config.dtype})
        store.ensure_meta("batch_size", config.batch_size)
        for v in config.variants:
            store.ensure_meta(f"variant:{v.name}", v.settings())
        if index == 0:
            _write_json_atomic(out / CONFIG_NAME,
                               _resolved(config, suite, metric_names, count, device))
        remove_stale_temp_files(out)

        seeds = range(config.first_seed, config.first_seed + config.seeds)
        units = [(e, s) for e in entries for s in seeds][index::count]
        done = store.done_keys()
        total = len(units) * len(config.variants)
        before = sum((e.prompt_id, s, v.name) in done for e, s in units for v in config.variants)
        worker = _Worker(pipe, store, suite, config, metrics,
                         f"{socket.gethostname()}:{os.getpid()}:{index}/{count}")
        generated = 0
        # under accelerate launch the processes share a terminal: the first one reports
        show = progress and (index == 0 or config.shard is not None)
        bar = tqdm(total=total, initial=before, unit="image", disable=not show,
                   desc=f"bench {suite.name}" + (f" [{index + 1}/{count}]" if count > 1 else ""),
                   file=sys.stderr, dynamic_ncols=True)
        with bar:
            for entry, batch in _batches(units, config.batch_size):
                for v in config.variants:
                    todo = [s for s in batch if (entry.prompt_id, s, v.name) not in done]
                    if not todo:
                        continue
                    bar.set_postfix_str(f"{v.name}: {entry.prompt[:40]}", refresh=False)
                    worker.run(entry, v, todo)
                    done.update((entry.prompt_id, s, v.name) for s in todo)
                    generated += len(todo)
                    bar.update(len(todo))
        rescored = worker.rescore({(e.prompt_id, s) for e, s in units},
                                  {e.prompt_id: e for e in entries}) if metrics else 0
    return BenchSummary(out=out, shard=(index, count), total=total, done_before=before,
                        generated=generated, rescored=rescored)

"""The AsynDM paper's protocol in one command: every method, every metric, four prompt sets.

Protocol (Table 1 of arXiv 2510.04504): SD 2.1-base, the prompt sets ``animal``,
``drawbench``, ``geneval`` and ``mscoco`` (40 prompts each, shipped in ``paper_prompts/``),
32 images per prompt (seeds 0-31), 50 DDIM steps, eta 1, guidance 7.5, scored by ImageReward,
CLIPScore (OpenCLIP ViT-H-14), BERTScore of a Qwen2.5-VL caption and QwenScore.

Each prompt set is one resumable :func:`asyndm.bench.runner.run_bench` run folder under
``out/`` (``out/animal``, ...), so an interrupted run started again continues where it
stopped. Under ``accelerate launch --num_processes N`` every process takes its share of the
(prompt, seed) units of every set; when all are done the first one writes each set's
``report.md``, the combined ``paper_table.md`` and ``paper_config.json``. With ``--shard I/N``
by hand (no barrier) shard 0 reports what the store holds when it finishes; run the command
again once every shard is done to report on everything.

The methods are the paper's (:data:`PAPER_METHODS`) that the bench's variant registry knows:
a method whose mode is not registered in this version is listed as not run, not faked.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .metrics import METRICS, PATH_KEYS
from .paper_names import PAPER_METHODS, PAPER_METRICS, PAPER_SUITES
from .runner import BenchConfig, BenchSummary, run_bench
from .variants import Variant, parse_variant

__all__ = ["PAPER_METHODS", "PAPER_SUITES", "PaperConfig", "PaperSummary", "WEIGHT_FOLDERS",
           "available_methods", "check_weights", "metric_paths", "paper_suite", "run_paper",
           "write_paper_table"]

WEIGHT_FOLDERS = {"imagereward": "imagereward", "openclip": "CLIP-ViT-H-14-laion2B-s32B-b79K",
                  "qwen": "Qwen2.5-VL-7B-Instruct", "bertscore": "roberta-large"}
"""Sub-folder of ``--weights DIR`` for each weight key (``MetricOptions.paths``)."""
PROMPT_DIR = Path(__file__).parent / "paper_prompts"


def paper_suite(name: str) -> Path:
    """The packaged prompt file of one of :data:`PAPER_SUITES`."""
    if name not in PAPER_SUITES:
        raise ValueError(f"unknown paper prompt set {name!r}; choose from {PAPER_SUITES}")
    return PROMPT_DIR / f"{name}.json"


def available_methods(methods: Sequence[str] = PAPER_METHODS) -> tuple[list[str], list[str]]:
    """``(runnable, missing)``: which methods the variant registry can parse."""
    runnable, missing = [], []
    for m in methods:
        try:
            parse_variant(m)
            runnable.append(m)
        except ValueError:
            missing.append(m)
    return runnable, missing


def metric_paths(metrics: Sequence[str], weights: str | None,
                 paths: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Weight folders of ``metrics``: explicit ``paths`` first, else ``weights/<WEIGHT_FOLDERS>``.

    A key with neither is left out; the metric then says which option it needs.
    """
    out: dict[str, str] = {}
    for m in metrics:
        for key in PATH_KEYS.get(m, ()):
            if key in paths:
                out[key] = paths[key]
            elif weights is not None:
                out[key] = str(Path(weights).expanduser() / WEIGHT_FOLDERS[key])
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class PaperConfig:
    """The paper protocol's settings (defaults: the paper's); saved as ``paper_config.json``.

    Attributes:
        model: diffusers SD 2.1-base folder (or any SD model).
        methods: ``None`` = every :data:`PAPER_METHODS` entry the registry knows.
        weights: a folder holding :data:`WEIGHT_FOLDERS`; ``paths`` overrides single keys.
        limit: only the first ``limit`` prompts of each set (a quick look; not the protocol).
        shard: ``(index, count)`` by hand; ``None`` = from ``accelerate launch`` (or all).
    """

    model: str
    out: str = "out/paper"
    suites: tuple[str, ...] = PAPER_SUITES
    methods: tuple[str, ...] | None = None
    metrics: tuple[str, ...] = PAPER_METRICS
    weights: str | None = None
    paths: tuple[tuple[str, str], ...] = ()
    seeds: int = 32
    first_seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    eta: float = 1.0
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"
    limit: int | None = None
    shard: tuple[int, int] | None = None
    report: bool = True
    missing_methods: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        for s in self.suites:
            paper_suite(s)
        if not self.suites:
            raise ValueError("give at least one prompt set")
        if self.methods is None:
            runnable, missing = available_methods()
            object.__setattr__(self, "methods", tuple(runnable))
            object.__setattr__(self, "missing_methods", tuple(missing))
        else:
            _, missing = available_methods(self.methods)
            if missing:
                raise ValueError(f"methods {missing} are not registered in this version "
                                 f"(runnable: {available_methods()[0]})")
        if not self.methods:
            raise ValueError("no method to run")
        if "dm" not in self.methods:
            raise ValueError("the methods must include dm, the paired baseline of the report")
        unknown_metrics = [m for m in self.metrics if m not in METRICS]
        if unknown_metrics:
            raise ValueError(f"unknown metrics {unknown_metrics}; available: {sorted(METRICS)}")
        known = {k for keys in PATH_KEYS.values() for k in keys}
        unknown = sorted({k for k, _ in self.paths} - known)
        if unknown:
            raise ValueError(f"unknown weight keys {unknown}; keys are {sorted(known)}")

    def variants(self) -> tuple[Variant, ...]:
        return tuple(parse_variant(m) for m in self.methods)

    def bench_config(self, suite: str) -> BenchConfig:
        return BenchConfig(
            suite=str(paper_suite(suite)), out=str(Path(self.out) / suite), model=self.model,
            variants=self.variants(), seeds=self.seeds, first_seed=self.first_seed,
            steps=self.steps, guidance=self.guidance, eta=self.eta, metrics=self.metrics,
            metric_paths=metric_paths(self.metrics, self.weights, dict(self.paths)),
            batch_size=self.batch_size, device=self.device, dtype=self.dtype,
            limit=self.limit, shard=self.shard)


@dataclass(frozen=True)
class PaperSummary:
    runs: dict[str, BenchSummary]
    """prompt set -> what this process did in it."""
    table: Path | None
    """``paper_table.md`` when this process wrote the reports."""
    missing_methods: tuple[str, ...]


def _wait_for_everyone(config: PaperConfig) -> bool:
    """Barrier under ``accelerate launch``; True when this process should write the report."""
    if config.shard is not None:
        return config.shard[0] == 0
    from accelerate import PartialState

    state = PartialState()  # the one run_bench set up
    state.wait_for_everyone()
    return state.is_main_process


def check_weights(config: PaperConfig) -> None:
    """Fail before loading any model when a metric's weight folder is not there."""
    given = dict(metric_paths(config.metrics, config.weights, dict(config.paths)))
    for m in config.metrics:
        for key in PATH_KEYS.get(m, ()):
            path = given.get(key)
            option = f"--{'bertscore-model' if key == 'bertscore' else key} or --weights"
            if path is None:
                raise ValueError(f"the {m} metric needs its weights folder ({option})")
            if not Path(path).is_dir():
                raise ValueError(f"the {m} metric's weights folder {path} does not exist "
                                 f"(set by {option})")


def run_paper(config: PaperConfig, progress: bool = True) -> PaperSummary:
    """Run (or resume) every prompt set of ``config``; the first process writes the reports."""
    check_weights(config)
    runs = {s: run_bench(config.bench_config(s), progress=progress) for s in config.suites}
    table = None
    if _wait_for_everyone(config) and config.report:
        from .report import write_report

        for s in config.suites:
            write_report(Path(config.out) / s, baseline="dm")
        (Path(config.out) / "paper_config.json").write_text(
            json.dumps(asdict(config), indent=2) + "\n")
        table = write_paper_table(config.out, config.suites, config.metrics,
                                  config.missing_methods)
    return PaperSummary(runs=runs, table=table, missing_methods=config.missing_methods)


def _fmt(x: str) -> str:
    return "" if x in ("", "nan") or math.isnan(float(x)) else f"{float(x):.3f}"


def write_paper_table(out: str | Path, suites: Sequence[str], metrics: Sequence[str],
                      missing: Sequence[str] = ()) -> Path:
    """``paper_table.md``: per metric, mean per method and prompt set (paper Table 1 layout),
    with the paired difference against ``dm`` and its 95 % interval from each ``results.csv``."""
    root = Path(out)
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    methods: list[str] = []
    for s in suites:
        path = root / s / "results.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        cats = {r["category"] for r in rows}
        keep = "all" if "all" in cats else None
        for r in rows:
            if keep is not None and r["category"] != keep:
                continue
            cells[(r["metric"], s, r["variant"])] = r
            if r["variant"] not in methods:
                methods.append(r["variant"])
    lines = ["# AsynDM paper protocol: Table 1", "",
             "Mean per method and prompt set; in brackets the paired difference against dm "
             "and its 95 % bootstrap interval (each set's report.md has the details).", ""]
    if missing:
        lines += [f"Not run (mode not registered in this version): {', '.join(missing)}.", ""]
    for m in metrics:
        lines += [f"## {m}", "", "| method | " + " | ".join(suites) + " |",
                  "|---|" + "---:|" * len(suites)]
        for v in methods:
            row = []
            for s in suites:
                c = cells.get((m, s, v))
                if c is None:
                    row.append("")
                elif v == "dm" or not _fmt(c["diff"]):
                    row.append(f"{_fmt(c['mean'])} (n={c['n']})")
                else:
                    row.append(f"{_fmt(c['mean'])} ({float(c['diff']):+.3f} "
                               f"[{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}])")
            lines.append(f"| {v} | " + " | ".join(row) + " |")
        lines.append("")
    path = root / "paper_table.md"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path

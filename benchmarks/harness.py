"""Measurement helpers shared by the benchmark scripts: clocks, peak memory, interleaving.

Every benchmark runs its modes *interleaved* in one process (``dm, asyndm, asyndm, dm, ...``)
and compares medians, so that load from other processes on a shared machine hits every mode
alike and cancels in the ratio ``mode / dm``.

Memory is measured per run:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; the working
  increment is the peak minus what was allocated just before the run.
* CPU: the process RSS. glibc keeps freed pages, so before each run the heap is trimmed
  (``malloc_trim``) and the kernel's high-water mark is reset (``/proc/self/clear_refs``);
  the peak is then ``VmHWM``, exact and free of sampling. Where that reset is refused, a
  thread samples the RSS with psutil every 2 ms instead.
"""

from __future__ import annotations

import ctypes
import gc
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

MiB = 2**20


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock reads include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """A ``progress`` wrapper for :func:`asyndm.sampler.sample` that times every step.

    ``sample`` iterates over ``progress(n)``; the time from handing out step ``i`` to being
    asked for the next one is step ``i``'s wall time (model call, update, masks, callback).
    The process CPU time of each step is kept too (see :class:`Run`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[float] = []
        self.cpu_steps: list[float] = []

    def __call__(self, n: int) -> Iterator[int]:
        for i in range(n):
            synchronize(self.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            yield i
            synchronize(self.device)
            self.steps.append(time.perf_counter() - start)
            self.cpu_steps.append(time.process_time() - cpu_start)


def _status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the baseline then includes cached pages, equally for every mode


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class PeakMemory:
    """Peak memory of a ``with`` block on ``device``: ``before``, ``peak`` and ``work`` bytes."""

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device = device
        self.interval_s = interval_s
        self.before = self.peak = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def work(self) -> int:
        """Peak minus the memory in use just before the block."""
        return self.peak - self.before

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        self.before = psutil.Process().memory_info().rss
        if not _reset_rss_peak():
            self.peak = self.before
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        else:
            self.peak = max(_status_kib("VmHWM") * 1024, self.before)

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, proc.memory_info().rss)


@dataclass
class Run:
    """One measured run of one mode.

    ``*_cpu_s`` are process CPU seconds (all threads). On a CPU shared with other work they
    are steadier than wall time (a descheduled thread does not count), so the benchmarks
    report their ratio beside the wall-time ratio; with ``--threads 1`` they are the
    operation count of the run, nearly free of contention.
    """

    total_s: float
    steps_s: list[float]
    peak_bytes: int
    work_bytes: int
    total_cpu_s: float = float("nan")
    steps_cpu_s: list[float] = field(default_factory=list)


def interleave(runs: dict[str, Callable[[], Run]], repeats: int,
               log: Callable[[str], None] | None = None) -> dict[str, list[Run]]:
    """Run every mode ``repeats`` times, alternating the order (ABC, CBA, ABC, ...)."""
    names = list(runs)
    out: dict[str, list[Run]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            run = runs[name]()
            out[name].append(run)
            if log is not None:
                log(f"  repeat {r + 1}/{repeats} {name:8s} total {run.total_s:8.3f} s  "
                    f"steps {' '.join(f'{s:.3f}' for s in run.steps_s)}  "
                    f"peak {run.peak_bytes / MiB:9.1f} MiB  work {run.work_bytes / MiB:8.1f} MiB")
    return out


def interior_steps(n: int) -> slice:
    """Steps ``2 .. n-2`` of an ``n``-step run (all steps when ``n < 4``).

    These are AsynDM's per-pixel steps: the maps of steps 0 and 1 are uniform (every pixel
    starts in the last subject's region, and the first masks read from attention set the
    transition *into* step 2), and so is the last one (every curve ends on the scheduler's
    last timestep).
    """
    return slice(2, -1) if n >= 4 else slice(None)


def summarise(runs: dict[str, list[Run]], baseline: str = "dm",
              steps: slice = slice(None)) -> dict:
    """Medians per mode and ratios ``mode / baseline``; ``steps`` picks the timed steps.

    Returns ``{"modes": {name: {step_s, total_s, peak_mib, work_mib}}, "ratios":
    {"name/baseline": {step, total, peak_mem, work_mem}}}``.
    """
    modes = {}
    for name, rs in runs.items():
        step_times = [s for r in rs for s in r.steps_s[steps]]
        step_cpu = [s for r in rs for s in r.steps_cpu_s[steps]] or [float("nan")]
        modes[name] = {
            "step_s": statistics.median(step_times),
            "total_s": statistics.median(r.total_s for r in rs),
            "step_cpu_s": statistics.median(step_cpu),
            "total_cpu_s": statistics.median(r.total_cpu_s for r in rs),
            "peak_mib": statistics.median(r.peak_bytes for r in rs) / MiB,
            "work_mib": statistics.median(r.work_bytes for r in rs) / MiB,
            "runs": len(rs),
        }
    base = modes[baseline]
    ratios = {}
    for name, m in modes.items():
        if name == baseline:
            continue
        ratios[f"{name}/{baseline}"] = {
            "step": m["step_s"] / base["step_s"],
            "total": m["total_s"] / base["total_s"],
            "step_cpu": m["step_cpu_s"] / base["step_cpu_s"],
            "total_cpu": m["total_cpu_s"] / base["total_cpu_s"],
            "peak_mem": m["peak_mib"] / base["peak_mib"],
            "work_mem": m["work_mib"] / base["work_mib"] if base["work_mib"] > 0 else float("nan"),
        }
    return {"modes": modes, "ratios": ratios}


def format_summary(summary: dict, memory_kind: str) -> str:
    """A plain-text table of a :func:`summarise` result."""
    lines = [
        f"{'mode':8s} {'step s':>9s} {'total s':>9s} {'step cpu':>9s} {'total cpu':>9s} "
        f"{'peak MiB':>10s} {'work MiB':>10s}   (memory: {memory_kind})"
    ]
    for name, m in summary["modes"].items():
        lines.append(f"{name:8s} {m['step_s']:9.3f} {m['total_s']:9.3f} "
                     f"{m['step_cpu_s']:9.3f} {m['total_cpu_s']:9.3f} "
                     f"{m['peak_mib']:10.1f} {m['work_mib']:10.1f}")
    lines.append("")
    lines.append(f"{'ratio':14s} {'step':>7s} {'total':>7s} {'step cpu':>9s} {'total cpu':>9s} "
                 f"{'peak mem':>9s} {'work mem':>9s}")
    for name, r in summary["ratios"].items():
        lines.append(f"{name:14s} {r['step']:7.3f} {r['total']:7.3f} {r['step_cpu']:9.3f} "
                     f"{r['total_cpu']:9.3f} {r['peak_mem']:9.3f} {r['work_mem']:9.3f}")
    return "\n".join(lines)


def memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "process RSS (VmHWM)" if _reset_rss_peak() else "process RSS (psutil, 2 ms)"


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]

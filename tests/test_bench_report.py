"""Reports: the paired bootstrap interval covers a known effect; files are written safely."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from asyndm.bench.report import paired_bootstrap_ci, write_report
from asyndm.bench.store import ResultRow, Store, write_image_atomic

EFFECT = 0.2


def _clustered(rng, n_prompts=30, n_seeds=4):
    """Differences with a prompt-level random effect around the true EFFECT."""
    prompt_effect = rng.normal(0.0, 0.3, n_prompts)
    return [EFFECT + a + rng.normal(0.0, 0.2, n_seeds) for a in prompt_effect]


def test_bootstrap_interval_covers_the_true_difference():
    rng = np.random.default_rng(1)
    hits = 0
    for trial in range(60):
        lo, hi = paired_bootstrap_ci(_clustered(rng), n_resamples=1000, seed=trial)
        hits += lo <= EFFECT <= hi
    assert hits / 60 >= 0.85  # nominal 95%; percentile intervals run a little short
    lo, hi = paired_bootstrap_ci(_clustered(rng, 200, 4), seed=0)
    assert lo > 0.1 and hi < 0.3  # and they shrink with more prompts


def test_bootstrap_edge_cases():
    assert np.isnan(paired_bootstrap_ci([])[0])
    assert paired_bootstrap_ci([np.array([0.5])]) == (0.5, 0.5)
    uneven = [np.array([1.0]), np.array([0.0, 0.0, 0.0]), np.array([])]
    lo, hi = paired_bootstrap_ci(uneven, seed=0)
    assert 0.0 <= lo <= hi <= 1.0
    assert paired_bootstrap_ci(uneven, seed=0) == (lo, hi)  # seeded: reproducible


@pytest.fixture
def synthetic_run(tmp_path):
    """30 prompts x 4 seeds; asyndm beats dm by EFFECT on average (prompt-clustered)."""
    rng = np.random.default_rng(0)
    diffs = _clustered(rng)
    rows = []
    for p, d in enumerate(diffs):
        base = rng.normal(0.5, 0.2, len(d))
        for seed, (b, dd) in enumerate(zip(base, d)):
            for variant, value in (("dm", b), ("asyndm", b + dd)):
                rel = f"images/p{p}/s{seed}_{variant}.png"
                colour = (int(255 * min(max(value, 0), 1)), 0, 0)
                digest = write_image_atomic(Image.new("RGB", (8, 8), colour), tmp_path / rel)
                rows.append(ResultRow(
                    prompt_id=f"p{p}", seed=seed, variant=variant, suite="syn",
                    category="odd" if p % 2 else "even",
                    prompt=f"prompt {p} costs $5 | `x` <b>*y*</b> $", settings={},
                    image=rel, image_sha256=digest, seconds=0.1, batch_size=1, worker="w",
                    metrics={"score": (float(value), None)}))
    with Store(tmp_path) as store:
        store.add_results(rows)
    return tmp_path, float(np.concatenate(diffs).mean())


def test_report_files(synthetic_run):
    root, observed = synthetic_run
    files = write_report(root, n_resamples=500)
    assert files.report.is_file() and files.csv.is_file() and files.examples.is_file()
    assert [p.name for p in files.plots] == ["diff_score.png"]
    with open(files.csv) as f:
        table = {(r["category"], r["variant"]): r for r in csv.DictReader(f)}
    assert set(table) == {(c, v) for c in ("even", "odd", "all") for v in ("dm", "asyndm")}
    row = table[("all", "asyndm")]
    assert int(row["n_pairs"]) == 120 and float(row["diff"]) == pytest.approx(observed)
    assert float(row["ci_low"]) <= EFFECT <= float(row["ci_high"])
    assert table[("all", "dm")]["diff"] == ""
    text = files.report.read_text()
    assert "## score" in text and "![examples](examples.png)" in text
    assert "costs \\$5 \\| \\`x\\` \\<b\\>\\*y\\*\\</b\\>" in text  # untrusted text escaped
    assert "<b>" not in text
    with Image.open(files.examples) as im:
        assert im.size[0] > 100


def test_report_without_runs_or_baseline(tmp_path):
    with pytest.raises(FileNotFoundError, match="no benchmark results"):
        write_report(tmp_path)
    with Store(tmp_path) as store:
        store.add_results([ResultRow("p", 0, "asyndm", "s", "c", "x", {}, "i.png", "h", 1.0,
                                     1, "w", {"m": (1.0, None)})])
    text = write_report(tmp_path, baseline="dm").report.read_text()
    assert "No results of the baseline `dm`" in text and "(1 image files missing)" in text

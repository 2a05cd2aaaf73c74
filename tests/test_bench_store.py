"""The result store: unique rows, pinned settings, atomic images, stale temp files."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time

import pytest
from PIL import Image

from asyndm.bench.store import (ResultRow, Store, StoreMismatch, remove_stale_temp_files,
                                write_image_atomic)


def _row(seed: int, variant: str = "dm", **metrics) -> ResultRow:
    return ResultRow(prompt_id="p-1", seed=seed, variant=variant, suite="s", category="c",
                     prompt="a 'cat'; DROP TABLE results; --", settings={"seed": seed},
                     image=f"images/p-1/s{seed}_{variant}.png", image_sha256="0" * 64,
                     seconds=0.5, batch_size=1, worker="w",
                     metrics={k: (v, {"why": "test"}) for k, v in metrics.items()})


def test_rows_are_unique_and_metrics_travel_with_them(tmp_path):
    with Store(tmp_path) as store:
        assert store.add_results([_row(0, shapes=1.0), _row(1, shapes=0.0)]) == 2
        assert store.add_results([_row(0, shapes=0.0), _row(0, "asyndm")]) == 1
        assert store.done_keys() == {("p-1", 0, "dm"), ("p-1", 1, "dm"), ("p-1", 0, "asyndm")}
        assert sorted(r["value"] for r in store.metric_values()) == [0.0, 1.0]
        assert [r["variant"] for r in store.missing_metrics("shapes")] == ["asyndm"]
        assert store.results()[0]["prompt"] == "a 'cat'; DROP TABLE results; --"
    with sqlite3.connect(tmp_path / "results.sqlite") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with pytest.raises(sqlite3.IntegrityError):
            con.execute("INSERT INTO results (prompt_id, seed, variant, suite, category, "
                        "prompt, settings, image, image_sha256, seconds, batch_size, worker, "
                        "created_at) SELECT prompt_id, seed, variant, suite, category, prompt, "
                        "settings, image, image_sha256, seconds, batch_size, worker, "
                        "created_at FROM results LIMIT 1")


def test_a_failed_batch_records_nothing(tmp_path):
    with Store(tmp_path) as store:
        bad = _row(1)
        object.__setattr__(bad, "settings", {"x": float("nan")})  # not valid JSON
        with pytest.raises(ValueError):
            store.add_results([_row(0), bad])
        assert store.done_keys() == set()


def test_settings_are_pinned(tmp_path):
    with Store(tmp_path) as store:
        store.ensure_meta("generation", {"steps": 50})
        store.ensure_meta("generation", {"steps": 50})
    with Store(tmp_path) as store, pytest.raises(StoreMismatch, match="steps"):
        store.ensure_meta("generation", {"steps": 20})


def test_images_are_written_atomically(tmp_path):
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    path = tmp_path / "a" / "b.png"
    digest = write_image_atomic(image, path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert os.listdir(path.parent) == ["b.png"]


def test_stale_temp_files_are_removed_but_live_ones_kept(tmp_path):
    dead = tmp_path / f".x.png.{2**22 + 12345}.tmp"  # above Linux's default pid_max
    live = tmp_path / f".y.png.{os.getpid()}.tmp"
    old = tmp_path / f".z.png.{os.getpid()}.tmp"
    for f in (dead, live, old):
        f.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert remove_stale_temp_files(tmp_path) == 2
    assert [f.exists() for f in (dead, live, old)] == [False, True, False]

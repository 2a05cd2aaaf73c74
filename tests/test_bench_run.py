"""End to end on a tiny random pipeline: runs, resumes after SIGKILL, shards, reports."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ddim, tiny_text_encoder, tiny_unet, tiny_vae
from PIL import Image

from asyndm.bench.cli import main as bench_main
from asyndm.bench.metrics import METRICS
from asyndm.bench.runner import BenchConfig, run_bench
from asyndm.bench.store import StoreMismatch
from asyndm.bench.variants import default_variants, parse_variant
from asyndm.loading import load_pipeline
from asyndm.pipeline import AsynDMPipeline

PROMPTS = [
    {"prompt": "a cat eating a sandwich", "subjects": ["cat", "sandwich"], "k": [0.5, 0.4]},
    {"prompt": "a dog playing basketball", "subjects": ["dog", "basketball"],
     "category": "sport"},
    {"prompt": "a red car on the table", "subjects": ["red car", "table"], "k": 0.6},
]
VARIANTS = default_variants(["dm", "asyndm"])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest, and steadiest on a shared machine, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tokenizer):
    """A saved tiny pipeline and a three-prompt suite."""
    root = tmp_path_factory.mktemp("bench")
    AsynDMPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(tokenizer),
                   tokenizer=tokenizer, unet=tiny_unet(), scheduler=ddim()) \
        .save_pretrained(root / "model", safe_serialization=True)
    (root / "suite.json").write_text(json.dumps(PROMPTS))
    return root


@pytest.fixture(scope="module")
def pipe(env):
    return load_pipeline(env / "model", "cpu", progress=False)


class Counting:
    """A pipeline that counts the images it is asked for."""

    def __init__(self, pipe):
        self.pipe, self.images = pipe, 0
        self.tokenizer, self.scheduler = pipe.tokenizer, pipe.scheduler

    def __call__(self, *args, **kwargs):
        self.images += kwargs["num_images_per_prompt"]
        return self.pipe(*args, **kwargs)


def _config(env, out, **kw) -> BenchConfig:
    base = dict(suite=str(env / "suite.json"), out=str(out), model=str(env / "model"),
                variants=VARIANTS, seeds=2, steps=2, batch_size=2, device="cpu", metrics=())
    return BenchConfig(**{**base, **kw})


def _rows(out: Path) -> list[tuple]:
    if not (out / "results.sqlite").is_file():
        return []
    with sqlite3.connect(out / "results.sqlite", timeout=30) as con:
        try:
            return con.execute("SELECT prompt_id, seed, variant, image, image_sha256, worker "
                               "FROM results").fetchall()
        except sqlite3.OperationalError:  # a starting run has not made its tables yet
            return []


def _check_images(out: Path, rows: list[tuple]) -> None:
    for row in rows:
        data = (out / row[3]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row[4]
    assert not list(out.rglob("*.tmp"))


def test_run_then_rerun_does_nothing(env, pipe, tmp_path):
    counting = Counting(pipe)
    cfg = _config(env, tmp_path, variants=VARIANTS + (parse_variant("asyndm:k=0.3"),))
    s = run_bench(cfg, pipe=counting, progress=False)
    assert (s.total, s.done_before, s.generated) == (18, 0, 18) and counting.images == 18
    rows = _rows(tmp_path)
    assert len(rows) == 18 and len({r[:3] for r in rows}) == 18
    _check_images(tmp_path, rows)
    saved = json.loads((tmp_path / "bench_config.json").read_text())
    assert saved["resolved"]["seeds"] == [0, 1] and saved["config"]["steps"] == 2
    with sqlite3.connect(tmp_path / "results.sqlite") as con:
        settings = json.loads(con.execute(
            "SELECT settings FROM results WHERE variant = 'asyndm:k=0.3' AND prompt_id LIKE "
            "'a-cat%' AND seed = 1").fetchone()[0])
    assert settings["k"] == [0.3, 0.3] and settings["subjects"] == ["cat", "sandwich"]
    assert settings["seed"] == 1 and settings["mode"] == "asyndm"

    again = run_bench(cfg, pipe=counting, progress=False)
    assert (again.done_before, again.generated) == (18, 0) and counting.images == 18
    assert _rows(tmp_path) == rows

    # variants are paired: the dm image of seed 1 (made in a batch of two) is the
    # pipeline's own batch-of-one image for a generator seeded 1
    (image,) = [r[3] for r in rows if r[0].startswith("a-cat") and r[1:3] == (1, "dm")]
    with Image.open(tmp_path / image) as im:
        stored = np.asarray(im, dtype=np.int16)
    direct = pipe(PROMPTS[0]["prompt"], mode="dm", num_inference_steps=2, eta=cfg.eta,
                  generator=[torch.Generator().manual_seed(1)]).images[0]
    assert np.abs(np.asarray(direct, dtype=np.int16) - stored).max() <= 1


def test_a_variants_own_guidance_reaches_the_pipeline_and_its_rows(env, pipe, tmp_path,
                                                                    monkeypatch):
    import asyndm.bench.runner as runner

    seen = []

    def method(pipe, mode, call, params):  # what a competitor is handed
        seen.append(call.guidance)
        return [Image.new("RGB", (32, 32))] * len(call.generators)

    monkeypatch.setattr(runner, "run_method", method)

    class Recording(Counting):
        def __call__(self, *args, **kwargs):
            seen.append(kwargs["guidance_scale"])
            return super().__call__(*args, **kwargs)

    variants = tuple(parse_variant(v) for v in ("dm", "dm:guidance=4", "s_cfg",
                                                "s_cfg:guidance=3"))
    run_bench(_config(env, tmp_path, variants=variants, seeds=1, limit=1, guidance=2.0),
              pipe=Recording(pipe), progress=False)
    assert sorted(seen) == [2.0, 2.0, 3.0, 4.0]
    with sqlite3.connect(tmp_path / "results.sqlite") as con:
        stored = {v: json.loads(s)["guidance"]
                  for v, s in con.execute("SELECT variant, settings FROM results")}
    assert stored == {"dm": 2.0, "dm:guidance=4": 4.0, "s_cfg": 2.0, "s_cfg:guidance=3": 3.0}


def test_changed_settings_are_refused(env, pipe, tmp_path):
    run_bench(_config(env, tmp_path, seeds=1, limit=1), pipe=pipe, progress=False)
    with pytest.raises(StoreMismatch, match="steps"):
        run_bench(_config(env, tmp_path, seeds=1, limit=1, steps=3), pipe=pipe, progress=False)
    other = (parse_variant("dm"), parse_variant("asyndm:k=0.2,name=asyndm"))
    with pytest.raises(StoreMismatch, match="variant:asyndm"):
        run_bench(_config(env, tmp_path, seeds=1, limit=1, variants=other), pipe=pipe,
                  progress=False)


def test_bad_subjects_fail_before_any_image(env, pipe, tmp_path):
    suite = tmp_path / "bad.json"
    suite.write_text(json.dumps([{"prompt": "a cat", "subjects": ["cat"]},
                                 {"prompt": "a dog", "subjects": ["horse"]}]))
    with pytest.raises(ValueError, match=r"entry 1 \('a dog'\), variant 'asyndm'.*horse"):
        run_bench(_config(env, tmp_path / "out", suite=str(suite)), pipe=pipe, progress=False)
    assert not _rows(tmp_path / "out")
    suite.write_text(json.dumps(["a cat"]))
    with pytest.raises(ValueError, match="no subjects"):
        run_bench(_config(env, tmp_path / "out", suite=str(suite)), pipe=pipe, progress=False)
    s = run_bench(_config(env, tmp_path / "out", suite=str(suite), variants=VARIANTS[:1]),
                  pipe=pipe, progress=False)
    assert s.generated == 2


def test_shards_cover_every_unit_once(env, pipe, tmp_path):
    for i in range(3):
        run_bench(_config(env, tmp_path, seeds=3, shard=(i, 3)), pipe=pipe, progress=False)
    rows = _rows(tmp_path)
    assert len(rows) == 18 and len({r[:3] for r in rows}) == 18
    order = sorted({r[0] for r in rows}, key=lambda pid: [p["prompt"].split()[1] in pid
                                                          for p in PROMPTS].index(True))
    for pid, seed, _, _, _, worker in rows:
        unit = order.index(pid) * 3 + seed
        assert worker.endswith(f":{unit % 3}/3")


def test_a_metric_added_later_scores_recorded_images(env, pipe, tmp_path, monkeypatch):
    class Red:
        name = "red"

        def __init__(self, opts):
            pass

        def score(self, images, entries):
            return [float(np.asarray(im)[..., 0].mean()) / 255 for im in images]

    monkeypatch.setitem(METRICS, "red", Red)
    counting = Counting(pipe)
    run_bench(_config(env, tmp_path), pipe=counting, progress=False)
    s = run_bench(_config(env, tmp_path, metrics=("red",)), pipe=counting, progress=False)
    assert (s.generated, s.rescored, counting.images) == (0, 12, 12)
    assert bench_main(["report", str(tmp_path), "--resamples", "200"]) == 0
    table = (tmp_path / "results.csv").read_text().splitlines()
    # categories "suite" (the file's stem) and "sport", plus "all"; two variants each
    assert table[0].startswith("metric,suite,category,variant") and len(table) == 1 + 6
    assert (tmp_path / "diff_red.png").is_file() and (tmp_path / "report.md").is_file()


def test_cli_errors_exit_2(env, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "a cat", "k": 0.5}]')
    code = bench_main(["bench", "--suite", str(bad), "--model", str(env / "model"),
                       "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "entry 0 ('a cat')" in err


def _bench_cmd(env, out: Path, seeds: int) -> list[str]:
    return [sys.executable, "-m", "asyndm.bench", "bench", "--model", str(env / "model"),
            "--suite", str(env / "suite.json"), "--modes", "dm", "asyndm", "--seeds",
            str(seeds), "--steps", "2", "--batch-size", "1", "--out", str(out), "--device",
            "cpu", "--no-progress", "--metrics"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_kill_9_and_resume(env, tmp_path):
    out, total = tmp_path / "run", 3 * 6 * 2
    cmd = _bench_cmd(env, out, seeds=6)
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while proc.poll() is None and len(_rows(out)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # at an arbitrary moment of the run
        proc.wait()
    rows = _rows(out)
    assert 0 < len(rows) < total, f"not killed mid-run ({len(rows)} rows): " + \
        log.read_text()[-2000:]
    recorded = {r[3]: ((out / r[3]).stat().st_ino, (out / r[3]).stat().st_mtime_ns)
                for r in rows}
    subprocess.run(cmd, env=_env(), check=True, capture_output=True, timeout=300)
    rows = _rows(out)
    assert len(rows) == total and len({r[:3] for r in rows}) == total
    _check_images(out, rows)
    for path, stamp in recorded.items():  # images recorded before the kill were not redone
        st = (out / path).stat()
        assert (st.st_ino, st.st_mtime_ns) == stamp, path
    with sqlite3.connect(out / "results.sqlite") as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_images_written_but_not_recorded_are_redone(env, pipe, tmp_path, monkeypatch):
    """A crash between writing a batch's images and committing its rows."""
    from asyndm.bench.store import Store

    real = Store.add_results
    calls = []

    def crash_on_third(self, rows):
        calls.append(len(rows))
        if len(calls) == 3:
            raise KeyboardInterrupt  # images of this batch are on disk, rows are not
        return real(self, rows)

    monkeypatch.setattr(Store, "add_results", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_bench(_config(env, tmp_path), pipe=pipe, progress=False)
    assert len(_rows(tmp_path)) == 4 and len(list(tmp_path.rglob("*.png"))) == 6
    monkeypatch.setattr(Store, "add_results", real)
    counting = Counting(pipe)
    s = run_bench(_config(env, tmp_path), pipe=counting, progress=False)
    assert (s.done_before, s.generated, counting.images) == (4, 8, 8)
    rows = _rows(tmp_path)
    assert len(rows) == 12
    _check_images(tmp_path, rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs accelerate launch")
def test_two_processes_under_accelerate_launch(env, tmp_path):
    out = tmp_path / "run"
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m"]
    cmd = _bench_cmd(env, out, seeds=2)
    res = subprocess.run(launch + cmd[2:], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 12 and len({r[:3] for r in rows}) == 12
    workers = {r[5].rsplit(":", 1)[1] for r in rows}
    assert workers == {"0/2", "1/2"}
    _check_images(out, rows)


def test_categories_select_prompts_and_unknown_ones_are_named(env, pipe, tmp_path):
    run_bench(_config(env, tmp_path, seeds=1, categories=("sport",)), pipe=pipe, progress=False)
    assert {r[0].split("-")[1] for r in _rows(tmp_path)} == {"dog"}
    with pytest.raises(ValueError, match="no category golf; its categories: sport, suite"):
        run_bench(_config(env, tmp_path / "x", categories=("golf",)), pipe=pipe,
                  progress=False)
    with pytest.raises(ValueError, match="at least one category"):
        _config(env, tmp_path, categories=())


def test_a_second_process_on_the_same_shard_is_refused(env, pipe, tmp_path):
    from asyndm.bench.store import shard_lock

    cfg = _config(env, tmp_path, seeds=1, limit=1)
    with shard_lock(tmp_path, 0, 1):  # as if another bench held the folder
        with pytest.raises(ValueError, match=r"shard 1/1 is being run by pid \d+"):
            run_bench(cfg, pipe=pipe, progress=False)
        # other shards of the same folder (accelerate launch) still run
        run_bench(_config(env, tmp_path, seeds=1, limit=1, shard=(1, 2)), pipe=pipe,
                  progress=False)
    assert _rows(tmp_path) == []  # shard 1 of 2 holds no unit of one prompt and seed
    done = run_bench(cfg, pipe=pipe, progress=False)
    assert done.generated == len(VARIANTS)


def test_batch_size_is_pinned_by_the_first_run(env, pipe, tmp_path):
    run_bench(_config(env, tmp_path, seeds=1, limit=1), pipe=pipe, progress=False)
    with pytest.raises(StoreMismatch, match="batch_size = 2, not 3"):
        run_bench(_config(env, tmp_path, seeds=1, limit=1, batch_size=3), pipe=pipe,
                  progress=False)

"""``asyndm paper`` end to end: a tiny random SD folder, the tiny metric models, on the CPU."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ddim, tiny_text_encoder, tiny_unet, tiny_vae
from paper_fixtures import make_weights

from asyndm.bench.cli import main as bench_main
from asyndm.bench.metrics import PAPER_METRICS
from asyndm.bench.paper import (PAPER_METHODS, PAPER_SUITES, PaperConfig, available_methods,
                                metric_paths, paper_suite)
from asyndm.bench.store import Store
from asyndm.bench.suites import load_suite
from asyndm.pipeline import AsynDMPipeline
from asyndm.shapes.tokenizer import write_clip_tokenizer

DATA = Path(__file__).parent / "data" / "paper"


def _first_prompts() -> list[str]:
    return [json.loads(paper_suite(s).read_text())[0] for s in PAPER_SUITES]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A saved tiny SD pipeline whose vocabulary holds the words of each set's first prompt
    (so the paper's word indices are token positions), and the four tiny metric models."""
    root = tmp_path_factory.mktemp("paper")
    words = sorted({w for p in _first_prompts()
                    for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", p.lower())})
    tok = write_clip_tokenizer(words, root / "tok", model_max_length=77)
    AsynDMPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(tok), tokenizer=tok,
                   unet=tiny_unet(), scheduler=ddim()) \
        .save_pretrained(root / "sd", safe_serialization=True)
    make_weights(root / "weights", _first_prompts())
    return root


def _args(env, out, *extra) -> list[str]:
    return ["paper", "--model", str(env / "sd"), "--weights", str(env / "weights"),
            "--out", str(out), "--limit", "1", "--seeds", "2", "--steps", "2",
            "--methods", "dm", "asyndm", "--device", "cpu", "--batch-size", "2",
            "--no-progress", "--threads", "1", *extra]


def _images(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*/images/*/*.png"))}


def test_paper_protocol_runs_scores_reports_and_resumes(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert bench_main(_args(env, out)) == 0
    first = capsys.readouterr().out
    for suite in PAPER_SUITES:
        assert f"paper {suite} 1/1: 4 images, 0 already done, 4 generated" in first
        with Store(out / suite) as store:
            results = store.results()
            values = store.metric_values()
        assert sorted((r["seed"], r["variant"]) for r in results) == \
            [(0, "asyndm"), (0, "dm"), (1, "asyndm"), (1, "dm")]
        by_result: dict[int, dict] = {}
        for v in values:
            by_result.setdefault(v["result_id"], {})[v["name"]] = v["value"]
        assert len(by_result) == 4
        for scores in by_result.values():
            assert sorted(scores) == sorted(PAPER_METRICS)
            # the tiny VLM may reply without a number (None); every other metric scores
            assert all(scores[m] is not None for m in ("imagereward", "openclip", "bertscore"))
        assert (out / suite / "report.md").is_file()
    table = (out / "paper_table.md").read_text()
    assert "| method | animal | drawbench | geneval | mscoco |" in table
    for m in PAPER_METRICS[:3]:
        section = table.split(f"## {m}\n")[1].split("## ")[0]
        assert re.search(r"\| dm \| -?\d+\.\d{3} \(n=2\)", section)
        assert re.search(r"\| asyndm \| -?\d+\.\d{3} \([+-]\d+\.\d{3} \[", section)
    images = _images(out)
    assert len(images) == 16

    assert bench_main(_args(env, out)) == 0  # a finished run does nothing more
    again = capsys.readouterr().out
    for suite in PAPER_SUITES:
        assert f"paper {suite} 1/1: 4 images, 4 already done, 0 generated" in again
    assert _images(out) == images


def test_shards_fill_one_store_and_the_first_writes_the_table(env, tmp_path, capsys):
    out = tmp_path / "sharded"
    common = ["--suites", "animal", "geneval", "--metrics"]
    assert bench_main(_args(env, out, *common, "--shard", "1/2")) == 0
    assert not (out / "paper_table.md").exists()  # only shard 0 reports
    assert bench_main(_args(env, out, *common, "--shard", "0/2")) == 0
    text = capsys.readouterr().out
    assert "paper animal 2/2: 2 images" in text and "paper animal 1/2: 2 images" in text
    for suite in ("animal", "geneval"):
        with Store(out / suite) as store:
            keys = sorted((r["seed"], r["variant"]) for r in store.results())
        assert keys == [(0, "asyndm"), (0, "dm"), (1, "asyndm"), (1, "dm")]
    assert (out / "paper_table.md").is_file()
    saved = json.loads((out / "paper_config.json").read_text())
    assert saved["suites"] == ["animal", "geneval"] and saved["shard"] == [0, 2]


def test_missing_weights_fail_before_any_model_is_loaded(env, tmp_path, capsys):
    gone = tmp_path / "no-weights"
    args = _args(env, tmp_path / "run")
    args[args.index("--weights") + 1] = str(gone)
    assert bench_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(gone / "imagereward") in err and "does not exist" in err
    assert not (tmp_path / "run").exists()


def test_help_and_argument_errors_import_no_torch():
    code = ("import sys\nfrom asyndm.cli import main\n"
            "for argv in (['paper', '--help'], ['paper', '--model', 'x', '--seeds', 'x']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "accelerate launch --num_processes 8 -m asyndm.bench paper" in res.stdout
    assert "invalid int value: 'x'" in res.stderr


def test_unknown_metric_fails_before_any_model(env, tmp_path, capsys):
    assert bench_main(_args(env, tmp_path / "run", "--metrics", "no_such_metric")) == 2
    assert "unknown metrics ['no_such_metric']" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_methods_come_from_the_variant_registry():
    runnable, missing = available_methods()
    assert {"dm", "dm_concave", "asyndm"} <= set(runnable)
    assert sorted(runnable + missing) == sorted(PAPER_METHODS)
    config = PaperConfig(model="sd")
    assert config.methods == tuple(runnable) and config.missing_methods == tuple(missing)
    assert config.seeds == 32 and config.steps == 50 and config.guidance == 7.5
    assert config.suites == PAPER_SUITES and config.metrics == PAPER_METRICS
    with pytest.raises(ValueError, match="not registered"):
        PaperConfig(model="sd", methods=("dm", "no_such_method"))
    with pytest.raises(ValueError, match="include dm"):
        PaperConfig(model="sd", methods=("asyndm",))


def test_weight_paths_from_the_weights_folder_and_overrides(tmp_path):
    paths = dict(metric_paths(PAPER_METRICS, str(tmp_path), {"qwen": "/my/qwen"}))
    assert paths == {"imagereward": str(tmp_path / "imagereward"),
                     "openclip": str(tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K"),
                     "qwen": "/my/qwen", "bertscore": str(tmp_path / "roberta-large")}
    assert metric_paths(("openclip",), None, {}) == ()


@pytest.mark.parametrize("suite", PAPER_SUITES)
def test_packaged_prompt_sets(suite):
    for name in (f"{suite}.json", f"{suite}_item.json"):
        assert (paper_suite(suite).parent / name).read_bytes() == (DATA / name).read_bytes()
    loaded = load_suite(paper_suite(suite))
    assert len(loaded.entries) == 40 and all(e.subjects and e.k for e in loaded.entries)
    assert {e.category for e in loaded.entries} == {suite}


def test_bench_takes_metric_weights_by_path(env, tmp_path):
    from asyndm.bench.paper import WEIGHT_FOLDERS

    out = tmp_path / "bench"
    qwen = env / "weights" / WEIGHT_FOLDERS["qwen"]
    assert bench_main(["bench", "--suite", str(paper_suite("drawbench")), "--model",
                       str(env / "sd"), "--modes", "dm", "--metrics", "qwenscore",
                       "--metric-path", f"qwen={qwen}", "--limit", "1", "--seeds", "1",
                       "--steps", "2", "--device", "cpu", "--out", str(out), "--no-progress",
                       "--threads", "1"]) == 0
    with Store(out) as store:
        names = [v["name"] for v in store.metric_values()]
    assert names == ["qwenscore"]
    with pytest.raises(SystemExit):
        bench_main(["bench", "--metric-path", "qwen", "--out", str(out)])


def test_every_registered_method_runs_in_the_protocol(env, tmp_path, capsys):
    runnable, _ = available_methods()
    args = _args(env, tmp_path / "all", "--suites", "animal", "--metrics")
    i = args.index("--methods")
    del args[i : i + 3]  # the default: every paper method the registry knows
    args[args.index("--seeds") + 1] = "1"
    assert bench_main(args) == 0
    with Store(tmp_path / "all" / "animal") as store:
        variants = sorted(r["variant"] for r in store.results())
    assert variants == sorted(runnable)
    assert f"paper animal 1/1: {len(runnable)} images" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs accelerate launch")
def test_two_processes_under_accelerate_launch_share_the_work(env, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "launched"
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(port), "-m", "asyndm.bench"]
    args = _args(env, out, "--suites", "animal", "geneval", "--metrics", "openclip",
                 "qwenscore")
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    res = subprocess.run(launch + args, env=env_vars, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for suite in ("animal", "geneval"):
        with Store(out / suite) as store:
            rows = store.results()
            scored = {v["name"] for v in store.metric_values()}
        assert sorted((r["seed"], r["variant"]) for r in rows) == \
            [(0, "asyndm"), (0, "dm"), (1, "asyndm"), (1, "dm")]
        assert {r["worker"].rsplit(":", 1)[1] for r in rows} == {"0/2", "1/2"}
        assert scored == {"openclip", "qwenscore"}
    table = (out / "paper_table.md").read_text()  # written once both processes were done
    assert "| method | animal | geneval |" in table
    # both seeds of both sets in the table: the report waited for the other process
    assert re.search(r"\| dm \| -?\d+\.\d{3} \(n=2\) \| -?\d+\.\d{3} \(n=2\) \|", table)

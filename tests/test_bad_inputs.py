"""The catalogue of CLI mistakes (docs/bad_inputs.md): each one is answered by one clear
line and exit status 2, with no traceback, before any file is written.

Every case runs in-process through ``asyndm.cli.main`` against a tiny random SD folder (the
few that must get past model loading load it in well under a second) and a work folder of
prepared traps: a file, a non-empty run folder, a garbage ``results.sqlite``, a model folder
with pickle weights. The whole work folder must be byte-for-byte unchanged afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from asyndm.cli import main
from asyndm.pipeline import AsynDMPipeline

PROMPT = "a cat eating a sandwich"  # tokens: 0 start, 1 a, 2 cat, 3 eating, 4 a, 5 sandwich, 6 end


@pytest.fixture(scope="module")
def model_dir(sd_components, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    AsynDMPipeline(**sd_components).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def traps(model_dir, tmp_path_factory) -> Path:
    """Prepared wrong things to point the CLI at (outside every case's work folder)."""
    root = tmp_path_factory.mktemp("traps")
    pickled = root / "pickled-model"
    shutil.copytree(model_dir, pickled)
    for f in (pickled / "unet").glob("*.safetensors"):
        f.unlink()
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    broken = root / "broken-index"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    (root / "no-index").mkdir()
    (root / "a-file.txt").write_text("x")
    suite = root / "padding-suite.json"
    suite.write_text(json.dumps([{"prompt": PROMPT, "subjects": [[40]], "k": 0.5}]))
    good = root / "suite.json"
    good.write_text(json.dumps([{"prompt": PROMPT, "subjects": ["cat"], "k": 0.5}]))
    return root


def _work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "busy").mkdir(parents=True)
    (work / "busy" / "dm_seed0.png").write_bytes(b"an earlier run's image")
    (work / "file.txt").write_text("not a folder")
    (work / "garbage").mkdir()
    (work / "garbage" / "results.sqlite").write_bytes(b"this is not a database" * 10)
    return work


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


G = ["generate", "--model", "{model}", "--prompt", PROMPT, "--out", "{work}/new", "--steps", "3",
     "--mode", "dm"]
C = ["compare", "--model", "{model}", "--prompt", PROMPT, "--out", "{work}/new", "--steps", "3"]
B = ["bench", "--model", "{model}", "--suite", "{traps}/suite.json", "--out", "{work}/new",
     "--steps", "3", "--seeds", "1", "--device", "cpu", "--no-progress", "--metrics"]
R = ["report", "{work}/garbage"]
S = ["--subjects", "cat", "--mode", "asyndm"]
A = G + ["--mode", "asyndm", "--subjects"]  # then the subjects

# (id, argv, what the one error line must say)
CASES = [
    # steps, sizes and numbers
    ("steps-1", G + ["--steps", "1"], r"steps must be >= 2"),
    ("steps-0", G + ["--steps", "0"], r"steps must be >= 2"),
    ("steps-negative", G + ["--steps", "-5"], r"steps must be >= 2"),
    ("steps-not-int", G + ["--steps", "abc"], r"invalid int value: 'abc'"),
    ("height-width-0", G + ["--height", "0", "--width", "0"], r"height must be > 0"),
    ("width-negative", G + ["--width", "-32"], r"width must be > 0"),
    ("height-odd", G + ["--height", "31"], r"multiples of 2 for this model, got 31x32"),
    ("guidance-nan", G + ["--guidance", "nan"], r"guidance must be a finite number"),
    ("guidance-inf", G + ["--guidance", "inf"], r"guidance must be a finite number"),
    ("guidance-negative", G + ["--guidance", "-1"], r"guidance must be >= 0"),
    ("eta-nan", G + ["--eta", "nan"], r"eta must be a finite number"),
    ("eta-above-1", G + ["--eta", "1.5"], r"eta must be in \[0, 1\]"),
    ("eta-negative", G + ["--eta", "-0.1"], r"eta must be in \[0, 1\]"),
    ("threshold-0", G + ["--mask-threshold", "0"], r"mask_threshold must be > 0"),
    ("threshold-nan", G + ["--mask-threshold", "nan"], r"mask_threshold must be a finite"),
    ("k-0", G + S + ["--k", "0"], r"k must be in \(0, 1\)"),
    ("k-1", G + S + ["--k", "1"], r"k must be in \(0, 1\)"),
    ("k-nan", G + S + ["--k", "nan"], r"k must be a finite number"),
    ("k-too-large-for-steps", G + S + ["--k", "0.99", "--steps", "50"],
     r"allowed 0 < k <= 0\.943"),
    ("k-count", A + ["cat", "sandwich", "--k", "0.3", "0.4", "0.5"],
     r"give one k or one per subject \(2\), got 3"),
    ("seed-negative", G + ["--seed", "-1"], r"seeds must be in 0\.\.2\*\*63-1"),
    ("seed-2-63", G + ["--seed", str(2**63)], r"seeds must be in 0\.\.2\*\*63-1"),
    ("seed-overflow-at-image-2", G + ["--seed", str(2**63 - 1), "--num-images", "2"],
     r"uses 9223372036854775807\.\.9223372036854775808"),
    ("num-images-0", G + ["--num-images", "0"], r"num_images must be >= 1"),
    ("threads-0", G + ["--threads", "0"], r"--threads: must be >= 1"),
    # prompt, subjects and modes
    ("prompt-empty", ["generate", "--prompt", "  ", "--out", "{work}/new"],
     r"prompt must not be empty"),
    ("prompt-missing", ["generate", "--out", "{work}/new"], r"required: --prompt"),
    ("asyndm-without-subjects", G + ["--mode", "asyndm"], r"need --subjects"),
    ("compare-without-subjects", C, r"need --subjects"),
    ("mode-twice", G + ["--mode", "dm", "--mode", "dm"], r"each mode once"),
    ("mode-unknown", G + ["--mode", "ddpm"], r"invalid choice: 'ddpm'"),
    ("curve-unknown", G + ["--curve", "cubic"], r"invalid choice: 'cubic'"),
    ("dtype-unknown", G + ["--dtype", "float8"], r"invalid choice: 'float8'"),
    ("subject-absent", A + ["dog"], r"'dog' does not occur"),
    ("subject-occurrence-0", A + ["cat#0"], r"occurrences count from 1"),
    ("subject-occurrence-2", A + ["cat#2"], r"occurs only 1 time"),
    ("position-start-token", A + ["0"], r"outside the prompt's tokens 1\.\.5"),
    ("position-end-token", A + ["6"], r"outside the prompt's tokens 1\.\.5"),
    ("position-padding", A + ["40"], r"outside the prompt's tokens 1\.\.5"),
    # devices and models
    ("device-bogus", G + ["--device", "bogus"], r"unknown device 'bogus'"),
    ("model-missing-folder", G + ["--model", "{work}/no/such/model"], r"no such folder"),
    ("model-relative-missing", G + ["--model", "./no-such-model"], r"no such folder"),
    ("model-no-index", G + ["--model", "{traps}/no-index"], r"no model_index\.json"),
    ("model-broken-index", G + ["--model", "{traps}/broken-index"],
     r"not a valid model_index\.json"),
    ("model-is-a-file", G + ["--model", "{traps}/a-file.txt"], r"a file, not a diffusers"),
    ("model-pickle-only", G + ["--model", "{traps}/pickled-model"],
     r"unet has only pickle weights \(diffusion_pytorch_model\.bin\)"),
    ("model-hub-id-without-weights", G + ["--model", "asyndm-nobody/no-such-model"],
     r"'asyndm-nobody/no-such-model' is not a local folder and could not be loaded"),
    # output folders
    ("out-is-a-file", G + ["--out", "{work}/file.txt"], r"is a file, not a folder"),
    ("out-under-a-file", G + ["--out", "{work}/file.txt/sub"], r"file\.txt is a file"),
    ("out-holds-an-earlier-run", G + ["--out", "{work}/busy"],
     r"already holds 1 file\(s\) \(dm_seed0\.png\).*--overwrite"),
    ("compare-out-busy", C + ["--subjects", "cat", "--out", "{work}/busy"], r"already holds"),
    # demo, schedule
    ("demo-steps-1", ["demo", "--steps", "1", "--out", "{work}/new"], r"steps must be >= 2"),
    ("demo-out-is-a-file", ["demo", "--out", "{work}/file.txt"], r"is a file, not a folder"),
    ("schedule-steps-0", ["schedule", "--steps", "0"], r"--steps must be >= 1"),
    # bench and report
    ("bench-steps-1", B + ["--steps", "1"], r"steps must be >= 2"),
    ("bench-batch-0", B + ["--batch-size", "0"], r"batch_size must be >= 1"),
    ("bench-seeds-0", B + ["--seeds", "0"], r"seeds must be >= 1"),
    ("bench-guidance-nan", B + ["--guidance", "nan"], r"guidance must be >= 0, got nan"),
    ("bench-eta-above-1", B + ["--eta", "2"], r"eta must be in \[0, 1\], got 2"),
    ("bench-seed-overflow", B + ["--first-seed", str(2**63 - 1), "--seeds", "2"],
     r"seeds must be in 0\.\.2\*\*63-1"),
    ("bench-suite-missing", B + ["--suite", "{work}/nope.json"], r"nope\.json"),
    ("bench-variant-unknown", B + ["--variant", "ddpm"], r"ddpm"),
    ("bench-position-padding", B + ["--suite", "{traps}/padding-suite.json"],
     r"entry 0 .*outside the prompt's tokens 1\.\.5"),
    ("bench-garbage-store", B + ["--out", "{work}/garbage"],
     r"results\.sqlite is not an asyndm results database"),
    ("report-garbage-store", R, r"results\.sqlite is not an asyndm results database"),
    ("report-resamples-0", R + ["--resamples", "0"], r"resamples must be >= 1"),
    ("report-missing-folder", ["report", "{work}/nothing-here"], r"holds no benchmark results"),
    ("report-of-a-file", ["report", "{work}/file.txt"], r"is a file, not the run folder"),
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The hub case must not wait on a network: answer as a machine without one does."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("argv, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_and_writes_nothing(argv, pattern, model_dir, traps, tmp_path,
                                                  capsys, monkeypatch):
    work = _work(tmp_path)
    monkeypatch.chdir(work)  # relative paths (./no-such-model) resolve in the work folder
    before = _snapshot(work)
    threads = torch.get_num_threads()
    args = [a.format(model=model_dir, work=work, traps=traps) for a in argv]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main(args)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    # nothing else but argparse's usage and loading progress bars: no warnings, no notices
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err)  # tqdm's cursor moves
    others = [line for line in re.split(r"[\r\n]", plain) if line.strip()
              and line not in lines and not line.startswith(("usage:", " "))
              and not re.search(r"(it/s|s/it)\]$", line)]
    assert not others, others
    assert not [str(w.message) for w in caught]  # what a user would see printed
    assert re.search(pattern, lines[0]), lines[0]
    assert _snapshot(work) == before
    assert torch.get_num_threads() == threads


def test_the_catalogue_is_large_and_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md").read_text()
    assert len(CASES) >= 40
    missing = [name for name, _, _ in CASES if f"`{name}`" not in doc]
    assert not missing, f"docs/bad_inputs.md lacks {missing}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it(tmp_path, capsys):
    out = tmp_path / "new"
    argv = ["generate", "--prompt", PROMPT, "--mode", "dm", "--device", "cuda", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no usable cuda device" in err and not out.exists()


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="root writes into read-only folders")
def test_read_only_out_folder(model_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["generate", "--model", str(model_dir), "--prompt", PROMPT,
                     "--mode", "dm", "--steps", "2", "--out", str(ro / "run")]) == 2
        assert "is not writable" in capsys.readouterr().err and not list(ro.iterdir())
    finally:
        ro.chmod(0o755)

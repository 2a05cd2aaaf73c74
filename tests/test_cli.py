import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from asyndm.cli import build_parser, main
from asyndm.pipeline import AsynDMPipeline
from test_schedules import reference_cases


@pytest.fixture(scope="module")
def model_dir(sd_components, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    AsynDMPipeline(**sd_components).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("case", [c for c in reference_cases() if "k=0.5" in c[0]],
                         ids=lambda c: c[0])
def test_schedule_json_matches_reference(case, capsys):
    _, curve, steps, k, vec = case
    assert main(["schedule", "--curve", curve, "--k", str(k), "--steps", str(steps), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["region"] == pytest.approx(vec["region"], abs=1e-3)
    assert got["background"] == pytest.approx(vec["background"], abs=1e-3)


def test_generate_writes_images_and_config_and_dm_equals_diffusers(model_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    argv = ["generate", "--model", str(model_dir), "--prompt", "a cat eating a sandwich",
            "--subjects", "cat", "sandwich", "--k", "0.5", "0.3", "--mode", "dm", "--mode",
            "asyndm", "--steps", "4", "--seed", "7", "--num-images", "2", "--out", str(out)]
    assert main(argv) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["asyndm_seed7.png", "asyndm_seed8.png", "dm_seed7.png", "dm_seed8.png"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["subjects"] == ["cat", "sandwich"] and cfg["k"] == [0.5, 0.3]
    assert cfg["modes"] == ["dm", "asyndm"] and cfg["steps"] == 4 and cfg["eta"] == 1.0
    ref = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True)
    ref.set_progress_bar_config(disable=True)
    want = ref("a cat eating a sandwich", num_inference_steps=4, eta=1.0, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(7)).images[0]
    assert np.array_equal(np.asarray(Image.open(out / "dm_seed7.png")), np.asarray(want))


def test_compare_writes_grid_and_animation(model_dir, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(model_dir), "--prompt", "a cat eating a sandwich",
                 "--subjects", "cat", "--steps", "3", "--out", str(out)]) == 0
    grid = Image.open(out / "compare.png")
    assert grid.width > 3 * 150
    gif = Image.open(out / "timesteps_seed0.gif")
    assert gif.n_frames == 3


def test_user_mistakes_are_one_line_errors(model_dir, tmp_path, capsys):
    base = ["generate", "--model", str(model_dir), "--prompt", "a cat eating a sandwich",
            "--steps", "50", "--out", str(tmp_path / "x")]
    assert main(base + ["--subjects", "dog"]) == 2
    err = capsys.readouterr().err
    assert "'dog' does not occur" in err and "Traceback" not in err
    assert main(base + ["--subjects", "cat", "--k", "0.99"]) == 2
    assert "allowed 0 < k <= 0.943" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--prompt", "a cat", "--mode", "dm"]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_every_subcommand_has_help_with_an_example():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "generate" in a.choices)
    for name, p in sub.choices.items():
        assert p.epilog and "asyndm" in p.epilog, name
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.dest}"


def _gen(model_dir, out, *extra) -> list[str]:
    return ["generate", "--model", str(model_dir), "--prompt", "a cat eating a sandwich",
            "--subjects", "cat", "--steps", "2", "--out", str(out), *extra]


def test_negative_prompt_works_in_every_mode(model_dir, tmp_path):
    out = tmp_path / "neg"
    modes = ["--mode", "dm", "--mode", "dm_concave", "--mode", "asyndm"]
    assert main(_gen(model_dir, out, *modes, "--negative-prompt", "a dog")) == 0
    assert main(_gen(model_dir, tmp_path / "empty", "--mode", "dm",
                     "--negative-prompt", "")) == 0
    with_neg = np.asarray(Image.open(out / "dm_seed0.png"))
    plain = tmp_path / "plain"
    assert main(_gen(model_dir, plain, "--mode", "dm")) == 0
    assert not np.array_equal(with_neg, np.asarray(Image.open(plain / "dm_seed0.png")))
    assert json.loads((out / "config.json").read_text())["negative_prompt"] == "a dog"


def test_overwrite_replaces_an_earlier_run_instead_of_mixing(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_gen(model_dir, out, "--mode", "dm", "--mode", "asyndm",
                     "--num-images", "2")) == 0
    (out / "notes.txt").write_text("mine")
    assert main(_gen(model_dir, out, "--mode", "dm", "--seed", "5")) == 2
    assert "already holds 6 file(s)" in capsys.readouterr().err
    assert main(_gen(model_dir, out, "--mode", "dm", "--seed", "5", "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "dm_seed5.png", "notes.txt"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == 5 and (cfg["height"], cfg["width"]) == (32, 32)


def test_threads_apply_to_the_command_and_are_restored(model_dir, tmp_path, monkeypatch):
    from asyndm.cli_base import default_threads

    before = torch.get_num_threads()
    assert main(_gen(model_dir, tmp_path / "t2", "--mode", "dm", "--threads", "2")) == 0
    assert json.loads((tmp_path / "t2" / "config.json").read_text())["threads"] == 2
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert default_threads() == 1  # half of a 2-core machine


def test_cli_choices_are_the_library_registries():
    from asyndm import cli_base
    from asyndm.sampler import MASK_MODES, MODES
    from asyndm.schedules import CURVES

    assert cli_base.MODES == MODES and cli_base.MASK_MODES == MASK_MODES
    assert cli_base.CURVE_NAMES == tuple(sorted(CURVES))


def test_help_shows_each_default_once():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "generate" in a.choices)
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "(default: None)" not in text, name
        for action in p._actions:
            shown = p._get_formatter()._expand_help(action) if action.help else ""
            assert shown.count("default") <= 1, f"{name} {action.dest}: {shown}"


def test_help_and_argument_errors_import_no_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom asyndm.cli import main\n"
            "for argv in (['--help'], ['generate', '--help'], ['bench', '--help'],\n"
            "             ['report', '--help'], ['demo', '--steps', 'x'],\n"
            "             ['generate', '--steps', 'x']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'diffusers' not in sys.modules, 'diffusers imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage: asyndm generate" in res.stdout


def test_a_cached_hub_id_gets_its_own_pipeline_class_without_the_network(tmp_path,
                                                                          monkeypatch):
    import huggingface_hub.constants as hub

    from asyndm.loading import _pipeline_class
    from asyndm.pipeline import AsynDMXLPipeline

    repo = tmp_path / "models--someone--tiny-xl"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    assert _pipeline_class("someone/tiny-xl") is AsynDMXLPipeline
    assert _pipeline_class("someone/not-cached") is AsynDMPipeline  # from_pretrained decides

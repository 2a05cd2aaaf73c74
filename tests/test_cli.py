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

"""Training: seeded batches, checkpoints, exact resume, export, and the CLI options."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from asyndm.shapes.tokenizer import write_clip_tokenizer
from asyndm.shapes.train import (
    DataSource,
    ResumeError,
    TrainConfig,
    _batches,
    make_batch,
    train,
    world_source,
)
from asyndm.shapes.train_cli import add_arguments, config_from_args, run

_COLOURS = {"red": (1.0, 0.0, 0.0), "blue": (0.0, 0.0, 1.0), "green": (0.0, 1.0, 0.0)}
_SHAPES = ("circle", "square")


def _vocabulary() -> list[str]:
    return ["a", "on", *_COLOURS, *_SHAPES]


def _sample_batch(rng: np.random.Generator, n: int):
    scenes = [(str(rng.choice(list(_COLOURS))), str(rng.choice(_SHAPES))) for _ in range(n)]
    return scenes, [f"a {c} {s}" for c, s in scenes]


def _render(scenes, size=32, device=None):
    """A stand-in renderer: the colour fills a square or a centred disc on grey."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2
    box = (yy - size / 2).abs().maximum((xx - size / 2).abs()) < size / 4
    out = torch.full((len(scenes), 3, size, size), 0.5)
    for i, (colour, shape) in enumerate(scenes):
        mask = disc if shape == "circle" else box
        out[i][:, mask] = torch.tensor(_COLOURS[colour])[:, None]
    return out.to(device or "cpu")


FAKE = DataSource(_vocabulary, _sample_batch, _render)
TINY = dict(size="tiny", batch_size=4, warmup_steps=2, log_every=2, bf16=True)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run many small ops; on a busy shared CPU two threads make them 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return write_clip_tokenizer(_vocabulary(), tmp_path_factory.mktemp("tok"), 8)


def test_batch_is_a_pure_function_of_seed_and_step(tok):
    a = make_batch(FAKE, tok, seed=1, step=7, batch_size=5, cfg_dropout=0.5)
    b = make_batch(FAKE, tok, seed=1, step=7, batch_size=5, cfg_dropout=0.5)
    c = make_batch(FAKE, tok, seed=1, step=8, batch_size=5, cfg_dropout=0.5)
    assert a.pixels.shape == (5, 3, 32, 32) and a.noise.shape == (5, 12, 16, 16)
    assert a.pixels.min() >= -1 and a.pixels.max() <= 1
    assert a.timesteps.shape == (5,) and 0 <= a.timesteps.min() and a.timesteps.max() < 1000
    assert a.input_ids.shape == (5, 8) and a.input_ids.dtype == torch.int64
    for name in ("pixels", "input_ids", "noise", "timesteps"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.noise, c.noise)


def test_data_workers_deliver_batches_in_step_order(tok):
    cfg = TrainConfig(num_workers=2, **TINY)
    stream = _batches(FAKE, tok, cfg, start=5, device=torch.device("cpu"))
    for step in range(5, 9):
        expect = make_batch(FAKE, tok, cfg.seed, step, cfg.batch_size, cfg.cfg_dropout)
        got = next(stream)
        assert torch.equal(got.noise, expect.noise) and torch.equal(got.pixels, expect.pixels)


def _weights(run_dir, name):
    (ckpt,) = sorted((run_dir / "checkpoints").glob("step_*"))
    return load_file(str(ckpt / f"{name}.safetensors"))


def test_train_checkpoint_resume_and_export(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    folder = train(TrainConfig(max_steps=4, **TINY), straight, source=FAKE)
    train(TrainConfig(max_steps=2, **TINY), split, source=FAKE)
    state = json.loads((split / "checkpoints" / "step_00000002" / "state.json").read_text())
    assert state["step"] == 2 and state["images_seen"] == 8
    train(TrainConfig(max_steps=4, **TINY), split, resume=True, source=FAKE)

    # Resuming continues the same trajectory: weights, EMA and optimiser state all match.
    for name in ("model", "ema", "optimizer"):
        a, b = _weights(straight, name), _weights(split, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    history = json.loads((split / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert [h["step"] for h in history["history"]] == [2, 4]
    assert all(np.isfinite(h["loss"]) for h in history["history"])
    assert (straight / "loss_curve.png").is_file() and (straight / "losses.csv").is_file()
    assert json.loads((straight / "summary.json").read_text())["steps"] == 4

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True)
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    # stored in half precision, computed (and loaded by default) in float32 like the UNet
    assert text.dtype == torch.float32 and unet.dtype == torch.float32
    from safetensors import safe_open

    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    ids = tok(["a red circle"], padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        ctx = text.float()(ids.input_ids).last_hidden_state
        out = unet.float()(torch.randn(1, 12, 16, 16), 500, encoder_hidden_states=ctx).sample
    assert out.shape == (1, 12, 16, 16) and torch.isfinite(out).all()

    with pytest.raises(ResumeError):
        train(TrainConfig(max_steps=4, **TINY), straight, source=FAKE)
    with pytest.raises(ResumeError):
        train(TrainConfig(max_steps=6, **dict(TINY, batch_size=2)), straight, resume=True,
              source=FAKE)


def test_batch_from_the_real_world(tmp_path):
    pytest.importorskip("asyndm.shapes.world")
    source = world_source()
    words = source.vocabulary()
    batch = make_batch(source, write_clip_tokenizer(words, tmp_path), 0, 0, 3, 0.1)
    assert batch.pixels.shape == (3, 3, 32, 32)
    assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1


def test_config_validation():
    with pytest.raises(ValueError):
        TrainConfig(size="huge")
    with pytest.raises(ValueError):
        TrainConfig(cfg_dropout=1.0)
    with pytest.raises(ValueError):
        TrainConfig(max_steps=0)


def test_cli_defaults_are_the_config_defaults():
    parser = argparse.ArgumentParser(prog="asyndm train-shapes")
    add_arguments(parser)
    args = parser.parse_args(["--out", "runs/x"])
    assert config_from_args(args) == TrainConfig()
    args = parser.parse_args(["--out", "x", "--device", "cuda", "--batch-size", "512",
                              "--num-workers", "12", "--no-bf16", "--minutes", "7", "--resume"])
    cfg = config_from_args(args)
    assert (cfg.device, cfg.batch_size, cfg.num_workers, cfg.bf16, cfg.minutes) == (
        "cuda", 512, 12, False, 7.0)
    assert args.resume
    help_text = parser.format_help()
    assert help_text.rstrip().splitlines()[-1].strip().startswith("asyndm train-shapes --out")
    for action in parser._actions:
        if action.dest not in ("help", "out"):
            assert "default" in action.help, action.dest


def test_cli_rejects_bad_settings(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--out", str(tmp_path), "--cfg-dropout", "2"])) == 2
    assert "cfg_dropout" in capsys.readouterr().err

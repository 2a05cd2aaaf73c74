"""Training on per-pixel timestep maps (issue 12): the map mixture, the per-pixel loss and
the training path through the sampler's own adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from asyndm.adapters.unet import PerPixelTimestep
from asyndm.shapes.model import MODEL_SIZES, build_components
from asyndm.shapes.render import object_masks, render
from asyndm.shapes.timestep_maps import (
    KINDS,
    MapMixture,
    draw_maps,
    noisy_and_velocity,
    region_trajectories,
)
from asyndm.shapes.tokenizer import write_clip_tokenizer
from asyndm.shapes.train import DataSource, ResumeError, TrainConfig, make_batch, train
from asyndm.shapes.world import COLOURS
from tests.test_shapes_train import (  # noqa: F401 (_one_thread: an autouse fixture)
    TINY,
    _one_thread,
    _render,
    _sample_batch,
    _vocabulary,
)


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2",
                         steps_offset=1)


def _fake_objects(scenes, size=16, device=None):
    """The stand-in renderer's object: the centre quarter of the canvas."""
    img = _render(scenes, size * 2)  # (B, 3, 2 s, 2 s)
    grey = (img - 0.5).abs().amax(dim=1) > 0.1  # (B, 2 s, 2 s)
    return torch.nn.functional.max_pool2d(grey[:, None].float(), 2)[:, 0] > 0


FAKE = DataSource(_vocabulary, _sample_batch, _render, _fake_objects)


def test_region_trajectories_lag_and_meet_at_the_end():
    mixture = MapMixture(0, 1, 0)
    ks, table = region_trajectories(_scheduler(), mixture)
    assert table.shape == (13, 20, 2) and ks[0] == 0.1 and abs(ks[-1] - 0.7) < 1e-12
    background, region = table[..., 0], table[..., 1]
    assert (region >= background).all()
    assert (region[:, -1] == background[:, -1]).all()  # every curve reaches the end
    # the scheduler's own ladder in the background, a stronger k lags more at mid-run
    sched = _scheduler()
    sched.set_timesteps(20)
    assert torch.equal(background[0], sched.timesteps)
    assert (region[1:, 10] >= region[:-1, 10]).all() and region[-1, 10] > region[0, 10]


def test_draw_maps_kinds():
    sched = _scheduler()
    objects = torch.zeros(64, 16, 16, dtype=torch.bool)
    objects[:, 5:7, 9:11] = True  # one 2x2 object inside one attention cell pair
    for kind in KINDS:
        weights = [float(kind == k) for k in KINDS]
        mixture = MapMixture(*weights)
        table = region_trajectories(sched, mixture)[1]
        gen = torch.Generator().manual_seed(3)
        maps, kinds = draw_maps(gen, objects, mixture, table)
        assert maps.shape == (64, 16, 16) and maps.dtype == torch.int64
        assert (kinds == KINDS.index(kind)).all()
        assert maps.min() >= 0 and maps.max() <= 999
        flat = maps.flatten(1)
        if kind == "shared":
            assert (flat == flat[:, :1]).all()
        elif kind == "asyndm":
            lag = torch.zeros(16, 16, dtype=torch.bool)
            lag[4:8, 8:12] = True  # the 8x8 grid's cells that hold object pixels
            inside, outside = maps[:, lag], maps[:, ~lag]
            assert (inside == inside[:, :1]).all() and (outside == outside[:, :1]).all()
            assert (inside[:, 0] >= outside[:, 0]).all() and (inside[:, 0] > outside[:, 0]).any()
            rows = {tuple(r) for r in table.flatten(0, 1).tolist()}
            assert all((o, i) in rows for o, i in zip(outside[:, 0].tolist(),
                                                       inside[:, 0].tolist()))
        else:
            spread = maps.float().std(dim=(1, 2))
            assert spread.max() > 20 and spread.max() <= 0.25 * 999 * 1.05
            assert len(set(maps.float().mean(dim=(1, 2)).round().tolist())) > 50
    a = draw_maps(torch.Generator().manual_seed(1), objects, MapMixture(1, 1, 1), table)[0]
    b = draw_maps(torch.Generator().manual_seed(1), objects, MapMixture(1, 1, 1), table)[0]
    assert torch.equal(a, b)


def test_mixture_validation_names_the_problem():
    with pytest.raises(ValueError, match="three weights"):
        MapMixture.parse("1,0")
    with pytest.raises(ValueError, match="numbers"):
        MapMixture.parse("1,x,0")
    with pytest.raises(ValueError, match="positive sum"):
        MapMixture(0, 0, 0)
    with pytest.raises(ValueError, match="k_low"):
        MapMixture(k_low=0.8, k_high=0.7)
    with pytest.raises(ValueError, match="map mixture"):
        TrainConfig(timestep_maps="1,-1,0")
    assert MapMixture.parse("1,0,0").synchronous and not MapMixture.parse("1,0,1").synchronous


def test_object_masks_mark_the_rendered_objects():
    from asyndm.shapes.grammar import sample_batch

    scenes, _ = sample_batch(np.random.default_rng(0), 4)
    masks = object_masks(scenes, 32)  # (4, 32, 32)
    images = render(scenes, 32)
    assert masks.shape == (4, 32, 32) and masks.any(dim=(1, 2)).all()
    for scene, mask, image in zip(scenes, masks, images):
        palette = torch.tensor([COLOURS[o.colour] for o in scene.objects]) / 255.0  # (K, 3)
        inside = image[:, mask].T  # (n, 3) pixels at least half covered by an object
        nearest = (inside[:, None] - palette[None]).abs().amax(dim=2).amin(dim=1)  # (n,)
        assert (nearest < 0.02).float().mean() > 0.6  # most are the objects' own colour
        assert mask.sum() < mask.numel() / 2


def test_noisy_and_velocity_with_constant_maps_is_the_schedulers():
    sched = _scheduler()
    z0, noise = torch.randn(3, 12, 16, 16), torch.randn(3, 12, 16, 16)
    t = torch.tensor([0, 480, 999])
    z_t, v = noisy_and_velocity(z0, noise, t[:, None, None].expand(3, 16, 16),
                                sched.alphas_cumprod)
    torch.testing.assert_close(z_t, sched.add_noise(z0, noise, t))
    torch.testing.assert_close(v, sched.get_velocity(z0, noise, t))


def test_batches_with_maps_keep_everything_else(tmp_path):
    tok = write_clip_tokenizer(_vocabulary(), tmp_path, 8)
    mixture = MapMixture(0.4, 0.3, 0.3)
    table = region_trajectories(_scheduler(), mixture)[1]
    plain = make_batch(FAKE, tok, seed=1, step=7, batch_size=6, cfg_dropout=0.5)
    mapped = make_batch(FAKE, tok, seed=1, step=7, batch_size=6, cfg_dropout=0.5,
                        maps=(mixture, table))
    assert plain.timesteps.shape == (6,) and mapped.timesteps.shape == (6, 16, 16)
    for name in ("pixels", "input_ids", "noise"):
        assert torch.equal(getattr(plain, name), getattr(mapped, name)), name
    with pytest.raises(ValueError, match="object pixels"):
        make_batch(DataSource(_vocabulary, _sample_batch, _render), tok, 1, 7, 6, 0.5,
                   maps=(mixture, table))


def test_per_pixel_training_gradients_match_the_scalar_path():
    """A constant map through the adapter gives the scalar path's loss and gradients."""
    comps = build_components(MODEL_SIZES["tiny"], _vocabulary(), seed=0)
    unet = comps["unet"].train()
    ctx = torch.randn(2, 8, unet.config.cross_attention_dim)
    x, target = torch.randn(2, 12, 16, 16), torch.randn(2, 12, 16, 16)
    t = torch.tensor([120, 800])
    params = dict(unet.named_parameters())
    names = ["time_embedding.linear_1.weight", "down_blocks.0.resnets.0.time_emb_proj.weight",
             "conv_in.weight"]

    def grads(timestep):
        unet.zero_grad(set_to_none=True)
        loss = (unet(x, timestep, encoder_hidden_states=ctx).sample - target).square().mean()
        loss.backward()
        return loss.detach(), [params[n].grad.clone() for n in names]

    ref_loss, ref = grads(t)
    with PerPixelTimestep(unet, 1000):
        for _ in range(2):  # a second step: the tables are made anew, in the new graph
            loss, got = grads(t[:, None, None].expand(2, 16, 16))
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            for n, a, b in zip(names, got, ref):
                assert a.abs().sum() > 0, n
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_train_on_maps_runs_and_refuses_a_changed_mixture(tmp_path):
    cfg = TrainConfig(max_steps=2, timestep_maps="0.4,0.3,0.3", **dict(TINY, bf16=False))
    folder = train(cfg, tmp_path / "run", source=FAKE)
    assert (folder / "model_index.json").is_file()
    assert "0.4,0.3,0.3" in (folder / "README.md").read_text()
    with pytest.raises(ResumeError, match="timestep_maps"):
        train(TrainConfig(max_steps=3, **dict(TINY, bf16=False)), tmp_path / "run",
              resume=True, source=FAKE)


def test_map_loss_script_reports_objects_and_background(capsys, monkeypatch):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "map_loss.py"
    monkeypatch.setattr("sys.argv", [str(script), "--batches", "1", "--batch-size", "8"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| objects", "| background"))]
    assert len(rows) == 2 and all(line.count("[") == 1 for line in rows)

import pytest
import torch

from asyndm.step import StepConfig, alpha_bar, ddim_step, gather
from conftest import ddim


def test_gather_accepts_scalar_vector_and_maps():
    table = torch.arange(10.0)
    assert gather(table, 3).shape == ()
    assert gather(table, torch.tensor([1, 2])).shape == (2, 1, 1, 1)
    assert gather(table, torch.zeros(2, 5, 4, dtype=torch.long)).shape == (2, 1, 5, 4)
    assert gather(table, torch.zeros(2, 1, 5, 4, dtype=torch.long)).shape == (2, 1, 5, 4)
    assert float(gather(table, torch.tensor([[[7]]]))[0, 0, 0, 0]) == 7.0


def test_alpha_bar_reads_negative_as_final():
    table = torch.linspace(0.99, 0.01, 10)
    t = torch.tensor([[[3, -1]]])
    out = alpha_bar(table, t, torch.tensor(1.0))
    assert out[0, 0, 0, 0] == table[3] and out[0, 0, 0, 1] == 1.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_uniform_map_equals_diffusers_ddim(prediction_type, eta, clip):
    sched = ddim(prediction_type)
    sched.register_to_config(clip_sample=clip)
    sched.set_timesteps(10)
    cfg = StepConfig.from_scheduler(sched, eta)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 5, generator=g)
    for i, t in enumerate(sched.timesteps):
        out = torch.randn(2, 4, 6, 5, generator=g)
        noise = torch.randn(2, 4, 6, 5, generator=g)
        ref = sched.step(out, t, x, eta=eta, variance_noise=noise if eta > 0 else None)
        t_next = sched.timesteps[i + 1] if i + 1 < len(sched.timesteps) else torch.tensor(-1)
        t_map, n_map = t.expand(2, 6, 5), t_next.expand(2, 6, 5)
        ours = ddim_step(out, x, alpha_bar(sched.alphas_cumprod, t_map, sched.final_alpha_cumprod),
                         alpha_bar(sched.alphas_cumprod, n_map, sched.final_alpha_cumprod), cfg,
                         noise)
        assert torch.equal(ours.prev_sample, ref.prev_sample)
        assert torch.equal(ours.pred_original_sample, ref.pred_original_sample)
        x = ref.prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_each_pixel_takes_its_own_timestep(prediction_type):
    sched = ddim(prediction_type)
    sched.set_timesteps(20)
    cfg = StepConfig.from_scheduler(sched, 0.0)
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    t = torch.full((1, 4, 4), 901)
    t[:, :2] = 501
    t_next = t - 50
    ours = ddim_step(out, x, alpha_bar(sched.alphas_cumprod, t, 1.0),
                     alpha_bar(sched.alphas_cumprod, t_next, 1.0), cfg).prev_sample
    for tt in (901, 501):
        ref = sched.step(out, torch.tensor(tt), x).prev_sample
        sel = (t == tt)[:, None].expand_as(x)
        assert torch.allclose(ours[sel], ref[sel], atol=1e-6)


def test_step_config_rejects_bad_input():
    with pytest.raises(ValueError, match="prediction_type"):
        StepConfig(prediction_type="flow")
    with pytest.raises(ValueError, match="eta"):
        StepConfig(eta=-1)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor(0.5),
                  torch.tensor(0.6), StepConfig(eta=1.0))

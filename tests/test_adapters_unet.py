import pytest
import torch
from diffusers import UNet2DConditionModel

import asyndm.adapters.unet as unet_adapter
from asyndm.adapters.unet import PerPixelTimestep, UnsupportedModelError
from conftest import tiny_unet


def _inputs(unet, hw=(16, 16), bsz=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, 4, *hw, generator=g)
    ctx = torch.randn(bsz, 7, unet.config.cross_attention_dim, generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(bsz, 32, generator=g),
                 "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * bsz)}
    return x, ctx, added


def _call(unet, x, t, ctx, added):
    return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added, return_dict=False)[0]


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
@pytest.mark.parametrize("hw", [(16, 16), (12, 20)], ids=["square", "non-square"])
@torch.no_grad()
def test_uniform_map_equals_plain_unet_and_removal_is_exact(sdxl, hw):
    unet = tiny_unet(sdxl=sdxl)
    x, ctx, added = _inputs(unet, hw)
    t = torch.tensor([601, 301])
    plain = _call(unet, x, t, ctx, added)
    with PerPixelTimestep(unet):
        t_map = t[:, None, None].expand(-1, *hw)  # (B, h, w)
        mapped = _call(unet, x, t_map, ctx, added)
        same_path = _call(unet, x, t, ctx, added)  # vectors still take the UNet's own path
        mapped_4d = _call(unet, x, t_map[:, None], ctx, added)
    assert torch.allclose(mapped, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(mapped, mapped_4d)
    assert torch.equal(same_path, plain)
    assert torch.equal(_call(unet, x, t, ctx, added), plain)
    assert not unet._forward_hooks and not unet._forward_pre_hooks


@torch.no_grad()
def test_map_changes_only_through_time_and_regions_matter():
    unet = tiny_unet()
    x, ctx, added = _inputs(unet, bsz=1)
    with PerPixelTimestep(unet):
        left_noisy = torch.full((1, 16, 16), 101)
        left_noisy[..., :8] = 901
        out = _call(unet, x, left_noisy, ctx, added)
        lo = _call(unet, x, torch.full((1, 16, 16), 101), ctx, added)
        hi = _call(unet, x, torch.full((1, 16, 16), 901), ctx, added)
    # far from the boundary each half resembles the uniform run of its own timestep
    err_right = (out[..., 12:] - lo[..., 12:]).abs().mean()
    err_left = (out[..., :4] - hi[..., :4]).abs().mean()
    assert err_right < (out[..., 12:] - hi[..., 12:]).abs().mean()
    assert err_left < (out[..., :4] - lo[..., :4]).abs().mean()


def test_bad_map_shape_is_a_clear_error():
    unet = tiny_unet()
    x, ctx, added = _inputs(unet)
    with PerPixelTimestep(unet), pytest.raises(ValueError, match=r"timestep map must be"):
        _call(unet, x, torch.zeros(2, 8, 8, dtype=torch.long), ctx, added)


def test_unsupported_configurations_are_refused():
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), norm_num_groups=32, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        resnet_time_scale_shift="scale_shift",
    )
    with pytest.raises(UnsupportedModelError, match="scale_shift"):
        PerPixelTimestep(unet)


@pytest.mark.parametrize("kind", ["embedding", "timestep"])
@torch.no_grad()
def test_class_embeddings_are_kept_per_sample(kind):
    torch.manual_seed(0)
    classes = (dict(num_class_embeds=3) if kind == "embedding"
               else dict(class_embed_type="timestep"))  # labels through time_proj too
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), norm_num_groups=32, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        **classes,
    ).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    labels = torch.tensor([0, 2]) if kind == "embedding" else torch.tensor([20, 350])
    t = torch.tensor([700, 700])
    plain = unet(x, t, encoder_hidden_states=ctx, class_labels=labels).sample
    with PerPixelTimestep(unet):
        mapped = unet(x, torch.full((2, 8, 8), 700), encoder_hidden_states=ctx,
                      class_labels=labels).sample
    assert torch.allclose(mapped, plain, atol=1e-5)


class _Shifted(torch.nn.Module):
    """A wrapped projection (as a LoRA layer wraps one): the base linear plus a shift."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base, self.out_features = base, base.out_features

    def forward(self, x):
        return self.base(x) + 0.5


@torch.no_grad()
def test_each_resnets_own_projection_is_used():
    unet = tiny_unet()
    resnet = unet.down_blocks[0].resnets[0]
    resnet.time_emb_proj = _Shifted(resnet.time_emb_proj)
    x, ctx, added = _inputs(unet)
    t = torch.tensor([601, 301])
    plain = _call(unet, x, t, ctx, added)
    with PerPixelTimestep(unet):
        mapped = _call(unet, x, t[:, None, None].expand(-1, 16, 16), ctx, added)
    assert torch.allclose(mapped, plain, atol=1e-5, rtol=1e-5)
    assert isinstance(resnet.time_emb_proj, _Shifted)  # put back on removal


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
@torch.no_grad()
def test_tables_are_made_once_per_conditioning(sdxl, monkeypatch):
    unet = tiny_unet(sdxl=sdxl)
    x, ctx, added = _inputs(unet)
    mlp_rows, projected = [], []
    handle = unet.time_embedding.register_forward_hook(
        lambda m, a, o: mlp_rows.append(a[0].shape[0]))
    project = unet_adapter._Group.project
    monkeypatch.setattr(unet_adapter._Group, "project",
                        lambda self, temb: projected.append(temb.shape) or project(self, temb))
    t_map = torch.full((2, 16, 16), 500)
    with PerPixelTimestep(unet, num_timesteps=1000):
        for step in range(3):  # the same conditioning tensors at every step, as in a loop
            t_map[:, :8] = 700 - 50 * step
            _call(unet, x, t_map, ctx, added)
        made = len(projected)
        _call(unet, x, t_map, ctx.clone(), None if added is None else
              {k: v.clone() for k, v in added.items()})  # new conditioning tensors
    handle.remove()
    assert mlp_rows == [1000]  # the time MLP ran once, on every train timestep
    n_groups = made
    assert n_groups > 0 and all(shape[-2] == 1000 for shape in projected)
    # per-sample tables (SDXL's added embedding) are made again for new conditioning
    # tensors; shared ones (SD) never
    assert len(projected) == (2 * n_groups if sdxl else n_groups)

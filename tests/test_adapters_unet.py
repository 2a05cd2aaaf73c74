import pytest
import torch
from diffusers import UNet2DConditionModel

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


@torch.no_grad()
def test_class_embeddings_are_kept_per_sample():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), norm_num_groups=32, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        num_class_embeds=3,
    ).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    labels, t = torch.tensor([0, 2]), torch.tensor([700, 700])
    plain = unet(x, t, encoder_hidden_states=ctx, class_labels=labels).sample
    with PerPixelTimestep(unet):
        mapped = unet(x, torch.full((2, 8, 8), 700), encoder_hidden_states=ctx,
                      class_labels=labels).sample
    assert torch.allclose(mapped, plain, atol=1e-5)

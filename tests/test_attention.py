import pytest
import torch

from asyndm.adapters.attention import AttentionCapture, choose_level, cross_attention_layers
from conftest import tiny_unet


@torch.no_grad()
def test_capture_keeps_outputs_and_only_touches_one_level():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    t = torch.tensor(500)
    before = {n: m.processor for n, (_, m) in cross_attention_layers(unet).items()}
    plain = unet(x, t, encoder_hidden_states=ctx).sample
    cap = AttentionCapture(unet, (16, 16))
    with cap:
        cap.start(torch.tensor([[2, 3]]), rows=slice(1, 2))  # cond half of a CFG batch
        out = unet(x, t, encoder_hidden_states=ctx).sample
        maps = cap.stop()
    assert torch.equal(out, plain)
    assert maps.shape == (1, 2, 8, 8)  # the cond row only, 2 token columns, level-1 maps
    after = {n: m.processor for n, (_, m) in cross_attention_layers(unet).items()}
    assert after == before
    assert len(cap.layers) < len(before)


@torch.no_grad()
def test_maps_are_head_then_layer_means_of_softmax_probabilities():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 7, 32, generator=g)
    seen = []
    cap = AttentionCapture(unet, (16, 16))

    def grab(mod, args, kwargs, out):
        seen.append((mod, args[0] if args else kwargs["hidden_states"]))
    handles = [m.register_forward_hook(grab, with_kwargs=True) for m in cap.layers.values()]
    with cap:
        cap.start(torch.tensor([[0, 1, 2, 3, 4, 5, 6]]))
        unet(x, torch.tensor(300), encoder_hidden_states=ctx)
        maps = cap.stop()
    for h in handles:
        h.remove()
    assert len(seen) == len(cap.layers)
    ref = 0
    for attn, hidden in seen:
        q = attn.head_to_batch_dim(attn.to_q(hidden))
        k = attn.head_to_batch_dim(attn.to_k(ctx))
        probs = attn.get_attention_scores(q, k)  # (heads, N, L)
        ref = ref + probs.mean(0)
    ref = (ref / len(seen)).T.reshape(1, 7, 8, 8)
    assert torch.allclose(maps, ref, atol=1e-5)
    assert torch.allclose(maps.sum(1), torch.ones(1, 8, 8), atol=1e-5)  # all 7 keys captured


def test_level_rule():
    unet = tiny_unet()  # cross-attention at levels 1 and 2
    assert choose_level(unet, (64, 64)) == 2  # SD at 512 px: 64 -> 16x16 maps
    assert choose_level(unet, (16, 16)) == 1  # tiny latents: at least 8x8
    assert AttentionCapture(unet, (48, 80)).map_hw == (12, 20)


def test_stop_without_call_is_an_error():
    cap = AttentionCapture(tiny_unet(), (16, 16))
    cap.start(torch.tensor([[1]]))
    with pytest.raises(RuntimeError, match="no attention"):
        cap.stop()

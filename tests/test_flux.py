"""AsynDM on FLUX.1 (dev and schnell): per-token timesteps, joint-attention capture, flow steps
on packed latents, subjects through T5, the pipeline and ``asyndm generate``.

Tiny random models built in code (:mod:`flux_fixtures`, no download): a Flux transformer with
two double- and two single-stream blocks, a tiny CLIP, a small T5 encoder and a real
sentencepiece-style (Unigram) T5 tokenizer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_transformer
from diffusers import FluxPipeline
from flux_fixtures import (flux_components, flux_scheduler, reference_pipeline, t5_tokenizer,
                           tiny_flux_transformer)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import asyndm
import asyndm.state as state_mod
from asyndm.adapters.flux import FluxAttentionCapture, FluxPerTokenTimestep, token_grid
from asyndm.adapters.unet import UnsupportedModelError
from asyndm.flow import FlowPlan
from asyndm.masks import BACKGROUND
from asyndm.pipeline_flux import AsynDMFluxPipeline
from asyndm.schedulers import AsynRun, per_pixel_scheduler
from asyndm.subjects import ResolvedSubject, batch_subjects, resolve_subjects

PROMPTS = ["a hedgehog eating a sandwich", "a dog on a table"]
SEEDS = (3, 4)
RUN = dict(num_inference_steps=4, output_type="np", max_sequence_length=16, height=16,
           width=16)
"""16 x 16 px with the one-level VAE: a 16 x 16 latent, an 8 x 8 grid of 64 packed tokens."""


def _gens():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


@pytest.fixture(scope="module", params=["dev", "schnell"])
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def components(tokenizer, variant):
    return flux_components(tokenizer, dev=variant == "dev")


@pytest.fixture(scope="module")
def pipe(components):
    p = AsynDMFluxPipeline(**components)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def reference_images(components):
    return reference_pipeline(components)(PROMPTS, generator=_gens(), **RUN).images


def _inputs(bsz: int = 2, hw: tuple[int, int] = (4, 6), guidance: bool = True, seed: int = 0):
    """A transformer call on packed latents: ``(B, N, 4)`` image tokens of an ``h x w`` grid."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    kw = dict(hidden_states=torch.randn(bsz, h * w, 4, generator=g),
              encoder_hidden_states=torch.randn(bsz, 7, 32, generator=g),
              pooled_projections=torch.randn(bsz, 32, generator=g),
              img_ids=ids.reshape(h * w, 3), txt_ids=torch.zeros(7, 3), return_dict=False)
    if guidance:
        kw["guidance"] = torch.tensor([3.5] * bsz)
    return kw


def _temb(model, value: torch.Tensor, kw: dict) -> torch.Tensor:
    """The model's own ``(B, D)`` embedding of one timestep, in the call's units."""
    bsz = kw["hidden_states"].shape[0]
    args = [value.expand(bsz) * 1000]
    if "guidance" in kw:
        args.append(kw["guidance"] * 1000)
    return model.time_text_embed(*args, kw["pooled_projections"])


# -- per-token timesteps -------------------------------------------------------------------
@pytest.mark.parametrize("dev", [True, False])
@torch.no_grad()
def test_uniform_map_matches_plain_and_removal_restores(dev):
    model = tiny_flux_transformer(guidance=dev)
    kw = _inputs(guidance=dev)
    t = torch.tensor([0.7, 0.25])  # the units the pipeline calls with: timestep / 1000
    ref = model(timestep=t, **kw)[0]
    singles = [b.norm for b in model.single_transformer_blocks]
    doubles = [b.norm1 for b in model.transformer_blocks]
    with FluxPerTokenTimestep(model):
        t_map = t[:, None, None].expand(2, 4, 6).contiguous()  # (B, h, w) token grid
        out = model(timestep=t_map, **kw)[0]
        out4 = model(timestep=t_map[:, None], **kw)[0]  # (B, 1, h, w)
        flat = model(timestep=t_map.flatten(1), **kw)[0]  # (B, N)
        plain = model(timestep=t, **kw)[0]  # a vector takes the model's own path
    after = model(timestep=t, **kw)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out4, out) and torch.equal(flat, out)
    assert torch.equal(plain, ref) and torch.equal(after, ref)
    assert all(a is b for a, b in zip([b.norm for b in model.single_transformer_blocks], singles))
    assert all(a is b for a, b in zip([b.norm1 for b in model.transformer_blocks], doubles))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("dev", [True, False])
@torch.no_grad()
def test_each_token_is_modulated_by_its_own_timestep(dev):
    model = tiny_flux_transformer(guidance=dev)
    kw = _inputs(guidance=dev)
    t_map = torch.full((2, 4, 6), 0.4)
    t_map[:, :2] = 0.9
    t_map[1, 3:, 4:] = 0.15
    seen = {}

    def grab(name):
        def hook(module, args, kwargs, output):
            seen[name] = (module.inner, args, kwargs, output)
        return hook

    with FluxPerTokenTimestep(model):
        for name, mod in (("double", model.transformer_blocks[1].norm1),
                          ("single", model.single_transformer_blocks[1].norm),
                          ("out", model.norm_out)):
            mod.register_forward_hook(grab(name), with_kwargs=True)
        model(timestep=t_map, **kw)
    tokens = t_map.flatten(1)  # (B, N)
    n_txt = kw["encoder_hidden_states"].shape[1]
    background = _temb(model, tokens.amin(dim=1), kw)  # (B, D): the text tokens' timestep
    inner, args, kwargs, output = seen["single"]
    expect_txt = inner(*args, emb=background)
    torch.testing.assert_close(output[0][:, :n_txt], expect_txt[0][:, :n_txt])
    for value in tokens.unique():
        temb = _temb(model, value, kw)  # (B, D)
        sel = tokens == value  # (B, N)
        inner, args, kwargs, output = seen["double"]
        expect = inner(*args, emb=temb)
        torch.testing.assert_close(output[0][sel], expect[0][sel], rtol=1e-5, atol=1e-5)
        inner, args, kwargs, output = seen["single"]
        expect = inner(*args, emb=temb)
        torch.testing.assert_close(output[0][:, n_txt:][sel], expect[0][:, n_txt:][sel],
                                   rtol=1e-5, atol=1e-5)
        inner, args, kwargs, output = seen["out"]
        torch.testing.assert_close(output[sel], inner(args[0], temb)[sel], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_text_timestep_defaults_to_the_background_and_bad_maps_raise():
    model = tiny_flux_transformer()
    kw = _inputs()
    t_map = torch.full((2, 4, 6), 0.4)
    t_map[:, 1:3, 2:5] = 0.8
    with FluxPerTokenTimestep(model):
        default = model(timestep=t_map, **kw)[0]
        explicit = model(timestep=t_map, text_timestep=torch.tensor([0.4, 0.4]), **kw)[0]
        other = model(timestep=t_map, text_timestep=torch.tensor([0.8, 0.8]), **kw)[0]
        with pytest.raises(ValueError, match="timestep map must be"):
            model(timestep=torch.full((2, 5, 6), 0.4), **kw)
        with pytest.raises(ValueError, match="text_timestep"):
            model(timestep=torch.tensor([0.1, 0.2]), text_timestep=torch.tensor(0.1), **kw)
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, other)


def test_unsupported_models_are_named():
    with pytest.raises(UnsupportedModelError, match="single_transformer_blocks"):
        FluxPerTokenTimestep(tiny_transformer())
    with pytest.raises(UnsupportedModelError):
        FluxPerTokenTimestep(torch.nn.Linear(2, 2))


def test_token_grid_is_flux_packing_order(pipe):
    """The assumption behind every reshape here: token ``n`` is latent patch
    ``(n // w, n % w)``, and ``img_ids`` say so."""
    h, w = 3, 5
    ids = pipe._prepare_latent_image_ids(1, h, w, torch.device("cpu"), torch.float32)
    n = torch.arange(h * w)
    assert torch.equal(ids[:, 1], (n // w).float()) and torch.equal(ids[:, 2], (n % w).float())
    assert token_grid(ids, h * w) == (h, w)
    latents = torch.arange(2 * h * 2 * w, dtype=torch.float32).reshape(1, 1, 2 * h, 2 * w)
    packed = pipe._pack_latents(latents, 1, 1, 2 * h, 2 * w)  # (1, N, 4)
    for token in (0, 7, h * w - 1):
        row, col = divmod(token, w)
        patch = latents[0, 0, 2 * row:2 * row + 2, 2 * col:2 * col + 2].flatten()
        assert torch.equal(packed[0, token], patch)
    with pytest.raises(ValueError, match="token grid"):
        token_grid(ids, h * w + 1)


# -- joint-attention capture ---------------------------------------------------------------
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``(B, S, H, d)``, interleaved pairs ``(x0, x1) -> (-x1, x0)``."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos[None, :, None] + turned * sin[None, :, None]


@torch.no_grad()
def test_capture_keeps_outputs_and_reads_subject_columns():
    model = tiny_flux_transformer()
    kw = _inputs(bsz=3)
    t = torch.tensor([0.5] * 3)
    ref = model(timestep=t, **kw)[0]
    layer = 1
    attn = model.transformer_blocks[layer].attn
    original = attn.processor
    first: dict[str, torch.Tensor] = {}

    def keep_first(name):  # the original processor's call comes first
        def hook(module, args, output):
            first.setdefault(name, output)
        return hook

    handles = [getattr(attn, n).register_forward_hook(keep_first(n))
               for n in ("norm_q", "norm_k", "norm_added_k")]
    calls = []
    handles.append(attn.to_q.register_forward_hook(lambda m, a, o: calls.append(1)))
    positions = torch.tensor([[0, 3], [2, 2]])  # (B, P) T5 columns of rows 1 and 2
    with FluxAttentionCapture(model, (4, 6), layers=(layer,)) as cap:
        cap.start(positions, rows=slice(1, 3))
        out = model(timestep=t, **kw)[0]
        maps = cap.stop()  # (B, P, h, w)
        assert len(calls) == 1  # the processor's own queries and keys, not recomputed
        for handle in cap._handles:  # without the norm hooks: recomputed, the same maps
            handle.remove()
        cap.start(positions, rows=slice(1, 3))
        model(timestep=t, **kw)
        recomputed = cap.stop()
        assert len(calls) == 3
    for h in handles:
        h.remove()
    assert torch.equal(out, ref) and torch.equal(recomputed, maps)
    assert attn.processor is original
    assert not any(m._forward_hooks for m in model.modules())
    # reference: the processor's own q and k, rotated at cat(txt_ids, img_ids), an explicit
    # softmax over [text; image] keys
    cos, sin = model.pos_embed(torch.cat([kw["txt_ids"], kw["img_ids"]]))
    n_txt = kw["txt_ids"].shape[0]
    q = _rotate(first["norm_q"][1:], cos[n_txt:], sin[n_txt:])  # (B, N, H, d)
    keys = _rotate(torch.cat([first["norm_added_k"][1:], first["norm_k"][1:]], dim=1), cos, sin)
    q, keys = q.transpose(1, 2), keys.transpose(1, 2)  # (B, H, N, d), (B, H, L + N, d)
    probs = ((q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(dim=-1)
    for b in range(2):
        for j, p in enumerate(positions[b].tolist()):
            expect = probs[b, :, :, p].mean(dim=0).reshape(4, 6)  # head mean, token grid
            torch.testing.assert_close(maps[b, j], expect, rtol=1e-4, atol=1e-6)


def test_default_capture_layers_are_the_middle_third_of_the_double_blocks():
    model = tiny_flux_transformer()
    assert list(FluxAttentionCapture(model, (4, 6)).layers) == ["transformer_blocks.0.attn"]
    with pytest.raises(ValueError, match="capture layers"):
        FluxAttentionCapture(model, (4, 6), layers=(2,))  # only 2 double-stream blocks


# -- subjects by word through T5 -----------------------------------------------------------
def test_subjects_resolve_through_the_t5_tokenizer_with_multi_piece_words():
    tok = t5_tokenizer()
    prompt = "a hedgehog eating a sandwich with a hedgehog"
    ids = tok(prompt).input_ids
    assert tok.convert_ids_to_tokens(ids)[:3] == ["▁a", "▁hedge", "hog"]  # no start token
    got = resolve_subjects(tok, prompt, ["hedgehog", "sandwich", "hedgehog#2", "a"], 0.5)
    assert [s.positions for s in got] == [(1, 2), (5,), (8, 9), (0,)]
    assert resolve_subjects(tok, prompt, [0], 0.5)[0].positions == (0,)  # T5's first word
    with pytest.raises(ValueError, match="▁hedge"):  # the error lists the pieces
        resolve_subjects(tok, prompt, ["horse"], 0.5)
    with pytest.raises(ValueError, match=r"tokens 0\.\.9"):  # the end token is refused
        resolve_subjects(tok, prompt, [10], 0.5)


# -- the flow scheduler on packed latents --------------------------------------------------
def test_scheduler_takes_fluxs_sigmas_and_mu():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    sched = per_pixel_scheduler(flux_scheduler(dev=True))
    sigmas = np.linspace(1.0, 1 / 6, 6)
    mu = calculate_shift(64)
    timesteps, n = retrieve_timesteps(sched, 6, "cpu", sigmas=sigmas, mu=mu)
    stock = flux_scheduler(dev=True)
    stock.set_timesteps(6, sigmas=sigmas, mu=mu)
    assert n == 6 and torch.equal(timesteps, stock.timesteps)
    plan = FlowPlan.from_sigmas(sched.sigmas, sched.timesteps, "quadratic")
    sigma, t = plan.lookup(torch.tensor((*plan.timesteps, 0.0)))
    assert torch.equal(sigma, stock.sigmas) and torch.equal(t[:-1], stock.timesteps)


@settings(max_examples=30, deadline=None)
@given(
    steps=st.integers(1, 10),
    ks=st.lists(st.floats(0.05, 0.95), min_size=1, max_size=3),
    curve=st.sampled_from(["quadratic", "piecewise", "exponential"]),
    threshold=st.floats(0.3, 3.0),
    seed=st.integers(0, 2**16),
    mu=st.floats(0.5, 1.15),
    dev=st.booleans(),
)
def test_every_token_is_monotone_and_ends_on_time_under_any_mask_switching(
        steps, ks, curve, threshold, seed, mu, dev):
    """The scheduler as Flux's pipeline drives it (packed ``(B, N, C)`` latents, its sigmas
    and ``mu``), with random subject attention at every step: masks switch at will."""
    subs = [ResolvedSubject(f"s{i}", (i,), k) for i, k in enumerate(ks)]
    subjects = batch_subjects([subs, subs[:1]])  # two samples, padded subjects
    h, w = 4, 6
    run = AsynRun(mode="asyndm", curve=curve, mask_threshold=threshold, capture=True,
                  subjects=subjects, token_grid=(h, w))
    sched = per_pixel_scheduler(flux_scheduler(dev))
    sched.asyndm_run = run
    sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, h * w, 4, generator=gen)  # (B, N, C)
    for t in sched.timesteps:
        st_now = sched.asyndm_pixels(x, t, 2)
        v = torch.randn(x.shape, generator=gen)
        sigma = run.plan.lookup(st_now.state)[0].flatten(1)[:, :, None]  # (B, N, 1)
        attn = torch.rand(2, subjects.positions.shape[1], h, w, generator=gen) ** 4
        run.attention = subjects.subject_attention(attn)  # (B, S, h, w)
        prev = sched.step(v, t, x, return_dict=False)[0]
        sigma_next = run.plan.lookup(run.pixels.state)[0].flatten(1)[:, :, None]
        # every token took its own Euler step, in Flux's token order
        torch.testing.assert_close(prev, x + (sigma_next - sigma) * v, rtol=0, atol=1e-6)
        x = prev
    maps = torch.stack([r.timesteps for r in run.records] + [run.records[-1].next_timesteps])
    assert maps.shape == (steps + 1, 2, h, w)
    assert bool((maps[0] == 1000).all())  # every token starts at pure noise
    assert bool((maps[1:] <= maps[:-1]).all())  # never up, per token
    torch.testing.assert_close(maps[-2], torch.full_like(maps[-2], float(sched.timesteps[-1])))
    assert bool((maps[-1] == 0).all())  # clean after the last step, every token on time


# -- the pipeline --------------------------------------------------------------------------
def test_dm_equals_diffusers_flux_pipeline(pipe, reference_images):
    out = pipe(PROMPTS, mode="dm", generator=_gens(), **RUN)
    assert out.images.shape == (2, 16, 16, 3)
    assert np.array_equal(out.images, reference_images)
    observed = pipe(PROMPTS, mode="dm", generator=_gens(), return_timestep_maps=True, **RUN)
    assert np.array_equal(observed.images, reference_images)  # observed through the hooks
    assert observed.timestep_maps.shape == (4, 2, 8, 8)


def test_asyndm_with_empty_masks_equals_dm(pipe, reference_images, monkeypatch):
    def run(**kw):
        return pipe(PROMPTS, subjects=[["hedgehog"], ["dog"]], mode="asyndm",
                    generator=_gens(), **kw, **RUN)

    assert np.array_equal(run(mask_mode="static", mask_threshold=1e9).images, reference_images)

    def no_regions(positions_or_attn, k, size_or_threshold):  # every token background
        bsz = positions_or_attn.shape[0]
        return torch.full((bsz, 8, 8), BACKGROUND, dtype=torch.long)

    monkeypatch.setattr(state_mod, "initial_labels", no_regions)
    monkeypatch.setattr(state_mod, "region_labels", no_regions)
    assert np.array_equal(run(mask_mode="dynamic").images, reference_images)


def _force_attention(model, targets: dict[int, tuple[list[int], torch.Tensor]]):
    """Hooks that make image queries of a region attend to given T5 columns.

    ``targets``: rotary dimension ``c`` (0 or 1: the axis whose ids are 0 for every text and
    image token, so rotation leaves it alone) -> (T5 columns, ``(h, w)`` bool region). Queries
    of the region and keys of the columns get a large value on dimension ``c``; every other
    query and key is zero, so the region attends to its columns and nothing else stands out.
    """
    def queries(module, args, out):  # (B, N, H, d) image queries
        new = torch.zeros_like(out)
        for c, (_, region) in targets.items():
            new[:, region.flatten(), :, c] = 6.0
        return new

    def text_keys(module, args, out):  # (B, L, H, d)
        new = torch.zeros_like(out)
        for c, (cols, _) in targets.items():
            new[:, cols, :, c] = 6.0
        return new

    handles = []
    for block in model.transformer_blocks:
        handles.append(block.attn.norm_q.register_forward_hook(queries))
        handles.append(block.attn.norm_k.register_forward_hook(lambda m, a, o: o * 0))
        handles.append(block.attn.norm_added_k.register_forward_hook(text_keys))
    return handles


def test_masks_follow_the_subject_tokens(pipe):
    prompt = "a hedgehog eating a sandwich"  # T5: ▁a ▁hedge hog ▁eating ▁a ▁sandwich </s>
    hedgehog = torch.zeros(8, 8, dtype=torch.bool)
    hedgehog[:3, :3] = True
    sandwich = torch.zeros(8, 8, dtype=torch.bool)
    sandwich[5:, 4:] = True
    handles = _force_attention(pipe.transformer, {0: ([1, 2], hedgehog), 1: ([5], sandwich)})
    try:
        out = pipe(prompt, subjects=["hedgehog", "sandwich"], k=[0.6, 0.4],
                   generator=torch.Generator().manual_seed(0), return_timestep_maps=True, **RUN)
        swapped = pipe(prompt, subjects=["sandwich", "hedgehog"], k=[0.6, 0.4],
                       mask_layers=[1], generator=torch.Generator().manual_seed(0), **RUN)
    finally:
        for h in handles:
            h.remove()
    expect = torch.full((8, 8), BACKGROUND)
    expect[hedgehog], expect[sandwich] = 0, 1
    assert torch.equal(out.masks[0], expect)
    assert torch.equal(out.label_maps[1:, 0], expect.expand(3, 8, 8))  # from step 1 on
    swap = torch.full((8, 8), BACKGROUND)
    swap[hedgehog], swap[sandwich] = 1, 0
    assert torch.equal(swapped.masks[0], swap)  # read from the other double-stream block
    with pytest.raises(ValueError, match="capture layers"):
        pipe(prompt, subjects=["hedgehog"], mask_layers=[2], **RUN)
    # the regions (known after step 0's attention) lag behind the background from step 2
    # on and arrive with it at the last step
    maps = out.timestep_maps[:, 0]  # (N, h, w)
    bg = maps[:, ~(hedgehog | sandwich)]
    assert bool((bg == bg[:, :1]).all())
    assert bool((maps[2][hedgehog] > bg[2, 0]).all() and (maps[2][sandwich] > bg[2, 0]).all())
    assert bool((maps[-1] == maps[-1, 7, 0]).all())


def test_negative_prompt_with_true_cfg_and_prompt_2(pipe):
    """Flux encodes its negative prompt in a second ``encode_prompt`` call: subjects come
    from the first (the prompt; T5 reads ``prompt_2`` when given)."""
    out = pipe("a cat", prompt_2="a hedgehog eating a sandwich", subjects=["hedgehog"],
               negative_prompt="a dog", true_cfg_scale=2.0,
               generator=torch.Generator().manual_seed(1), return_timestep_maps=True, **RUN)
    assert out.mode == "asyndm" and out.timestep_maps.shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="does not occur"):
        pipe("a hedgehog", prompt_2="a dog", subjects=["hedgehog"], **RUN)
    with pytest.raises(ValueError, match="beyond the 4 T5 tokens"):
        pipe(PROMPTS[0], subjects=["sandwich"], **{**RUN, "max_sequence_length": 4})


def test_prompt_embeds_take_t5_positions_and_region_masks_lag(pipe):
    """With ``prompt_embeds`` and no prompt, subjects are T5 positions (0 is a word);
    a user's region mask lags on the token grid as attention masks do."""
    embeds, pooled, _ = pipe.encode_prompt(PROMPTS[0], None, max_sequence_length=16)
    by_word = pipe(PROMPTS[0], subjects=["hedgehog"], generator=_gens()[0],
                   return_timestep_maps=True, **RUN)
    by_position = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, subjects=[[1, 2]],
                       generator=_gens()[0], return_timestep_maps=True, **RUN)
    assert torch.equal(by_position.timestep_maps, by_word.timestep_maps)
    first = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, subjects=[0],
                 generator=_gens()[0], **RUN)
    assert first.mode == "asyndm"
    region = np.zeros((16, 16), np.uint8)
    region[:8, :8] = 1  # the top-left 4 x 4 tokens
    out = pipe(PROMPTS[0], region_mask=region, k=0.5, generator=_gens()[0],
               return_timestep_maps=True, **RUN)
    expect = torch.full((8, 8), BACKGROUND)
    expect[:4, :4] = 0
    assert torch.equal(out.masks[0], expect)
    step2 = out.timestep_maps[2, 0]
    assert bool((step2[:4, :4] > step2[7, 7]).all())
    assert bool((step2[expect < 0] == step2[7, 7]).all())


def test_enable_on_a_stock_flux_pipeline_and_removal_restores_it(components, reference_images):
    stock = reference_pipeline(components)
    scheduler = stock.scheduler
    with asyndm.enable(stock, subjects=[["hedgehog"], ["dog"]], k=0.5) as run:
        images = stock(PROMPTS, generator=_gens(), **RUN).images
    assert run.timestep_maps.shape == (4, 2, 8, 8) and run.masks.shape == (2, 8, 8)
    assert not np.array_equal(images, reference_images)
    assert stock.scheduler is scheduler and "encode_prompt" not in vars(stock)
    model = stock.transformer
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert all(type(b.norm).__name__ == "AdaLayerNormZeroSingle"
               for b in model.single_transformer_blocks)
    assert np.array_equal(stock(PROMPTS, generator=_gens(), **RUN).images, reference_images)
    # the diffusers way to the subclass: from_pipe shares the components
    sub = AsynDMFluxPipeline.from_pipe(stock)
    sub.set_progress_bar_config(disable=True)
    assert np.array_equal(sub(PROMPTS, generator=_gens(), **RUN).images, reference_images)


def test_pipeline_rejects_bad_arguments(pipe):
    with pytest.raises(ValueError, match="needs subjects"):
        pipe(PROMPTS[0], mode="asyndm", **RUN)
    with pytest.raises(ValueError, match="does not occur"):
        pipe(PROMPTS[0], subjects=["horse"], **RUN)


# -- asyndm generate -----------------------------------------------------------------------
def test_generate_on_a_saved_flux_folder(tokenizer, tmp_path):
    from asyndm.cli import main
    from asyndm.loading import _pipeline_class

    folder = tmp_path / "tiny-flux"
    FluxPipeline(**flux_components(tokenizer, dev=True)).save_pretrained(
        folder, safe_serialization=True)
    assert _pipeline_class(str(folder)) is AsynDMFluxPipeline
    out = tmp_path / "gen"
    argv = ["generate", "--model", str(folder), "--prompt", "a hedgehog eating a sandwich",
            "--subjects", "hedgehog", "--mode", "dm", "--mode", "asyndm", "--steps", "3",
            "--height", "16", "--width", "16", "--seed", "2", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["asyndm_seed2.png", "dm_seed2.png"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["guidance"] == 3.5  # FluxPipeline's own default for a Flux folder
    ref = FluxPipeline.from_pretrained(folder, use_safetensors=True)
    ref.set_progress_bar_config(disable=True)
    want = ref("a hedgehog eating a sandwich", num_inference_steps=3, guidance_scale=3.5,
               height=16, width=16, generator=torch.Generator().manual_seed(2)).images[0]
    assert np.array_equal(np.asarray(Image.open(out / "dm_seed2.png")), np.asarray(want))
    assert main(argv[:-1] + [str(tmp_path / "odd"), "--height", "15"]) == 2


def test_flux_benchmark_runs_and_reports_its_ratio():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_flux

    results = bench_flux.main(["--steps", "4", "--grid", "4", "--repeats", "1", "--no-warmup",
                               "--variant", "schnell"])
    assert set(results["ratios"]) == {"asyndm/dm"}
    assert results["ratios"]["asyndm/dm"]["step"] > 0 and results["steps"] == 4
    costs = bench_flux.main(["--adapters", "--grid", "4", "--repeats", "1"])["adapters_ms"]
    assert set(costs) == {"none", "capture", "recompute", "plain", "per_token"}

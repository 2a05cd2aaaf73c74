"""The six competitors (asyndm.methods): degenerate settings equal DM / CFG exactly, model calls
per step, one step against a hand computation of each equation, one-line errors."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, EulerDiscreteScheduler

from asyndm.loading import load_pipeline
from asyndm.methods import METHODS, Call, count_model_calls, method_params, run_method
from asyndm.methods.attend_excite import excite_loss
from asyndm.methods.cfgpp import cfgpp_inputs
from asyndm.methods.common import ae_kernel, blur_queries, smooth_maps
from asyndm.methods.s_cfg import SCFGParams, guidance_rate
from asyndm.methods.z_sampling import ddim_invert
from asyndm.pipeline import AsynDMPipeline, AsynDMXLPipeline
from conftest import ddim

PROMPT = "a cat eating a sandwich"
STEPS = 4


@pytest.fixture(scope="module")
def pipe(sd_components):
    p = AsynDMPipeline(**sd_components)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def embedded():
    return load_pipeline(None, progress=False)


def _call(prompt=PROMPT, seeds=(0,), **kw):
    kw.setdefault("steps", STEPS)
    kw.setdefault("guidance", 7.5)
    kw.setdefault("output_type", "np")
    kw.setdefault("subject_positions", ((2,), (5,)))
    return Call(prompt=prompt, generators=tuple(torch.Generator().manual_seed(s) for s in seeds),
                **kw)


def _dm(pipe, prompt=PROMPT, seeds=(0,), guidance=7.5, eta=1.0):
    return pipe(prompt, mode="dm", num_inference_steps=STEPS, guidance_scale=guidance, eta=eta,
                num_images_per_prompt=len(seeds), output_type="np",
                generator=[torch.Generator().manual_seed(s) for s in seeds]).images


DEGENERATE = [
    ("z_sampling", {"zigzag": "0"}),
    ("seg", {"scale": "0"}),
    ("pag", {"scale": "0"}),
    ("s_cfg", {"rate_min": "1", "rate_max": "1"}),
    ("attend_excite", {"updates": "0", "refine": "false"}),
]


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("mode,opts", DEGENERATE)
def test_degenerate_settings_equal_dm_exactly(pipe, mode, opts, eta):
    got = run_method(pipe, mode, _call(eta=eta, seeds=(3, 4)), method_params(mode, opts))
    assert np.array_equal(got, _dm(pipe, seeds=(3, 4), eta=eta))


def test_cfgpp_lam_zero_is_unconditional_ddim(pipe):
    # DM of the empty prompt guides u + w (u - u) = u exactly: unconditional DDIM
    got = run_method(pipe, "cfgpp", _call(), method_params("cfgpp", {"lam": "0"}))
    assert np.array_equal(got, _dm(pipe, prompt=""))
    assert not np.array_equal(got, _dm(pipe))


def test_every_method_changes_the_image_and_keeps_its_noise(pipe):
    dm = _dm(pipe)
    for mode in METHODS:
        got = run_method(pipe, mode, _call())
        assert got.shape == dm.shape and np.isfinite(got).all()
        assert not np.array_equal(got, dm), mode


@pytest.mark.parametrize("mode", ["z_sampling", "attend_excite", "seg"])
def test_an_image_depends_on_its_seed_only(pipe, mode):
    pair = run_method(pipe, mode, _call(seeds=(5, 6)))
    alone = run_method(pipe, mode, _call(seeds=(6,)))
    np.testing.assert_allclose(pair[1], alone[0], atol=2e-5)


@pytest.mark.parametrize("mode,rows", [
    ("cfgpp", [2] * STEPS), ("s_cfg", [2] * STEPS), ("seg", [3] * STEPS), ("pag", [3] * STEPS),
    # zig (CFG), zag (gamma_2 = 0: unconditional row alone), the step (CFG); the last step plain
    ("z_sampling", [2, 1, 2] * (STEPS - 1) + [2]),
])
def test_model_calls_per_step(pipe, mode, rows):
    with count_model_calls(pipe) as calls:
        run_method(pipe, mode, _call())
    assert calls.per_call_rows == rows and calls.per_image(1) == sum(rows)


def test_attend_excite_calls_add_conditional_rows_while_updating(pipe):
    params = method_params("attend_excite", {"updates": "2", "refine": "false"})
    with count_model_calls(pipe) as calls:
        run_method(pipe, "attend_excite", _call(seeds=(0, 1)), params)
    # each update: one conditional forward (2 images = 2 rows), then the CFG step (4 rows)
    assert calls.per_call_rows == [2, 4, 2, 4, 4, 4]


def test_z_sampling_rounds_and_inverse_guidance_add_calls(pipe):
    params = method_params("z_sampling", {"zigzag": "1", "rounds": "2", "inv_guidance": "1.5"})
    with count_model_calls(pipe) as calls:
        run_method(pipe, "z_sampling", _call(), params)
    assert calls.per_call_rows == [2, 2] * 2 + [2] * STEPS


# --- one step against the equation --------------------------------------------------------

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_cfgpp_step_is_guided_x0_and_unconditional_renoise(prediction):
    sched = ddim(prediction)
    sched.set_timesteps(10)
    t, t_prev = int(sched.timesteps[3]), int(sched.timesteps[4])
    g = torch.Generator().manual_seed(0)
    x, out_u, out_c = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    ab, ab_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[t_prev]
    lam = 0.6
    sample, model_out = cfgpp_inputs(out_u, out_c, x, ab, lam, prediction)
    got = sched.step(model_out, t, sample, eta=0.0).prev_sample
    if prediction == "v_prediction":  # the branches as epsilon
        out_u, out_c = (ab.sqrt() * o + (1 - ab).sqrt() * x for o in (out_u, out_c))
    eps_lam = out_u + lam * (out_c - out_u)
    x0 = (x - (1 - ab).sqrt() * eps_lam) / ab.sqrt()
    want = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * out_u
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cfgpp_refuses_sample_prediction(sd_components):
    p = AsynDMPipeline(**{**sd_components, "scheduler": ddim("sample")})
    with pytest.raises(ValueError, match="epsilon- or v-prediction"):
        run_method(p, "cfgpp", _call())


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_z_sampling_inversion_is_the_exact_reverse_of_the_ddim_step(prediction):
    sched = ddim(prediction)
    sched.set_timesteps(10)
    t, t_next = sched.timesteps[2], sched.timesteps[3]
    ab_t, ab_next = sched.alphas_cumprod[int(t)], sched.alphas_cumprod[int(t_next)]
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    eps = out if prediction == "epsilon" else ab_t.sqrt() * out + (1 - ab_t).sqrt() * x
    down = sched.step(out, t, x, eta=0.0).prev_sample  # at t_next
    # the same epsilon read at t_next brings the sample back to t
    s_n = (1 - ab_next).sqrt()
    out_next = eps if prediction == "epsilon" else (eps - s_n * down) / ab_next.sqrt()
    back = ddim_invert(out_next, down, ab_next, ab_t, prediction)
    torch.testing.assert_close(back, x, atol=1e-4, rtol=1e-4)
    # diffusers' inverse scheduler agrees when called with t_i (not t_{i+1}, as the official code)
    inv = DDIMInverseScheduler(**{k: v for k, v in sched.config.items()
                                  if k in ("beta_start", "beta_end", "beta_schedule",
                                           "prediction_type", "steps_offset")},
                               clip_sample=False)
    inv.set_timesteps(10)
    theirs = inv.step(out_next, int(t), down).prev_sample
    torch.testing.assert_close(back, theirs, atol=1e-5, rtol=1e-5)
    off_by_one = inv.step(out_next, int(t_next), down).prev_sample
    assert not torch.allclose(off_by_one, x, atol=1e-2)


def test_seg_blur_kernels():
    q = torch.zeros(1, 2, 9, 9)
    q[0, :, 4, 4] = 1.0
    blurred = blur_queries(q, 1.0)  # kernel 7, standard Gaussian of sigma 1
    x = torch.arange(-3, 4, dtype=torch.float32)
    g = torch.exp(-0.5 * x**2)
    g = g / g.sum()
    torch.testing.assert_close(blurred[0, 0, 1:8, 1:8], g[:, None] * g[None, :])
    inf = blur_queries(torch.randn(2, 3, 4, 5), math.inf)
    assert torch.allclose(inf, inf.mean((-2, -1), keepdim=True).expand_as(inf))
    assert blur_queries(q, 100.0).shape == q.shape  # kernel capped at the map size


def test_seg_with_a_vanishing_blur_is_cfg(pipe):
    # sigma 0.01 gives a 1 x 1 kernel: the third branch is the conditional one, c - g = 0
    got = run_method(pipe, "seg", _call(), method_params("seg", {"sigma": "0.01"}))
    np.testing.assert_allclose(got, _dm(pipe), atol=1e-5)


def test_pag_and_seg_step_combines_three_branches(pipe, monkeypatch):
    from diffusers import DDIMScheduler

    for mode, opts in (("pag", {"scale": "2"}), ("seg", {"scale": "2", "sigma": "1"})):
        seen, outs = [], []
        real = DDIMScheduler.step
        monkeypatch.setattr(DDIMScheduler, "step",
                            lambda self, mo, *a, **k: seen.append(mo) or real(self, mo, *a, **k))
        handle = pipe.unet.register_forward_hook(lambda m, a, o: outs.append(o[0]))
        try:
            run_method(pipe, mode, _call(), method_params(mode, opts))
        finally:
            handle.remove()
            monkeypatch.undo()
        u, c, p = outs[0].chunk(3)
        torch.testing.assert_close(seen[0], u + 7.5 * (c - u) + 2 * (c - p))
        assert not torch.allclose(c, p)


def test_s_cfg_rate_by_hand():
    regions = torch.zeros(1, 3, 4, 4)
    regions[:, 0, :, :2] = 1  # token 0 holds the left half
    regions[:, 1, :, 2:] = 1  # token 1 the right half
    fore = regions[:, 1:2].clone()  # the right half is foreground
    delta = torch.zeros(1, 2, 4, 4)
    delta[:, 0, :, :2], delta[:, 0, :, 2:] = 1.0, 2.0  # |c - u|: 1 left, 2 right
    # rate_0 = mean_fore / mean_0 = 2 / 1, rate_1 = 2 / 2; the smoothing keeps the edges
    rate = guidance_rate(delta, regions, fore, 7.5, SCFGParams())
    torch.testing.assert_close(rate[0, 0, :, 0], torch.full((4,), 2.0))
    torch.testing.assert_close(rate[0, 0, :, 3], torch.full((4,), 1.0))
    capped = guidance_rate(delta, regions, fore, 10.0, SCFGParams())  # w rate <= 15
    torch.testing.assert_close(capped[0, 0, :, 0], torch.full((4,), 1.5))


def test_s_cfg_hook_scales_the_guidance_by_the_rate(pipe, monkeypatch):
    import asyndm.methods.s_cfg as s_cfg

    monkeypatch.setattr(s_cfg, "guidance_rate",
                        lambda delta, *a: torch.full_like(delta[:, :1], 2.0))
    got = run_method(pipe, "s_cfg", _call(eta=0.0))
    np.testing.assert_allclose(got, _dm(pipe, guidance=15.0, eta=0.0), atol=2e-4)


def test_attend_excite_loss_by_hand():
    n_text, eot = 5, 6  # tokens 1..5 are text, 6 the end token
    flat = torch.full((1, 16, 8), 0.1)
    loss = excite_loss(flat, [2, 4], eot, (4, 4), ae_kernel())
    torch.testing.assert_close(loss, torch.tensor([1 - 1 / n_text]))
    peaked = flat.clone()
    peaked[0, 5, 2] = peaked[0, 9, 4] = 0.9  # each subject dominates one pixel
    torch.testing.assert_close(excite_loss(peaked, [2, 4], eot, (4, 4), None),
                               torch.tensor([0.0]), atol=1e-6, rtol=0)


def test_attend_excite_updates_raise_the_subject_attention(pipe):
    from asyndm.methods.attend_excite import _Exciter
    from asyndm.methods.common import ProbeStore, prepare, probes

    call = _call()
    inp = prepare(pipe, call)
    ex = _Exciter(pipe, inp.embeds[1:], [2, 5], 6, 1, (8, 8), ae_kernel())
    with torch.enable_grad(), probes(pipe.unet, {1}, ex.store):
        z = inp.latents.detach().requires_grad_(True)
        before = ex.loss(z, inp.timesteps[0])
        after = ex.loss(ex.update(z, before, 20.0), inp.timesteps[0])
    assert isinstance(ex.store, ProbeStore) and after.item() < before.item()


def test_smooth_maps_keeps_constants():
    ones = torch.ones(2, 5, 6)
    torch.testing.assert_close(smooth_maps(ones, ae_kernel(3, 0.5)), ones)


# --- the embedded model (v-prediction, clipped x0, pixel space) ----------------------------

def test_embedded_degenerate_settings_and_costs(embedded):
    prompt = "a red circle to the left of a blue square"
    kw = dict(prompt=prompt, guidance=2.0, subject_positions=((2,), (8,)))
    dm = _dm(embedded, prompt=prompt, guidance=2.0)
    for mode, opts in DEGENERATE:
        got = run_method(embedded, mode, _call(**kw), method_params(mode, opts))
        assert np.array_equal(got, dm), mode
    # v-prediction: lam = 0 goes through the epsilon conversion, equal up to rounding
    got = run_method(embedded, "cfgpp", _call(**kw), method_params("cfgpp", {"lam": "0"}))
    np.testing.assert_allclose(got, _dm(embedded, prompt="", guidance=2.0), atol=1e-4)
    for mode in METHODS:
        img = run_method(embedded, mode, _call(**kw))
        assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()


# --- one-line errors ------------------------------------------------------------------------

@pytest.mark.parametrize("mode,opts,match", [
    ("cfgpp", {"lam": "1.5"}, "lam must be in"),
    ("cfgpp", {"lam": "x"}, "lam='x'"),
    ("cfgpp", {"w": "1"}, "unknown key"),
    ("z_sampling", {"zigzag": "-2"}, "zigzag must be"),
    ("z_sampling", {"rounds": "0"}, "rounds must be"),
    ("s_cfg", {"rate_min": "2", "rate_max": "1"}, "rate_min"),
    ("seg", {"sigma": "0"}, "sigma must be"),
    ("pag", {"scale": "-1"}, "scale must be"),
    ("attend_excite", {"refine": "maybe"}, "true or false"),
])
def test_bad_parameters_are_one_line_errors(mode, opts, match):
    with pytest.raises(ValueError, match=match) as err:
        method_params(mode, opts)
    assert "\n" not in str(err.value)


def test_bad_calls_are_one_line_errors(pipe, sd_components):
    cases = [
        (lambda: method_params("nope"), "unknown method"),
        (lambda: run_method(pipe, "z_sampling", _call(),
                            method_params("z_sampling", {"zigzag": "9"})), "zigzag must be <="),
        (lambda: run_method(pipe, "s_cfg", _call(guidance=1.0)), "guidance must be > 1"),
        (lambda: run_method(pipe, "attend_excite", _call(subject_positions=())), "needs subjects"),
        (lambda: run_method(pipe, "attend_excite", _call(subject_positions=((40,),))),
         "not text tokens"),
        (lambda: run_method(pipe, "pag", _call(), method_params("pag", {"layers": "nowhere"})),
         "pag: Cannot find PAG layer"),
        (lambda: run_method(AsynDMPipeline(**{**sd_components, "scheduler":
                                              EulerDiscreteScheduler.from_config(ddim().config)}),
                            "z_sampling", _call()), "DDIMScheduler"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            fn()
        assert "\n" not in str(err.value)


# --- wiring: registry names, generate / compare, bench variants, store and report -------------

def test_cli_names_repeat_the_registry():
    from asyndm.cli_base import METHOD_NAMES

    assert METHOD_NAMES == tuple(METHODS)


def test_generate_runs_methods_and_records_unused_subjects(tmp_path):
    import json

    from asyndm.cli import main

    out = tmp_path / "gen"
    rc = main(["generate", "--prompt", "a red circle to the left of a blue square",
               "--subjects", "red circle", "blue square", "--mode", "dm",
               "--mode", "cfgpp:lam=0.3", "--mode", "attend_excite:updates=1,refine=false",
               "--steps", "3", "--out", str(out)])
    assert rc == 0
    assert {p.name for p in out.glob("*.png")} == {
        "dm_seed0.png", "cfgpp-lam-0.3_seed0.png", "attend_excite-updates-1-refine-false_seed0.png"}
    modes = json.loads((out / "config.json").read_text())["modes_resolved"]
    assert modes["cfgpp:lam=0.3"]["params"] == {"lam": 0.3}
    assert modes["cfgpp:lam=0.3"]["used_subjects"] is False
    assert modes["attend_excite:updates=1,refine=false"]["used_subjects"] is True
    assert modes["dm"]["model_evals_per_image"] == 6  # 3 steps x [uncond; cond]
    assert modes["attend_excite:updates=1,refine=false"]["model_evals_per_image"] == 7


def test_generate_mode_mistakes_are_one_line(tmp_path, capsys):
    from asyndm.cli import main

    for args, match in ((["--mode", "cfgpp:lam=2"], "lam must be in"),
                        (["--mode", "attend_excite"], "need --subjects"),
                        (["--mode", "asyndm:k=0.2", "--subjects", "circle"], "no KEY=VALUE")):
        assert main(["generate", "--prompt", "a red circle", *args, "--out",
                     str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_bench_variants_of_methods():
    from asyndm.bench.variants import parse_variant

    v = parse_variant("seg:sigma=10,scale=2.50")
    assert v.name == "seg:scale=2.5,sigma=10" and not v.needs_subjects
    assert v.settings() == {"name": v.name, "mode": "seg",
                            "params": {"scale": 2.5, "sigma": 10.0, "layers": "mid"}}
    assert parse_variant("attend_excite").needs_subjects
    assert "params" not in parse_variant("asyndm:k=0.5").settings()  # older stores still match
    for text, match in (("cfgpp:k=0.5", "unknown key"), ("pag:scale=-1", "scale must be"),
                        ("dm:lam=1", "unknown key")):
        with pytest.raises(ValueError, match=match):
            parse_variant(text)


def test_bench_records_model_evals_and_the_report_shows_them(tmp_path):
    import sqlite3

    from asyndm.bench.report import write_report
    from asyndm.bench.runner import BenchConfig, run_bench
    from asyndm.bench.variants import parse_variant

    out = tmp_path / "bench"
    variants = tuple(parse_variant(v) for v in ("dm", "pag", "z_sampling:zigzag=1", "cfgpp"))
    run_bench(BenchConfig(suite="shapes", out=str(out), variants=variants, seeds=1, limit=1,
                          steps=3, batch_size=1, device="cpu"), progress=False)
    with sqlite3.connect(out / "results.sqlite") as db:
        evals = dict(db.execute("SELECT variant, model_evals FROM results"))
        subjects = [r[0] for r in db.execute("SELECT settings FROM results WHERE variant='pag'")]
    # z_sampling: zig 2 + zag 1 + step 2 at step 0, then 2 + 2
    assert evals == {"dm": 6, "pag": 9, "z_sampling:zigzag=1": 9, "cfgpp": 6}
    assert '"subjects": null' in subjects[0]
    text = write_report(out, n_resamples=50).report.read_text()
    assert "| evals / image | s / image |" in text and "| pag | 1 | 9.0 |" in text


@pytest.mark.parametrize("mode,opts", DEGENERATE + [("cfgpp", None)])
def test_sdxl_methods_run_and_degenerate_to_dm(sdxl_components, mode, opts):
    p = AsynDMXLPipeline(**sdxl_components)
    p.set_progress_bar_config(disable=True)
    dm = p(PROMPT, num_inference_steps=2, guidance_scale=5.0, output_type="np",
           generator=[torch.Generator().manual_seed(0)]).images
    call = _call(steps=2, guidance=5.0, eta=None)
    if opts is not None:  # cfgpp has no setting that is DM (lam = 0 is unconditional DDIM)
        assert np.array_equal(run_method(p, mode, call, method_params(mode, opts)), dm)
    with count_model_calls(p) as calls:
        image = run_method(p, mode, call)
    assert calls.counted and image.shape == dm.shape and np.isfinite(image).all()
    assert not np.array_equal(image, dm)

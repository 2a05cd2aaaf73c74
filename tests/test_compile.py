"""``asyndm.compile_denoiser``: AsynDM under ``torch.compile`` compiles once per configuration,
never from step to step, and computes what eager AsynDM does."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import asyndm
from asyndm.pipeline import AsynDMPipeline

PROMPT = "a cat eating a sandwich"


def _pipe(sd_components):
    pipe = AsynDMPipeline(**sd_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, mode, steps=6):
    subjects = None if mode == "dm" else ["cat", "sandwich"]
    return pipe(PROMPT, subjects=subjects, k=[0.5, 0.3], mode=mode, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


@torch.no_grad()
def test_compiled_asyndm_compiles_once_and_matches_eager(sd_components):
    pipe = _pipe(sd_components)
    eager = {m: _run(pipe, m) for m in ("dm", "asyndm")}
    counter = CompileCounter()  # runs each captured graph as traced, counting graphs
    asyndm.compile_denoiser(pipe, "default", backend=counter)
    dm = _run(pipe, "dm")
    after_dm = counter.frame_count
    first = _run(pipe, "asyndm")
    after_first = counter.frame_count
    longer = _run(pipe, "asyndm", steps=9)  # other maps at every step: nothing new to compile
    assert after_dm == 1
    # the map path, and the model's own path with the adapters installed (the last step)
    assert after_first == after_dm + 2
    assert counter.frame_count == after_first
    torch.testing.assert_close(dm, eager["dm"], rtol=0, atol=1e-6)
    torch.testing.assert_close(first, eager["asyndm"], rtol=0, atol=1e-6)
    assert longer.shape == first.shape
    asyndm.compile_denoiser(pipe, "off")
    assert "forward" not in pipe.unet.__dict__
    assert torch.equal(_run(pipe, "asyndm"), eager["asyndm"])


def test_compile_modes_are_checked(sd_components):
    pipe = _pipe(sd_components)
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        asyndm.compile_denoiser(pipe, "fast")
    with pytest.raises(ValueError, match="has no unet"):
        asyndm.compile_denoiser(object(), "default")
    asyndm.compile_denoiser(pipe, "default", backend="eager")
    compiled = pipe.unet.forward
    asyndm.compile_denoiser(pipe, "off")
    asyndm.compile_denoiser(pipe, "off")  # already eager
    assert "forward" not in pipe.unet.__dict__
    asyndm.compile_denoiser(pipe, "default", backend="eager")  # the kept compiled forward
    assert pipe.unet.forward is compiled


def test_generate_compiles_the_denoiser_it_loads(monkeypatch, tmp_path):
    from asyndm import generate

    seen = []
    monkeypatch.setattr(generate, "compile_denoiser", lambda pipe, mode: seen.append(mode))
    cfg = generate.GenerateConfig(prompt="a red circle", subjects=("circle",), steps=2,
                                  modes=("dm",), out=str(tmp_path / "run"), compile="default")
    generate.run_modes(cfg)
    assert seen == ["default"]
    with pytest.raises(ValueError, match="unknown compile mode"):
        generate.GenerateConfig(prompt="a red circle", compile="fast")

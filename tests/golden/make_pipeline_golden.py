"""Pin AsynDM outputs of the tiny SD / SDXL pipelines (run once, from the repo root).

    python tests/golden/make_pipeline_golden.py tests/golden/pipeline_v1.safetensors

Written at commit 20b60fb (the re-implemented ``__call__``, before AsynDM moved into
diffusers' own pipelines), so tests can check that the new path reproduces the old one.
Each entry is the final latents ``(B, 4, h, w)`` and the timestep maps ``(N, B, h, w)`` of
one case of :data:`CASES`; the tiny models are the ones ``tests/conftest.py`` builds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import WORDS, tiny_text_encoder, tiny_unet, tiny_vae, ddim  # noqa: E402

from asyndm.shapes.tokenizer import write_clip_tokenizer  # noqa: E402

PROMPT = "a cat eating a sandwich"
CASES = {
    "sd_quadratic_dynamic_eta1": dict(subjects=["cat", "sandwich"], k=[0.6, 0.3], eta=1.0,
                                      num_inference_steps=4),
    "sd_exponential_dynamic_eta0": dict(subjects=["cat", "sandwich"], k=[0.4, 0.3], eta=0.0,
                                        curve="exponential", num_inference_steps=5),
    "sd_piecewise_static_eta1": dict(subjects=["sandwich"], k=0.5, eta=1.0, curve="piecewise",
                                     mask_mode="static", num_inference_steps=6),
    "sd_dm_concave_eta1": dict(subjects=["cat"], k=0.5, eta=1.0, mode="dm_concave",
                               num_inference_steps=4),
    "sdxl_quadratic_dynamic_eta1": dict(subjects=["cat"], k=0.5, eta=1.0,
                                        num_inference_steps=3, height=32, width=32),
}


def build(tmp: Path):
    tok = write_clip_tokenizer(WORDS, tmp, model_max_length=77)
    from asyndm.pipeline import AsynDMPipeline, AsynDMXLPipeline

    sd = AsynDMPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(tok), tokenizer=tok,
                        unet=tiny_unet(), scheduler=ddim(), safety_checker=None,
                        feature_extractor=None)
    xl = AsynDMXLPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(tok), tokenizer=tok,
                          text_encoder_2=tiny_text_encoder(tok, projection=True, seed=1),
                          tokenizer_2=tok, unet=tiny_unet(sdxl=True), scheduler=ddim())
    for p in (sd, xl):
        p.set_progress_bar_config(disable=True)
    return sd, xl


def run_case(sd, xl, name: str) -> dict[str, torch.Tensor]:
    pipe = xl if name.startswith("sdxl") else sd
    kw = dict(CASES[name])
    kw.setdefault("mode", "asyndm")
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent",
               return_timestep_maps=True, **kw)
    latents = out.images if torch.is_tensor(out.images) else torch.as_tensor(out.images)
    return {f"{name}.latents": latents.float().contiguous(),
            f"{name}.timestep_maps": out.timestep_maps.contiguous()}


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        sd, xl = build(Path(d))
        tensors = {}
        for case in CASES:
            tensors.update(run_case(sd, xl, case))
    save_file(tensors, sys.argv[1])
    print(f"wrote {len(tensors)} tensors to {sys.argv[1]}")

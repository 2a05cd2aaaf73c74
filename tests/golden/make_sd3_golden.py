"""Pin AsynDM outputs of the tiny SD3 pipeline (run once, from the repo root).

    python tests/golden/make_sd3_golden.py tests/golden/pipeline_sd3_v1.safetensors

Written with the source of commit 20b60fb (``AsynDMSD3Pipeline`` with its own sampling loop,
``asyndm.flow.sample_flow``), before SD3 moved into diffusers' own ``__call__``: run with
``PYTHONPATH`` pointing at that commit's ``src``. The tiny models are ``tests/conftest.py``'s.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from conftest import (WORDS, flow_scheduler, tiny_sd3_vae, tiny_text_encoder,  # noqa: E402
                      tiny_transformer)

from asyndm.shapes.tokenizer import write_clip_tokenizer  # noqa: E402

PROMPT = "a cat eating a sandwich"
RUN = dict(num_inference_steps=4, guidance_scale=5.0, max_sequence_length=8)
CASES = {
    "sd3_quadratic_dynamic": dict(subjects=["cat", "sandwich"], k=[0.6, 0.3]),
    "sd3_exponential_static": dict(subjects=["sandwich"], k=0.5, curve="exponential",
                                   mask_mode="static"),
    "sd3_dm_concave": dict(subjects=["cat"], k=0.5, mode="dm_concave"),
}


def build(tmp: Path):
    from asyndm.pipeline_sd3 import AsynDMSD3Pipeline

    tok = write_clip_tokenizer(WORDS, tmp, model_max_length=77)
    pipe = AsynDMSD3Pipeline(
        transformer=tiny_transformer(), scheduler=flow_scheduler(), vae=tiny_sd3_vae(),
        text_encoder=tiny_text_encoder(tok, projection=True, seed=1), tokenizer=tok,
        text_encoder_2=tiny_text_encoder(tok, projection=True, seed=2), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_case(pipe, name: str) -> dict[str, torch.Tensor]:
    kw = {**RUN, **CASES[name]}
    kw.setdefault("mode", "asyndm")
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent",
               return_timestep_maps=True, **kw)
    return {f"{name}.latents": out.images.float().contiguous(),
            f"{name}.timestep_maps": out.timestep_maps.float().contiguous()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        pipe = build(Path(d))
        tensors = {}
        for case in CASES:
            tensors.update(run_case(pipe, case))
    save_file(tensors, sys.argv[1])
    print(f"wrote {len(tensors)} tensors to {sys.argv[1]}")

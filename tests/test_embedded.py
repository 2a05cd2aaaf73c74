"""The shipped model: loads through the pipeline, generates, and the demo runs end to end."""

import json

import numpy as np
import torch
from PIL import Image

from asyndm.cli import main
from asyndm.loading import EMBEDDED_MODEL_DIR, load_pipeline
from asyndm.shapes.world import parse_prompt
from asyndm.demo import DEMO_PROMPTS


def test_embedded_model_is_shipped_small_and_safetensors_only():
    files = [p for p in EMBEDDED_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 1024 * 1024
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    index = json.loads((EMBEDDED_MODEL_DIR / "model_index.json").read_text())
    assert index["vae"] == [None, None]


def test_embedded_model_generates_through_the_pipeline():
    pipe = load_pipeline(None, progress=False)
    assert pipe.vae is None and pipe.scheduler.config.clip_sample
    out = pipe("a red circle to the left of a blue square", subjects=["red circle", "blue square"],
               k=0.3, mode="asyndm", num_inference_steps=3, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    img = out.images[0]
    assert img.shape == (32, 32, 3) and np.isfinite(img).all() and img.std() > 0.01


def test_demo_prompts_are_in_the_grammar():
    for prompt, subjects in DEMO_PROMPTS:
        spec = parse_prompt(prompt)
        assert tuple(spec.subjects) == subjects


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    grid = Image.open(tmp_path / "compare.png")
    assert grid.width >= 3 * 160 and grid.height >= 4 * 160
    for i in range(len(DEMO_PROMPTS)):
        assert Image.open(tmp_path / f"timesteps_{i}.gif").n_frames == 2

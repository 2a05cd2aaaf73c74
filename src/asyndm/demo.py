"""``asyndm demo``: DM | DM_concave | AsynDM on the embedded model, in seconds on a CPU.

Four ShapesBench prompts are generated as one batch per mode (every image from its own
seeded generator, so the three modes share their noise), then written as a comparison grid
(one row per prompt, with the exact scorer's verdict under each image) and one animation per
prompt of AsynDM's timestep map and regions over the steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from .generate import MIN_STEPS, check_out_dir
from .loading import EMBEDDED_GUIDANCE, label_progress, load_pipeline
from .sampler import MODES, StepRecord
from .viz import comparison_grid, mode_titles, save_timestep_animation

DEMO_PROMPTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a red circle to the left of a blue square", ("red circle", "blue square")),
    ("a yellow triangle and a green diamond on a striped background",
     ("yellow triangle", "green diamond")),
    ("three red circles on a plain background", ("red circles",)),
    ("a square the same colour as the circle", ("square", "circle")),
)
DEMO_K = 0.3
DEMO_GUIDANCE = EMBEDDED_GUIDANCE


def _verdicts(images: list[Image.Image], prompts: list[str]) -> list[str]:
    """The exact scorer's verdict per image ('' if the prompt is outside the grammar)."""
    from .shapes.score import score
    from .shapes.grammar import parse_prompt

    out = []
    for img, prompt in zip(images, prompts):
        try:
            out.append("ok" if score(img, parse_prompt(prompt)).correct else "wrong")
        except ValueError:
            out.append("")
    return out


def run_demo(
    out: str | Path = "out/demo", steps: int = 25, device: str = "cpu", seed: int = 0,
    model: str | None = None,
) -> list[Path]:
    """Write ``compare.png`` and ``timesteps_<i>.gif`` into ``out``; return the paths."""
    out = Path(out)
    if steps < MIN_STEPS:
        raise ValueError(f"steps must be >= {MIN_STEPS}, got {steps}")
    check_out_dir(out, overwrite=True)  # the demo's files replace the last demo's
    pipe = load_pipeline(model, device)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [p for p, _ in DEMO_PROMPTS]
    subjects = [list(s) for _, s in DEMO_PROMPTS]
    images: dict[str, list[Image.Image]] = {}
    records: list[StepRecord] = []
    for mode in MODES:
        label_progress(pipe, f"demo: {mode}, {len(prompts)} prompts, denoising steps")
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        images[mode] = pipe(
            prompts, subjects=subjects, k=DEMO_K, mode=mode, num_inference_steps=steps,
            guidance_scale=DEMO_GUIDANCE, eta=1.0, generator=gens,
            callback=records.append if mode == "asyndm" else None,
        ).images
    verdicts = {m: _verdicts(images[m], prompts) for m in MODES}
    rows = [[images[m][i] for m in MODES] for i in range(len(prompts))]
    captions = [[f"scorer: {verdicts[m][i]}" if verdicts[m][i] else "" for m in MODES]
                for i in range(len(prompts))]
    titles = [f"seed {seed + i}: {p}  [subjects: {', '.join(s)}]"
              for i, (p, s) in enumerate(DEMO_PROMPTS)]
    which = f"the embedded model {Path(pipe.name_or_path).name}" if model else "the embedded model"
    header = (f"asyndm demo: {which} draws 32x32 images (shown enlarged); "
              f"{steps} DDIM steps, guidance {DEMO_GUIDANCE}; the three modes of a row share "
              "their noise; scorer = the exact ShapesBench check of the prompt")
    grid = comparison_grid(rows, mode_titles(str(DEMO_K)), titles, cell=160,
                           captions=captions, header=header)
    paths = [out / "compare.png"]
    tmp = paths[0].with_name("compare.png.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, paths[0])
    for i, (prompt, subs) in enumerate(DEMO_PROMPTS):
        paths.append(save_timestep_animation(records, out / f"timesteps_{i}.gif", index=i,
                                             title=f"AsynDM, seed {seed + i}: {prompt}",
                                             label_names=list(subs)))
    return paths

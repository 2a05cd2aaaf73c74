"""Region repair / editing (issue 14): the baselines, the offending-object mask, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from asyndm.cli import main
from asyndm.pipeline import AsynDMPipeline
from asyndm.repair import (RepairConfig, generate_with_latents, offending_mask, outside_change,
                           redraw)
from asyndm.shapes.grammar import parse_prompt
from asyndm.shapes.score import score

PROMPT = "a cat eating a sandwich"


@pytest.fixture(scope="module")
def pipe(sd_components):
    p = AsynDMPipeline(**sd_components)
    p.set_progress_bar_config(disable=True)
    return p


def square(size=32, lo=8, hi=24):
    m = np.zeros((size, size), np.uint8)
    m[lo:hi, lo:hi] = 255
    return m


def test_inpainting_keeps_the_outside_and_asyndm_redraws_the_region(pipe):
    cfg = RepairConfig(steps=4, guidance=7.5)
    before, latents = generate_with_latents(pipe, PROMPT, 0, cfg)
    again = pipe(PROMPT, num_inference_steps=4, eta=1.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(before), np.asarray(again))  # the DM image of the seed
    mask = square()
    inpainted = redraw(pipe, "inpaint", PROMPT, 0, mask, cfg, latents)
    # the last step puts the original latents back outside the mask; the VAE's decoder
    # mixes neighbouring latents, so pixels next to the mask may move a little
    far = np.zeros_like(mask)
    far[2:30, 2:30] = 255
    assert outside_change(before, inpainted, far) < 2.0
    assert outside_change(before, inpainted, mask) < outside_change(
        before, redraw(pipe, "reseed", PROMPT, 0, mask, cfg), mask)
    repaired = redraw(pipe, "asyndm", PROMPT, 0, mask, cfg)
    assert not np.array_equal(np.asarray(repaired), np.asarray(before))


def test_the_offending_mask_covers_the_extra_object():
    from asyndm.shapes.render import render
    from asyndm.shapes.world import Background, Scene, SceneObject

    scene = Scene(Background("plain", ("white", "white")), (
        SceneObject("circle", "red", 8.0, 8.0, 16.0), SceneObject("square", "blue", 8.0,
                                                                  24.0, 16.0)))
    image = render([scene])[0]  # (3, 32, 32) in [0, 1]
    spec = parse_prompt("a red circle")
    result = score(image, spec)
    assert not result.correct
    mask = offending_mask(result, spec, dilate=0)
    assert mask is not None and mask[16, 24] == 255 and mask[16, 8] == 0
    assert offending_mask(score(image, parse_prompt("a red circle and a blue square")),
                          parse_prompt("a red circle and a blue square")) is None


def test_cli_refuses_bad_masks_in_one_line_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(empty)
    junk = tmp_path / "junk.png"
    junk.write_text("no image")
    grey = tmp_path / "grey.png"
    Image.fromarray(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)).save(grey)
    two = tmp_path / "two.png"
    m = square()
    m[0:4, 0:4] = 100
    Image.fromarray(m).save(two)
    out = tmp_path / "out"
    for mask, extra, message in [
        (empty, [], "is empty"), (junk, [], "cannot read it as an image"),
        (grey, [], "distinct values"), (two, ["--k", "0.5", "0.3", "0.2"], "2 region"),
        (two, ["--k", "1.5"], "k in"),
    ]:
        code = main(["repair", "--prompt", "a red circle", "--seed", "0", "--mask", str(mask),
                     "--out", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (mask, err)
        assert not out.exists()


@pytest.mark.slow
def test_cli_repair_and_edit_on_the_embedded_model(tmp_path, capsys):
    mask = tmp_path / "mask.png"
    Image.fromarray(square(32, 4, 20)).save(mask)
    code = main(["repair", "--prompt", "a red circle", "--seed", "3", "--mask", str(mask),
                 "--steps", "3", "--out", str(tmp_path / "r"), "--threads", "1"])
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == ["asyndm.png", "before.png", "compare.png", "config.json", "inpaint.png",
                     "mask.png", "reseed.png"]
    code = main(["edit", "--source-prompt", "a red circle", "--prompt", "a blue circle",
                 "--seed", "3", "--mask", str(mask), "--steps", "3", "--methods", "asyndm",
                 "--out", str(tmp_path / "e"), "--threads", "1"])
    assert code == 0 and (tmp_path / "e" / "asyndm.png").is_file()

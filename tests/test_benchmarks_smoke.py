"""Smoke tests of the benchmark scripts on tiny models: they run and report their ratios.

No timing is asserted here; the speed and memory targets are checked by running the
benchmarks themselves (see benchmarks/README.md).
"""

import sys
from pathlib import Path

import pytest
import torch

from asyndm.adapters.attention import AttentionCapture
from asyndm.adapters.unet import PerPixelTimestep
from conftest import tiny_unet

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_embedded  # noqa: E402
import bench_sd21  # noqa: E402
import profile_overhead  # noqa: E402
from naive import NaiveAttentionCapture, NaivePerPixelTimestep  # noqa: E402

RATIO_FIELDS = {"step", "total", "step_cpu", "total_cpu", "peak_mem", "work_mem"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run many tiny operators: on a busy 2-core machine two OpenMP threads
    spin-wait for each other at every one of them (seconds per test instead of a fraction)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_ratios(results: dict, names: set[str]) -> None:
    assert set(results["ratios"]) == names
    for ratio in results["ratios"].values():
        assert set(ratio) == RATIO_FIELDS
        assert ratio["step"] > 0 and ratio["total"] > 0 and ratio["peak_mem"] > 0


def test_bench_sd21_runs_on_tiny_unet():
    results = bench_sd21.main(["--resolution", "128", "--steps", "4", "--repeats", "1",
                               "--naive", "--no-warmup"], unet=tiny_unet())
    _check_ratios(results, {"asyndm/dm", "naive/dm"})
    assert set(results["modes"]) == {"dm", "asyndm", "naive"}
    # step 2 of a 4-step AsynDM run is its first per-pixel (non-uniform) map
    assert results["distinct_timesteps"]["dm"] == [1, 1, 1, 1]
    assert results["distinct_timesteps"]["asyndm"][2] > 1


def test_bench_sd21_interleaves_compiled_modes():
    results = bench_sd21.main(["--resolution", "128", "--steps", "4", "--repeats", "1",
                               "--compile", "default", "--compile-backend", "eager"],
                              unet=tiny_unet())
    _check_ratios(results, {"asyndm/dm", "dm-c/dm", "asyndm-c/dm", "asyndm-c/dm-c"})
    assert results["compile"] == "default"


def test_compile_check_compiles_once_per_kind_of_step():
    import compile_check

    rows = compile_check.main(["--backend", "eager", "--steps", "3"])
    assert rows["dm"]["graphs"] == 1 and rows["asyndm"]["graphs"] == 3
    assert rows["asyndm again"]["graphs"] == rows["asyndm, 8 steps"]["graphs"] == 3
    assert rows["asyndm"]["max_diff"] < 1e-5  # the eager backend runs the traced graph as is


def test_bench_embedded_runs_on_tiny_random_model():
    results = bench_embedded.main(["--model", "random", "--size", "tiny", "--steps", "3",
                                   "--repeats", "1", "--no-warmup"])
    _check_ratios(results, {"asyndm/dm"})
    assert results["model"].startswith("random-init 'tiny'")


def test_profile_overhead_counts_operators_and_syncs_on_tiny_unet():
    rows = profile_overhead.main(["--resolution", "128", "--iters", "1", "--compile", "default",
                                  "--compile-backend", "eager"], unet=tiny_unet())
    assert set(rows) == {*profile_overhead.VARIANTS, "loop dm", "loop asyndm", "pipeline dm",
                         "pipeline asyndm", "compiled dm", "compiled asyndm"}
    # capture adds operators to the plain UNet call; the naive adapters add the most
    assert rows["dm"]["aten_ops"] < rows["capture"]["aten_ops"] < rows["naive"]["aten_ops"]
    assert rows["asyndm"]["kernels"] < rows["naive"]["kernels"]
    dm, asyn = rows["pipeline dm"], rows["pipeline asyndm"]
    assert asyn["first_aten_ops"] > asyn["aten_ops"]  # the run's one-off work
    # DM's DDIM step reads two host flags per step; AsynDM's step reads one in their place
    assert dm["syncs"] == 2 and asyn["syncs"] <= dm["syncs"] + 1
    # compiled: DM one graph; AsynDM its map path and the model's own path (the last step);
    # nothing compiled again for other maps at other steps
    assert rows["compiled dm"]["graphs"] == 1 and rows["compiled asyndm"]["graphs"] == 2
    assert rows["compiled dm"]["recompiled"] == rows["compiled asyndm"]["recompiled"] == 0


@pytest.mark.parametrize("level", [None, 1])
def test_naive_adapters_compute_what_ours_compute(level):
    unet = tiny_unet()
    x = torch.randn(2, 4, 16, 16)
    embeds = torch.randn(2, 77, 32)
    t_map = torch.full((2, 16, 16), 800)
    t_map[:, 3:11, 5:13] = 650  # a subject region lagging behind
    positions = torch.tensor([[2, 5]])
    with torch.no_grad():
        before = unet(x, torch.tensor(800), encoder_hidden_states=embeds).sample
        outs = []
        for capture_cls, hooks_cls in ((AttentionCapture, PerPixelTimestep),
                                       (NaiveAttentionCapture, NaivePerPixelTimestep)):
            with capture_cls(unet, (16, 16), level) as capture, hooks_cls(unet):
                capture.start(positions, slice(1, 2))
                out = unet(x, t_map, encoder_hidden_states=embeds).sample
                outs.append((out, capture.stop()))
        after = unet(x, torch.tensor(800), encoder_hidden_states=embeds).sample
    (ours, ours_maps), (naive, naive_maps) = outs
    torch.testing.assert_close(naive, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(naive_maps, ours_maps, rtol=1e-4, atol=1e-6)
    assert torch.equal(after, before)  # both restore the UNet's own processors, no hooks left

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from asyndm.schedules import CURVES, FINAL_STATE, SchedulePlan, advance, state_trajectory

# the reference implementation's vectors; provenance in tests/data/README.md
REFERENCE = Path(__file__).resolve().parent / "data" / "schedule_vectors.json"
REF_NAMES = {"bin": "quadratic", "lin": "piecewise", "exp": "exponential"}


def sd_scheduler(**kw) -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, steps_offset=1, **kw)


def reference_cases():
    cases = json.loads(REFERENCE.read_text())["cases"]
    for key, vec in cases.items():
        curve, steps, k = key.split("/")
        yield key, REF_NAMES[curve], int(steps.split("=")[1]), float(k.split("=")[1]), vec


@pytest.mark.parametrize("case", list(reference_cases()), ids=lambda c: c[0])
def test_curves_equal_reference_vectors(case):
    _, curve, steps, k, vec = case
    plan = SchedulePlan.from_scheduler(sd_scheduler(), steps, curve)
    traj = state_trajectory(plan, k)
    # the reference iterates in float32, we in float64: agree to float32 round-off
    assert traj["region"] == pytest.approx(vec["region"], abs=1e-3)
    assert traj["background"] == pytest.approx(vec["background"], abs=1e-3)


@pytest.mark.parametrize("steps", [1, 7, 20, 30, 50, 999])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_background_is_the_scheduler_ladder(steps, spacing):
    sched = sd_scheduler(timestep_spacing=spacing)
    plan = SchedulePlan.from_scheduler(sched, steps, "quadratic")
    sched.set_timesteps(steps)
    s = torch.full((1,), plan.initial, dtype=torch.float32)
    states = []
    for i in range(-1, steps):
        s = advance(plan, s, i, torch.zeros(1))
        states.append(float(s[0]))
    # the model sees the rounded states: exactly the ladder (on a uniform ladder the states
    # follow the reference's float32 linear re-solve, within round-off of it)
    assert [round(x) for x in states[:-1]] == [int(t) for t in sched.timesteps]
    assert states[:-1] == pytest.approx([float(t) for t in sched.timesteps], abs=1e-3)
    assert states[-1] == FINAL_STATE


@pytest.mark.parametrize("curve", sorted(CURVES))
def test_k_validation_names_the_allowed_range(curve):
    plan = SchedulePlan.from_scheduler(sd_scheduler(), 50, curve)
    for bad in (0.0, -0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"allowed 0 < k <= 0\.\d{3}"):
            plan.validate_k(bad)
    plan.validate_k(0.5)
    k_max = plan.max_k()
    assert round(plan.region_first_state(k_max)) <= 999
    if k_max < 0.999:
        assert round(plan.region_first_state(min(k_max + 0.01, 0.999))) > 999
        with pytest.raises(ValueError, match="50 steps"):
            plan.validate_k(min(k_max + 0.01, 0.999))


def test_quadratic_bound_at_50_steps():
    # first state 1 + 1000 (1 - 1/50)(1 + k/50) <= 999.5  <=>  k <= 0.9439
    plan = SchedulePlan.from_scheduler(sd_scheduler(), 50, "quadratic")
    assert plan.max_k() == pytest.approx(0.94388, abs=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    curve=st.sampled_from(sorted(CURVES)),
    steps=st.integers(min_value=1, max_value=60),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    switch_prob=st.floats(min_value=0.0, max_value=1.0),
)
def test_any_mask_switching_is_monotone_bounded_and_ends_on_time(curve, steps, seed, switch_prob):
    plan = SchedulePlan.from_scheduler(sd_scheduler(), steps, curve)
    g = torch.Generator().manual_seed(seed)
    k_choices = torch.tensor([0.0, 0.2, 0.5, min(0.8, plan.max_k())])
    k_map = k_choices[torch.randint(0, 4, (2, 6, 5), generator=g)]
    state = torch.full((2, 6, 5), plan.initial)
    state = advance(plan, state, -1, k_map)
    assert float(state.max()) <= 999.5
    for i in range(steps):
        assert float(state.min()) >= plan.target
        if i == steps - 1:
            assert torch.all(state == plan.target)
        switch = torch.rand(state.shape, generator=g) < switch_prob
        k_map = torch.where(switch, k_choices[torch.randint(0, 4, state.shape, generator=g)], k_map)
        nxt = advance(plan, state, i, k_map)
        assert torch.all(nxt <= state)
        assert float(nxt.min()) >= 0.0 and float(nxt.max()) <= 999.5
        state = nxt
    assert torch.all(state == FINAL_STATE)

"""Learning-rate schedules (acctattr/schedules.py)."""

from __future__ import annotations

import math

import pytest
import torch

from acctattr.runs.manifest import LrSpec
from acctattr.runs.schedules import interpolate_logged_lrs, lrs_from_spec, schedule_lrs


def test_warmup_starts_at_zero_and_rises_linearly():
    """During warmup lr_s = base * s / W, so step 0 has lr 0 and step W has the full base."""
    lrs = schedule_lrs("constant", 10, base=0.4, warmup=4)
    assert lrs[:5] == [0.0, 0.1, 0.2, pytest.approx(0.3), 0.4]
    assert lrs[4:] == [0.4] * 6


def test_constant():
    """A constant schedule without warmup gives base at every step."""
    assert schedule_lrs("constant", 5, base=0.3) == [0.3] * 5


def test_linear_at_exact_steps():
    """linear decays as min + (base - min) * (T - s) / (T - W) after warmup."""
    lrs = schedule_lrs("linear", 12, base=1.0, warmup=2, minimum=0.2)
    assert len(lrs) == 12
    assert lrs[0] == 0.0 and lrs[1] == 0.5
    assert lrs[2] == pytest.approx(1.0)  # first step after warmup: the full base
    for s in range(2, 12):
        assert lrs[s] == pytest.approx(0.2 + 0.8 * (12 - s) / 10)
    assert lrs[11] == pytest.approx(0.28)


def test_cosine_endpoints_and_midpoint():
    """cosine starts at base after warmup, is halfway at mid-decay and ends one step above min."""
    T, W, base, lo = 22, 2, 0.5, 0.1
    lrs = schedule_lrs("cosine", T, base=base, warmup=W, minimum=lo)
    assert lrs[W] == pytest.approx(base)
    assert lrs[W + (T - W) // 2] == pytest.approx((base + lo) / 2)
    assert lrs[-1] == pytest.approx(lo + (base - lo) * (1 + math.cos(math.pi * 19 / 20)) / 2)
    assert all(a >= b for a, b in zip(lrs[W:], lrs[W + 1:], strict=False))


def test_cosine_matches_torch_scheduler():
    """After warmup, cosine equals torch's CosineAnnealingLR with T_max = T - W."""
    T, W, base, lo = 30, 5, 0.2, 0.01
    ours = schedule_lrs("cosine", T, base=base, warmup=W, minimum=lo)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T - W, eta_min=lo)
    ref = []
    for _ in range(T - W):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert ours[W:] == pytest.approx(ref, rel=1e-12)


def test_unknown_schedule_raises():
    """A schedule name outside constant/linear/cosine is a ValueError, not a silent constant."""
    with pytest.raises(ValueError, match="step"):
        schedule_lrs("step", 3, base=0.1)


def test_lrs_from_spec_number_list_schedule():
    """A number repeats, a list is taken as-is, a schedule dict goes through its formula."""
    assert lrs_from_spec(LrSpec(value=0.2), 3) == [0.2, 0.2, 0.2]
    assert lrs_from_spec(LrSpec(values=(0.1, 0.3, 0.2)), 3) == [0.1, 0.3, 0.2]
    spec = LrSpec(schedule="linear", base=1.0, warmup=1, min=0.0)
    assert lrs_from_spec(spec, 3) == schedule_lrs("linear", 3, 1.0, 1, 0.0)
    with pytest.raises(ValueError):
        lrs_from_spec(LrSpec(values=(0.1, 0.2)), 3)


def test_logged_points_are_exact_and_between_are_interpolated():
    """Logged steps keep their lr; steps between two log points are linearly interpolated."""
    logged = [(20, 2.0), (10, 1.0), (30, 0.0)]  # any order
    lrs, guessed = interpolate_logged_lrs(logged, first_step=10, steps=21)
    assert lrs[0] == 1.0 and lrs[10] == 2.0 and lrs[20] == 0.0
    assert lrs[5] == pytest.approx(1.5)
    assert lrs[13] == pytest.approx(1.4)
    assert guessed == 21 - 3


def test_steps_outside_the_log_take_the_nearest_logged_value():
    """Before the first or after the last log point the nearest logged lr is used and counted."""
    lrs, guessed = interpolate_logged_lrs([(10, 1.0), (12, 3.0)], first_step=7, steps=9)
    assert lrs == [1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0]
    assert guessed == 7


def test_fully_logged_stage_has_nothing_guessed():
    """A stage whose every step was logged is returned exactly with zero guesses."""
    logged = [(s, 0.01 * s) for s in range(100)]
    lrs, guessed = interpolate_logged_lrs(logged, first_step=40, steps=10)
    assert lrs == [0.01 * s for s in range(40, 50)]
    assert guessed == 0


def test_no_log_points_raises():
    """An empty log is a ValueError."""
    with pytest.raises(ValueError):
        interpolate_logged_lrs([], 0, 3)

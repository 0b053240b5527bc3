"""The Adam flow's batch-noise scale c, fitted to the recorded second moment: the linear fit
(clip factors held at c = 0) and the clipped one (each substep's clip factor falling as c
grows), on second moments made by the model they fit."""

from __future__ import annotations

import math

import pytest
import torch

from acctattr.estimators.unrolled.noise import (
    ClipRecord,
    _sample,
    fit_clipped_noise,
    fit_noise,
)

P, SUBSTEPS = 3000, 12


def _substeps(gain: float, seed: int = 0):
    """SUBSTEPS random (g, S, w, theta) over P coordinates; ``gain`` scales g (and so how
    hard a given tau clips it)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for q in range(SUBSTEPS):
        g = torch.randn(P, dtype=torch.float64, generator=gen) * gain * (1 + q / SUBSTEPS)
        s = torch.rand(P, dtype=torch.float64, generator=gen) * 2.0
        theta = torch.randn(P, dtype=torch.float64, generator=gen)
        w = torch.tensor(0.999 ** (SUBSTEPS - q) * 0.05, dtype=torch.float64)
        out.append((g, s, w, theta))
    return out


def _v_end(substeps, tau: float, c: float, lam: float, v_start: torch.Tensor,
           keep: float) -> torch.Tensor:
    """The second moment the clipped model leaves at batch-noise scale c."""
    v = keep * v_start
    for g, s, w, theta in substeps:
        rho = min(1.0, tau / math.sqrt(float(g.square().sum()) + c * float(s.sum())))
        v = v + w * ((rho * g + lam * theta).square() + c * rho * rho * s)
    return v


def _record(substeps, tau: float, lam: float, positive: torch.Tensor) -> ClipRecord:
    record = ClipRecord(positive, tau)
    for g, s, w, theta in substeps:
        record.add((float(g.square().sum()), float(s.sum())), g, s,
                   torch.tensor(lam, dtype=torch.float64), theta, w)
    return record


def _linear_sums(substeps, tau: float, lam: float):
    """fit_noise's inputs: w (rho0 g + lam theta)^2 and w rho0^2 S summed, rho0 at c = 0."""
    squares = torch.zeros(P, dtype=torch.float64)
    spread = torch.zeros(P, dtype=torch.float64)
    for g, s, w, theta in substeps:
        rho = min(1.0, tau / math.sqrt(float(g.square().sum())))
        squares += w * (rho * g + lam * theta).square()
        spread += w * rho * rho * s
    return squares, spread


@pytest.mark.parametrize("lam", [0.0, 0.01])
def test_the_clipped_fit_recovers_c_where_the_mean_gradient_alone_is_clipped(lam):
    """Under hard clipping (|g|^2 3-12 tau^2 here, and c sum(S) about |g|^2, as in the
    Llama sample's sft: README "Fidelity") the recorded v hardly grows with c: holding the
    clip factors at c = 0 the linear fit misses c by far, while the clipped fit finds it."""
    substeps = _substeps(gain=0.11)
    tau, c_true, keep = 3.5, 0.03, 0.5
    v_start = torch.rand(P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v_end = _v_end(substeps, tau, c_true, lam, v_start, keep)
    positive = torch.ones(P, dtype=torch.bool)
    keep_t = torch.tensor(keep, dtype=torch.float64)
    c = fit_clipped_noise(_record(substeps, tau, lam, positive), v_start, keep_t, v_end)
    assert c == pytest.approx(c_true, rel=1e-4)
    squares, spread = _linear_sums(substeps, tau, lam)
    linear = fit_noise(squares, spread, v_start, keep_t, v_end, positive)
    assert abs(linear - c_true) > 0.5 * c_true


def test_unclipped_the_two_fits_agree():
    """Where no substep is clipped at any c the search reaches, both fits solve the same
    least-squares problem."""
    substeps = _substeps(gain=0.01)
    tau, c_true, keep = 1e6, 0.05, 0.9
    v_start = torch.rand(P, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    v_end = _v_end(substeps, tau, c_true, 0.0, v_start, keep)
    v_end = v_end * (1 + 0.01 * torch.randn(P, dtype=torch.float64,
                                            generator=torch.Generator().manual_seed(3)))
    positive = torch.ones(P, dtype=torch.bool)
    keep_t = torch.tensor(keep, dtype=torch.float64)
    clipped = fit_clipped_noise(_record(substeps, tau, 0.0, positive), v_start, keep_t, v_end)
    squares, spread = _linear_sums(substeps, tau, 0.0)
    linear = fit_noise(squares, spread, v_start, keep_t, v_end, positive)
    assert clipped == pytest.approx(linear, rel=1e-6)


def test_the_clipped_fit_reads_only_the_coordinates_the_stage_trains():
    """Coordinates outside ``positive`` (frozen ones, whatever their v) do not move c."""
    substeps = _substeps(gain=0.11)
    tau, c_true = 3.5, 0.03
    v_start = torch.zeros(P, dtype=torch.float64)
    v_end = _v_end(substeps, tau, c_true, 0.0, v_start, 0.0)
    positive = torch.arange(P) % 3 != 0
    v_end[~positive] = 1e6
    c = fit_clipped_noise(_record(substeps, tau, 0.0, positive), v_start,
                          torch.tensor(0.0, dtype=torch.float64), v_end)
    assert c == pytest.approx(c_true, rel=1e-4)


def test_the_coordinate_sample_is_fixed_and_trained_only():
    """The fit's coordinates are trained ones, the same on every call, in order, and all of
    them where there are few."""
    positive = torch.rand(200_000, generator=torch.Generator().manual_seed(4)) < 0.3
    a, b = _sample(positive, 1000), _sample(positive, 1000)
    assert torch.equal(a, b)  # the same on every call: a fixed seed
    assert 850 < len(a) < 1150 and bool(positive[a].all())
    assert len(a.unique()) == len(a)
    assert int(a[-1]) > 150_000  # drawn from the whole vector, not its start
    assert bool((a[1:] >= a[:-1]).all())
    few = torch.zeros(50, dtype=torch.bool)
    few[[3, 7, 11]] = True
    assert _sample(few, 1000).tolist() == [3, 7, 11]  # all of them where there are few


def test_the_coordinate_sample_spans_a_model_read_in_pieces():
    """A vector longer than one piece: every index drawn is a trained coordinate, and the
    pieces past the first are drawn from too."""
    positive = torch.zeros(10_000_000, dtype=torch.bool)
    positive[::3] = True
    a = _sample(positive, 1000)
    assert bool(positive[a].all()) and bool((a[1:] > a[:-1]).all())
    assert int((a > 8_000_000).sum()) > 100

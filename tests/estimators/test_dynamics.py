"""The perturbation propagators against explicit references."""

from __future__ import annotations

import pytest
import torch

from acctattr.estimators.dynamics import sgd_transform
from acctattr.estimators.unrolled.lanczos import lanczos_expm, lanczos_phi


def _sym(n: int, eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(eigs) @ q.T


def test_lanczos_matches_matrix_exp_on_psd_matrix():
    """With full Krylov dimension, Lanczos exp(-L A) d equals torch.linalg.matrix_exp."""
    n = 12
    a = _sym(n, torch.linspace(0.01, 3.0, n, dtype=torch.float64))
    d = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for scale in (0.1, 1.0, 7.5):
        ref = torch.linalg.matrix_exp(-scale * a) @ d
        got = lanczos_expm(lambda x, a=a: a @ x, d, scale, iters=n)
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-10), scale


def test_lanczos_clamps_negative_curvature_to_flat():
    """Negative eigenvalues are treated as zero curvature: exp(-L * max(A, 0)) d."""
    n = 10
    eigs = torch.tensor([-2.0, -0.5, -0.01, 0.0, 0.2, 0.5, 1.0, 2.0, 3.0, 4.0],
                        dtype=torch.float64)
    a = _sym(n, eigs, seed=3)
    a_plus = _sym(n, eigs.clamp(min=0.0), seed=3)
    d = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = torch.linalg.matrix_exp(-2.0 * a_plus) @ d
    got = lanczos_expm(lambda x: a @ x, d, 2.0, iters=n)
    assert torch.allclose(got, ref, rtol=1e-8, atol=1e-10)
    # and the unclamped exponential would differ a lot (the clamp matters)
    assert (torch.linalg.matrix_exp(-2.0 * a) @ d - ref).norm() > 1.0


def test_lanczos_few_iterations_accurate_for_large_scale():
    """A few Krylov steps already capture a strongly damped propagation to 1e-3."""
    n = 200
    a = _sym(n, torch.logspace(-3, 1, n, dtype=torch.float64), seed=5)
    d = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = torch.linalg.matrix_exp(-0.5 * a) @ d
    got = lanczos_expm(lambda x: a @ x, d, 0.5, iters=30)
    assert (got - ref).norm() / ref.norm() < 1e-3


def test_lanczos_phi_is_the_exact_gradient_flow_step_on_a_quadratic():
    """lanczos_phi(A, b, L) = (I - exp(-L A)) A^-1 b: on f(x) = x'Ax/2 + b'x, gradient flow
    from 0 for time L ends at -this; a zero eigenvalue moves by L b (plain Euler) and a
    negative one is treated as flat. Checked against matrix_exp and a fine Euler run."""
    n = 9
    eigs = torch.tensor([-1.0, 0.0, 1e-12, 0.05, 0.3, 1.0, 2.0, 5.0, 40.0], dtype=torch.float64)
    a = _sym(n, eigs, seed=7)
    a_plus = _sym(n, eigs.clamp(min=0.0), seed=7)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    evals, evecs = torch.linalg.eigh(a_plus)
    scale = 3.0
    weight = torch.where(evals > 1e-9, -torch.expm1(-scale * evals) / evals.clamp(min=1e-300),
                         torch.full_like(evals, scale))
    ref = evecs @ (weight * (evecs.T @ b))
    got = lanczos_phi(lambda x: a @ x, b, scale, iters=n)
    assert torch.allclose(got, ref, rtol=1e-8, atol=1e-9)
    # gradient flow x' = -(A+ x + b) by 30000 small Euler steps lands on -ref
    x = torch.zeros(n, dtype=torch.float64)
    h = scale / 30000
    for _ in range(30):
        for _ in range(1000):
            x = x - h * (a_plus @ x + b)
    assert torch.allclose(x, -ref, rtol=1e-3, atol=1e-4)
    # stiff direction (40 * 3 = 120): one step lands on its minimum, no overshoot
    stiff = evecs[:, -1]
    assert abs(float(stiff @ got) - float(stiff @ b) / 40.0) < 1e-8


def test_sgd_transform_matches_manual_recurrence():
    """The composed 2x2 SGD transform equals stepping the recurrence by hand."""
    lrs = [0.1, 0.05, 0.02, 0.07]
    mu, tau, lam = 0.9, 0.2, 0.03
    t = sgd_transform(lrs, mu, tau, False, lam, fresh=False)
    d, e = 1.3, -0.4
    for eta in lrs:
        e = mu * e + (1 - tau) * lam * d
        d = d - eta * e
    assert abs(t.dd * 1.3 + t.de * -0.4 - d) < 1e-12
    assert abs(t.ed * 1.3 + t.ee * -0.4 - e) < 1e-12


def test_lanczos_stops_early_once_the_estimate_settles():
    """With rtol > 0, on a matrix with 3 distinct eigenvalues Lanczos stops after about 3
    products instead of ``iters`` and still matches matrix_exp and the exact phi step."""
    n = 40
    a = _sym(n, torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64).repeat_interleave(
        torch.tensor([10, 20, 10])), seed=11)
    d = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    calls = []

    def matvec(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return a @ x

    ref = torch.linalg.matrix_exp(-1.5 * a) @ d
    got = lanczos_expm(matvec, d, 1.5, iters=20, rtol=1e-6)
    assert len(calls) < 20, len(calls)
    assert (got - ref).norm() / ref.norm() < 1e-8
    calls.clear()
    evals, evecs = torch.linalg.eigh(a)
    phi_ref = evecs @ (-torch.expm1(-1.5 * evals) / evals * (evecs.T @ d))
    got = lanczos_phi(matvec, d, 1.5, iters=20, rtol=1e-6)
    assert len(calls) < 20, len(calls)
    assert (got - phi_ref).norm() / phi_ref.norm() < 1e-8


def test_lanczos_rtol_zero_builds_every_vector():
    """rtol=0 (the default) takes all ``iters`` products and gives the full-iteration result
    bit for bit, where a loose rtol stops sooner with a slightly different one."""
    n = 60
    a = _sym(n, torch.logspace(-2, 1, n, dtype=torch.float64), seed=13)
    d = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    counts = []

    def run(**rtol: float) -> torch.Tensor:
        calls = []

        def matvec(x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return a @ x

        out = lanczos_phi(matvec, d, 0.7, iters=12, **rtol)
        counts.append(len(calls))
        return out

    default, zero, unreachable, loose = run(), run(rtol=0.0), run(rtol=1e-30), run(rtol=1e-2)
    assert counts[:3] == [12, 12, 12] and counts[3] < 12, counts
    assert torch.equal(default, zero) and torch.equal(default, unreachable)
    assert not torch.equal(default, loose)
    assert (loose - default).norm() / default.norm() < 1e-1


def test_the_momentum_oscillator_is_the_exact_solution_over_a_long_substep():
    """adam_flow.oscillator solves x' = -p m, m' = (g + h x - m) / tau exactly: it agrees
    with a fine Runge-Kutta integration to 1e-6 over a 16-step substep, for over- and
    under-damped coordinates and flat ones (h = 0, or so small it is taken as flat); a
    plain Euler step of the same system does not (it is what made the first moment
    unstable over long substeps)."""
    from acctattr.estimators.unrolled.adam_flow import oscillator

    gen = torch.Generator().manual_seed(0)
    n = 600
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    m = torch.randn(n, generator=gen, dtype=torch.float64)
    p = torch.rand(n, generator=gen, dtype=torch.float64) * 0.5
    h = torch.rand(n, generator=gen, dtype=torch.float64) ** 3 * 5
    h[:50], h[50:100] = 0.0, 1e-12
    tau, t = 9.49, 16.0
    k = p * h / tau
    assert bool((k > 0.25 / tau**2).any()) and bool(((k > 1e-6) & (k < 0.25 / tau**2)).any())
    x, m_end = oscillator(g, m, p, h, tau, t)

    def f(xx, mm):
        return -p * mm, (g + h * xx - mm) / tau

    xr, mr, steps = torch.zeros_like(g), m.clone(), 4000
    dt = t / steps
    for _ in range(steps):
        a = f(xr, mr)
        b = f(xr + dt / 2 * a[0], mr + dt / 2 * a[1])
        c = f(xr + dt / 2 * b[0], mr + dt / 2 * b[1])
        d = f(xr + dt * c[0], mr + dt * c[1])
        xr = xr + dt / 6 * (a[0] + 2 * b[0] + 2 * c[0] + d[0])
        mr = mr + dt / 6 * (a[1] + 2 * b[1] + 2 * c[1] + d[1])
    assert torch.allclose(x, xr, atol=1e-6) and torch.allclose(m_end, mr, atol=1e-6)
    euler = -p * m * t
    assert (euler - xr).abs().max() > 1.0
    # flat and no lag (m = g): Adam's plain step, -p g t
    x0, m0 = oscillator(g, g.clone(), p, torch.zeros_like(h), tau, t)
    assert torch.allclose(x0, -p * g * t) and torch.allclose(m0, g)


def test_the_first_moment_is_kept_only_in_a_stage_whose_substeps_are_short():
    """adam_momentum keeps m_hat in a stage's flow where its substeps span at most
    MOMENTUM_SPAN memory times tau = -1/ln(beta1) on average (a short Trainer stage's), and
    takes the settled step where they are longer (toxicity at 32x its steps: ~300
    optimizer steps a substep, where the oscillator's long probe under-learned the stage;
    README "Fidelity"); with adam_momentum off, never."""
    import math
    from types import SimpleNamespace

    from acctattr.estimators.unrolled.adam_flow import MOMENTUM_SPAN, AdamFlow
    from acctattr.options import UnrolledConfig

    group = SimpleNamespace(beta1=0.9)
    flow = AdamFlow.__new__(AdamFlow)
    flow.flat = SimpleNamespace(per_group=lambda j, value: torch.tensor(
        value(group), dtype=torch.float64))
    flow.config = UnrolledConfig()
    edge = math.floor(MOMENTUM_SPAN * -1 / math.log(0.9))  # 37 steps
    assert flow.momentum_in(0, [(0, 0, 9), (0, 9, 18)])
    assert flow.momentum_in(0, [(0, 0, edge), (1, edge, 2 * edge)])
    assert not flow.momentum_in(0, [(0, 0, edge + 1)])
    assert not flow.momentum_in(0, [(0, k, k + 300) for k in range(0, 900, 300)])
    flow.config = UnrolledConfig(adam_momentum=False)
    assert not flow.momentum_in(0, [(0, 0, 9)])


@pytest.mark.parametrize("parts", [2, 5, 8])
def test_group_moments_are_the_same_from_one_vectorised_block_or_group_by_group(
        monkeypatch, parts):
    """GroupMoments takes every group's gradient in one vmapped pass where they are small
    (BLOCK_ELEMENTS) and one group at a time above it: the two must agree up to float32
    rounding (a vmapped batch of groups may block its matmuls differently), and the mean
    loss it gives from the same passes is the training loss."""
    from acctattr.estimators.unrolled import noise
    from acctattr.evaluation.curvature import Curvature
    from acctattr.evaluation.metrics import resolve_metric

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    sample = {"x": torch.randn(23, 6), "y": torch.randint(0, 3, (23,))}
    curv = Curvature(model, {}, resolve_metric("cross_entropy", None, "train.loss"), sample,
                     ("x",), "y")
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [p.numel() for p in params.values()]
    got = {}
    for name, limit in (("block", 1 << 30), ("groups", 0)):
        monkeypatch.setattr(noise, "BLOCK_ELEMENTS", limit)
        moments = noise.GroupMoments()
        g, s, loss = moments(curv, 0, params, parts, sizes, torch.device("cpu"))
        assert loss == pytest.approx(curv.value(params), rel=1e-6)  # the guard's "before"
        out = torch.empty(sum(sizes), dtype=torch.float64)
        got[name] = (g, s, moments.gradient(curv, 0, params, parts, out).clone())
        assert not moments.looped
    for a, b in zip(got["block"], got["groups"], strict=True):
        # float32 rounding is relative to the vector's scale, not to each element: an
        # element near 0 differed by 3e-9 on one machine's kernels (2026-12-06)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(a.abs().max()))
    assert got["block"][1].abs().sum() > 0  # the groups differ: there is noise to see

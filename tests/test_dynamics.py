"""The perturbation propagators against explicit references."""

from __future__ import annotations

import torch

from acctattr.dynamics import lanczos_expm, sgd_transform


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

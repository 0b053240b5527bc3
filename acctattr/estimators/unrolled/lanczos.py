"""Matrix functions f(A) d of a symmetric operator known only by its products A x (Lanczos):
exp(-s A) d for the linear propagator and the phi function of the exponential Euler step.
Negative curvature is clamped to zero. Nothing here opens a file."""

from __future__ import annotations

import torch


def lanczos_expm(matvec, d: torch.Tensor, scale: float, iters: int = 20,
                 tol: float = 1e-10, rtol: float = 0.0) -> torch.Tensor:
    """exp(-scale * A_+) @ d (lanczos_apply with f(x) = exp(-scale * x))."""
    if scale == 0.0:
        return d.double().clone()
    return lanczos_apply(matvec, d, lambda x: torch.exp(-scale * x), iters, tol, rtol)


def lanczos_phi(matvec, d: torch.Tensor, scale: float, iters: int = 20,
                tol: float = 1e-10, rtol: float = 0.0) -> torch.Tensor:
    """(I - exp(-scale * A_+)) A_+^-1 @ d, i.e. scale * phi_1(-scale * A_+) d: how far
    gradient flow x' = -(A x + b) moves in time ``scale`` is -this applied to b (the
    exponential Euler step, exact for a quadratic, stable at any step size)."""
    def phi(x: torch.Tensor) -> torch.Tensor:
        z = scale * x
        small = z < 1e-8
        return torch.where(small, torch.full_like(x, scale),
                           -torch.expm1(-z) / torch.where(small, torch.ones_like(x), x))
    return lanczos_apply(matvec, d, phi, iters, tol, rtol)


def _tridiagonal(alphas: list[float], betas: list[float]) -> torch.Tensor:
    """T_k [k, k] from its diagonal (k alphas) and off-diagonal (the first k-1 betas)."""
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


def _coefficients(alphas: list[float], betas: list[float], fn) -> torch.Tensor:
    """f(T_k+) e_1 [k]: the Lanczos estimate's coordinates in the basis Q_k."""
    evals, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas))
    return evecs @ (fn(evals.clamp(min=0.0)) * evecs[0])  # on the CPU (k x k)


def lanczos_apply(matvec, d: torch.Tensor, fn, iters: int = 20,
                  tol: float = 1e-10, rtol: float = 0.0) -> torch.Tensor:
    """f(A_+) @ d for a symmetric operator A given only by products A @ x.

    Lanczos with full reorthogonalisation builds an orthonormal Krylov basis Q (n x m) and
    the tridiagonal T = Q^T A Q; then f(A) d ~ |d| Q f(T_+) e_1, where T_+
    clamps T's negative eigenvalues to zero (negative curvature does not grow a perturbation
    in training; it is treated as flat).

    With ``rtol`` > 0 it stops as soon as the estimate has settled: from the second basis
    vector on, the estimate y_k = |d| Q_k c_k (c_k = f(T_k+) e_1, k x k, cheap) is compared
    with the previous one; Q is orthonormal, so |y_k - y_(k-1)| = |d| |c_k - [c_(k-1), 0]|,
    and it stops when that is at most rtol |y_k|, before the next product A q.

    Args:
        matvec: x [n] -> A x [n], float64.
        d: the vector to propagate [n].
        fn: eigenvalues (>= 0) -> f(eigenvalues), elementwise.
        iters: Krylov dimension m (stops early on an invariant subspace).
        rtol: relative change between successive estimates that ends the iteration
            early; 0 always builds all m vectors.
    Returns:
        f(A_+) d, shape [n], float64.
    """
    d = d.double()
    beta0 = float(d.norm())
    if beta0 == 0.0:
        return fn(torch.zeros(1, dtype=torch.float64, device=d.device)) * d
    n = d.numel()
    m = min(iters, n)
    Q = torch.zeros(m, n, dtype=torch.float64, device=d.device)
    alphas: list[float] = []
    betas: list[float] = []
    previous: torch.Tensor | None = None  # c_(k-1), while checking for convergence
    q = d / beta0
    for j in range(m):
        Q[j] = q
        w = matvec(q).double()
        alpha = float(w @ q)
        alphas.append(alpha)
        if rtol > 0.0:
            coeffs = _coefficients(alphas, betas, fn)
            if previous is not None:
                change = float((coeffs[:-1] - previous).square().sum() + coeffs[-1] ** 2)
                if change <= (rtol * float(coeffs.norm())) ** 2:
                    return beta0 * (Q[: j + 1].T @ coeffs.to(d.device))
            previous = coeffs
        # full reorthogonalisation against every basis vector (twice is enough)
        for _ in range(2):
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        beta = float(w.norm())
        if j == m - 1 or beta <= tol * max(1.0, abs(alpha)):
            break
        betas.append(beta)
        q = w / beta
    k = len(alphas)
    coeffs = _coefficients(alphas, betas, fn)
    return beta0 * (Q[:k].T @ coeffs.to(d.device))

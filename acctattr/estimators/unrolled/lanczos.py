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
    return lanczos_apply(matvec, d, phi(scale), iters, tol, rtol)


def phi(scale: float):
    """x -> (1 - exp(-scale x)) / x elementwise (scale where scale x < 1e-8): lanczos_phi's
    function, for Krylov.apply."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        z = scale * x
        small = z < 1e-8
        return torch.where(small, torch.full_like(x, scale),
                           -torch.expm1(-z) / torch.where(small, torch.ones_like(x), x))
    return fn


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
    return Krylov(matvec, d, iters, tol).apply(fn, rtol)


class Krylov:
    """The Lanczos process of one operator and start vector (lanczos_apply), kept so that
    several functions of the operator can be applied to the same vector from one basis,
    built as far as the most demanding of them needs: the SGD flow's halved step has the
    same point, gradient and Hessian as the step it halves, and half the time. Each
    ``apply`` gives the same bits as lanczos_apply with that function (the same products,
    in the same order, and the same stopping rule); ``release`` frees the basis."""

    def __init__(self, matvec, d: torch.Tensor, iters: int = 20, tol: float = 1e-10) -> None:
        self.matvec = matvec
        self.d = d.double()
        self.beta0 = float(self.d.norm())
        self.tol = tol
        self.m = min(iters, self.d.numel())
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.Q: torch.Tensor | None = None
        self.q = self.d
        if self.beta0 != 0.0:
            self.Q = torch.zeros(self.m, self.d.numel(), dtype=torch.float64,
                                 device=self.d.device)
            self.q = self.d / self.beta0
        self._w: torch.Tensor | None = None  # the last vector's product, not reorthogonalised
        self._ended = False
        self.products = 0  # A x products taken

    def _has(self, j: int) -> bool:
        """Whether basis vector j (and its alpha) is there, built if the process goes on."""
        while len(self.alphas) <= j:
            if self._ended or self.Q is None:
                return False
            Q = self.Q
            if self._w is not None:
                i = len(self.alphas) - 1
                w, self._w = self._w, None
                # full reorthogonalisation against every basis vector (twice is enough)
                for _ in range(2):
                    w = w - Q[: i + 1].T @ (Q[: i + 1] @ w)
                beta = float(w.norm())
                if i == self.m - 1 or beta <= self.tol * max(1.0, abs(self.alphas[i])):
                    self._ended = True
                    return False
                self.betas.append(beta)
                self.q = w / beta
            i = len(self.alphas)
            Q[i] = self.q
            w = self.matvec(self.q).double()
            self.products += 1
            self.alphas.append(float(w @ self.q))
            self._w = w
        return True

    def apply(self, fn, rtol: float = 0.0) -> torch.Tensor:
        """f(A_+) @ d, as lanczos_apply(matvec, d, fn, iters, tol, rtol)."""
        d = self.d
        if self.beta0 == 0.0:
            return fn(torch.zeros(1, dtype=torch.float64, device=d.device)) * d
        if self.Q is None:
            raise RuntimeError("this Krylov basis was released")
        previous: torch.Tensor | None = None  # c_(k-1), while checking for convergence
        k = 0
        while self._has(k):
            if rtol > 0.0:
                coeffs = _coefficients(self.alphas[: k + 1], self.betas[:k], fn)
                if previous is not None:
                    change = float((coeffs[:-1] - previous).square().sum() + coeffs[-1] ** 2)
                    if change <= (rtol * float(coeffs.norm())) ** 2:
                        return self.beta0 * (self.Q[: k + 1].T @ coeffs.to(d.device))
                previous = coeffs
            k += 1
        coeffs = _coefficients(self.alphas[:k], self.betas[: k - 1], fn)
        return self.beta0 * (self.Q[:k].T @ coeffs.to(d.device))

    def release(self) -> None:
        """Free the basis (m float64 copies of d); no further apply."""
        self.Q = None
        self._w = None

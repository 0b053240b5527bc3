"""How a perturbation (d, e) of parameters and optimizer state travels through later steps.

d is a parameter perturbation, e a perturbation of the optimizer's first-order state (SGD
momentum buffer, Adam first moment ``exp_avg``). Under the *frozen* estimator (SPEC sec. 2)
the later steps' loss gradients are held fixed, so only the optimizer's own linear terms
(weight decay, momentum, the Adam update of a carried first moment) act on (d, e). Every
coefficient is a scalar per parameter group, so a whole stage collapses to a few scalars:

- SGD: a 2x2 matrix M with [d', e'] = M [d, e].
- AdamW (and Adam without L2): d' = a*d + b*(p * e), e' = r*e, with p = 1/(sqrt(v_hat)+eps)
  the stage's frozen preconditioner.
- Adam with coupled L2 mixes d into e elementwise through p; it runs step by step on tensors.

All scalar recurrences run in float64. Nothing here opens a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SgdTransform:
    """[d', e'] = [[dd, de], [ed, ee]] @ [d, e] for one SGD stage and parameter group."""

    dd: float
    de: float
    ed: float
    ee: float

    def apply(self, d: torch.Tensor, e: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if e is None:
            return self.dd * d, self.ed * d
        return self.dd * d + self.de * e, self.ed * d + self.ee * e


def sgd_transform(lrs: Sequence[float], momentum: float, dampening: float, nesterov: bool,
                  weight_decay: float, fresh: bool) -> SgdTransform:
    """Compose one stage of ``torch.optim.SGD`` (coupled weight decay) acting on (d, e).

    Per step s with lr eta_s (PyTorch semantics; gradient terms cancel under frozen):
        e_s = mu*e_{s-1} + (1-tau)*lam*d_s      (the first step of a fresh optimizer sets
                                                 e_0 = lam*d_0: PyTorch skips dampening there)
        d_{s+1} = d_s - eta_s*e_s               (nesterov: d_s - eta_s*(lam*d_s + mu*e_s))
    With momentum 0 there is no buffer: d_{s+1} = (1 - eta_s*lam)*d_s and e stays 0.

    Args:
        fresh: the stage built a new optimizer (its incoming e is ignored and zero).
    """
    lam, mu, tau = weight_decay, momentum, dampening
    # rows: d, e as combinations of the stage's incoming (d0, e0)
    d0, d1 = 1.0, 0.0
    e0, e1 = 0.0, 0.0 if fresh else 1.0
    if mu == 0.0:
        for eta in lrs:
            f = 1.0 - eta * lam
            d0, d1 = f * d0, f * d1
        return SgdTransform(d0, d1, 0.0, 0.0)
    for s, eta in enumerate(lrs):
        if s == 0 and fresh:
            e0, e1 = lam * d0, lam * d1
        else:
            e0, e1 = mu * e0 + (1 - tau) * lam * d0, mu * e1 + (1 - tau) * lam * d1
        if nesterov:
            u0, u1 = lam * d0 + mu * e0, lam * d1 + mu * e1
        else:
            u0, u1 = e0, e1
        d0, d1 = d0 - eta * u0, d1 - eta * u1
    return SgdTransform(d0, d1, e0, e1)


@dataclass(frozen=True)
class AdamwTransform:
    """d' = a*d + b*(p*e), e' = r*e for one AdamW stage and parameter group."""

    a: float
    b: float
    r: float

    def apply(self, d: torch.Tensor, e: torch.Tensor | None,
              p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if e is None or self.b == 0.0:
            return self.a * d, None if e is None else self.r * e
        if p is None:
            raise ValueError("a carried first-moment perturbation needs the preconditioner p")
        return self.a * d + self.b * (p * e), self.r * e


def adamw_transform(lrs: Sequence[float], beta1: float, weight_decay: float, step0: int,
                    fresh: bool) -> AdamwTransform:
    """Compose one AdamW stage (decoupled decay, frozen preconditioner) acting on (d, e).

    Per step (SPEC sec. 2): e_s = beta1*e_{s-1};
        d_{s+1} = (1 - eta_s*lam)*d_s - eta_s*c_s*p*e_s,  c_s = 1/(1 - beta1^n),
    n = step0 + s + 1 the step's index in the optimizer's life.

    Args:
        step0: optimizer steps already taken when the stage began (0 for a fresh optimizer).
    """
    a, b, r = 1.0, 0.0, 0.0 if fresh else 1.0
    for s, eta in enumerate(lrs):
        n = step0 + s + 1
        r = beta1 * r
        f = 1.0 - eta * weight_decay
        a = f * a
        b = f * b - eta * r / (1.0 - beta1**n)
    return AdamwTransform(a, b, r)


def adam_l2_propagate(d: torch.Tensor, e: torch.Tensor | None, p: torch.Tensor,
                      lrs: Sequence[float], beta1: float, weight_decay: float,
                      step0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam with coupled L2 (``torch.optim.Adam(weight_decay=lam)``), step by step.

        e_s = beta1*e_{s-1} + (1-beta1)*lam*d_s;   d_{s+1} = d_s - eta_s*c_s*p*e_s

    Args:
        d, e: perturbations, parameter-shaped (e None for a fresh optimizer).
        p: frozen preconditioner 1/(sqrt(v_hat)+eps), parameter-shaped.
    """
    d = d.double()
    e = torch.zeros_like(d) if e is None else e.double()
    p = p.double()
    for s, eta in enumerate(lrs):
        n = step0 + s + 1
        e = beta1 * e + (1 - beta1) * weight_decay * d
        d = d - (eta / (1.0 - beta1**n)) * p * e
    return d, e


def adam_preconditioner(exp_avg_sq: torch.Tensor, step: int, beta2: float,
                        eps: float) -> torch.Tensor:
    """p = 1/(sqrt(v_hat) + eps), v_hat = v/(1 - beta2^step): Adam's frozen preconditioner."""
    # in place on one float64 copy: the same bits as v/c, sqrt, + eps and 1/x, each of
    # which allocated its own (Tensor.__rdiv__ is reciprocal() * 1)
    v_hat = exp_avg_sq.to(torch.float64, copy=True).div_(1.0 - beta2 ** max(step, 1))
    return v_hat.sqrt_().add_(eps).reciprocal_()

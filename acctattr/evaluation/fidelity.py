"""How well estimated effects agree with retraining truth (SPEC section 6).

Per stage: Pearson and Spearman correlation of per-example effects with the truth, and
whether the sign of the mean effect is right; per estimator: whether the ranking of stages
by |effect| matches the truth's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two [N] vectors (NaN when either is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..N-1 of x [N], ties sharing their average rank."""
    x = x.double()
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    # the rank of each distinct value is the mean position of its block in sorted order
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() + 1) / 2
    return mean_rank[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(ranks(a), ranks(b))


@dataclass(frozen=True)
class StageFidelity:
    stage: str
    pearson: float
    spearman: float
    effect: float
    true_effect: float
    sign_ok: bool


@dataclass(frozen=True)
class Fidelity:
    """One estimator and evaluation mode against the truth."""

    estimator: str
    evaluate: str
    stages: tuple[StageFidelity, ...]  # in training order
    ranking_ok: bool
    seconds: float | None = None


def compare(estimator: str, evaluate: str, estimated: dict[str, torch.Tensor],
            truth: dict[str, torch.Tensor], seconds: float | None = None) -> Fidelity:
    """Per-example effects [N] per stage (estimated and true, same stage order) -> Fidelity."""
    rows = []
    for name, ref in truth.items():
        est = estimated[name]
        e, t = float(est.mean()), float(ref.mean())
        rows.append(StageFidelity(name, pearson(est, ref), spearman(est, ref), e, t,
                                  (e > 0) == (t > 0)))
    by_est = sorted(truth, key=lambda n: -abs(float(estimated[n].mean())))
    by_true = sorted(truth, key=lambda n: -abs(float(truth[n].mean())))
    return Fidelity(estimator, evaluate, tuple(rows), by_est == by_true, seconds)

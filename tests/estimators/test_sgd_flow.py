"""The SGD flow's step halving on long substeps (issue 12: unrolled's cost on long runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from acctattr import pipeline
from acctattr.estimators.unrolled import Unrolled, sgd_flow
from acctattr.options import UnrolledConfig

DIGITS = Path(__file__).resolve().parents[2] / "sample_runs" / "digits" / "manifest.yaml"


def _flow(config: UnrolledConfig) -> tuple[Unrolled, sgd_flow.SgdFlow]:
    estimator = pipeline.estimator(pipeline.check(DIGITS), "unrolled", config)
    assert isinstance(estimator, Unrolled)
    return estimator, estimator.sgd


def test_a_substep_may_be_halved_down_to_one_optimizer_step():
    """max_halvings where a substep is short; where it spans more optimizer steps than
    2^max_halvings, as deep as one optimizer step (a fixed depth leaves pieces of many
    steps on a long run: digits at 32x had ~9 per finest piece)."""
    _, flow = _flow(UnrolledConfig(max_halvings=5))
    for steps in (1, 2, 19, 32):
        assert flow.halvings(100, 100 + steps) == 5
    for steps in (33, 64, 65, 300, 4800):
        depth = flow.halvings(100, 100 + steps)
        assert 2 ** (depth - 1) < steps <= 2**depth, (steps, depth)


def test_a_long_substep_never_raises_the_training_loss(monkeypatch):
    """One flow substep per stage and one halving allowed: each substep spans the whole
    stage (150 or 100 optimizer steps). Under a fixed depth a half of the counterfactual's
    first step raised digits' shortcut training loss from 2.32 to 23.6 and was accepted,
    and the counterfactual ran away (the cost of long runs: issue 12). Halving on down to
    one optimizer step, no step of the actual or the counterfactual run raises its
    stage's training loss, and the simulated run reproduces the recorded loss fall."""
    estimator, flow = _flow(UnrolledConfig(max_halvings=1, flow_substeps=1))
    flat = flow.flat
    steps: list[tuple[int, float, float]] = []
    original = sgd_flow.SgdFlow.gd_step

    def loss(j, theta):
        lam = flat.coupled_decay(j)
        return flat.curvature(j).value(flat.at(theta)) + 0.5 * float((lam * theta**2).sum())

    def recorded(self, j, theta, lr, rate, depth=0, expansion=None, most=None):
        step = original(self, j, theta, lr, rate, depth, expansion, most)
        if depth == 0:
            steps.append((j, loss(j, theta), loss(j, theta + step)))
        return step

    monkeypatch.setattr(sgd_flow.SgdFlow, "gd_step", recorded)
    estimator.embed(0)
    assert len(steps) == 4  # both later stages: the actual run, then the counterfactual
    for j, before, after in steps:
        assert after <= before, (j, before, after)
    for r in estimator.reproduction.values():
        assert r.ok(1.25), r.describe()


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))

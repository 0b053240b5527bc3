"""What unrolled's flows cost on long runs (issue 12): the SGD flow's step halving on long
substeps, and the per-substep sums over a stage's learning rates computed once."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from acctattr import pipeline
from acctattr.estimators.unrolled import Unrolled, sgd_flow
from acctattr.estimators.unrolled.lanczos import Krylov, lanczos_apply, phi
from acctattr.options import UnrolledConfig

ROOT = Path(__file__).resolve().parents[2] / "sample_runs"
DIGITS = ROOT / "digits" / "manifest.yaml"


def _flow(config: UnrolledConfig, manifest: Path = DIGITS) -> tuple[Unrolled, sgd_flow.SgdFlow]:
    estimator = pipeline.estimator(pipeline.check(manifest), "unrolled", config)
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
    stage's training loss, and the simulated run reproduces the recorded loss fall. A
    halved step's first half builds no Lanczos basis of its own."""
    estimator, flow = _flow(UnrolledConfig(max_halvings=1, flow_substeps=1))
    flat = flow.flat
    steps: list[tuple[int, float, float]] = []
    original = sgd_flow.SgdFlow.gd_step
    # gd_step calls, first halves (given their caller's expansion), Krylov bases built
    flow_calls, halves, bases = [0], [0], [0]
    init = sgd_flow.Krylov.__init__

    def built(self, *args, **kwargs):
        bases[0] += 1
        init(self, *args, **kwargs)

    monkeypatch.setattr(sgd_flow.Krylov, "__init__", built)

    def loss(j, theta):
        lam = flat.coupled_decay(j)
        return flat.curvature(j).value(flat.at(theta)) + 0.5 * float((lam * theta**2).sum())

    def recorded(self, j, theta, lr, rate, depth=0, expansion=None, most=None, krylov=None):
        flow_calls[0] += 1
        halves[0] += expansion is not None
        step = original(self, j, theta, lr, rate, depth, expansion, most, krylov)
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
    # a first half reads its caller's Lanczos basis: one basis per expansion
    assert halves[0] > 0 and bases[0] == flow_calls[0] - halves[0]


def _counted(estimator: Unrolled) -> list[int]:
    """Count every learning rate the stages' schedules are asked for (the Lrs views share
    their lr_at)."""
    asked = [0]
    for run in estimator.flat.runs:
        at = run.lrs._at  # type: ignore[attr-defined]

        def counting(s: int, at=at) -> float:
            asked[0] += 1
            return at(s)

        run.lrs._at = counting  # type: ignore[attr-defined]
    return asked


@pytest.mark.parametrize("run", ["digits", "toxicity"])
def test_a_substeps_sums_over_its_learning_rates_are_computed_once(run):
    """Every simulation through a later stage asks for each substep's summed lr, momentum
    ramp (SGD) and decoupled decay (AdamW): each a loop over the substep's optimizer steps,
    32x as long on a run 32x as long. They equal the loops and are computed once."""
    estimator, flow = _flow(UnrolledConfig(), ROOT / run / "manifest.yaml")
    flat = flow.flat
    asked = _counted(estimator)
    for j in (1, 2):
        stage = flat.runs[j]
        k0, k1 = 3, stage.steps - 5
        lrs = [stage.lrs[s] for s in range(k0, k1)]
        asked[0] = 0
        first = (flat.lr_sum(j, k0, k1), flat.decay(j, k0, k1),
                 flow.rate_over(j, k0, k1, flat.rate(j)),
                 flow.rate_over(j, k0, k1, flat.rate(j), since_start=True))
        assert asked[0] > 0
        asked[0] = 0
        again = (flat.lr_sum(j, k0, k1), flat.decay(j, k0, k1),
                 flow.rate_over(j, k0, k1, flat.rate(j)),
                 flow.rate_over(j, k0, k1, flat.rate(j), since_start=True))
        assert asked[0] == 0, (run, j)
        assert first[0] == again[0] == float(sum(lrs))
        for a, b in zip(first[1:], again[1:], strict=True):
            assert torch.equal(a, b)
        groups = {estimator.stages.groups[j][n] for n in flat.names}
        for wd in {stage.state.groups[i].weight_decay for i in groups}:
            loop = math.prod(1 - eta * wd for eta in lrs)
            assert bool((first[1] == loop).any()), (run, j, wd)


def test_a_halved_step_reads_its_lanczos_basis_again_with_the_same_bits():
    """The first half of a halved step has the same Hessian and gradient as the step: its
    phi is read from the step's Krylov basis (extended where it needs more vectors) with
    the same bits as a basis built again, and no product is taken twice."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 60, generator=gen, dtype=torch.float64)
    a = x @ x.T / 60 + torch.diag(torch.linspace(-0.5, 30.0, 60, dtype=torch.float64))
    d = torch.randn(60, generator=gen, dtype=torch.float64)

    def matvec(v):
        return a @ v

    for rtol in (0.0, 1e-4):
        for scales in ((40.0, 20.0, 10.0), (0.01, 40.0), (5.0, 0.01, 2.5)):
            shared = Krylov(matvec, d, 8)
            for t in scales:
                fresh = Krylov(matvec, d, 8)
                assert torch.equal(shared.apply(phi(t), rtol), fresh.apply(phi(t), rtol))
                assert torch.equal(shared.apply(phi(t), rtol),
                                   lanczos_apply(matvec, d, phi(t), 8, rtol=rtol))
                assert shared.products <= 8
            # the shared basis took as many products as the most demanding function alone
            most = max(_products(matvec, d, t, rtol) for t in scales)
            assert shared.products == most, (rtol, scales)
    # the whole basis (m = n) gives phi exactly, negative curvature taken as flat
    evals, evecs = torch.linalg.eigh(a)
    exact = evecs @ (phi(3.0)(evals.clamp(min=0.0)) * (evecs.T @ d))
    full = Krylov(matvec, d, 60).apply(phi(3.0))
    assert torch.allclose(full, exact, rtol=1e-6, atol=1e-8)


def _products(matvec, d, t, rtol) -> int:
    k = Krylov(matvec, d, 8)
    k.apply(phi(t), rtol)
    return k.products


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))

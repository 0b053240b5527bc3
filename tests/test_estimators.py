"""Estimators against retraining truth where the frozen estimator is exact (linear loss)."""

from __future__ import annotations

import pytest
import torch
from staged import StageCfg, truth, write_run

from acctattr import pipeline

COSINE = {"schedule": "cosine", "base": 0.05, "warmup": 0, "min": 0.0}
WARM_COS = {"schedule": "cosine", "base": 0.02, "warmup": 5, "min": 0.001}

CASES = {
    "sgd_momentum_dampening_continued": [
        StageCfg("a", "sgd", 30, COSINE, {"momentum": 0.9}, (0.01, 0.0)),
        StageCfg("b", "sgd", 25, 0.03, {"momentum": 0.8, "dampening": 0.3}, (0.05, 0.0)),
        StageCfg("c", "sgd", 20, {"schedule": "linear", "base": 0.02, "warmup": 3, "min": 0.0},
                 {"momentum": 0.8, "dampening": 0.3}, (0.05, 0.0), continues=True),
    ],
    "sgd_nesterov_continued_from_first": [
        StageCfg("a", "sgd", 30, 0.04, {"momentum": 0.9, "nesterov": True}, (0.02, 0.001)),
        StageCfg("b", "sgd", 30, COSINE, {"momentum": 0.9, "nesterov": True}, (0.02, 0.001),
                 continues=True),
        StageCfg("c", "sgd", 10, [0.01 * (i + 1) for i in range(10)], {}, (0.1, 0.0)),
    ],
    "adamw_two_groups_fresh": [
        StageCfg("a", "adamw", 30, WARM_COS, {"betas": (0.9, 0.99)}, (0.1, 0.0)),
        StageCfg("b", "adamw", 25, WARM_COS, {"betas": (0.8, 0.999)}, (0.3, 0.0)),
        StageCfg("c", "adamw", 20, 0.01, {}, (0.5, 0.05)),
    ],
    "mixed_sgd_then_adamw": [
        StageCfg("a", "sgd", 20, 0.05, {"momentum": 0.5}, (0.02, 0.02)),
        StageCfg("b", "adamw", 20, WARM_COS, {}, (0.2, 0.0)),
        StageCfg("c", "sgd", 20, 0.05, {"momentum": 0.9, "dampening": 0.5}, (0.03, 0.0)),
    ],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_frozen_direct_equals_retraining_on_linear_loss(tmp_path, case):
    """With a loss linear in the parameters, frozen+direct equals retraining to 1e-4."""
    stages = CASES[case]
    manifest = write_run(tmp_path / case, stages)
    true = truth(stages)
    result = pipeline.run(manifest, "frozen", "direct", per_example=True)
    assert result.examples is not None
    for cfg in stages:
        est = torch.tensor([e.effects[cfg.name] for e in result.examples], dtype=torch.float64)
        ref = true[cfg.name]
        assert ref.abs().max() > 1e-4, "the case must give every stage a real effect"
        err = (est - ref).abs().max() / ref.abs().max()
        assert err < 1e-4, f"{case} stage {cfg.name}: relative error {err:.2e}"
        mean = next(s.effect for s in result.stages if s.name == cfg.name)
        assert abs(mean - float(ref.mean())) <= 1e-4 * max(abs(float(ref.mean())), 1e-6)


def test_naive_misses_later_weight_decay(tmp_path):
    """naive ignores later stages, so under later weight decay it is measurably off."""
    stages = CASES["adamw_two_groups_fresh"]
    manifest = write_run(tmp_path / "run", stages)
    ref = truth(stages)["a"]
    result = pipeline.run(manifest, "naive", "direct", per_example=True)
    est = torch.tensor([e.effects["a"] for e in result.examples], dtype=torch.float64)
    assert (est - ref).abs().max() / ref.abs().max() > 1e-3

"""The lm sample run (a tiny GPT-2 fine-tuned in three stages by transformers.Trainer with
clipping, dropout, warmup and accumulation) against its retraining truth.

The README's figures come from bench/fidelity.py; these are looser versions of them, so CI
stays deterministic. The last stage is evaluated directly, so it is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from acctattr import pipeline

ROOT = Path(__file__).resolve().parents[2] / "sample_runs" / "lm"


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.fixture(scope="module")
def auto_result():
    return pipeline.run(ROOT / "manifest.yaml", per_example=True)


def test_the_lm_run_records_what_trainer_did():
    """The manifest reads clipping and batch size; the truth carries its second-seed floor;
    clipping was active (Trainer logged gradient norms above max_grad_norm)."""
    loaded = pipeline.check(ROOT / "manifest.yaml")
    assert [r.max_grad_norm for r in loaded.runs] == [1.0, 1.0, 1.0]
    assert [r.batch_size for r in loaded.runs] == [16, 16, 16]  # sft: 8 x 2 accumulation
    truth = json.loads((ROOT / "truth.json").read_text())["stages"]
    assert all(0.5 < truth[n]["floor"]["pearson"] <= 1.0 for n in truth)
    norms = [h["grad_norm"] for f in sorted(ROOT.glob("*/checkpoint-*/trainer_state.json"))
             for h in json.loads(f.read_text())["log_history"] if "grad_norm" in h]
    assert sum(n > 1.0 for n in norms) > len(norms) / 2


def test_auto_keeps_unrolled_and_tracks_retraining_on_the_lm_run(auto_result):
    """auto keeps unrolled (its simulation reproduces every later stage); per-example
    Pearson >= 0.9 and the sign right on every stage, means within 20% (README "Fidelity":
    Adam's first moment in the flow, ``adam_momentum``, is what takes pretrain from -21%
    to within a few percent), the last stage exact."""
    truth = json.loads((ROOT / "truth.json").read_text())["stages"]
    assert auto_result.estimator == "unrolled", auto_result.estimator_note
    assert auto_result.examples is not None
    for s in auto_result.stages:
        est = torch.tensor([e.effects[s.name] for e in auto_result.examples],
                           dtype=torch.float64)
        ref = torch.tensor(truth[s.name]["examples"], dtype=torch.float64)
        assert _pearson(est, ref) >= 0.9, (s.name, _pearson(est, ref))
        assert (s.effect > 0) == (float(ref.mean()) > 0), s.name
        assert abs(s.effect / float(ref.mean()) - 1) < 0.2, (s.name, s.effect)
        if s.name == "poison":
            assert torch.allclose(est, ref, atol=1e-4)


@pytest.fixture(scope="module")
def four_x(tmp_path_factory):
    """The lm run trained 4x as many steps (sample_runs/lm/make_run.py's build_run, as
    `make_run.py --scale 4` writes it) and its retraining truth under Trainer's first seed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("acctattr_test_lm_make_run",
                                                  ROOT / "make_run.py")
    assert spec is not None and spec.loader is not None
    mr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mr)
    from transformers.utils import logging

    folder = tmp_path_factory.mktemp("lm4x")
    verbosity = logging.get_verbosity()  # Trainer sets it process-wide (to errors only)
    try:
        manifest = mr.build_run(folder, scale=4)
        doc = mr.truth(folder, lambda skip, out, seed=0: mr.replay(skip, out, scale=4,
                                                                  seed=seed), seeds=(0,))
    finally:
        logging.set_verbosity(verbosity)
    return manifest, doc["stages"]


def test_auto_tracks_retraining_on_the_lm_run_at_4x_its_steps(four_x):
    """At 4x its steps (sft 256, poison 128 optimizer steps) auto keeps unrolled, and every
    stage is >= 0.9 per example with its sign right; sft's mean within 25%, pretrain's
    within 50% (README "Fidelity": pretrain's mean is not stable here. On a build of this
    run whose weights differ from another machine's by 1e-5, small changes to the
    simulation, sample_size 1000 or 15 / 18 substeps, give 0.53-1.35x the truth, at
    Pearson 0.92-0.99; sft stays at 1.08-1.09x). At 16 substeps a stage the first moment's
    flow was not converged here (pretrain -34%); a stage that keeps it now takes
    MOMENTUM_SUBSTEPS times as many."""
    manifest, truth = four_x
    result = pipeline.run(manifest, per_example=True)
    assert result.estimator == "unrolled", result.estimator_note
    assert result.examples is not None
    for s in result.stages:
        est = torch.tensor([e.effects[s.name] for e in result.examples], dtype=torch.float64)
        ref = torch.tensor(truth[s.name]["examples"], dtype=torch.float64)
        assert _pearson(est, ref) >= 0.9, (s.name, _pearson(est, ref))
        assert (s.effect > 0) == (float(ref.mean()) > 0), s.name
        bar = 0.5 if s.name == "pretrain" else 0.25
        assert abs(s.effect / float(ref.mean()) - 1) < bar, (s.name, s.effect)

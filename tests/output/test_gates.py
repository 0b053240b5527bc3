"""Gates (acctattr/gates.py) and the standard errors they rest on, on the digits sample."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest
from reportkit import TRAP, digits_run

from acctattr.errors import AcctattrError
from acctattr.output import gates
from acctattr.results import Result, StageEffect


def _stage(result: Result, name: str) -> StageEffect:
    return next(s for s in result.stages if s.name == name)


def test_standard_errors_are_std_over_sqrt_n_of_per_example_effects():
    """effect_se and groups_se are sample std / sqrt(n) of the per-example effects."""
    result = digits_run().result
    assert result.examples is not None
    for s in result.stages:
        xs = [e.effects[s.name] for e in result.examples]
        assert s.effect_se == pytest.approx(statistics.stdev(xs) / math.sqrt(len(xs)),
                                            rel=1e-6)
        assert s.groups is not None and s.groups_se is not None
        for g in s.groups:
            gx = [e.effects[s.name] for e in result.examples if e.group == g]
            assert s.groups_se[g] == pytest.approx(
                statistics.stdev(gx) / math.sqrt(len(gx)), rel=1e-6)
    assert sorted(s.position for s in result.stages) == [1, 2, 3]
    assert _stage(result, "pretrain").position == 1


def test_gate_trips_on_shortcut_trap_group_below_its_effect():
    """The shortcut stage's harm to the trap group trips a threshold well below it."""
    result = digits_run().result
    effect = _stage(result, "shortcut").groups[TRAP]
    gate = gates.evaluate(result, effect / 2, 0.95, "shortcut", TRAP)
    assert gate.tripped
    w = gate.worst
    assert (w.stage, w.group) == ("shortcut", TRAP)
    assert w.harm == pytest.approx(effect)
    assert w.bound == pytest.approx(effect - gate.z * w.se)
    assert gate.z == pytest.approx(1.6448536, rel=1e-6)


def test_gate_passes_above_the_effect():
    """A threshold above the harm never trips."""
    result = digits_run().result
    effect = _stage(result, "shortcut").groups[TRAP]
    assert not gates.evaluate(result, effect * 1.05, 0.95, "shortcut", TRAP).tripped


def test_gate_passes_when_the_confidence_bound_straddles_the_threshold():
    """Harm above X but its lower bound below X: not tripped at 95%, tripped at 50%."""
    result = digits_run().result
    s = _stage(result, "shortcut")
    harm, se = s.groups[TRAP], s.groups_se[TRAP]
    threshold = harm - 0.8 * se  # between the 95% bound (harm - 1.645 se) and harm
    assert not gates.evaluate(result, threshold, 0.95, "shortcut", TRAP).tripped
    assert gates.evaluate(result, threshold, 0.5, "shortcut", TRAP).tripped


def test_newest_and_worst_select_the_last_stage_and_every_group():
    """newest = last in training order; worst checks every group of it."""
    result = digits_run().result
    gate = gates.evaluate(result, 100.0, 0.95, "newest", "worst")
    assert [(c.stage, c.group) for c in gate.checks] == [("polish", "0"), ("polish", "1")]
    everything = gates.evaluate(result, 100.0, 0.95)
    assert [c.stage for c in everything.checks] == ["pretrain", "shortcut", "polish"]
    assert all(c.group is None for c in everything.checks)


def test_unknown_selectors_and_bad_confidence_are_usage_errors():
    """Unknown stage or group names, and C outside [0.5, 1), raise AcctattrError."""
    result = digits_run().result
    with pytest.raises(AcctattrError, match="shortcut"):
        gates.evaluate(result, 0.1, 0.95, "nope")
    with pytest.raises(AcctattrError, match="worst"):
        gates.evaluate(result, 0.1, 0.95, None, "7")
    for c in (1.0, 0.4, 1.5):
        with pytest.raises(AcctattrError, match="confidence"):
            gates.evaluate(result, 0.1, c)
    no_groups = replace(result, stages=tuple(replace(s, groups=None, groups_se=None)
                                             for s in result.stages))
    with pytest.raises(AcctattrError, match="no groups"):
        gates.evaluate(no_groups, 0.1, 0.95, None, "worst")
    with pytest.raises(AcctattrError, match="newest"):
        gates.check_stage_name("nope", ["a", "b"])


def test_harm_follows_the_metric_direction_and_undefined_se_fails_closed():
    """On a higher-is-better metric a negative effect is harm; a NaN se plays no part at
    confidence 0.5 and trips the gate (fail closed) at a confidence that needs it."""
    stages = (StageEffect("a", 1, -0.3, "hurt", 0.75, 0.9, None, 0.01, None, 1),
              StageEffect("b", 2, 0.1, "helped", 0.25, 0.5, None, math.nan, None, 2))
    result = Result("accuracy", True, "frozen", "linear", 100, 0.6, stages)
    gate = gates.evaluate(result, 0.2)
    assert gate.tripped and gate.worst.stage == "a" and gate.worst.harm == pytest.approx(0.3)
    lone = Result("accuracy", True, "frozen", "linear", 1, 0.6,
                  (replace(stages[0], effect_se=math.nan),))
    closed = gates.evaluate(lone, 0.2, 0.95)
    assert closed.tripped and "standard error is undefined" in (closed.worst.reason or "")
    assert "fail closed" in gates.describe(closed, "accuracy")
    assert "undefined" in gates.describe(gates.evaluate(lone, 0.2), "accuracy")


@pytest.mark.parametrize("run", ["digits", "toxicity", "lm"])
def test_readme_ci_recipe_trips_exactly_where_retraining_says_the_newest_stage_hurt(run):
    """The README's CI gate (--estimator frozen --gate-stage newest, point estimate) trips
    when, and only when, retraining without the newest stage says it made the metric worse
    by more than the threshold: the newest stage is evaluated directly, which is exact."""
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from acctattr.cli import app

    root = Path(__file__).resolve().parents[2] / "sample_runs" / run
    from acctattr.runs.manifest import load_manifest

    truth = json.loads((root / "truth.json").read_text())
    stages = truth["stages"]
    newest = load_manifest(root / "manifest.yaml").stages[-1].name
    harm = stages[newest]["effect"] * (-1 if truth["higher_is_better"] else 1)
    cases = [(0.0, harm > 0), (abs(harm) * 0.8, harm > 0), (abs(harm) * 1.2, False)]
    if run == "digits":  # the issue's own thresholds: the newest stage's true harm is 0.094
        cases += [(0.2, False), (0.05, True)]
    for threshold, trips in cases:
        out = CliRunner().invoke(app, ["run", str(root / "manifest.yaml"), "--estimator",
                                       "frozen", "-q", "-f", "json", "--fail-on-harm",
                                       str(threshold), "--gate-stage", "newest"])
        assert out.exit_code == (1 if trips else 0), (threshold, harm, out.output)
        doc = json.loads(out.stdout)
        stage = next(s for s in doc["stages"] if s["name"] == doc["gate"]["worst"]["stage"])
        assert stage["evaluate"] == "direct"
        assert stage["effect"] == pytest.approx(stages[newest]["effect"], rel=1e-5)

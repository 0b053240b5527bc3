"""What a run and a validation produce: the dataclasses every report reads.

report.py, gates.py and plots.py depend on these and nothing else of the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from acctattr.evaluation.fidelity import Fidelity

# (what, done, total, level=0): level 0 counts stages, level 1 the work inside one stage's
# estimate (the later stages an embedding is carried through, and their substeps)
Progress = Callable[..., None]


@dataclass(frozen=True)
class StageEffect:
    name: str
    rank: int
    effect: float
    verdict: str  # hurt | helped | neutral
    share: float  # |effect| / sum of |effect| over stages
    counterfactual_value: float
    groups: dict[str, float] | None
    # Standard error of ``effect`` over eval examples: sample std / sqrt(n) (NaN when n < 2).
    # It measures how much the mean would move on another eval set of the same size, not
    # the estimator's error against retraining.
    effect_se: float = float("nan")
    groups_se: dict[str, float] | None = None  # the same per group (n = the group's size)
    position: int = 0  # 1-based place in training order (0: unknown)
    evaluate: str = ""  # the evaluation this stage's effect came from (linear | direct)
    # eval examples whose estimated counterfactual value lies outside the metric's range
    # (e.g. a cross-entropy below 0): the estimate extrapolated too far for them
    out_of_range: int = 0


@dataclass(frozen=True)
class ExampleEffects:
    index: int
    group: str | None
    effects: dict[str, float]


@dataclass(frozen=True)
class Result:
    """Everything a report needs; report.py depends on this and nothing else."""

    metric: str
    higher_is_better: bool
    estimator: str
    evaluate: str
    n_examples: int
    final_value: float
    stages: tuple[StageEffect, ...]  # ranked
    examples: tuple[ExampleEffects, ...] | None = None
    warnings: tuple[str, ...] = ()
    estimator_note: str | None = None  # why ``auto`` chose the estimator it did
    # several behaviours (``evals:``): every one's result (name, Result) in manifest order;
    # this Result is the first one's. None: one behaviour.
    behaviours: tuple[tuple[str, Result], ...] | None = None

    def harm(self, effect: float) -> float:
        """How much an effect made the metric worse (negative: it helped)."""
        return -effect if self.higher_is_better else effect


@dataclass(frozen=True)
class Validation:
    """Every estimator's fidelity against retraining through the manifest's ``replay``."""

    metric: str
    n_examples: int
    replay: str
    retrain_seconds: float  # all the counterfactual retrainings together
    results: tuple[Fidelity, ...]

"""CI gates on a Result: trip only when the harm is confidently above a threshold.

Pure Python on the result dataclasses (no torch, no rich). A check compares the one-sided
lower confidence bound of a stage's harm with the threshold X:

    bound = harm − z_C · se          z_C = NormalDist().inv_cdf(C)

and trips when bound > X. ``harm`` is the effect signed so that positive means "made the
metric worse" (Result.harm); ``se`` is its standard error over eval examples, so the bound
says "on another eval set of this size the harm would still exceed X with probability C".
Each check has its own confidence C; checking several stages or groups at once does not
widen the bounds (no multiple-comparison correction).

Gates fail closed: a check whose harm is NaN or infinite (a metric that overflowed), or
whose standard error or bound is undefined or infinite when the confidence needs it (C >
0.5 with a group of one example, an eval set of one), cannot show that the harm is below
the threshold, so it trips, and ``GateCheck.reason`` says why. At C = 0.5 the bound is the
point estimate and the standard error plays no part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from acctattr.errors import AcctattrError
from acctattr.results import Result, StageEffect

NEWEST = "newest"  # --gate-stage: the last stage in training order
WORST = "worst"  # --gate-group: every group, the gate trips on any of them


@dataclass(frozen=True)
class GateCheck:
    """One (stage, group) compared with the threshold; group None = all examples."""

    stage: str
    group: str | None
    harm: float
    se: float
    bound: float  # harm − z·se; NaN when se is undefined (fewer than 2 examples)
    tripped: bool
    # why the check tripped without a comparison: its harm, standard error or bound is
    # undefined or not finite (gates fail closed); None when the numbers decided
    reason: str | None = None


@dataclass(frozen=True)
class Gate:
    """The outcome of --fail-on-harm: what was asked, what was checked, whether it tripped."""

    threshold: float
    confidence: float
    z: float
    stage: str | None  # as requested: a stage name, "newest", or None (every stage)
    group: str | None  # as requested: a group name, "worst", or None (all examples)
    checks: tuple[GateCheck, ...]  # in training order, groups sorted within a stage

    @property
    def tripped(self) -> bool:
        return any(c.tripped for c in self.checks)

    @property
    def worst(self) -> GateCheck:
        """The check with the highest lower bound (a tripping one if any tripped)."""

        def key(c: GateCheck) -> tuple[bool, float, float]:
            return (c.reason is not None, -math.inf if math.isnan(c.bound) else c.bound,
                    -math.inf if math.isnan(c.harm) else c.harm)

        return max(self.checks, key=key)


def z_value(confidence: float) -> float:
    """The one-sided normal quantile z_C for confidence C in [0.5, 1)."""
    if not 0.5 <= confidence < 1:
        raise AcctattrError(f"--confidence {confidence:g} is outside [0.5, 1)",
                            "0.5 (the default) gates on the point estimate; 0.95 trips only "
                            "when the harm is above the threshold with 95% confidence")
    return NormalDist().inv_cdf(confidence)


def select_stages(result: Result, stage: str | None) -> list[StageEffect]:
    """The stages a gate checks, in training order: all, one by name, or the newest.

    A stage whose name is literally "newest" is matched by name first.
    """
    ordered = sorted(result.stages, key=lambda s: (s.position, s.rank))
    if stage is None:
        return ordered
    named = [s for s in ordered if s.name == stage]
    if named:
        return named
    if stage == NEWEST:
        return ordered[-1:]
    raise AcctattrError(f"--gate-stage {stage!r}: no stage of that name",
                        f"choose one of {', '.join(s.name for s in ordered)}, or 'newest'")


def check_stage_name(stage: str | None, names: list[str]) -> None:
    """Fail fast (before any computing) on a --gate-stage that names no stage."""
    if stage is not None and stage != NEWEST and stage not in names:
        raise AcctattrError(f"--gate-stage {stage!r}: the manifest has no stage of that name",
                            f"choose one of {', '.join(names)}, or 'newest'")


def check_group_name(group: str | None, has_group: bool, names: list[str] | None) -> None:
    """Fail fast on a --gate-group the eval set cannot have: no eval.group in the manifest,
    or (``names`` known from the data) a group id not among them."""
    if group is None:
        return
    if not has_group:
        raise AcctattrError(f"--gate-group {group!r}: the manifest names no eval.group",
                            "name a group tensor in the manifest's eval.group, or drop "
                            "--gate-group")
    if group != WORST and names is not None and group not in names:
        raise AcctattrError(f"--gate-group {group!r}: the eval set has no group of that name",
                            f"choose one of {', '.join(names)}, or 'worst'")


def check_threshold(threshold: float) -> None:
    if not math.isfinite(threshold):
        raise AcctattrError(f"--fail-on-harm {threshold}: must be a finite number")


def evaluate(result: Result, threshold: float, confidence: float = 0.5,
             stage: str | None = None, group: str | None = None) -> Gate:
    """Check the selected stage(s) and group(s) against ``threshold`` (see module doc)."""
    check_threshold(threshold)
    z = z_value(confidence)
    stages = select_stages(result, stage)
    checks: list[GateCheck] = []
    for s in stages:
        targets: list[tuple[str | None, float, float]]
        if group is None:
            targets = [(None, s.effect, s.effect_se)]
        else:
            if s.groups is None:
                raise AcctattrError(f"--gate-group {group!r}: the result has no groups",
                                    "name a group tensor in the manifest's eval.group, or "
                                    "drop --gate-group")
            names = sorted(s.groups)
            if group == WORST:
                picked = names
            elif group in s.groups:
                picked = [group]
            else:
                raise AcctattrError(f"--gate-group {group!r}: no group of that name",
                                    f"choose one of {', '.join(names)}, or 'worst'")
            se = s.groups_se or {}
            targets = [(g, s.groups[g], se.get(g, math.nan)) for g in picked]
        for g, effect, err in targets:
            harm = result.harm(effect)
            bound = harm - z * err if z > 0 else harm
            reason = undefined_reason(harm, err if z > 0 else 0.0, bound, result.n_examples)
            checks.append(GateCheck(s.name, g, harm, err, bound,
                                    tripped=reason is not None or bool(bound > threshold),
                                    reason=reason))
    return Gate(threshold, confidence, z, stage, group, tuple(checks))


def undefined_reason(harm: float, se: float, bound: float, n_examples: int) -> str | None:
    """Why a check cannot be decided by its numbers (it then trips), or None. ``se`` is 0
    where the confidence does not use it (C = 0.5)."""
    if not math.isfinite(harm):
        return f"the effect is {_word(harm)}, so the harm is unknown"
    if math.isnan(se):
        return ("the standard error is undefined (fewer than 2 examples"
                + (f" in the group; {n_examples} in the eval set)" if n_examples >= 2 else ")")
                + ", so the harm's noise is unknown")
    if not math.isfinite(se):
        return f"the standard error is {_word(se)}"
    if not math.isfinite(bound):
        return f"the lower bound is {_word(bound)}"
    return None


def _word(x: float) -> str:
    return "NaN" if math.isnan(x) else "infinite"


def describe(gate: Gate, metric: str) -> str:
    """The gate's outcome in words, for stderr (and the markdown report)."""
    w = gate.worst
    where = f"stage '{w.stage}'" + (f", group '{w.group}'" if w.group is not None else "")
    conf = f"{gate.confidence:.0%} confidence"
    if w.reason is not None:
        more = sum(c.tripped for c in gate.checks) - 1
        extra = f" (and {more} more check{'s' if more != 1 else ''} tripped)" if more else ""
        return (f"gate tripped (fail closed): {where}: {w.reason}; a gate cannot pass on "
                f"numbers it cannot check{extra}")
    if math.isnan(w.se):
        stats = f"harm {w.harm:+.4g}, standard error undefined (fewer than 2 examples)"
    else:
        stats = f"harm {w.harm:+.4g} ± {w.se:.2g}, lower bound {w.bound:+.4g}"
    n = len(gate.checks)
    scope = f"{n} check{'s' if n != 1 else ''}"
    if gate.tripped:
        more = sum(c.tripped for c in gate.checks) - 1
        extra = f" (and {more} more)" if more else ""
        return (f"gate tripped: {where} made {metric} worse by more than {gate.threshold:g} "
                f"at {conf}{extra}: {stats}")
    if n == 1:
        return (f"gate passed: {where} did not make {metric} worse by more than "
                f"{gate.threshold:g} at {conf} ({stats})")
    return (f"gate passed: no stage made {metric} worse by more than {gate.threshold:g} at "
            f"{conf} ({scope}; closest: {where}, {stats})")

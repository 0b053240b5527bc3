"""Per-example effects -> the ranked Result: exactly rounded means, standard errors, group
effects, and the warnings for estimates that leave the metric's range."""

from __future__ import annotations

import math

import torch

from acctattr.evaluation.evaluator import Evaluator
from acctattr.loading import Loaded
from acctattr.results import ExampleEffects, Result, StageEffect


def fsum_mean(x: torch.Tensor) -> float:
    """The mean of ``x`` [n], exactly rounded (math.fsum): the same bits however torch would
    split the sum among threads."""
    return math.fsum(x.double().tolist()) / x.numel()


def _out_of_range(values: torch.Tensor, bounds: tuple[float | None, float | None]) -> int:
    """How many of ``values`` lie outside [low, high] (a small tolerance for rounding)."""
    low, high = bounds
    tol = 1e-9 * max(1.0, float(values.abs().max())) if values.numel() else 0.0
    n = 0
    if low is not None:
        n += int((values < low - tol).sum())
    if high is not None:
        n += int((values > high + tol).sum())
    return n


def _range_text(bounds: tuple[float | None, float | None]) -> str:
    low, high = bounds
    return f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"


def standard_error(x: torch.Tensor) -> float:
    """Standard error of the mean of ``x`` [n]: sample std (n − 1) / sqrt(n); NaN if n < 2."""
    n = int(x.numel())
    if n < 2:
        return float("nan")
    mean = fsum_mean(x)
    var = math.fsum((v - mean) ** 2 for v in x.double().tolist()) / (n - 1)
    return math.sqrt(var) / math.sqrt(n)


def summarize(loaded: Loaded, estimator: str, evaluate: str, base: torch.Tensor,
              groups: torch.Tensor | None, per_stage: list[torch.Tensor],
              per_example: bool, estimator_note: str | None = None,
              warnings: list[str] | None = None, modes: list[str] | None = None,
              evaluator: Evaluator | None = None) -> Result:
    """Per-example effects [K][N] -> ranked stage effects (and per-example rows).

    ``modes``: each stage's evaluation (default ``evaluate`` for every stage). A stage whose
    estimated counterfactual values f_i(theta_T) - effect_i leave the metric's range (a
    cross-entropy below 0) is flagged: the estimate extrapolated too far there.
    """
    metric = (evaluator or loaded.evaluator).metric
    names = [r.name for r in loaded.runs]
    modes = modes or [evaluate] * len(names)
    outside = [_out_of_range(base - e, metric.value_range) for e in per_stage]
    warnings = [*(warnings or []), *(
        f"stage '{names[k]}': its estimated counterfactual {metric.name} lies outside the "
        f"metric's range {_range_text(metric.value_range)} for {n} of {base.shape[0]} eval "
        f"examples, which no model can reach: its {modes[k]} estimate extrapolated too far"
        + (" (try --evaluate direct)" if modes[k] == "linear" else "")
        for k, n in enumerate(outside) if n)]
    undefined = int((~torch.isfinite(base)).sum())
    if undefined:  # a user metric can yield NaN or Inf; such effects are reported, gates trip
        warnings.append(f"{metric.name} is NaN or infinite at the final model for {undefined} "
                        f"of {base.shape[0]} eval examples: the final value and every effect "
                        "are undefined (a gate on them trips)")
        per_stage = [torch.where(torch.isfinite(base), e, math.nan) for e in per_stage]
    final = fsum_mean(base)
    effects = [fsum_mean(e) for e in per_stage]
    total = sum(abs(x) for x in effects)
    group_ids = sorted(set(groups.tolist())) if groups is not None else []
    order = sorted(range(len(names)), key=lambda k: (-abs(effects[k]), k))
    stages = []
    for rank, k in enumerate(order, start=1):
        harm = -effects[k] if metric.higher_is_better else effects[k]
        g = g_se = None
        if groups is not None:
            members = {gid: per_stage[k][groups == gid] for gid in group_ids}
            g = {str(gid): fsum_mean(m) for gid, m in members.items()}
            g_se = {str(gid): standard_error(m) for gid, m in members.items()}
        stages.append(StageEffect(
            name=names[k], rank=rank, effect=effects[k],
            verdict=("undefined" if not math.isfinite(harm) else  # a gate on it trips
                     "hurt" if harm > 0 else "helped" if harm < 0 else "neutral"),
            share=abs(effects[k]) / total if total > 0 else 0.0,
            counterfactual_value=final - effects[k], groups=g,
            effect_se=standard_error(per_stage[k]), groups_se=g_se, position=k + 1,
            evaluate=modes[k], out_of_range=outside[k]))
    examples = None
    if per_example:
        matrix = torch.stack(per_stage).tolist()
        glist = groups.tolist() if groups is not None else None
        examples = tuple(ExampleEffects(
            index=i, group=str(glist[i]) if glist is not None else None,
            effects={names[k]: matrix[k][i] for k in range(len(names))})
            for i in range(base.shape[0]))
    return Result(metric=metric.name, higher_is_better=metric.higher_is_better,
                  estimator=estimator, evaluate=evaluate, n_examples=int(base.shape[0]),
                  final_value=final, stages=tuple(stages), examples=examples,
                  warnings=(*loaded.warnings, *(warnings or [])),
                  estimator_note=estimator_note)

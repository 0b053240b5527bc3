"""Learning-rate schedules -> one lr per optimizer step (0-indexed steps s = 0..T-1).

The formulas (also in the README), with T = steps, W = warmup, base and min:

    warmup (s < W):        lr_s = base * s / W        (step 0 has lr 0, as in Hugging Face)
    constant (s >= W):     lr_s = base
    linear (s >= W):       lr_s = min + (base - min) * (T - s) / (T - W)
    cosine (s >= W):       lr_s = min + (base - min) * (1 + cos(pi * (s - W) / (T - W))) / 2
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from acctattr.runs.manifest import LrSpec


def schedule_lrs(schedule: str, steps: int, base: float, warmup: int = 0,
                 minimum: float = 0.0) -> list[float]:
    """Per-step learning rates of a named schedule (formulas in the module docstring)."""
    out = []
    span = max(steps - warmup, 1)
    for s in range(steps):
        if s < warmup:
            out.append(base * s / warmup)
            continue
        if schedule == "constant":
            factor = 1.0
        elif schedule == "linear":
            factor = (steps - s) / span
        elif schedule == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * (s - warmup) / span))
        else:
            raise ValueError(f"unknown schedule {schedule!r}")
        out.append(minimum + (base - minimum) * factor)
    return out


def interpolate_logged_lrs(logged: Sequence[tuple[int, float]], first_step: int,
                           steps: int) -> tuple[list[float], int]:
    """Per-step lrs from sparse (global_step, lr) log points, linearly interpolated.

    A Hugging Face Trainer logs ``learning_rate`` at global step N after the scheduler has
    stepped N times, i.e. the lr that 0-indexed global step N uses. Steps before the first
    or after the last log point take the nearest logged value.

    Args:
        logged: (global_step, lr) pairs, any order.
        first_step: 0-indexed global step of the stage's first optimizer step.
        steps: the stage's number of optimizer steps.
    Returns:
        (per-step lrs, how many of them were interpolated or extrapolated rather than logged)
    """
    points = sorted(dict(logged).items())
    if not points:
        raise ValueError("no learning_rate entries")
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    out: list[float] = []
    guessed = 0
    j = 0
    for s in range(first_step, first_step + steps):
        while j + 1 < len(xs) and xs[j + 1] <= s:
            j += 1
        if s == xs[j]:
            out.append(ys[j])
            continue
        guessed += 1
        if s < xs[0]:
            out.append(ys[0])
        elif j + 1 >= len(xs):
            out.append(ys[-1])
        else:
            t = (s - xs[j]) / (xs[j + 1] - xs[j])
            out.append(ys[j] + t * (ys[j + 1] - ys[j]))
    return out, guessed


def lrs_from_spec(spec: LrSpec, steps: int) -> list[float]:
    """Per-step lrs of a manifest lr spec (not ``trainer_state``, which needs file I/O)."""
    if spec.value is not None:
        return [spec.value] * steps
    if spec.values is not None:
        if len(spec.values) != steps:
            raise ValueError(f"{len(spec.values)} per-step lrs for {steps} steps")
        return list(spec.values)
    if spec.schedule is not None:
        return schedule_lrs(spec.schedule, steps, spec.base, spec.warmup, spec.min)
    raise ValueError("lr spec names a trainer_state file; read it with checkpoints.read_lrs")

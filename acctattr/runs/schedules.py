"""Learning-rate schedules -> one lr per optimizer step (0-indexed steps s = 0..T-1).

The formulas (also in the README), with T = steps, W = warmup, base and min:

    warmup (s < W):        lr_s = base * s / W        (step 0 has lr 0, as in Hugging Face)
    constant (s >= W):     lr_s = base
    linear (s >= W):       lr_s = min + (base - min) * (T - s) / (T - W)
    cosine (s >= W):       lr_s = min + (base - min) * (1 + cos(pi * (s - W) / (T - W))) / 2
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeGuard, overload

from acctattr.files import is_file
from acctattr.runs.formats import FormatError, TrainerState, training_args
from acctattr.runs.manifest import LrSpec


class Lrs(Sequence[float]):
    """A stage's per-step learning rates, computed on demand in closed form: never a list
    of ``steps`` floats (a stage of 1e8 steps costs nothing to hold or check).

    Supports ``len``, indexing, slicing (a slice is another lazy view) and iteration; each
    value is computed by exactly the arithmetic a list would have held, so sums over it
    are bit-identical to sums over that list. ``lr_at(s)`` maps a 0-based step to its lr.
    """

    def __init__(self, lr_at: Callable[[int], float], start: int, stop: int) -> None:
        self._at = lr_at
        self._start = start
        self._stop = max(start, stop)

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, index: int) -> float: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[float]: ...

    def __getitem__(self, index: int | slice) -> float | Sequence[float]:
        n = len(self)
        if isinstance(index, slice):
            lo, hi, step = index.indices(n)
            if step == 1:
                return Lrs(self._at, self._start + lo, self._start + max(lo, hi))
            return [self._at(self._start + i) for i in range(lo, hi, step)]
        i = operator.index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("learning-rate step out of range")
        return self._at(self._start + i)

    def __iter__(self) -> Iterator[float]:
        return map(self._at, range(self._start, self._stop))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other,
                                                                       strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Lrs(steps {self._start}..{self._stop})"


def schedule_at(schedule: str, steps: int, base: float, warmup: int = 0,
                minimum: float = 0.0) -> Callable[[int], float]:
    """The lr of 0-based step s of a named schedule (formulas in the module docstring)."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}")
    span = max(steps - warmup, 1)

    def at(s: int) -> float:
        if s < warmup:
            return base * s / warmup
        if schedule == "constant":
            factor = 1.0
        elif schedule == "linear":
            factor = (steps - s) / span
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * (s - warmup) / span))
        return minimum + (base - minimum) * factor

    return at


def schedule_lrs(schedule: str, steps: int, base: float, warmup: int = 0,
                 minimum: float = 0.0) -> list[float]:
    """Per-step learning rates of a named schedule, as a list (formulas in the module
    docstring; ``lrs_from_spec`` gives the same values lazily)."""
    return list(Lrs(schedule_at(schedule, steps, base, warmup, minimum), 0, steps))


def interpolate_logged_lrs(logged: Sequence[tuple[int, float]], first_step: int,
                           steps: int) -> tuple[Sequence[float], int]:
    """Per-step lrs from sparse (global_step, lr) log points, linearly interpolated.

    A Hugging Face Trainer logs ``learning_rate`` at global step N after the scheduler has
    stepped N times, i.e. the lr that 0-indexed global step N uses. Steps before the first
    or after the last log point take the nearest logged value.

    Args:
        logged: (global_step, lr) pairs, any order.
        first_step: 0-indexed global step of the stage's first optimizer step.
        steps: the stage's number of optimizer steps.
    Returns:
        (per-step lrs, lazy (Lrs), how many of them were interpolated or extrapolated
        rather than logged)
    """
    points = sorted(dict(logged).items())
    if not points:
        raise ValueError("no learning_rate entries")
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]

    def at(i: int) -> float:
        s = first_step + i
        j = max(bisect.bisect_right(xs, s) - 1, 0)  # the last log point at or before s
        if s == xs[j]:
            return ys[j]
        if s < xs[0]:
            return ys[0]
        if j + 1 >= len(xs):
            return ys[-1]
        t = (s - xs[j]) / (xs[j + 1] - xs[j])
        return ys[j] + t * (ys[j + 1] - ys[j])

    logged_here = bisect.bisect_left(xs, first_step + steps) - bisect.bisect_left(xs, first_step)
    return Lrs(at, 0, steps), steps - logged_here


def lrs_from_spec(spec: LrSpec, steps: int) -> Sequence[float]:
    """Per-step lrs of a manifest lr spec (not ``trainer_state``, which needs file I/O):
    lazy (Lrs) for a number or a schedule, a list for a per-step list."""
    if spec.value is not None:
        value = spec.value
        return Lrs(lambda s: value, 0, steps)
    if spec.values is not None:
        if len(spec.values) != steps:
            raise ValueError(f"{len(spec.values)} per-step lrs for {steps} steps")
        return list(spec.values)
    if spec.schedule is not None:
        return Lrs(schedule_at(spec.schedule, steps, spec.base, spec.warmup, spec.min),
                   0, steps)
    raise ValueError("lr spec names a trainer_state file; read it with checkpoints.read_lrs")


# TrainingArguments.lr_scheduler_type -> (schedule_at's schedule, whether its warmup applies):
# transformers.get_scheduler's "constant" takes no warmup
TRAINER_SCHEDULES = {"linear": ("linear", True), "cosine": ("cosine", True),
                     "constant_with_warmup": ("constant", True), "constant": ("constant", False)}


def trainer_schedule(args: dict, max_steps: int) -> tuple[Callable[[int], float], str] | None:
    """The lr of each 0-indexed global step of a Hugging Face Trainer run of ``max_steps``
    planned steps, from its TrainingArguments fields (``formats.training_args``): the
    linear, cosine, constant and constant_with_warmup schedules of transformers.get_scheduler
    in closed form, and every other schedule get_scheduler builds as a LambdaLR
    (cosine_with_restarts, polynomial, inverse_sqrt, cosine_with_min_lr,
    warmup_stable_decay, ... with ``lr_scheduler_kwargs``) from transformers itself, where
    it is installed (warmup ``warmup_steps``, or a fraction of the run where it is below 1
    or ``warmup_ratio`` where an older transformers kept one), with a description; None
    where the fields do not fix one (a missing or unreadable field, a schedule that is no
    function of the step)."""
    name = args.get("lr_scheduler_type")
    kind = TRAINER_SCHEDULES.get(name)  # type: ignore[arg-type]
    base = args.get("learning_rate")
    kwargs = args.get("lr_scheduler_kwargs", None)
    if not isinstance(name, str) or not _number(base) or base < 0 \
            or not (kwargs is None or isinstance(kwargs, dict)):
        return None
    if kind is None or kwargs:
        warmup = _warmup(args, max_steps)
        at = None if warmup is None else _library_schedule(name, max_steps, float(base),
                                                           warmup, kwargs or {})
        if at is None:
            return None
        extra = "".join(f", {k}={v!r}" for k, v in sorted((kwargs or {}).items()))
        return at, (f"{name} from {base:g}{extra}, {warmup} warmup step(s) of {max_steps} "
                    "(transformers.get_scheduler)")
    # every TrainingArguments has warmup_steps: one the scan could not read (a huge
    # integer, another type) fixes no schedule, nor does a ratio beyond the whole run
    warmup = _warmup(args, max_steps) if kind[1] else 0
    if warmup is None:
        return None
    at = schedule_at(kind[0], max_steps, float(base), warmup)
    return at, (f"{args['lr_scheduler_type']} from {base:g}, {warmup} warmup step(s) of "
                f"{max_steps}")


def _warmup(args: dict, max_steps: int) -> int | None:
    """TrainingArguments.get_warmup_steps: ``warmup_steps`` from 1 up, else that fraction
    (or an older transformers' ``warmup_ratio``) of the run, rounded up; None where the
    fields cannot be read or a ratio is beyond the whole run."""
    steps, ratio = args.get("warmup_steps"), args.get("warmup_ratio", 0.0)
    if not _number(steps) or steps < 0 or not _number(ratio) or not 0 <= ratio <= 1:
        return None
    if steps >= 1:
        return int(steps)
    return math.ceil(max_steps * (steps or ratio)) if steps > 0 or ratio > 0 else 0


def _library_schedule(name: str, steps: int, base: float, warmup: int,
                      kwargs: dict) -> Callable[[int], float] | None:
    """lr(s) = base * f(s) with f the lr_lambda of transformers.get_scheduler(name, ...):
    what LambdaLR gives the step, by the same arithmetic. None where transformers is not
    installed, refuses the arguments, or builds no single-lambda LambdaLR."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    try:
        sched = transformers.get_scheduler(name, opt, num_warmup_steps=warmup,
                                           num_training_steps=steps,
                                           scheduler_specific_kwargs=dict(kwargs))
    except Exception:  # an unknown name, kwargs this version does not take
        return None
    if type(sched) is not torch.optim.lr_scheduler.LambdaLR or len(sched.lr_lambdas) != 1:
        return None
    f = sched.lr_lambdas[0]

    def at(s: int) -> float:
        return base * f(s)

    return at


def _number(x: object) -> TypeGuard[int | float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _saved_last_lr(folder: Path, planned: int | None) -> tuple[int, float] | None:
    """(last_epoch, _last_lr[0]) of ``folder/scheduler.pt`` (a LambdaLR's state: the lr
    of 0-indexed step last_epoch, the next one), where it can be read; else None."""
    import torch

    try:
        if not is_file(folder / "scheduler.pt"):  # a FIFO would block torch.load
            return None
        saved = torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True)
        step, last = saved["last_epoch"], float(saved["_last_lr"][0])
    except Exception:  # not LambdaLR's state
        return None
    if isinstance(step, int) and not isinstance(step, bool) and 0 <= step \
            and (planned is None or step <= planned) and math.isfinite(last):
        return step, last
    return None


def _fits(at: Callable[[int], float], points: Sequence[tuple[int, float]]) -> bool:
    scale = max((abs(lr) for _, lr in points), default=0.0) or 1.0
    return all(math.isclose(at(s), lr, rel_tol=1e-6, abs_tol=1e-9 * scale)
               for s, lr in points if s >= 0)


def settle_convention(ts: TrainerState) -> TrainerState:
    """``ts`` with the step each logged learning_rate belongs to decided where no
    transformers_version says (a Trainer run of a model without config.json): the lr
    logged at the last step against scheduler.pt's (the next step's: equal under the older
    rule, the previous step's under transformers >= 4.51), else the schedule
    training_args.bin names, which only one of the two readings may fit. Where neither
    settles it and the two readings give different lrs, a FormatError naming the file."""
    if ts.lr_convention != "unknown" or not ts.lr_points:
        return ts
    folder = ts.path.parent
    older = list(ts.lr_points)  # as read: the lr logged at step N is step N's
    newer = [(s - 1, lr) for s, lr in older]
    saved = _saved_last_lr(folder, ts.max_steps)
    fits: set[str] = set()
    if saved is not None and saved[0] in dict(older) and not _fits(
            lambda s: saved[1], [(0, dict(older)[saved[0]])]):
        fits = {"used"}  # the lr logged with the saved state is not the next step's
    got = trainer_schedule(training_args(folder), ts.max_steps) if ts.max_steps else None
    if not fits and got is not None:
        extra = [saved] if saved is not None else []
        fits = {name for name, pts in (("used", newer), ("next", older))
                if _fits(got[0], pts + extra)}
    if not fits and len({lr for _, lr in older}) == 1:
        fits = {"next"}  # one logged value: the same lrs either way
    if not fits:
        raise FormatError(
            f"{ts.path}: cannot tell which step each logged learning_rate belongs to (before "
            "transformers 4.51 the lr logged at step N was the next step's, from 4.51 the "
            "step's own): no config.json with a transformers_version beside it, and neither "
            "scheduler.pt nor training_args.bin's schedule settles it; add "
            f"\"transformers_version\" of the transformers that trained it to "
            f"{folder / 'config.json'}, or give optimizer.lr as a per-step list")
    if "used" in fits:
        points = tuple((s, lr) for s, lr in newer if s >= 0)
        return dataclasses.replace(ts, lr_points=points, lr_convention="used")
    return dataclasses.replace(ts, lr_convention="next")


def stated_trainer_lrs(ts: TrainerState) -> tuple[Callable[[int], float], str] | None:
    """The lr of each 0-indexed global step under the schedule the Trainer's
    training_args.bin names (trainer_schedule), where it gives every lr the run
    logged and the one scheduler.pt saved (the next step's, ``_last_lr``) and at least one
    of them is there; else None."""

    folder, planned = ts.path.parent, ts.max_steps
    got = trainer_schedule(training_args(folder), planned) if planned else None
    if got is None or planned is None:
        return None
    at, how = got
    points = list(ts.lr_points)
    saved = _saved_last_lr(folder, planned)  # None: the logged lrs alone
    if saved is not None:
        points.append(saved)
    if not points or not _fits(at, points):
        return None
    return at, how

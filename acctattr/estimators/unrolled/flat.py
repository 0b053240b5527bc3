"""The run as the unrolled simulations see it: the trainable parameters as one float64
vector, the per-group hyperparameters of each stage as vectors over it, the checkpoints a
stage's segments are anchored at, and what the simulations keep between calls (the
simulated actual path of one stage, the reproduction checks, the fitted noise scales).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from acctattr.estimators.base import Params, Stages, Training
from acctattr.options import UnrolledConfig
from acctattr.runs.checkpoints import StateDictReader

if TYPE_CHECKING:
    from acctattr.estimators.unrolled.path import ActualPath, Reproduction


class FlatRun:
    """Flat float64 views of the run's parameters and per-group constants, shared by the
    SGD flow, the Adam flow and the linear propagator."""

    def __init__(self, training: Training, stages: Stages, config: UnrolledConfig) -> None:
        self.training = training
        self.stages = stages
        self.runs = training.runs
        self.curvature = training.curvature
        self.config = config
        self.device = stages.device  # where the float64 vectors live
        self.names = list(training.trainable)
        self.shapes = [training.trainable[n] for n in self.names]
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self._anchors: dict[int, Params] = {}
        # the simulated actual run of the one later stage being carried through (kept for
        # every earlier stage carried through it, one stage at a time)
        self.paths: dict[int, ActualPath] = {}
        # stage index -> how well its simulated actual run reproduces the recorded one
        self.reproduction: dict[int, Reproduction] = {}
        # stage index -> fitted batch-noise scale c (~ 1/batch size) of its Adam flow
        self.noise_scale: dict[int, float] = {}
        # (what, done, total) of the simulation's substeps (the estimator's progress)
        self.progress: Callable[[str, int, int], None] | None = None
        # (stage, first step, end step) -> summed lr, and weight decay -> AdamW's decay factor
        # over those steps: a substep's, asked for again by every simulation through it
        # (each a loop over its steps' lrs, which grows with the run's length)
        self._lr_sums: dict[tuple[int, int, int], float] = {}
        self._decays: dict[tuple[int, int, int], dict[float, float]] = {}

    def report(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)

    # ------------------------------------------------------------ flat <-> named
    def flat(self, named: Params, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """One float64 (or ``dtype``) vector of the parameters in self.names order (one
        copy, converted as it is written)."""
        out = torch.empty(sum(self.sizes), dtype=dtype, device=self.device)
        for part, n in zip(torch.split(out, self.sizes), self.names, strict=True):
            part.copy_(named[n].reshape(-1))
        return out

    def named(self, flat: torch.Tensor, dtype: torch.dtype = torch.float32) -> Params:
        parts = torch.split(flat, self.sizes)
        return {n: p.reshape(s).to(dtype) for n, p, s in zip(self.names, parts, self.shapes,
                                                             strict=True)}

    def at(self, theta: torch.Tensor) -> Params:
        """Flat parameters as the model's own tensors (its dtypes), to evaluate it at."""
        dtypes = self.training.dtypes
        parts = torch.split(theta, self.sizes)
        return {n: p.reshape(s).to(dtypes.get(n, torch.float32))
                for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    # ------------------------------------------------------------ per-group constants
    def per_group(self, j: int, value: Callable[..., float]) -> torch.Tensor:
        """value(group hyperparameters) for each parameter's group: a scalar (0-dim float64
        tensor, broadcast) where every parameter's group gives the same value, else a flat
        vector of it per element."""
        run = self.runs[j]
        groups = self.stages.groups[j]
        values = {i: float(value(run.state.groups[i])) for i in {groups[n] for n in self.names}}
        if len(set(values.values())) == 1:
            return torch.tensor(next(iter(values.values())), dtype=torch.float64,
                                device=self.device)
        return torch.cat([torch.full((size,), values[groups[n]], dtype=torch.float64,
                                     device=self.device)
                          for n, size in zip(self.names, self.sizes, strict=True)])

    def coupled_decay(self, j: int) -> torch.Tensor:
        """Stage j's coupled (L2) weight decay per element (a scalar where uniform); AdamW's
        decoupled one is not."""
        if self.runs[j].opt_type == "adamw":
            return torch.tensor(0.0, dtype=torch.float64, device=self.device)
        return self.per_group(j, lambda g: g.weight_decay)

    def decay(self, j: int, k0: int, k1: int) -> torch.Tensor:
        """AdamW's decoupled weight decay over steps k0..k1 of stage j, per element (each
        group's product over the steps' lrs computed once per (j, k0, k1))."""
        memo = self._decays.setdefault((j, k0, k1), {})

        def factor(g) -> float:
            if g.weight_decay not in memo:
                memo[g.weight_decay] = math.prod(1 - eta * g.weight_decay
                                                 for eta in self.runs[j].lrs[k0:k1])
            return memo[g.weight_decay]

        return self.per_group(j, factor)

    def lr_sum(self, j: int, k0: int, k1: int) -> float:
        """The summed lr of steps k0..k1 of stage j, float(sum(lrs[k0:k1])) (computed once
        per (j, k0, k1))."""
        key = (j, k0, k1)
        if key not in self._lr_sums:
            self._lr_sums[key] = float(sum(self.runs[j].lrs[k0:k1]))
        return self._lr_sums[key]

    def rate(self, j: int) -> torch.Tensor:
        """Per-element effective step multiplier of stage j."""
        run = self.runs[j]
        if run.opt_type == "sgd":
            # without momentum torch keeps no buffer and ignores dampening
            return self.per_group(j, lambda g: 1.0 if g.momentum == 0.0 else
                                  1.0 / (1.0 - g.momentum) if g.nesterov
                                  else (1.0 - g.dampening) / (1.0 - g.momentum))
        return self.flat({n: self.stages.preconditioner(j, n) for n in self.names})

    def trained_mask(self, j: int) -> torch.Tensor | None:
        """1 for parameters stage j trained, 0 for those it left alone; None: all trained."""
        trained = self.runs[j].trained
        if trained is None:
            return None
        return torch.cat([torch.full((size,), 1.0 if n in trained else 0.0, dtype=torch.float64,
                                     device=self.device)
                          for n, size in zip(self.names, self.sizes, strict=True)])

    # ------------------------------------------------------------ checkpoints
    def anchor(self, reader: StateDictReader) -> Params:
        """A checkpoint's trainable parameters (at most two kept in memory)."""
        key = id(reader)
        if key not in self._anchors:
            if len(self._anchors) >= 2:
                self._anchors.pop(next(iter(self._anchors)))
            self._anchors[key] = {n: reader.get(n).to(self.device) for n in self.names}
        return self._anchors[key]

    def drop_anchors(self) -> None:
        """Forget the checkpoints read so far (read again when next asked for)."""
        self._anchors.clear()

    def point(self, a: StateDictReader, b: StateDictReader, t: float) -> Params:
        """The run's parameters a fraction t of the way from anchor a to anchor b."""
        pa = self.anchor(a)
        if t == 0.0:
            return pa
        pb = self.anchor(b)
        if t == 1.0:
            return pb
        return {n: torch.lerp(pa[n], pb[n], t) for n in self.names}

    def segments(self, j: int) -> list[tuple[StateDictReader, StateDictReader, int, int]]:
        """(anchor at the segment's start, anchor at its end, first step, end step)."""
        run = self.runs[j]
        points = [(0, run.start), *run.checkpoints, (run.steps, run.end)]
        return [(a, b, sa, sb) for (sa, a), (sb, b) in zip(points, points[1:], strict=False)]

    # ------------------------------------------------------------ the training loss
    def gradient(self, j: int, theta: torch.Tensor) -> torch.Tensor:
        """Stage j's mean training-loss gradient plus coupled decay at flat theta."""
        return self.flat(self.curvature(j).gradient(self.at(theta))) + \
            self.coupled_decay(j) * theta

"""frozen: Delta_k and the stage's optimizer-state change delta_b_k carried through every
later stage by the optimizer's own linear dynamics, later gradients held fixed (SPEC
section 2; the recurrences are in acctattr.estimators.dynamics).

For SGD and AdamW a whole later stage collapses to a few scalars per parameter group:
v_k = alpha * Delta_k + beta * delta_b_k.
"""

from __future__ import annotations

from functools import partial

import torch

from acctattr import heap
from acctattr.estimators.base import Estimator, Params, Training
from acctattr.estimators.dynamics import (
    AdamwTransform,
    SgdTransform,
    adam_l2_propagate,
    adamw_transform,
    sgd_transform,
)
from acctattr.options import UnrolledConfig


class Frozen(Estimator):
    name = "frozen"
    evaluate = "linear"
    # bench/scale.py, 124M GPT-2-style run: 3.4-3.9 checkpoints above start-up at its peak,
    # the model itself (theta_T) included, whatever the number of stages
    copies = 5

    def __init__(self, training: Training, config: UnrolledConfig | None = None,
                 strict: bool = False) -> None:
        super().__init__(training, config, strict)
        self._transforms: dict[tuple[int, int], SgdTransform | AdamwTransform] = {}

    def embed(self, k: int) -> Params:
        # every step is elementwise: each parameter is built a slice at a time, every
        # stage's files read for that slice only
        v = {name: self.streamed(name, partial(self._param, k, name))
             for name in self.training.trainable}
        self.stages.release()  # the files read for it: none stays open between stages
        heap.trim()  # the slices' float64 blocks, before the evaluation allocates
        return v

    def _param(self, k: int, name: str, start: int | None = None,
               stop: int | None = None) -> torch.Tensor:
        d = self.stages.delta(k, name, start, stop)
        e = self.stages.delta_state(k, name, start, stop)
        for j in range(k + 1, len(self.training.runs)):
            d, e = self.propagate(j, name, d, e, start, stop)
        return d

    def propagate(self, j: int, name: str, d: torch.Tensor, e: torch.Tensor | None,
                  start: int | None = None, stop: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Carry (d, e) of one parameter (flat elements start..stop of it) through stage j
        with gradients held fixed."""
        run = self.training.runs[j]
        if run.fresh:
            e = None
        if run.trained is not None and name not in run.trained:
            # the stage's optimizer never touched this parameter: no weight decay, no
            # momentum, no update acts on its perturbation (a frozen base weight under LoRA)
            return d, e
        group = self.stages.groups[j][name]
        hp = run.state.groups[group]
        if run.opt_type == "adam" and hp.weight_decay > 0:
            pre = self.stages.preconditioner(j, name, start, stop)
            return adam_l2_propagate(d, e, pre, run.lrs, hp.beta1, hp.weight_decay, run.step0)
        t = self._transform(j, group)
        if isinstance(t, SgdTransform):
            return t.apply(d, e)
        p = (self.stages.preconditioner(j, name, start, stop)
             if (e is not None and t.b != 0.0) else None)
        return t.apply(d, e, p)

    def _transform(self, j: int, group: int) -> SgdTransform | AdamwTransform:
        key = (j, group)
        if key not in self._transforms:
            run = self.training.runs[j]
            hp = run.state.groups[group]
            if run.opt_type == "sgd":
                self._transforms[key] = sgd_transform(run.lrs, hp.momentum, hp.dampening,
                                                      hp.nesterov, hp.weight_decay, run.fresh)
            else:
                wd = hp.weight_decay if run.opt_type == "adamw" else 0.0
                self._transforms[key] = adamw_transform(run.lrs, hp.beta1, wd, run.step0,
                                                        run.fresh)
        return self._transforms[key]

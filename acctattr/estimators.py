"""Stage embeddings v_k ~ theta_T - theta_T^(-k), one parameter-shaped vector per stage.

- ``naive``: v_k = Delta_k (the task vector).
- ``frozen``: Delta_k and the stage's optimizer-state change delta_b_k carried through every
  later stage by the optimizer's own linear dynamics (acctattr.dynamics), gradients held
  fixed: v_k = alpha*Delta_k + beta*delta_b_k per parameter group for SGD.

An embedding depends only on checkpoints and optimizer state, never on the eval set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from acctattr.checkpoints import StateDictReader
from acctattr.dynamics import (
    AdamwTransform,
    SgdTransform,
    adam_l2_propagate,
    adam_preconditioner,
    adamw_transform,
    sgd_transform,
)
from acctattr.errors import CheckpointError
from acctattr.optim_state import OptimizerState

# The optimizer state that carries a parameter perturbation forward.
FIRST_MOMENT = {"sgd": "momentum_buffer", "adam": "exp_avg", "adamw": "exp_avg"}
Params = dict[str, torch.Tensor]


@dataclass
class StageRun:
    """Everything the estimators need about one stage, files opened lazily."""

    name: str
    start: StateDictReader
    end: StateDictReader
    opt_type: str
    lrs: list[float]
    fresh: bool
    step0: int  # optimizer steps taken before this stage (0 when fresh)
    state: OptimizerState
    data: Path | None = None
    checkpoints: list[tuple[int, StateDictReader]] = field(default_factory=list)
    # parameters this stage's optimizer updated; None = every trainable parameter. An
    # adapter stage trains none of the model's own weights (frozenset()).
    trained: frozenset[str] | None = None

    @property
    def steps(self) -> int:
        return len(self.lrs)


class Embedder:
    """Computes v_k for one stage at a time (only one embedding is held in memory)."""

    def __init__(self, runs: list[StageRun], trainable: dict[str, tuple[int, ...]]) -> None:
        self.runs = runs
        self.trainable = trainable
        self._groups = [r.state.group_of() for r in runs]
        self._transforms: dict[tuple[int, int], SgdTransform | AdamwTransform] = {}
        self._precond: dict[tuple[int, str], torch.Tensor] = {}

    # ------------------------------------------------------------ pieces
    def delta(self, k: int, name: str) -> torch.Tensor:
        """Delta_k for one parameter, float64."""
        run = self.runs[k]
        return run.end.get(name).double() - run.start.get(name).double()

    def delta_state(self, k: int, name: str) -> torch.Tensor | None:
        """delta_b_k: first-moment state at the end of stage k minus at the end of stage k-1.

        Needed only when stage k+1 continues stage k's optimizer state; None otherwise.
        """
        if k + 1 >= len(self.runs) or self.runs[k + 1].fresh:
            return None
        run, nxt = self.runs[k], self.runs[k + 1]
        key = FIRST_MOMENT[run.opt_type]
        if run.state.source is None:
            raise CheckpointError(
                f"stage '{nxt.name}' continues the optimizer state of stage '{run.name}', so "
                f"stage '{run.name}' needs optimizer.state (its {key} at the end)",
                "add optimizer.state to that stage, or set continues: false if it did not")
        now = run.state.tensor(name, key)
        before = None
        if k > 0 and self.runs[k - 1].opt_type == nxt.opt_type:
            prev = self.runs[k - 1]
            if prev.state.source is None:
                raise CheckpointError(
                    f"skipping stage '{run.name}' makes stage '{nxt.name}' continue the state "
                    f"of stage '{prev.name}', which has no optimizer.state",
                    f"add optimizer.state to stage '{prev.name}'")
            before = prev.state.tensor(name, key)
        if now is None and before is None:
            return None
        zero = torch.zeros(self.trainable[name], dtype=torch.float64)
        return (now.double() if now is not None else zero) - (
            before.double() if before is not None else zero)

    def _transform(self, j: int, group: int) -> SgdTransform | AdamwTransform:
        key = (j, group)
        if key not in self._transforms:
            run = self.runs[j]
            hp = run.state.groups[group]
            if run.opt_type == "sgd":
                self._transforms[key] = sgd_transform(run.lrs, hp.momentum, hp.dampening,
                                                      hp.nesterov, hp.weight_decay, run.fresh)
            else:
                wd = hp.weight_decay if run.opt_type == "adamw" else 0.0
                self._transforms[key] = adamw_transform(run.lrs, hp.beta1, wd, run.step0,
                                                        run.fresh)
        return self._transforms[key]

    def preconditioner(self, j: int, name: str) -> torch.Tensor:
        """Stage j's frozen Adam preconditioner for one parameter, from its state file."""
        key = (j, name)
        if key not in self._precond:
            run = self.runs[j]
            hp = run.state.groups[self._groups[j][name]]
            v = run.state.tensor(name, "exp_avg_sq")
            if v is None:
                why = "there is none" if run.state.source is None else "it lacks that tensor"
                raise CheckpointError(
                    f"stage '{run.name}': the estimator needs the Adam second moment "
                    f"(exp_avg_sq) of '{name}' from optimizer.state, and {why}",
                    "give the stage's optimizer.state (its optimizer.pt at the stage's end)")
            step = run.state.step if run.state.step is not None else run.step0 + run.steps
            self._precond[key] = adam_preconditioner(v, step, hp.beta2, hp.eps)
        return self._precond[key]

    # ------------------------------------------------------------ estimators
    def naive(self, k: int) -> Params:
        """v_k = Delta_k."""
        return {name: self.delta(k, name) for name in self.trainable}

    def frozen(self, k: int) -> Params:
        """v_k from Delta_k and delta_b_k through every later stage's optimizer dynamics."""
        return {name: self.frozen_param(k, name) for name in self.trainable}

    def frozen_param(self, k: int, name: str) -> torch.Tensor:
        d = self.delta(k, name)
        e = self.delta_state(k, name)
        for j in range(k + 1, len(self.runs)):
            d, e = self.propagate_frozen(j, name, d, e)
        return d

    def propagate_frozen(self, j: int, name: str, d: torch.Tensor,
                         e: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Carry (d, e) of one parameter through stage j with gradients held fixed."""
        run = self.runs[j]
        if run.fresh:
            e = None
        if run.trained is not None and name not in run.trained:
            # the stage's optimizer never touched this parameter: no weight decay, no
            # momentum, no update acts on its perturbation (a frozen base weight under LoRA)
            return d, e
        group = self._groups[j][name]
        hp = run.state.groups[group]
        if run.opt_type == "adam" and hp.weight_decay > 0:
            return adam_l2_propagate(d, e, self.preconditioner(j, name), run.lrs, hp.beta1,
                                     hp.weight_decay, run.step0)
        t = self._transform(j, group)
        if isinstance(t, SgdTransform):
            return t.apply(d, e)
        p = self.preconditioner(j, name) if (e is not None and t.b != 0.0) else None
        return t.apply(d, e, p)

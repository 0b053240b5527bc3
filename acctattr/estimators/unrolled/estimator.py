"""unrolled: v_k carried through later stages with their training-loss curvature (SPEC
section 2), by simulating both runs through each later stage.

Default (``flow``, both optimizers): from each checkpoint of a later stage to the next (its
anchors: start, intermediate checkpoints, end) the actual run is simulated forward and the
counterfactual alongside it at theta - d, on the stage's training loss over a sample of its
data; d changes by the difference of the two runs' steps. Re-learning thus stops where the
counterfactual has caught up, which a linearisation of so large a perturbation misses.
SGD: acctattr.estimators.unrolled.sgd_flow; Adam: adam_flow; ``linear``: linear.

Either way AdamW's decoupled decay is its own factor prod(1 - eta*lam). A first-moment
perturbation carried into a continuing stage is first released into d with the frozen
coefficient; the one handed on to the next continuing stage is the steady-state response
of the moment to the gradient change between the runs at the stage's end.
"""

from __future__ import annotations

import torch

from acctattr.devices import single_threaded
from acctattr.estimators.base import Estimator, Params, Training, Unsuitable
from acctattr.estimators.dynamics import adamw_transform, sgd_transform
from acctattr.estimators.unrolled.adam_flow import AdamFlow
from acctattr.estimators.unrolled.flat import FlatRun
from acctattr.estimators.unrolled.linear import LinearPropagator
from acctattr.estimators.unrolled.path import Reproduction
from acctattr.estimators.unrolled.sgd_flow import SgdFlow
from acctattr.options import UnrolledConfig


class Unrolled(Estimator):
    name = "unrolled"
    evaluate = "direct"
    suited = ("every later stage has training data (data:) and, for Adam, optimizer.state; "
              "it fits in memory; and its simulation reproduces each later stage's "
              "recorded training loss")
    # Peak memory in float32 copies of the trainable parameters: 23.0 measured by
    # bench/unrolled_memory.py (4.2M-parameter AdamW run) with adam_momentum on (the
    # default), 20.7 off; 18.7 and 18.7 checkpoints by bench/scale.py (10M GPT-2-style run
    # at 3 and 16 steps a stage, the model included; the stored path is in a temporary
    # file, so it does not grow with flow_substeps: see README); rounded up from the
    # largest (2026-12-06; tests/estimators/test_unrolled_memory.py holds the default's
    # to it).
    copies = 30
    # embeddings cost simulations of later stages: under torchrun each rank builds some
    shard_stages = True

    def __init__(self, training: Training, config: UnrolledConfig | None = None,
                 strict: bool = False) -> None:
        super().__init__(training, config, strict)
        self.flat = FlatRun(training, self.stages, self.config)
        self.sgd = SgdFlow(self.flat)
        self.adam = AdamFlow(self.flat)
        self.linear = LinearPropagator(self.flat)

    @property
    def reproduction(self) -> dict[int, Reproduction]:
        """Later stage index -> how well its simulated actual run reproduces the recorded
        one (filled as stages are simulated: embedding stage 0 simulates every later one)."""
        return self.flat.reproduction

    @property
    def noise_scale(self) -> dict[int, float]:
        """Adam stage index -> its fitted batch-noise scale c (~ 1/batch size)."""
        return self.flat.noise_scale

    # ------------------------------------------------------------ the interface
    def needs(self) -> list[str]:
        """Training data for every later stage, Adam state, and what the flows simulate.

        amsgrad divides by the running maximum of the second moment, which the flow does
        not keep. maximize ascends the training objective, so train.loss must name a score
        (higher is better) for the simulated run to go the way the real one went. Adapter
        stages train none of the base weights, so they need neither data nor state.
        """
        later = [r for r in self.training.runs[1:] if not r.adapter]
        why = []
        if self.training.device.type == "mps":
            why.append("unrolled simulates training in float64, which MPS does not support")
        lacking = [r.name for r in later if r.data is None]
        if lacking:
            why.append(f"stage(s) {', '.join(lacking)} have no training data (data:), which "
                       "unrolled needs for curvature")
        stateless = [r.name for r in later
                     if r.opt_type in ("adam", "adamw") and r.state.source is None]
        if stateless:
            why.append(f"Adam stage(s) {', '.join(stateless)} have no optimizer.state, whose "
                       "second moment unrolled needs")
        for r in later:
            if r.opt_type in ("adam", "adamw") and any(g.amsgrad for g in r.state.groups):
                why.append(f"stage '{r.name}' uses Adam's amsgrad, which unrolled does not "
                           "simulate (frozen uses its max_exp_avg_sq)")
            if any(g.maximize for g in r.state.groups):
                loss = self.training.train_loss()
                if not loss.higher_is_better:
                    why.append(f"stage '{r.name}' has maximize=True in its optimizer.state, so "
                               f"it raised its training objective, but train.loss {loss.name} "
                               "is lower-is-better")
        return why

    # its reductions (training-loss gradients over the sample, dot products over the
    # parameters) would otherwise add in an order set by the thread count (README, "Devices,
    # threads and several processes")
    @single_threaded
    def embed(self, k: int) -> Params:
        runs = self.training.runs
        flat = self.flat
        flat.progress = self.progress
        d = flat.flat(self.stages.deltas(k))
        e = None
        if k + 1 < len(runs) and not runs[k + 1].fresh:
            parts = {n: self.stages.delta_state(k, n) for n in flat.names}
            if any(p is not None for p in parts.values()):
                e = flat.flat({n: (p if p is not None else torch.zeros(
                    self.training.trainable[n], device=flat.device)) for n, p in parts.items()})
            del parts  # a float64 copy of the model, not to be held through the stages
        self.adam.carry = None
        for j in range(k + 1, len(runs)):
            hand_on = j + 1 < len(runs) and not runs[j + 1].fresh
            if j == k + 1:
                self.adam.cf_start = ("state", self.adam.state_before(k))
            else:
                self.adam.cf_start = ("carry", self.adam.carry)
            self.adam.carry = None
            # e is released into d first: not held while the stage is simulated
            if e is not None and not runs[j].fresh:
                d.add_(self._release(j, e))
            e = None
            d, e = self.propagate(j, d, None, hand_on)
        failed = self._unreproduced()
        if self.strict and failed:
            raise Unsuitable("unrolled's simulation does not reproduce the recorded run of "
                             + "; ".join(r.describe() for r in failed))
        # kept as naive and frozen keep theirs (the evaluation rounds to the model's dtype)
        return {n: t.to(self.embed_dtype(n)) for n, t in flat.named(d, torch.float64).items()}

    def warnings(self) -> list[str]:
        return [f"unrolled's simulation does not reproduce the recorded run of {r.describe()}; "
                "its estimates of the stages before it may be off: check them with `acctattr "
                "validate`, or use --estimator frozen" for r in self._unreproduced()]

    # ------------------------------------------------------------ one later stage
    def propagate(self, j: int, d: torch.Tensor, e: torch.Tensor | None,
                  hand_on: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Carry (d, e) through stage j; returns e only when ``hand_on`` (next continues)."""
        flat = self.flat
        run = flat.runs[j]
        if run.fresh:
            e = None
        if e is not None:
            d = d.add_(self._release(j, e))  # d is the caller's to hand over
            del e
        if run.adapter:
            return d, None  # the stage trained none of these parameters
        rate = flat.rate(j)
        mask = flat.trained_mask(j)
        if mask is not None:
            rate = rate * mask
        total = float(sum(run.lrs))
        if run.opt_type != "sgd" and self.config.adam_dynamics == "flow":
            positive = rate > 0  # all the flow needs of the preconditioner
            del rate, mask
            return self.adam.propagate(j, d, positive, total, hand_on)
        if run.opt_type == "sgd" and self.config.sgd_dynamics == "flow":
            return self.sgd.propagate(j, d, rate, total, hand_on)
        return self.linear.propagate(j, d, rate, total, hand_on)

    def _release(self, j: int, e: torch.Tensor) -> torch.Tensor:
        """How far a carried first-moment perturbation moves d in stage j (frozen, no decay)."""
        flat = self.flat
        run = flat.runs[j]
        if run.opt_type == "sgd":
            coef = flat.per_group(j, lambda g: sgd_transform(
                run.lrs, g.momentum, g.dampening, g.nesterov, 0.0, fresh=False).de)
            return coef * e
        coef = flat.per_group(j, lambda g: adamw_transform(run.lrs, g.beta1, 0.0, run.step0,
                                                           fresh=False).b)
        return coef * flat.rate(j) * e

    def _unreproduced(self) -> list[Reproduction]:
        factor = self.config.reproduce_factor
        return [r for _, r in sorted(self.reproduction.items()) if not r.ok(factor)]

"""Stage embeddings v_k ~ theta_T - theta_T^(-k), one parameter-shaped vector per stage.

- ``naive``: v_k = Delta_k (the task vector).
- ``frozen``: Delta_k and the stage's optimizer-state change delta_b_k carried through every
  later stage by the optimizer's own linear dynamics (acctattr.dynamics), gradients held
  fixed: v_k = alpha*Delta_k + beta*delta_b_k per parameter group for SGD.

An embedding depends only on checkpoints and optimizer state, never on the eval set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from acctattr.dynamics import (
    AdamwTransform,
    SgdTransform,
    adam_l2_propagate,
    adam_preconditioner,
    adamw_transform,
    lanczos_expm,
    lanczos_phi,
    sgd_transform,
)
from acctattr.errors import CheckpointError
from acctattr.options import SECANT_RULES, UnrolledConfig
from acctattr.runs.checkpoints import StateDictReader
from acctattr.runs.optim_state import OptimizerState

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
        self.groups = [r.state.group_of() for r in runs]
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
            hp = run.state.groups[self.groups[j][name]]
            # amsgrad divides by the running maximum of the second moment
            moment = "max_exp_avg_sq" if hp.amsgrad else "exp_avg_sq"
            v = run.state.tensor(name, moment)
            if v is None:
                why = "there is none" if run.state.source is None else "it lacks that tensor"
                raise CheckpointError(
                    f"stage '{run.name}': the estimator needs the Adam second moment "
                    f"({moment}) of '{name}' from optimizer.state, and {why}",
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
        group = self.groups[j][name]
        hp = run.state.groups[group]
        if run.opt_type == "adam" and hp.weight_decay > 0:
            return adam_l2_propagate(d, e, self.preconditioner(j, name), run.lrs, hp.beta1,
                                     hp.weight_decay, run.step0)
        t = self._transform(j, group)
        if isinstance(t, SgdTransform):
            return t.apply(d, e)
        p = self.preconditioner(j, name) if (e is not None and t.b != 0.0) else None
        return t.apply(d, e, p)


# ---------------------------------------------------------------- unrolled

@dataclass
class _ActualPath:
    """The simulated actual run through one later stage: per substep its (first, end)
    optimizer step and the step it takes, and where each segment starts (a checkpoint);
    the points between are rebuilt on iteration, so a stage keeps one float32 copy of the
    parameters per substep and per segment. Adam: the noise scale, exp_avg_sq at the end
    (the state file's) and the simulated run's."""

    spans: list[tuple[int, int]]
    starts: dict[int, torch.Tensor]  # substep index -> the checkpoint it restarts from
    steps: list[torch.Tensor]  # float32
    c: float = 0.0
    v_end: torch.Tensor | None = None
    v_sim: torch.Tensor | None = None
    # AdamW: substep (first, end) -> its decoupled decay factor, applied after the step
    decay: Callable[[int, int], torch.Tensor] | None = None

    def __iter__(self):
        """(first step, end step), start point, step; the tensors in float64."""
        theta = torch.empty(0)
        for i, (span, step) in enumerate(zip(self.spans, self.steps, strict=True)):
            if i in self.starts:
                theta = self.starts[i].double()
            step64 = step.double()
            yield span, theta, step64
            theta = theta + step64
            if self.decay is not None:
                theta = theta * self.decay(*span)


@dataclass(frozen=True)
class Reproduction:
    """Whether unrolled's simulated actual run of a later stage reproduces the run that was
    recorded: the stage's training loss (on its data sample) at its start, and how far it
    fell from each checkpoint to the next, summed over the stage, as recorded (the next
    checkpoint) and as simulated (from the checkpoint). The flow follows the optimizer's
    expected steps; where batch noise dominates a short stage, the real run learns far less
    than that (bench/trainer_short.py), and unrolled's re-learning is not there either."""

    stage: str
    start_loss: float
    recorded_drop: float
    simulated_drop: float

    def ok(self, factor: float) -> bool:
        """The simulated drop within ``factor`` of the recorded one, either way, give or take
        1% of the starting loss (a stage that barely moves its loss)."""
        slack = 0.01 * abs(self.start_loss)
        low = self.recorded_drop / factor - slack
        return low <= self.simulated_drop <= factor * self.recorded_drop + slack

    def describe(self) -> str:
        return (f"stage '{self.stage}': its simulated run lowers the training loss by "
                f"{self.simulated_drop:.4g}, the recorded run by {self.recorded_drop:.4g} "
                f"(from {self.start_loss:.4g})")


class Unrolled:
    """v_k carried through later stages with their training-loss curvature (SPEC sec. 2).

    Default (``flow``, both optimizers): from each checkpoint of a later stage to the next
    (its anchors: start, intermediate checkpoints, end) the actual run is simulated forward
    and the counterfactual alongside it at theta - d, on the stage's training loss over a
    sample of its data; d changes by the difference of the two runs' steps. This keeps
    what linearisation loses when skipping a stage is a large perturbation: re-learning
    stops where the counterfactual has caught up. SGD (_sgd_flow): gradient flow with rate
    r = (1-dampening)/(1-momentum), exponential Euler substeps (Lanczos on HVPs). Adam
    (_adam_flow): expected normalised steps g / (sqrt(v_hat) + eps), each run with its own
    second moment including the batch noise; steps cut where the gradient changes sign.

    ``linear`` (sgd_dynamics / adam_dynamics): within a segment with summed lr L, rate r
    (Adam: the preconditioner p) and coupled weight decay lam, each substep applies

        d <- r^(1/2) exp(-L * r^(1/2) (H_bar + lam) r^(1/2)) r^(-1/2) d

    by Lanczos (acctattr.dynamics.lanczos_expm), H_bar the secant Hessian between the actual
    run (interpolated between the anchors) and the counterfactual (theta - d/2); for Adam,
    r uses the counterfactual's larger second moment and a substep moves a coordinate by at
    most its summed lr (UnrolledConfig.precond, adam_cap).

    Either way AdamW's decoupled decay is its own factor prod(1 - eta*lam). A first-moment
    perturbation carried into a continuing stage is first released into d with the frozen
    coefficient; the one handed on to the next continuing stage is the steady-state response
    of the moment to the gradient change between the runs at the stage's end.
    """

    def __init__(self, embedder: Embedder, curvature, config: UnrolledConfig) -> None:
        """
        Args:
            curvature: stage index -> acctattr.evaluation.curvature.Curvature for that stage's data.
        """
        self.e = embedder
        self.curvature = curvature
        self.config = config
        self.names = list(embedder.trainable)
        self.shapes = [embedder.trainable[n] for n in self.names]
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self._anchors: dict[int, Params] = {}
        # stage index -> fitted batch-noise scale c (~ 1/batch size) of its Adam flow
        self.noise_scale: dict[int, float] = {}
        self._paths: dict[int, _ActualPath] = {}
        # stage index -> how well its simulated actual run reproduces the recorded one
        self.reproduction: dict[int, Reproduction] = {}
        self._dtypes: dict[str, torch.dtype] | None = None
        # the counterfactual's Adam state as a stage starts (set per stage by embedding):
        # ("state", (exp_avg_sq, step) or None for fresh) or ("carry", (dv, step offset))
        self._cf_start: tuple[str, tuple[torch.Tensor, int] | None] = ("carry", None)
        self._carry: tuple[torch.Tensor, int] | None = None

    # flat <-> named
    def flat(self, named: Params) -> torch.Tensor:
        """One float64 vector of the parameters in self.names order (one copy, converted
        as it is written)."""
        out = torch.empty(sum(self.sizes), dtype=torch.float64)
        for part, n in zip(torch.split(out, self.sizes), self.names, strict=True):
            part.copy_(named[n].reshape(-1))
        return out

    def named(self, flat: torch.Tensor, dtype: torch.dtype = torch.float32) -> Params:
        parts = torch.split(flat, self.sizes)
        return {n: p.reshape(s).to(dtype) for n, p, s in zip(self.names, parts, self.shapes,
                                                             strict=True)}

    def _at(self, j: int, theta: torch.Tensor) -> Params:
        """Flat parameters as the model's own tensors (its dtypes), to evaluate it at."""
        if self._dtypes is None:
            self._dtypes = {n: p.dtype for n, p in self.curvature(j).model.named_parameters()}
        parts = torch.split(theta, self.sizes)
        return {n: p.reshape(s).to(self._dtypes.get(n, torch.float32))
                for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def _per_group(self, j: int, value) -> torch.Tensor:
        """A flat vector holding value(group hyperparameters) for each parameter's group."""
        run = self.e.runs[j]
        groups = self.e.groups[j]
        return torch.cat([torch.full((size,), float(value(run.state.groups[groups[n]])),
                                     dtype=torch.float64)
                          for n, size in zip(self.names, self.sizes, strict=True)])

    def _rate(self, j: int) -> torch.Tensor:
        """Per-element effective step multiplier of stage j."""
        run = self.e.runs[j]
        if run.opt_type == "sgd":
            # without momentum torch keeps no buffer and ignores dampening
            return self._per_group(j, lambda g: 1.0 if g.momentum == 0.0 else
                                   1.0 / (1.0 - g.momentum) if g.nesterov
                                   else (1.0 - g.dampening) / (1.0 - g.momentum))
        return self.flat({n: self.e.preconditioner(j, n) for n in self.names})

    def _anchor(self, reader: StateDictReader) -> Params:
        key = id(reader)
        if key not in self._anchors:
            if len(self._anchors) >= 2:  # at most two anchor checkpoints in memory
                self._anchors.pop(next(iter(self._anchors)))
            self._anchors[key] = {n: reader.get(n) for n in self.names}
        return self._anchors[key]

    def _point(self, a: StateDictReader, b: StateDictReader, t: float) -> Params:
        """The run's parameters a fraction t of the way from anchor a to anchor b."""
        pa = self._anchor(a)
        if t == 0.0:
            return pa
        pb = self._anchor(b)
        if t == 1.0:
            return pb
        return {n: torch.lerp(pa[n], pb[n], t) for n in self.names}

    def _hvp(self, j: int, anchor: Params, d: torch.Tensor):
        """x -> (H_bar + lam_coupled) x, H_bar averaged on the line anchor - t*d (secant)."""
        ts, ws = SECANT_RULES[self.config.secant_points]
        curv = self.curvature(j)
        products = []
        for t, w in zip(ts, ws, strict=True):
            shift = self.named(t * d)
            point = {n: anchor[n] - shift[n].to(anchor[n].dtype) for n in self.names} \
                if t else anchor
            products.append((w, curv.hvp(point)))
        lam = self._coupled_decay(j)

        def matvec(x: torch.Tensor) -> torch.Tensor:
            named = self.named(x)
            total = sum(w * self.flat(product(named)) for w, product in products)
            return total + lam * x

        return matvec

    def _coupled_decay(self, j: int) -> torch.Tensor:
        run = self.e.runs[j]
        if run.opt_type == "adamw":
            return torch.zeros(sum(self.sizes), dtype=torch.float64)
        return self._per_group(j, lambda g: g.weight_decay)

    def _segments(self, j: int) -> list[tuple[StateDictReader, StateDictReader, int, int]]:
        """(anchor at the segment's start, anchor at its end, first step, end step)."""
        run = self.e.runs[j]
        points = [(0, run.start), *run.checkpoints, (run.steps, run.end)]
        return [(a, b, sa, sb) for (sa, a), (sb, b) in zip(points, points[1:], strict=False)]

    def propagate(self, j: int, d: torch.Tensor, e: torch.Tensor | None,
                  hand_on: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Carry (d, e) through stage j; returns e only when ``hand_on`` (next continues)."""
        run = self.e.runs[j]
        if run.fresh:
            e = None
        if e is not None:
            d = d + self._release(j, e)
        rate = self._rate(j)
        mask = self._trained_mask(j)
        if mask is not None:
            if not bool(mask.any()):
                return d, None  # the stage trained none of these parameters (an adapter)
            rate = rate * mask
        total = float(sum(run.lrs))
        if run.opt_type != "sgd" and self.config.adam_dynamics == "flow":
            return self._adam_flow(j, d, rate, total, hand_on)
        if run.opt_type == "sgd" and self.config.sgd_dynamics == "flow":
            return self._sgd_flow(j, d, rate, total, hand_on)
        for a, b, s0, s1 in self._segments(j):
            lrs = run.lrs[s0:s1]
            scale = float(sum(lrs))
            if scale > 0:
                n = max(1, round(self.config.substeps * scale / total)) if total > 0 else 1
                for point, part in self._hessian_points(a, b, n):
                    r = rate if run.opt_type == "sgd" else self._adam_rate(j, point, d, rate)
                    root = r.sqrt()
                    inv = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
                    mv = self._hvp(j, point, d)
                    y = lanczos_expm(lambda x, mv=mv, root=root: root * mv(root * x), d * inv,
                                     part * scale, self.config.lanczos_iters,
                                     rtol=self.config.lanczos_rtol)
                    new = root * y + torch.where(root > 0, torch.zeros_like(d), d)
                    cap = self.config.adam_cap
                    if run.opt_type != "sgd" and cap is not None:
                        limit = cap * part * scale
                        new = d + (new - d).clamp(-limit, limit)
                    d = new
            if run.opt_type == "adamw":
                d = d * self._per_group(j, lambda g, lrs=lrs: math.prod(
                    1 - eta * g.weight_decay for eta in lrs))
        if not hand_on:
            return d, None
        steady = self._hvp(j, self._anchor(run.end), d)(d)
        if run.opt_type == "sgd":
            steady = steady * self._per_group(j, lambda g: (1 - g.dampening) / (1 - g.momentum)
                                              if g.momentum > 0 else 0.0)
        return d, steady

    def _adam_flow(self, j: int, d: torch.Tensor, rate: torch.Tensor, total: float,
                   hand_on: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Carry d through an Adam stage by simulating Adam's expected steps in both runs.

        Adam steps by u = m_hat / (sqrt(v_hat) + eps). In expectation over batches
        m_hat ~ g, the mean gradient, and v is the running average of g^2 + c*S, where
        S is the per-example gradient variance and c ~ 1/batch size (the batch noise). From
        each checkpoint (anchor) the actual run is simulated forward to the next in Euler
        substeps, and the counterfactual alongside it at theta - d, each with its own v;
        d changes by the difference of their steps. The difference is bounded (|u| <= 1),
        zero wherever both runs' gradients agree, and follows a counterfactual whose larger
        gradients and noise raise its own second moment.

        A substep spans many optimizer steps, so near a minimum a plain Euler step would
        jump past it where Adam, step by step, settles: each run's step is cut, per
        coordinate, to the secant estimate of where its gradient changes sign (one more
        gradient at the proposed point). c is fitted per stage so that the simulated actual
        run's v at the stage's end equals the state file's exp_avg_sq.
        """
        run = self.e.runs[j]
        curv = self.curvature(j)
        eps = self._per_group(j, lambda g: g.eps)
        lam_c = self._coupled_decay(j)
        positive = rate > 0
        path = self._actual_path(j, total)
        v_cf, step0 = self._cf_second_moment(j, path)
        # updated in place below (whole-model vectors: fewer fresh allocations)
        d, v_cf = d.clone(), v_cf.clone()
        for (k0, k1), theta, s_act in path:
            cf = theta - d
            g_cf, n_cf = self._moments(j, cf)
            keep = self._per_group(j, lambda g, n=k1 - k0: g.beta2**n)
            v_cf.mul_(keep).addcmul_(1 - keep, n_cf.mul_(path.c).addcmul_(g_cf, g_cf))
            u_cf = self._adam_direction(j, g_cf, v_cf, step0 + k1, eps)
            s_cf = self._settled_step(j, cf, g_cf, u_cf.mul_(-float(sum(run.lrs[k0:k1]))),
                                      positive, lam_c)
            d.add_(s_act).sub_(s_cf)
            if run.opt_type == "adamw":
                d.mul_(self._decay(j, k0, k1))
        if not hand_on:
            return d, None
        # the next stage continues this one's state: hand on how the runs' v differ
        assert path.v_sim is not None  # an Adam path always has it
        self._carry = (v_cf - path.v_sim, (0 if run.fresh else run.step0) - step0)
        end = self._anchor(run.end)
        end_g = self.flat(curv.gradient(end))
        return d, end_g - self.flat(curv.gradient(self._at(j, self.flat(end) - d))) + lam_c * d

    def _cf_second_moment(self, j: int, path: _ActualPath) -> tuple[torch.Tensor, int]:
        """The counterfactual's exp_avg_sq and step count as Adam stage j starts.

        Fresh: zero, 0. Continuing the skipped stage's state: the counterfactual continues
        the stage before it instead (its state file; fresh if there is none). Continuing a
        later stage's: the actual run's, plus the difference the flow handed on.
        """
        run = self.e.runs[j]
        assert path.v_end is not None  # an Adam path always has it
        if run.fresh:
            return torch.zeros_like(path.v_end), 0
        how, value = self._cf_start
        if how == "state":
            if value is None:
                return torch.zeros_like(path.v_end), 0
            return value
        v = self._start_second_moment(j, path.v_end)
        if how == "carry" and value is not None:
            dv, offset = value
            return (v + dv).clamp(min=0.0), max(run.step0 - offset, 0)
        return v, run.step0

    def _state_before(self, k: int) -> tuple[torch.Tensor, int] | None:
        """exp_avg_sq and step count at the end of the stage before k (what a stage
        continuing k's state continues when k is skipped); None: a fresh optimizer."""
        v = self._saved_second_moment(k - 1) if k > 0 else None
        if v is None:
            return None
        prev = self.e.runs[k - 1]
        step = prev.state.step if prev.state.step is not None else prev.step0 + prev.steps
        return v, step

    def _saved_second_moment(self, i: int) -> torch.Tensor | None:
        """Adam stage i's exp_avg_sq at its end from its state file, flat; None when the
        stage is not Adam or its state file lacks it."""
        run = self.e.runs[i]
        if run.opt_type not in ("adam", "adamw") or run.state.source is None:
            return None
        parts = [run.state.tensor(n, "exp_avg_sq") for n in self.names]
        found = [p for p in parts if p is not None]
        if len(found) != len(parts):
            return None
        return torch.cat([p.reshape(-1).double() for p in found])

    def _sgd_flow(self, j: int, d: torch.Tensor, rate: torch.Tensor, total: float,
                  hand_on: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Carry d through an SGD stage by simulating both runs' gradient flow.

        In expectation (and in steady state for momentum) SGD steps by -eta * r * g, r =
        (1 - dampening)/(1 - momentum). As for Adam (_adam_flow), the actual run is
        simulated from each checkpoint and the counterfactual alongside it at theta - d; d
        changes by the difference of their steps. A substep spans many optimizer steps, so
        each is an exponential Euler step (_gd_step): stable at any length, exact on a
        quadratic, and halved where it would raise the loss.
        """
        run = self.e.runs[j]
        path = self._sgd_path(j, total, rate)
        for (k0, k1), theta, s_act in path:
            cf = theta - d
            s_cf = self._gd_step(j, cf, float(sum(run.lrs[k0:k1])),
                                 self._sgd_rate(j, k0, k1, rate))
            if run.fresh:
                d = d + s_act - s_cf
            else:
                # both runs' buffers are warm, but their difference only builds up from the
                # stage's start (what they held before is the released e)
                ramp = self._sgd_rate(j, k0, k1, rate, since_start=True)
                d = d + (s_act - s_cf) * torch.where(rate > 0, ramp / rate.clamp(min=1e-300),
                                                     torch.ones_like(rate))
        if not hand_on:
            return d, None
        end = self.flat(self._anchor(run.end))
        steady = self._gradient(j, end) - self._gradient(j, end - d)
        return d, steady * self._per_group(j, lambda g: (1 - g.dampening) / (1 - g.momentum)
                                           if g.momentum > 0 else 0.0)

    def _sgd_path(self, j: int, total: float, rate: torch.Tensor) -> _ActualPath:
        """The actual run through SGD stage j simulated from each checkpoint to the next."""
        if j in self._paths:
            return self._paths[j]
        run = self.e.runs[j]
        spans = self._spans(j, total)
        starts, steps, ends = self._walk(j, spans, lambda q, k0, k1, theta: self._gd_step(
            j, theta, float(sum(run.lrs[k0:k1])), self._sgd_rate(j, k0, k1, rate)))
        self._check_reproduction(j, ends)
        path = _ActualPath([(k0, k1) for _, k0, k1 in spans], starts, steps)
        self._paths = {j: path}
        return path

    def _sgd_rate(self, j: int, k0: int, k1: int, rate: torch.Tensor,
                  since_start: bool = False) -> torch.Tensor:
        """SGD's step per unit lr over steps k0..k1 for a steady gradient, per element.

        A buffer that has been accumulating the gradient since before the stage (a
        continued one) is taken as warm: the steady (1-dampening)/(1-momentum) (``rate``).
        One that starts at the stage ramps up, holding at step s mu^s + (1-tau)(1-mu^s)/
        (1-mu) gradients (torch's first step of a fresh buffer is undamped) or, for a
        gradient *difference* entering a continued buffer (``since_start``),
        (1-tau)(1-mu^(s+1))/(1-mu); nesterov steps by 1 + mu times that. Weighted by the
        lrs of k0..k1.
        """
        run = self.e.runs[j]
        lrs = run.lrs[k0:k1]
        total = float(sum(lrs))
        if (not run.fresh and not since_start) or total == 0.0:
            return rate

        def ramp(g) -> float:
            mu, tau = g.momentum, g.dampening
            if mu == 0.0:  # torch keeps no buffer: the step is the gradient
                return 1.0
            if run.fresh:
                held = [mu**s + (1 - tau) * (1 - mu**s) / (1 - mu) for s in range(k0, k1)]
            else:
                held = [(1 - tau) * (1 - mu ** (s + 1)) / (1 - mu) for s in range(k0, k1)]
            if g.nesterov:
                held = [1.0 + mu * h for h in held]
            return sum(eta * h for eta, h in zip(lrs, held, strict=True)) / total

        mask = (rate > 0).to(rate.dtype)
        return self._per_group(j, ramp) * mask

    def _gd_step(self, j: int, theta: torch.Tensor, lr: float, rate: torch.Tensor,
                 depth: int = 0, expansion=None) -> torch.Tensor:
        """Gradient flow theta' = -r g for summed lr ``lr`` from theta, by one exponential
        Euler step: -r^(1/2) phi(L r^(1/2) (H + lam) r^(1/2)) r^(1/2) g, H at theta (Lanczos);
        exact on a quadratic and stable however many optimizer steps it spans. Where the
        step raises the training loss (the quadratic model does not hold that far), it is
        taken as two half steps, at most max_halvings deep.

        Args:
            expansion: (loss, gradient g, v -> H v) at theta, each with the coupled decay
                (_expand); the first half step reuses its caller's.
        """
        root = rate.sqrt()
        lam = self._coupled_decay(j)
        before, g, product = expansion or self._expand(j, theta)

        def matvec(x: torch.Tensor) -> torch.Tensor:
            y = root * x
            return root * (product(y) + lam * y)

        step = -root * lanczos_phi(matvec, root * g, lr, self.config.lanczos_iters,
                                   rtol=self.config.lanczos_rtol)
        if depth < self.config.max_halvings:
            after_theta = theta + step
            after = self.curvature(j).value(self._at(j, after_theta)) + 0.5 * float(
                (lam * after_theta * after_theta).sum())
            if not after <= before:  # gradient flow never raises the loss: two half steps
                first = self._gd_step(j, theta, lr / 2, rate, depth + 1,
                                      (before, g, product))
                return first + self._gd_step(j, theta + first, lr / 2, rate, depth + 1)
        return step

    def _expand(self, j: int, theta: torch.Tensor):
        """At flat theta, from one forward and backward pass: stage j's training loss and
        gradient, each with the coupled decay (lam |theta|^2 / 2, lam theta), and x -> H x
        (flat, the loss's Hessian alone)."""
        value, grad, product = self.curvature(j).expand(self._at(j, theta))
        lam = self._coupled_decay(j)

        def matvec(x: torch.Tensor) -> torch.Tensor:
            return self.flat(product(self.named(x)))

        return (value + 0.5 * float((lam * theta * theta).sum()),
                self.flat(grad) + lam * theta, matvec)

    def _gradient(self, j: int, theta: torch.Tensor) -> torch.Tensor:
        """Stage j's mean training-loss gradient plus coupled decay at flat theta."""
        return self.flat(self.curvature(j).gradient(self._at(j, theta))) + \
            self._coupled_decay(j) * theta

    def _moments(self, j: int, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage j's mean training-loss gradient (with coupled decay) and per-example
        gradient variance at flat parameters theta."""
        g, noise = self.curvature(j).gradient_and_noise(self._at(j, theta),
                                                        self.config.noise_chunks)
        return self.flat(g).addcmul_(self._coupled_decay(j), theta), self.flat(noise)

    def _adam_direction(self, j: int, g: torch.Tensor, v: torch.Tensor, step: int,
                        eps: torch.Tensor) -> torch.Tensor:
        """Adam's normalised step g / (sqrt(v_hat) + eps), v_hat = v / (1 - beta2^step)."""
        bias = self._per_group(j, lambda h: 1 - h.beta2**step)
        return g / bias.reciprocal_().mul_(v).sqrt_().add_(eps)

    def _settled_step(self, j: int, theta: torch.Tensor, g: torch.Tensor, step: torch.Tensor,
                      positive: torch.Tensor, lam_c: torch.Tensor) -> torch.Tensor:
        """``step`` from theta, cut per coordinate where the gradient would change sign to
        the secant estimate of the zero: g / (g - g_after) of the way."""
        step = torch.where(positive, step, 0.0)
        after = theta + step
        g_after = self.flat(self.curvature(j).gradient(self._at(j, after))).addcmul_(
            lam_c, after)
        del after
        flip = (g * g_after) < 0
        denom = torch.where(flip, g_after.neg_().add_(g), 1.0)  # g - g_after where it flips
        return step.mul_(torch.where(flip, g / denom, 1.0))

    def _decay(self, j: int, k0: int, k1: int) -> torch.Tensor:
        """AdamW's decoupled weight decay over steps k0..k1 of stage j, per element."""
        lrs = self.e.runs[j].lrs[k0:k1]
        return self._per_group(j, lambda g: math.prod(1 - eta * g.weight_decay for eta in lrs))

    def _spans(self, j: int, total: float) -> list[tuple[int, int, int]]:
        """Stage j's flow substeps as (segment index, first step, end step): flow_substeps
        shared among the segments by summed lr, at least one each."""
        run = self.e.runs[j]
        spans = []
        for i, (_, _, s0, s1) in enumerate(self._segments(j)):
            if s1 <= s0:
                continue
            scale = float(sum(run.lrs[s0:s1]))
            n = max(1, round(self.config.flow_substeps * scale / total)) if total > 0 else 1
            cuts = [s0 + round((s1 - s0) * q / n) for q in range(n + 1)]
            spans += [(i, k0, k1) for k0, k1 in zip(cuts, cuts[1:], strict=False) if k1 > k0]
        return spans

    def _actual_path(self, j: int, total: float) -> _ActualPath:
        """The actual run through stage j simulated from each checkpoint to the next; the
        same for every earlier stage carried through j, so kept (one stage at a time)."""
        if j in self._paths:
            return self._paths[j]
        run = self.e.runs[j]
        eps = self._per_group(j, lambda g: g.eps)
        lam_c = self._coupled_decay(j)
        positive = self._rate(j) > 0
        v_end = self.flat({n: self._second_moment(j, n) for n in self.names})
        v_start = self._start_second_moment(j, v_end)
        step0 = 0 if run.fresh else run.step0
        spans = self._spans(j, total)

        decay = partial(self._decay, j) if run.opt_type == "adamw" else None
        # how much of each substep's g^2 + c*S is left in v at the stage's end (_fit_noise)
        weight = [self._per_group(j, lambda g, a=run.steps - k1, b=k1 - k0: g.beta2**a * (
            1 - g.beta2**b)) for _, k0, k1 in spans]

        def simulate(c: float):
            v = v_start.clone()
            squares, spread = torch.zeros_like(v), torch.zeros_like(v)  # weighted sums

            def step_at(q: int, k0: int, k1: int, theta: torch.Tensor) -> torch.Tensor:
                g, noise = self._moments(j, theta)
                keep = self._per_group(j, lambda h, n=k1 - k0: h.beta2**n)
                squares.addcmul_(weight[q], g * g)
                spread.addcmul_(weight[q], noise)
                v.mul_(keep).addcmul_(1 - keep, noise.mul_(c).addcmul_(g, g))
                u = self._adam_direction(j, g, v, step0 + k1, eps)
                return self._settled_step(j, theta, g, u.mul_(-float(sum(run.lrs[k0:k1]))),
                                          positive, lam_c)

            starts, steps, ends = self._walk(j, spans, step_at, decay)
            return starts, steps, (squares, spread), v, ends

        c = self.config.noise_scale
        starts, steps, sums, v_sim, ends = simulate(0.0 if c is None else c)
        if c is None:  # fit c to exp_avg_sq on this path, then simulate again with it
            c = self._fit_noise(j, sums[0], sums[1], v_start, v_end, positive)
            starts, steps, sums, v_sim, ends = simulate(c)
        self._check_reproduction(j, ends)
        path = _ActualPath([(k0, k1) for _, k0, k1 in spans], starts, steps, c, v_end, v_sim,
                           decay)
        self._paths = {j: path}
        self.noise_scale[j] = c
        return path

    def _walk(self, j: int, spans: list[tuple[int, int, int]], step_at,
              decay: Callable[[int, int], torch.Tensor] | None = None):
        """The actual run through stage j's substeps (_spans), restarted on the run's own
        checkpoint at each segment; step_at(substep, k0, k1, theta) gives each step.

        Returns what _ActualPath keeps (substep -> checkpoint it restarts from, float32
        steps) and segment -> where the simulation ends it, theta rebuilt from the float32
        steps as _ActualPath rebuilds it."""
        segments = self._segments(j)
        starts: dict[int, torch.Tensor] = {}
        steps: list[torch.Tensor] = []  # kept for every earlier stage: float32, half the memory
        ends: dict[int, torch.Tensor] = {}
        segment, theta = -1, torch.empty(0)  # set at the first span
        for q, (i, k0, k1) in enumerate(spans):
            if i != segment:  # back on the run's own checkpoint
                segment, theta = i, self.flat(self._anchor(segments[i][0]))
                starts[q] = theta.float()
            steps.append(step_at(q, k0, k1, theta).float())
            theta = theta + steps[-1].double()
            if decay is not None:
                theta = theta * decay(k0, k1)
            ends[i] = theta
        return starts, steps, ends

    def _check_reproduction(self, j: int, ends: dict[int, torch.Tensor]) -> None:
        """Record (self.reproduction) how far stage j's training loss falls from each of its
        checkpoints to the next, recorded against simulated (segment -> simulated end)."""
        curv = self.curvature(j)
        segments = self._segments(j)
        at_anchor: dict[int, float] = {}  # a checkpoint ends one segment and starts the next

        def anchored(reader: StateDictReader) -> float:
            if id(reader) not in at_anchor:
                at_anchor[id(reader)] = curv.value(self._anchor(reader))
            return at_anchor[id(reader)]

        start = recorded = simulated = 0.0
        for i, theta in sorted(ends.items()):
            a, b = segments[i][0], segments[i][1]
            before = anchored(a)
            if i == min(ends):
                start = before
            recorded += before - anchored(b)
            simulated += before - curv.value(self._at(j, theta))
        self.reproduction[j] = Reproduction(self.e.runs[j].name, start, recorded, simulated)

    def _fit_noise(self, j: int, squares: torch.Tensor, spread: torch.Tensor,
                   v_start: torch.Tensor, v_end: torch.Tensor, positive: torch.Tensor) -> float:
        """c >= 0 by least squares: v_end ~ beta2^T v_start + sum_i w_i (g_i^2 + c S_i), given
        the weighted sums of the substeps' g_i^2 (``squares``) and S_i (``spread``)."""
        explained = self._per_group(j, lambda g: g.beta2 ** self.e.runs[j].steps) * v_start \
            + squares
        use = positive & (spread > 0)
        if not bool(use.any()):
            return 0.0
        c = float(((v_end - explained) * spread)[use].sum() / (spread * spread)[use].sum())
        return max(c, 0.0)

    def _second_moment(self, j: int, name: str) -> torch.Tensor:
        """Stage j's exp_avg_sq for one parameter at its end, from its state file."""
        self.e.preconditioner(j, name)  # raises the clear error when the state lacks it
        v = self.e.runs[j].state.tensor(name, "exp_avg_sq")
        assert v is not None  # preconditioner() raised otherwise
        return v.double()

    def _start_second_moment(self, j: int, v_end: torch.Tensor) -> torch.Tensor:
        """The actual run's exp_avg_sq as stage j starts: zero when fresh; else the
        previous stage's, or, when that state file is absent, v_end (stationary)."""
        run = self.e.runs[j]
        if run.fresh:
            return torch.zeros_like(v_end)
        v = self._saved_second_moment(j - 1) if j > 0 else None
        return v_end if v is None else v

    def _trained_mask(self, j: int) -> torch.Tensor | None:
        """1 for parameters stage j trained, 0 for those it left alone; None: all trained."""
        trained = self.e.runs[j].trained
        if trained is None:
            return None
        return torch.cat([torch.full((size,), 1.0 if n in trained else 0.0, dtype=torch.float64)
                          for n, size in zip(self.names, self.sizes, strict=True)])

    def _adam_rate(self, j: int, point: Params, d: torch.Tensor,
                   rate: torch.Tensor) -> torch.Tensor:
        """Adam's per-element rate at a propagation point (config.precond)."""
        how = self.config.precond
        if how == "actual":
            return rate
        curv = self.curvature(j)
        shift = self.named(d)
        g_act = self.flat(curv.gradient(point))
        g_cf = self.flat(curv.gradient({n: point[n] - shift[n].to(point[n].dtype)
                                        for n in self.names}))
        eps = self._per_group(j, lambda g: g.eps)
        positive = rate > 0
        v = torch.where(positive, (1.0 / rate.clamp(min=1e-300) - eps).clamp(min=0) ** 2,
                        torch.zeros_like(rate))
        v_cf = v + (g_cf**2 - g_act**2).clamp(min=0)
        v_use = v_cf if how == "counterfactual" else 0.5 * (v + v_cf)
        return torch.where(positive, 1.0 / (v_use.sqrt() + eps), torch.zeros_like(rate))

    def _hessian_points(self, a: StateDictReader, b: StateDictReader, n: int):
        """(parameters where H is taken, fraction of the segment it covers), in order.

        With ``interpolate``, n substeps: a stage's ``substeps`` are shared among its
        segments in proportion to their summed lr, so the cost does not grow with the
        number of intermediate checkpoints.

        Built lazily so that each point is formed after the previous substep moved d.
        """
        how = self.config.hessian_at
        if how == "start":
            yield self._anchor(a), 1.0
        elif how == "end":
            yield self._anchor(b), 1.0
        elif how == "split":
            yield self._anchor(a), 0.5
            yield self._anchor(b), 0.5
        else:
            for i in range(n):
                yield self._point(a, b, (i + 0.5) / n), 1.0 / n

    def _release(self, j: int, e: torch.Tensor) -> torch.Tensor:
        """How far a carried first-moment perturbation moves d in stage j (frozen, no decay)."""
        run = self.e.runs[j]
        if run.opt_type == "sgd":
            coef = self._per_group(j, lambda g: sgd_transform(
                run.lrs, g.momentum, g.dampening, g.nesterov, 0.0, fresh=False).de)
            return coef * e
        coef = self._per_group(j, lambda g: adamw_transform(run.lrs, g.beta1, 0.0, run.step0,
                                                            fresh=False).b)
        return coef * self._rate(j) * e

    def embedding(self, k: int) -> Params:
        runs = self.e.runs
        d = self.flat(self.e.naive(k))
        e = None
        if k + 1 < len(runs) and not runs[k + 1].fresh:
            parts = {n: self.e.delta_state(k, n) for n in self.names}
            if any(p is not None for p in parts.values()):
                e = self.flat({n: (p if p is not None else torch.zeros(self.e.trainable[n]))
                               for n, p in parts.items()})
        self._carry = None
        for j in range(k + 1, len(runs)):
            hand_on = j + 1 < len(runs) and not runs[j + 1].fresh
            if j == k + 1:
                self._cf_start = ("state", self._state_before(k))
            else:
                self._cf_start = ("carry", self._carry)
            self._carry = None
            d, e = self.propagate(j, d, e, hand_on)
        return self.named(d, torch.float64)


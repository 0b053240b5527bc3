"""Carrying d through an Adam/AdamW stage by simulating Adam's expected steps in both runs.

Adam steps by u = m_hat / (sqrt(v_hat) + eps). In expectation over batches m_hat ~ g, the
mean gradient, and v is the running average of g^2 + c*S, where S is the per-example
gradient variance and c ~ 1/batch size (the batch noise; acctattr.estimators.unrolled.noise
fits it). From each checkpoint the actual run is simulated forward to the next in Euler
substeps, and the counterfactual alongside it at theta - d, each with its own v; d changes
by the difference of their steps. The difference is bounded (|u| <= 1), zero wherever both
runs' gradients agree, and follows a counterfactual whose larger gradients and noise raise
its own second moment.

A substep spans many optimizer steps, so near a minimum a plain Euler step would jump past
it where Adam, step by step, settles: each run's step is cut, per coordinate, to the secant
estimate of where its gradient changes sign (one more gradient at the proposed point).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial

import torch

from acctattr import heap
from acctattr.estimators.base import Params
from acctattr.estimators.unrolled.flat import FlatRun
from acctattr.estimators.unrolled.noise import (
    PIECE,
    ClipRecord,
    GroupMoments,
    fit_clipped_noise,
    fit_noise,
)
from acctattr.estimators.unrolled.path import (
    PARK_MIN,
    ActualPath,
    add_in_pieces,
    check_reproduction,
    kept_aside,
    next_pace,
    parked,
    spans,
    walk,
)

# (exp_avg_sq, step count): an Adam optimizer's second moment and where it is in its life
Moment = tuple[torch.Tensor, int]
# Whole-model arithmetic that mixes float32 and float64, or needs temporaries, is done in
# pieces of PIECE elements: torch's CPU kernels cast a whole operand to a temporary
# otherwise, and pieces of a parameter's size (16 MB of float64 for a 2M-element embedding)
# are left behind in the C heap (bench/scale.py: 2.7 checkpoints at 10M).
# dtypes float32 holds exactly
_NARROW = (torch.float32, torch.bfloat16, torch.float16)
# elements per slice of the first moment's closed-form solution (its temporaries, float64)
OSCILLATOR_SLICE = 1 << 16
# the first moment is kept in a stage's flow where its substeps span at most this many of
# m_hat's memory times on average (AdamFlow.momentum_in): e^-4, 2% of the start, is left
MOMENTUM_SPAN = 4.0
# a stage whose flow keeps the first moment takes this many times flow_substeps: its
# oscillator follows m_hat's lag only where a substep spans a few optimizer steps. lm at
# 4x its steps (sft 256, poison 128 steps) gave pretrain -0.49, -1.13 and -1.14 at 16, 32
# and 54/27 substeps, and -0.82 at 64 (true -0.75; -0.72 at 256); toxicity at 2x 0.948 at
# 16, 0.984 at 64 (README "Fidelity")
MOMENTUM_SUBSTEPS = 4


class AdamFlow:
    def __init__(self, flat: FlatRun) -> None:
        self.flat = flat
        self.config = flat.config
        # the counterfactual's Adam state as a stage starts (set per stage by the estimator):
        # ("state", (exp_avg_sq, step) or None for fresh) or ("carry", (dv, step offset))
        self.cf_start: tuple[str, Moment | None] = ("carry", None)
        # what the stage just propagated hands on to a continuing next stage: how the
        # counterfactual's v differs from the actual run's, and its step offset
        self.carry: Moment | None = None
        self.group_moments = GroupMoments()

    def propagate(self, j: int, d: torch.Tensor, positive: torch.Tensor, total: float,
                  hand_on: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Carry d through Adam stage j (summed lr ``total``; ``positive``: where its
        preconditioner is, the elements it trains); returns the first-moment perturbation
        to hand on when ``hand_on``. d is updated in place (the caller hands it over).

        Memory: besides d and the counterfactual's v (float64), a substep holds the actual
        point (float64) and step (float32), the counterfactual's gradient and noise while
        they are computed (GroupMoments: two float64 vectors and one group's gradient), then
        its gradient, step and the settled step's own gradient; results are written into
        the buffers they replace. With the first moment (``path.momentum``) d's buffer
        holds the counterfactual's point over the substep and the actual point is parked,
        and so is m_hat while the moments are computed (bench/scale.py, README "Memory,
        dtypes and scale")."""
        flat = self.flat
        run = flat.runs[j]
        curv = flat.curvature(j)
        eps = flat.per_group(j, lambda g: g.eps)
        lam_c = flat.coupled_decay(j)
        with parked(d, j not in flat.paths):  # d is not needed while the path is simulated
            path = self.path(j, total, positive)
        v_cf, step0 = self.cf_second_moment(j, path)  # a fresh tensor: updated in place
        self.cf_start = ("carry", None)  # taken (it may have been v_cf itself)
        m_cf: torch.Tensor | None = None  # adam_momentum: the counterfactual's m_hat
        what = f"carrying the counterfactual through stage '{run.name}'"
        with _parked_all(path.v_sim):  # the simulated run's v: read only after the loop
            for q, ((k0, k1), theta, s_act) in enumerate(path):
                flat.report(what, q, len(path.spans))
                lr = path.pace * flat.lr_sum(j, k0, k1)
                if path.momentum:
                    # d's buffer holds the counterfactual's point theta - d over the substep,
                    # and theta, needed only at its end, is parked meanwhile
                    cf = d.neg_().add_(theta)
                    with parked(theta):
                        with _parked_all(m_cf):
                            g_cf, n_cf, loss = self.moments(j, flat.at(cf))
                        rho = self._clip_and_update(j, g_cf, n_cf, cf, v_cf, path.c, k0, k1)
                        del n_cf
                        m_cf = g_cf.clone() if m_cf is None else m_cf
                        s_cf = self.momentum_step(j, cf, g_cf, m_cf, v_cf, step0 + k1, eps,
                                                  positive, lam_c, rho, lr, k1 - k0,
                                                  guard=partial(self.value_at, j, cf),
                                                  before=loss + self.penalty(j, cf))
                        del g_cf
                    d.neg_().add_(theta)  # d again
                    del cf
                else:
                    # the point as the model's tensors only while the moments are computed
                    g_cf, n_cf, _ = self.moments(j, flat.at(theta - d))
                    cf = theta - d
                    rho = self._clip_and_update(j, g_cf, n_cf, cf, v_cf, path.c, k0, k1)
                    del n_cf
                    u_cf = self.direction(j, g_cf, v_cf, step0 + k1, eps)
                    s_cf = self.settled_step(j, cf, g_cf, u_cf.mul_(-lr), positive, lam_c, rho,
                                             own_theta=True)
                    del u_cf, cf, g_cf  # s_cf: not held past it while the next substep's are made
                add_in_pieces(d, s_act)
                add_in_pieces(d, s_cf, negate=True)
                del s_cf
                if run.opt_type == "adamw":
                    d.mul_(flat.decay(j, k0, k1))
        if not hand_on:
            return d, None
        # the next stage continues this one's state: hand on how the runs' v differ
        assert path.v_sim is not None  # kept for a stage the next one continues
        self.carry = (v_cf.sub_(path.v_sim), (0 if run.fresh else run.step0) - step0)
        del v_cf
        end = flat.anchor(run.end)
        end_g = flat.flat(curv.gradient(end))
        return d, end_g - flat.flat(curv.gradient(flat.at(flat.flat(end) - d))) + lam_c * d

    def _clip_and_update(self, j: int, g: torch.Tensor, noise: torch.Tensor,
                         point: torch.Tensor, v: torch.Tensor, c: float, k0: int,
                         k1: int) -> float:
        """The counterfactual's substep k0..k1 at ``point``: its mean gradient g clipped
        (returns the clip factor) plus coupled decay, in place, and its second moment v
        moved on by g^2 + c * noise (noise is used up)."""
        flat = self.flat
        rho = self.clip_factor(j, g, noise, c)
        g.mul_(rho).addcmul_(flat.coupled_decay(j), point)
        keep = flat.per_group(j, lambda h, n=k1 - k0: h.beta2**n)
        v.mul_(keep).addcmul_(1 - keep, noise.mul_(c * rho * rho).addcmul_(g, g))
        return rho

    def path(self, j: int, total: float, positive: torch.Tensor) -> ActualPath:
        """The actual run through stage j simulated from each checkpoint to the next; the
        same for every earlier stage carried through j, so kept (one stage at a time).

        The second moments read from the state files are kept in their own precision
        (float32 holds a float32 or bf16 exp_avg_sq exactly) and widened as they are used;
        the simulated run's v is kept only for a stage the next one continues (the carry)."""
        flat = self.flat
        if j in flat.paths:
            return flat.paths[j]
        run = flat.runs[j]
        eps = flat.per_group(j, lambda g: g.eps)
        lam_c = flat.coupled_decay(j)
        step0 = 0 if run.fresh else run.step0
        substeps = spans(flat, j, total)
        handed_on = j + 1 < len(flat.runs) and not flat.runs[j + 1].fresh

        decay = partial(flat.decay, j) if run.opt_type == "adamw" else None
        momentum = self.momentum_in(j, substeps)
        if momentum:  # finer: MOMENTUM_SUBSTEPS
            substeps = spans(flat, j, total, MOMENTUM_SUBSTEPS * self.config.flow_substeps)
        # how much of each substep's g^2 + c*S is left in v at the stage's end (fit_noise)
        weight = [flat.per_group(j, lambda g, a=run.steps - k1, b=k1 - k0: g.beta2**a * (
            1 - g.beta2**b)) for _, k0, k1 in substeps]

        # a clipped stage's c is fitted with the clip factor falling with it (ClipRecord)
        tau = run.max_grad_norm if self.config.clip_aware_noise else None

        def simulate(c: float, pace: float = 1.0, fitting: bool = False):
            # read from the state file on each pass, not kept through the simulation
            v = self.start_second_moment(j).to(torch.float64, copy=True)
            m: torch.Tensor | None = None  # adam_momentum: the simulated run's m_hat
            # what c is fitted to: weighted sums of g^2 and S over the substeps (float32:
            # they set one number, c, to float32 precision), or a clipped stage's record
            record = ClipRecord(positive, tau) if fitting and tau else None
            sums = (torch.zeros_like(v, dtype=torch.float32),
                    torch.zeros_like(v, dtype=torch.float32)) \
                if fitting and record is None else None

            def step_at(q: int, k0: int, k1: int, theta: torch.Tensor) -> torch.Tensor:
                nonlocal m
                with _parked_all(m):
                    g, noise, loss = self.moments(j, theta)
                norms = None
                if record is not None:
                    norms = _norms(g, noise)
                    record.add(norms, g, noise, lam_c, theta, weight[q])
                rho = self.clip_factor(j, g, noise, c, norms)
                g.mul_(rho).addcmul_(lam_c, theta)  # the clipped gradient, then coupled decay
                keep = flat.per_group(j, lambda h, n=k1 - k0: h.beta2**n)
                noise.mul_(rho * rho)  # what clipping leaves of the batch noise
                if sums is not None:
                    _add_weighted(sums, g, noise, weight[q])
                v.mul_(keep).addcmul_(1 - keep, noise.mul_(c).addcmul_(g, g))
                del noise
                lr = pace * flat.lr_sum(j, k0, k1)
                if momentum:
                    m = g.clone() if m is None else m
                    with _parked_all(*(sums or ())):  # the noise fit's: not used by the step
                        return self.momentum_step(j, theta, g, m, v, step0 + k1, eps,
                                                  positive, lam_c, rho, lr, k1 - k0,
                                                  guard=partial(self.value_at, j, theta),
                                                  before=loss + self.penalty(j, theta))
                u = self.direction(j, g, v, step0 + k1, eps)
                return self.settled_step(j, theta, g, u.mul_(-lr), positive, lam_c, rho)

            starts, steps, ends = walk(flat, j, substeps, step_at, decay)
            return starts, steps, sums or record, (v if handed_on else None), ends

        c = self.config.noise_scale
        starts, steps, fit_to, v_sim, ends = simulate(0.0 if c is None else c,
                                                      fitting=c is None)
        if c is None:  # fit c to exp_avg_sq on this path, then simulate again with it
            keep_all = flat.per_group(j, lambda g: g.beta2 ** run.steps)
            with _parked_all(v_sim):
                if isinstance(fit_to, ClipRecord):
                    c = fit_clipped_noise(fit_to, self.start_second_moment(j), keep_all,
                                          self.end_second_moment(j))
                else:
                    assert fit_to is not None
                    c = fit_noise(fit_to[0], fit_to[1], self.start_second_moment(j),
                                  keep_all, self.end_second_moment(j), positive, PIECE)
            del fit_to
            if c != 0.0:  # else the path just simulated (at c = 0) is the one with it
                del starts, steps, v_sim
                starts, steps, _, v_sim, ends = simulate(c)
        # the check judges the flow as the optimizer's expected steps; the path it keeps is
        # the one paced to lower the loss as much as the recorded run did (next_pace)
        flat.reproduction[j] = rep = check_reproduction(flat, j, ends)
        tried: list[tuple[float, float]] = [(1.0, rep.simulated_drop)]
        pace = 1.0
        while (nxt := next_pace(rep.recorded_drop, tried, self.config.pace_tolerance)):
            pace = nxt
            del starts, steps, v_sim
            starts, steps, _, v_sim, ends = simulate(c, pace)
            tried.append((pace, check_reproduction(flat, j, ends).simulated_drop))
        path = ActualPath([(k0, k1) for _, k0, k1 in substeps], starts, steps, c, None, v_sim,
                          decay, pace, momentum)
        flat.paths = {j: path}
        flat.noise_scale[j] = c
        flat.drop_anchors()  # read again where needed: two checkpoints less while carrying
        return path

    def momentum_in(self, j: int, substeps: list[tuple[int, int, int]]) -> bool:
        """Whether stage j's flow keeps Adam's first moment (``adam_momentum``): where its
        substeps are no longer than MOMENTUM_SPAN times m_hat's memory tau = -1/ln(beta1)
        (the longest of its groups'), on average. Over a longer substep m_hat is the
        substep's gradient to within e^(-MOMENTUM_SPAN) of its start, and Adam's step is
        the settled step the flow takes without it; the oscillator's secant curvature,
        taken along a probe step that long, is then far off (toxicity at 32x its steps,
        ~300 optimizer steps a substep: the simulated identity_shortcut fell 0.21 of its
        recorded loss with it)."""
        if not self.config.adam_momentum or not substeps:
            return False
        tau = float(self.memory(j).max())
        mean = sum(k1 - k0 for _, k0, k1 in substeps) / len(substeps)
        return mean <= MOMENTUM_SPAN * tau

    def memory(self, j: int) -> torch.Tensor:
        """m_hat's memory in optimizer steps, tau = -1/ln(beta1), per stage j's group
        (per_group: a scalar where they agree)."""
        return self.flat.per_group(
            j, lambda g: -1.0 / math.log(min(max(g.beta1, 1e-12), 1 - 1e-12)))

    # ------------------------------------------------------------ one step
    def moments(self, j: int, theta: torch.Tensor | Params,
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Stage j's mean training-loss gradient, per-example gradient variance and mean
        training loss (from the same passes) at flat parameters theta, or at theta already
        as the model's tensors (flat.at: the caller then need not keep the float64 point
        while they are computed); the loss's alone: clipping acts before any coupled decay
        (``penalty``). Flat float64, one sample group at a time (GroupMoments)."""
        flat = self.flat
        params = flat.at(theta) if isinstance(theta, torch.Tensor) else theta
        del theta
        return self.group_moments(flat.curvature(j), j, params, self.config.noise_chunks,
                                  flat.sizes, flat.device)

    @property
    def narrow(self) -> bool:
        """Every trainable parameter float32 or narrower: a substep's step, the point after
        it and the actual run's gradient there are kept in float32 (the gradients at the
        point and the second moments stay float64: a float64 operand of a float32 tensor
        makes torch's CPU kernels cast it to a whole temporary copy)."""
        dtypes = self.flat.training.dtypes
        return all(dtypes.get(n, torch.float32) in _NARROW for n in self.flat.names)

    def clip_factor(self, j: int, g: torch.Tensor, noise: torch.Tensor, c: float,
                    norms: tuple[float, float] | None = None) -> float:
        """How much gradient-norm clipping scales stage j's batch gradients at a point:
        min(1, max_grad_norm / |g_batch|), with E|g_batch|^2 = |g|^2 + c * sum(S) for the
        mean gradient g, per-example variance S and batch-noise scale c (~ 1/batch size).

        Adam divides by the root of its second moment, so a steady clip factor cancels out
        of its step; it matters through the second moment it leaves (the state file's
        exp_avg_sq holds clipped gradients: fitting the noise without it finds too little
        noise, and the simulated run learns too fast) and where it changes over a stage.

        Args:
            norms: (|g|^2, sum S) where the caller has them (_norms), else computed here."""
        tau = self.flat.runs[j].max_grad_norm
        if not tau:
            return 1.0
        g2, spread = norms or _norms(g, noise)
        norm = math.sqrt(g2 + c * spread)
        return min(1.0, tau / norm) if norm > 0 else 1.0

    def momentum_step(self, j: int, theta: torch.Tensor, g: torch.Tensor, m: torch.Tensor,
                      v: torch.Tensor, step: int, eps: torch.Tensor, positive: torch.Tensor,
                      lam_c: torch.Tensor, rho: float, lr: float, n: int,
                      guard: Callable[..., float] | None = None,
                      before: float | None = None) -> torch.Tensor:
        """``adam_momentum``: Adam's step over a substep of n optimizer steps (summed lr
        ``lr``) with its first moment, solved exactly per coordinate on the local quadratic;
        m (Adam's bias-corrected m_hat, in place) moves to the substep's end. Returns the
        step (a fresh tensor; theta, g and v are left as they are).

        Per coordinate, in optimizer steps t: x' = -p m, m' = (g + h x - m) / tau, with x
        the move from theta, p = (lr / n) / (sqrt(v_hat) + eps) Adam's step per unit of
        m_hat, tau = -1 / ln(beta1) (m_hat's memory: beta1^t = e^(-t/tau)) and h the
        coordinate's curvature, the secant of the gradient along the step the flow would
        take without momentum (one more gradient, as the settled step takes). A damped
        oscillator, solved exactly for any substep length, so the first moment's lag is
        followed without resolving the steps: over-damped coordinates settle on the
        gradient's zero as the settled step does, under-damped ones (p h > 1 / (4 tau))
        overshoot it and turn, as Adam's heavy ball does. Taking tau down to critical
        damping there instead lost the adapter-stage run (README "Fidelity").
        (Adam's recurrence with the gradient held over the substep, tried before, swung
        between -0.47 and -1.23 for lm 4x's pretrain at 16 to 64 substeps).

        A step that would raise the training loss is taken again critically damped, as the
        SGD flow halves such a step: ``guard(step)`` is the training loss after the step,
        and ``before`` at the substep's start (theta; the caller has it from the moments'
        passes, with ``penalty``), else ``guard()``. Where the secant curvature is far off (a
        probe step far past the gradient's zero, as in a fresh stage's warmup), an
        under-damped coordinate's phase at the substep's end is arbitrary, and the summed
        move can undo the substep's learning: the LoRA variant's poison stage fell 0.43 of
        its recorded loss, 0.98 with the guard (3 of its 64 substeps taken again).

        Memory: p is computed a slice at a time where it is used (not kept whole); the
        probe point and the gradient there are in the model's precision (float32 unless
        ``narrow`` is false); m and v are parked in a temporary file (``parked``) while
        the probe's gradient is taken and while the guard evaluates the loss. The
        step and m stay float64: in float32 either moved lm's pretrain estimate by 2%
        (the oscillator amplifies their rounding; README "Memory, dtypes and scale").
        """
        flat = self.flat
        inv = flat.per_group(j, lambda h: 1 - h.beta2**step).reciprocal_()
        if before is None:
            before = guard() if guard is not None else 0.0

        def rate(part: slice) -> torch.Tensor:  # p over a slice
            ip = inv[part] if inv.dim() else inv
            ep = eps[part] if eps.dim() else eps
            p = (v[part] * ip).sqrt_().add_(ep).reciprocal_().mul_(lr / n)
            return p.masked_fill_(~positive[part], 0.0)

        # the step without momentum; then the step. In slices: the solution's temporaries
        # are a slice's, not the model's
        slices = [slice(a, a + OSCILLATOR_SLICE) for a in range(0, g.numel(), OSCILLATOR_SLICE)]
        step_ = torch.empty(g.shape, dtype=torch.float64, device=g.device)
        for part in slices:
            step_[part] = (g[part] * rate(part)).mul_(-float(n))
        point = torch.empty(theta.shape, device=theta.device,
                            dtype=torch.float32 if self.narrow else torch.float64)
        for tp, sp, pp in zip(*(torch.split(x, PIECE) for x in (theta, step_, point)),
                              strict=True):
            torch.add(tp, sp, out=pp)
        del theta
        with _parked_all(m, v):
            g_probe = self.gradient_at(j, point, rho, lam_c)
        del point
        tau = self.memory(j)

        def solve(part: slice, critical: bool) -> tuple[torch.Tensor, torch.Tensor]:
            p = rate(part)
            probe = (g[part] * p).mul_(-float(n))  # the probe step, as taken above
            h = _secant(g[part], g_probe[part], probe)
            t = tau[part] if tau.dim() else tau
            if critical:  # p h tau = 1/4 where it was more (0.25 / 0 = inf: left as it is)
                t = torch.minimum(torch.as_tensor(t, dtype=h.dtype, device=h.device),
                                  0.25 / (p * h))
            return oscillator(g[part], m[part], p, h, t, float(n))

        if guard is None:
            for part in slices:
                step_[part], m[part] = solve(part, False)
            return step_
        # m as it was is kept aside (in a temporary file for a large model: no second m in
        # memory) until the step is kept, and put back to solve it again
        with kept_aside(m) as restore:
            for part in slices:
                step_[part], m[part] = solve(part, False)
            with _parked_all(m, v):
                critical = guard(step_) > before
            if critical:
                restore()
                for part in slices:
                    step_[part], m[part] = solve(part, True)
        return step_

    def penalty(self, j: int, point: torch.Tensor) -> float:
        """Coupled decay's 1/2 lam |point|^2 over stage j's parameters (0 without it),
        summed one piece at a time as value_at sums it."""
        lam_c = self.flat.coupled_decay(j)
        if lam_c.dim() == 0 and float(lam_c) == 0.0:
            return 0.0
        total = 0.0
        for a, x in zip(range(0, point.numel(), PIECE), torch.split(point, PIECE),
                        strict=True):
            lp = lam_c[a:a + x.numel()] if lam_c.dim() else lam_c
            x = x.double()
            total += 0.5 * float((lp * x * x).sum())
        return total

    def value_at(self, j: int, point: torch.Tensor, step: torch.Tensor | None = None,
                 minus: torch.Tensor | None = None) -> float:
        """Stage j's training loss (plus coupled decay's 1/2 lam |theta|^2) at flat
        point - minus + step, the point built one piece at a time in the model's precision
        (float32 unless ``narrow`` is false): no whole-model float64 temporary."""
        flat = self.flat
        lam_c = flat.coupled_decay(j)
        coupled = lam_c.dim() > 0 or float(lam_c) != 0.0
        out = torch.empty(point.shape, dtype=torch.float32 if self.narrow else torch.float64,
                          device=point.device)
        penalty = 0.0
        for a, op in zip(range(0, point.numel(), PIECE), torch.split(out, PIECE), strict=True):
            part = slice(a, a + op.numel())
            x = point[part].to(torch.float64, copy=True)
            if minus is not None:
                x.sub_(minus[part])
            if step is not None:
                x.add_(step[part])
            if coupled:
                lp = lam_c[part] if lam_c.dim() else lam_c
                penalty += 0.5 * float((lp * x * x).sum())
            op.copy_(x)
        value = flat.curvature(j).value(flat.at(out)) + penalty
        if out.nbytes >= PARK_MIN:  # a large model's: the forward pass's activations,
            heap.trim()  # before the step's slices are solved
        del out
        return value

    def gradient_at(self, j: int, point: torch.Tensor, rho: float, lam_c: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """Stage j's clipped training-loss gradient plus coupled decay at flat ``point``
        (float32 or float64), summed over the sample's groups one at a time: into ``out``
        where given, else into point's own buffer where no coupled decay needs the point
        and the model's tensors are not views of it, else into a fresh one. The decay is
        added one piece at a time (mixed dtypes: torch casts a whole operand otherwise)."""
        flat = self.flat
        params = flat.at(point)
        coupled = lam_c.dim() > 0 or float(lam_c) != 0.0
        if out is None:
            shared = any(q.untyped_storage().data_ptr() == point.untyped_storage().data_ptr()
                         for q in params.values())
            out = torch.empty_like(point) if coupled or shared else point
        self.group_moments.gradient(flat.curvature(j), j, params, self.config.noise_chunks,
                                    out)
        del params
        out.mul_(rho)
        if coupled:
            for ga, ap, lp in zip(*(torch.split(x, PIECE) for x in (out, point)),
                                  _pieces(lam_c, point), strict=True):
                ga.addcmul_(lp, ap)
        return out

    def direction(self, j: int, g: torch.Tensor, v: torch.Tensor, step: int,
                  eps: torch.Tensor) -> torch.Tensor:
        """Adam's normalised step g / (sqrt(v_hat) + eps), v_hat = v / (1 - beta2^step)
        (a fresh tensor, float32 where the parameters are (``narrow``), computed in float64
        one parameter at a time and rounded once; g and v are left as they are)."""
        flat = self.flat
        inv = flat.per_group(j, lambda h: 1 - h.beta2**step).reciprocal_()
        out = torch.empty(v.shape, dtype=torch.float32 if self.narrow else torch.float64,
                          device=v.device)
        for gp, vp, ip, ep, op in zip(*(torch.split(x, PIECE) for x in (g, v)),
                                      _pieces(inv, v), _pieces(eps, v),
                                      torch.split(out, PIECE), strict=True):
            torch.div(gp, (vp * ip).sqrt_().add_(ep), out=op)
        return out

    def settled_step(self, j: int, theta: torch.Tensor, g: torch.Tensor, step: torch.Tensor,
                     positive: torch.Tensor, lam_c: torch.Tensor,
                     rho: float = 1.0, own_theta: bool = False) -> torch.Tensor:
        """``step`` from theta, cut per coordinate where the gradient (clipped by ``rho``,
        plus coupled decay) would change sign to the secant estimate of the zero:
        g / (g - g_after) of the way. ``step`` is updated in place and returned; with
        ``own_theta`` theta's buffer is reused (the caller no longer needs it).

        Where the parameters are float32 or narrower (``narrow``), the step is float32, and
        so is the point after it (the model is evaluated there in its own dtype: the same
        values); the gradient there is summed into theta's float64 buffer with
        ``own_theta``, else in float32 (it only decides where the gradient flips sign and
        the secant's fraction: float32 rounding). Mixed float32/float64 arithmetic is done
        one parameter at a time (torch casts a whole operand otherwise)."""
        step.masked_fill_(~positive, 0.0)
        if self.narrow:
            after = torch.empty(theta.shape, dtype=torch.float32, device=theta.device)
            for tp, sp, ap in zip(*(torch.split(x, PIECE) for x in (theta, step, after)),
                                  strict=True):
                torch.add(tp, sp, out=ap)
            out = theta if own_theta else torch.empty_like(after)
        else:
            after, out = (theta.add_(step) if own_theta else theta + step), None
        del theta
        # the gradient after the step (summed over the sample's groups, one at a time),
        # where it can be, written over the point it was taken at
        g_after = self.gradient_at(j, after, rho, lam_c, out)
        del after, out
        # one parameter at a time: no whole-model temporaries
        for gp, ga, sp in zip(*(torch.split(x, PIECE) for x in (g, g_after, step)),
                              strict=True):
            flip = torch.lt(gp * ga, 0)
            denom = (gp - ga).masked_fill_(~flip, 1.0)  # g - g_after where it flips
            sp.mul_(torch.div(gp, denom, out=denom).masked_fill_(~flip, 1.0))
        return step

    # ------------------------------------------------------------ second moments
    def second_moment(self, j: int, name: str) -> torch.Tensor:
        """Stage j's exp_avg_sq for one parameter at its end, from its state file (in the
        file's dtype)."""
        stages = self.flat.stages
        stages.preconditioner(j, name)  # raises the clear error when the state lacks it
        v = stages.runs[j].state.tensor(name, "exp_avg_sq")
        assert v is not None  # preconditioner() raised otherwise
        return v

    def end_second_moment(self, j: int) -> torch.Tensor:
        """Stage j's exp_avg_sq at its end, flat, in float32 where that holds every value
        exactly (a float32, bf16 or fp16 state), else float64."""
        parts = {n: self.second_moment(j, n) for n in self.flat.names}
        return self.flat.flat(parts, _exact_dtype(parts.values()))

    def start_second_moment(self, j: int) -> torch.Tensor:
        """The actual run's exp_avg_sq as stage j starts: zero when fresh; else the
        previous stage's, or, when that state file is absent, stage j's own at its end
        (stationary); flat, in the dtype that holds it exactly (read from the files on
        every call: not kept)."""
        run = self.flat.runs[j]
        if run.fresh:
            return torch.zeros(sum(self.flat.sizes), dtype=torch.float32,
                               device=self.flat.device)
        v = self.saved_second_moment(j - 1, exact=True) if j > 0 else None
        return self.end_second_moment(j) if v is None else v

    def cf_second_moment(self, j: int, path: ActualPath) -> Moment:
        """The counterfactual's exp_avg_sq and step count as Adam stage j starts.

        Fresh: zero, 0. Continuing the skipped stage's state: the counterfactual continues
        the stage before it instead (its state file; fresh if there is none). Continuing a
        later stage's: the actual run's, plus the difference the flow handed on.
        """
        run = self.flat.runs[j]
        zero = partial(torch.zeros, sum(self.flat.sizes), dtype=torch.float64,
                       device=self.flat.device)
        if run.fresh:
            return zero(), 0
        how, value = self.cf_start
        if how == "state":
            if value is None:
                return zero(), 0
            return value
        v = self.start_second_moment(j)
        if how == "carry" and value is not None:
            dv, offset = value
            return (v + dv).clamp(min=0.0), max(run.step0 - offset, 0)
        return v.to(torch.float64, copy=True), run.step0

    def state_before(self, k: int) -> Moment | None:
        """exp_avg_sq and step count at the end of the stage before k (what a stage
        continuing k's state continues when k is skipped); None: a fresh optimizer."""
        v = self.saved_second_moment(k - 1) if k > 0 else None
        if v is None:
            return None
        prev = self.flat.runs[k - 1]
        step = prev.state.step if prev.state.step is not None else prev.step0 + prev.steps
        return v, step

    def saved_second_moment(self, i: int, exact: bool = False) -> torch.Tensor | None:
        """Adam stage i's exp_avg_sq at its end from its state file, flat (float64, or with
        ``exact`` the narrowest float that holds it); None when the stage is not Adam or
        its state file lacks it."""
        run = self.flat.runs[i]
        if run.opt_type not in ("adam", "adamw") or run.state.source is None:
            return None
        parts = [run.state.tensor(n, "exp_avg_sq") for n in self.flat.names]
        found = [p for p in parts if p is not None]
        if len(found) != len(parts):
            return None
        dtype = _exact_dtype(found) if exact else torch.float64
        return torch.cat([p.reshape(-1).to(self.flat.device, dtype) for p in found])


@contextmanager
def _parked_all(*tensors: torch.Tensor | None) -> Iterator[None]:
    """Every one of these (None skipped) parked while the block runs (path.parked)."""
    with ExitStack() as stack:
        for t in tensors:
            if t is not None:
                stack.enter_context(parked(t))
        yield


def _norms(g: torch.Tensor, noise: torch.Tensor) -> tuple[float, float]:
    """(|g|^2, sum S): what the clip factor is computed from (AdamFlow.clip_factor)."""
    return float(g.square().sum()), float(noise.sum())


def _add_weighted(sums: tuple[torch.Tensor, torch.Tensor], g: torch.Tensor,
                  noise: torch.Tensor, w: torch.Tensor) -> None:
    """sums += (w g^2, w noise), in pieces: no whole-model temporaries (and, in a function
    of its own, no loop variable left holding a view of noise after it)."""
    for sq, sp, gp, np_, wp in zip(*(torch.split(x, PIECE) for x in (*sums, g, noise)),
                                   _pieces(w, g), strict=True):
        sq.addcmul_(wp, gp * gp)
        sp.addcmul_(wp, np_)


def _pieces(x: torch.Tensor, like: torch.Tensor) -> list[torch.Tensor]:
    """A per-group constant (a scalar, or a flat vector like ``like``) cut as
    torch.split(like, PIECE) cuts the flat vectors."""
    n = -(-like.numel() // PIECE)
    return list(torch.split(x, PIECE)) if x.dim() else [x] * n


def _exact_dtype(parts: Iterable[torch.Tensor]) -> torch.dtype:
    """float32 where it holds every one of these tensors exactly, else float64."""
    return torch.float32 if all(p.dtype in _NARROW for p in parts) else torch.float64


def _secant(g: torch.Tensor, g_after: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the gradient's slope along ``step``: (g_after - g) / step, zero where
    the step is zero or the slope negative (a concave coordinate is taken as flat)."""
    h = (g_after - g).div_(torch.where(step != 0, step, torch.ones_like(step)))
    return h.masked_fill_(step == 0, 0.0).clamp_(min=0.0)


def oscillator(g: torch.Tensor, m: torch.Tensor, p: torch.Tensor, h: torch.Tensor,
               tau: torch.Tensor | float, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x(t) and m(t) of x' = -p m, m' = (g + h x - m) / tau from x = 0, m (elementwise;
    p, h >= 0, tau > 0): Adam's move and first moment on a quadratic with the gradient g
    at the start (AdamFlow.momentum_step).

    With z = x + g / h (the distance to the gradient's zero) the system is linear and
    homogeneous, A = [[0, -p], [h / tau, -1 / tau]], and exp(A t) = e^(-gamma t) (C I + S (A
    + gamma I)), gamma = 1 / (2 tau), w^2 = gamma^2 - p h / tau, C = cosh(w t) and S = sinh(w
    t) / w (cos and sin where w^2 < 0). Where p h t^2 / tau is tiny the coordinate is flat
    (h = 0; z would be far away and x its difference): x = -p (m tau (1 - e) + g (t - tau
    (1 - e))), m = g + (m - g) e, e = e^(-t / tau)."""
    tau = torch.as_tensor(tau, dtype=g.dtype, device=g.device)
    gamma = 0.5 / tau
    k = p * h / tau
    flat = k * t * t < 1e-6
    d2 = gamma * gamma - k
    w = d2.abs().sqrt()
    over = d2 >= 0
    # each regime computed only where some element is in it (the same values: where()
    # picks them element by element either way)
    any_over, all_over = bool(over.any()), bool(over.all())
    if any_over:  # over-damped: e^(-gamma t) cosh, sinh / w as the slow and fast decays
        slow = k / (gamma + w)  # gamma - w, without cancellation
        es = torch.exp(-slow * t)
        ef = torch.exp(-(gamma + w) * t)
        ec_over = 0.5 * (es + ef)
        z2 = 2 * w * t
        phi = torch.where(z2 > 1e-8, -torch.expm1(-z2) / torch.where(z2 > 1e-8, z2, 1.0),
                          1 - 0.5 * z2)
        es_over = es * t * phi
    if not all_over:  # under-damped: e^(-gamma t) cos, sin / w
        decay = torch.exp(-gamma * t)
        ec_under = decay * torch.cos(w * t)
        es_under = decay * t * torch.sinc(w * t / math.pi)
    if all_over:
        ec, es_ = ec_over, es_over
    elif not any_over:
        ec, es_ = ec_under, es_under
    else:
        ec = torch.where(over, ec_over, ec_under)
        es_ = torch.where(over, es_over, es_under)
    z0 = g / torch.where(flat, torch.ones_like(h), h)
    z = ec * z0 + es_ * (gamma * z0 - p * m)
    m_end = ec * m + es_ * (h / tau * z0 - gamma * m)
    x = z - z0
    if not bool(flat.any()):
        return x, m_end
    e = torch.exp(-t / tau)
    x_flat = -p * (m * tau * (1 - e) + g * (t - tau * (1 - e)))
    m_flat = g + (m - g) * e
    return torch.where(flat, x_flat, x), torch.where(flat, m_flat, m_end)

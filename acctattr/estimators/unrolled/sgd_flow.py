"""Carrying d through an SGD stage by simulating both runs' gradient flow.

In expectation (and in steady state for momentum) SGD steps by -eta * r * g with
r = (1 - dampening)/(1 - momentum). The actual run is simulated from each checkpoint and the
counterfactual alongside it at theta - d; d changes by the difference of their steps. A
substep spans many optimizer steps, so each is an exponential Euler step: stable at any
length, exact on a quadratic, and halved where it would raise the training loss: down to
max_halvings deep, or as deep as it takes to reach one optimizer step's length where a
substep spans more steps than 2^max_halvings (a long run's substeps are long: a fixed
depth would accept steps that raise the loss there, and the counterfactual can run away).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from acctattr.estimators.unrolled.flat import FlatRun
from acctattr.estimators.unrolled.lanczos import Krylov, phi
from acctattr.estimators.unrolled.path import ActualPath, check_reproduction, spans, walk

# (loss, gradient g, x -> H x) at a point, each with the coupled decay
Expansion = tuple[float, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class SgdFlow:
    def __init__(self, flat: FlatRun) -> None:
        self.flat = flat
        self.config = flat.config
        # (stage, first step, end step, since_start) -> (momentum, dampening, nesterov) ->
        # rate_over's ramp (a loop over the substep's steps, asked for by every simulation
        # through it)
        self._ramps: dict[tuple[int, int, int, bool], dict[tuple, float]] = {}

    def propagate(self, j: int, d: torch.Tensor, rate: torch.Tensor, total: float,
                  hand_on: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Carry d through SGD stage j (summed lr ``total``, per-element ``rate``); returns
        the first-moment perturbation to hand on when ``hand_on`` (the next stage continues
        this one's buffer): the buffer's steady-state response to the gradient difference
        between the runs at the stage's end."""
        flat = self.flat
        run = flat.runs[j]
        path = self.path(j, total, rate)
        what = f"carrying the counterfactual through stage '{run.name}'"
        for q, ((k0, k1), theta, s_act) in enumerate(path):
            flat.report(what, q, len(path.spans))
            cf = theta - d
            s_cf = self.gd_step(j, cf, flat.lr_sum(j, k0, k1),
                                self.rate_over(j, k0, k1, rate), most=self.halvings(k0, k1))
            if run.fresh:
                d = d + s_act - s_cf
            else:
                # both runs' buffers are warm, but their difference only builds up from the
                # stage's start (what they held before is the released e)
                ramp = self.rate_over(j, k0, k1, rate, since_start=True)
                d = d + (s_act - s_cf) * torch.where(rate > 0, ramp / rate.clamp(min=1e-300),
                                                     torch.ones_like(rate))
        if not hand_on:
            return d, None
        end = flat.flat(flat.anchor(run.end))
        steady = flat.gradient(j, end) - flat.gradient(j, end - d)
        return d, steady * flat.per_group(j, lambda g: (1 - g.dampening) / (1 - g.momentum)
                                          if g.momentum > 0 else 0.0)

    def path(self, j: int, total: float, rate: torch.Tensor) -> ActualPath:
        """The actual run through SGD stage j simulated from each checkpoint to the next."""
        flat = self.flat
        if j in flat.paths:
            return flat.paths[j]
        substeps = spans(flat, j, total)
        starts, steps, ends = walk(flat, j, substeps, lambda q, k0, k1, theta: self.gd_step(
            j, theta, flat.lr_sum(j, k0, k1), self.rate_over(j, k0, k1, rate),
            most=self.halvings(k0, k1)))
        flat.reproduction[j] = check_reproduction(flat, j, ends)
        path = ActualPath([(k0, k1) for _, k0, k1 in substeps], starts, steps)
        flat.paths = {j: path}
        return path

    def rate_over(self, j: int, k0: int, k1: int, rate: torch.Tensor,
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
        run = self.flat.runs[j]
        total = self.flat.lr_sum(j, k0, k1)
        if (not run.fresh and not since_start) or total == 0.0:
            return rate
        memo = self._ramps.setdefault((j, k0, k1, since_start), {})

        def ramp(g) -> float:
            mu, tau = g.momentum, g.dampening
            if mu == 0.0:  # torch keeps no buffer: the step is the gradient
                return 1.0
            key = (mu, tau, g.nesterov)
            if key in memo:
                return memo[key]
            if run.fresh:
                held = [mu**s + (1 - tau) * (1 - mu**s) / (1 - mu) for s in range(k0, k1)]
            else:
                held = [(1 - tau) * (1 - mu ** (s + 1)) / (1 - mu) for s in range(k0, k1)]
            if g.nesterov:
                held = [1.0 + mu * h for h in held]
            lrs = run.lrs[k0:k1]
            memo[key] = sum(eta * h for eta, h in zip(lrs, held, strict=True)) / total
            return memo[key]

        mask = (rate > 0).to(rate.dtype)
        return self.flat.per_group(j, ramp) * mask

    def halvings(self, k0: int, k1: int) -> int:
        """How many times a substep over optimizer steps k0..k1 may be halved: max_halvings,
        or as many as it takes to reach one optimizer step where it spans more than
        2^max_halvings steps.

        A fixed depth makes the finest piece a fixed fraction of a substep, and a substep
        spans the stage's steps / flow_substeps: on a run 32x as long (bench/scaling.py)
        the finest piece spanned ~9 optimizer steps, a step from the counterfactual's start
        that raised the loss was accepted there, and the counterfactual ran away (training
        loss 2.3 -> 300, every later substep halved to the bottom: 12x the passes). No
        piece is finer than one optimizer step needs to be: the run itself moved in steps
        that long."""
        return max(self.config.max_halvings, math.ceil(math.log2(max(k1 - k0, 1))))

    def gd_step(self, j: int, theta: torch.Tensor, lr: float, rate: torch.Tensor,
                depth: int = 0, expansion: Expansion | None = None,
                most: int | None = None, krylov: Krylov | None = None) -> torch.Tensor:
        """Gradient flow theta' = -r g for summed lr ``lr`` from theta, by one exponential
        Euler step: -r^(1/2) phi(L r^(1/2) (H + lam) r^(1/2)) r^(1/2) g, H at theta (Lanczos);
        exact on a quadratic and stable however many optimizer steps it spans. Where the
        step raises the training loss (the quadratic model does not hold that far), it is
        taken as two half steps, at most ``most`` (default max_halvings; ``halvings``)
        deep.

        Args:
            expansion: (loss, gradient g, v -> H v) at theta, each with the coupled decay
                (``expand``); the first half step reuses its caller's.
            krylov: the Lanczos basis of the step being halved (the first half: the same
                operator and vector, half the time), extended only where the half step
                needs more vectors; the same bits as building it again.
        """
        flat = self.flat
        root = rate.sqrt()
        lam = flat.coupled_decay(j)
        before, g, product = expansion or self.expand(j, theta)

        def matvec(x: torch.Tensor) -> torch.Tensor:
            y = root * x
            return root * (product(y) + lam * y)

        if krylov is None:
            krylov = Krylov(matvec, root * g, self.config.lanczos_iters)
        step = -root * krylov.apply(phi(lr), self.config.lanczos_rtol)
        most = self.config.max_halvings if most is None else most
        if depth < most:
            after_theta = theta + step
            after = flat.curvature(j).value(flat.at(after_theta)) + 0.5 * float(
                (lam * after_theta * after_theta).sum())
            if not after <= before:  # gradient flow never raises the loss: two half steps
                first = self.gd_step(j, theta, lr / 2, rate, depth + 1, (before, g, product),
                                     most, krylov)
                krylov.release()
                return first + self.gd_step(j, theta + first, lr / 2, rate, depth + 1,
                                            most=most)
        krylov.release()  # a first half's step was its caller's last use of the basis
        return step

    def expand(self, j: int, theta: torch.Tensor) -> Expansion:
        """At flat theta, from one forward and backward pass: stage j's training loss and
        gradient, each with the coupled decay (lam |theta|^2 / 2, lam theta), and x -> H x
        (flat, the loss's Hessian alone)."""
        flat = self.flat
        value, grad, product = flat.curvature(j).expand(flat.at(theta))
        lam = flat.coupled_decay(j)

        def matvec(x: torch.Tensor) -> torch.Tensor:
            return flat.flat(product(flat.named(x)))

        return (value + 0.5 * float((lam * theta * theta).sum()),
                flat.flat(grad) + lam * theta, matvec)

"""The linearised propagator (``sgd_dynamics`` / ``adam_dynamics`` = "linear"): within a
segment with summed lr L, rate r (Adam: the preconditioner p) and coupled weight decay lam,
each substep applies

    d <- r^(1/2) exp(-L * r^(1/2) (H_bar + lam) r^(1/2)) r^(-1/2) d

by Lanczos, H_bar the secant Hessian between the actual run (interpolated between the
anchors) and the counterfactual (theta - d/2); for Adam, r uses the counterfactual's larger
second moment and a substep moves a coordinate by at most its summed lr
(UnrolledConfig.precond, adam_cap). Cheaper and less faithful than the flows (README).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from acctattr.estimators.base import Params
from acctattr.estimators.unrolled.flat import FlatRun
from acctattr.estimators.unrolled.lanczos import lanczos_expm
from acctattr.options import SECANT_RULES
from acctattr.runs.checkpoints import StateDictReader


class LinearPropagator:
    def __init__(self, flat: FlatRun) -> None:
        self.flat = flat
        self.config = flat.config

    def propagate(self, j: int, d: torch.Tensor, rate: torch.Tensor, total: float,
                  hand_on: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Carry d through stage j; returns the first-moment perturbation to hand on when
        ``hand_on``: the steady-state response of the moment to the gradient change."""
        flat = self.flat
        run = flat.runs[j]
        for a, b, s0, s1 in flat.segments(j):
            lrs = run.lrs[s0:s1]
            scale = float(sum(lrs))
            if scale > 0:
                n = max(1, round(self.config.substeps * scale / total)) if total > 0 else 1
                for point, part in self.hessian_points(a, b, n):
                    r = rate if run.opt_type == "sgd" else self.adam_rate(j, point, d, rate)
                    root = r.sqrt()
                    inv = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
                    mv = self.hvp(j, point, d)
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
                d = d * flat.per_group(j, lambda g, lrs=lrs: math.prod(
                    1 - eta * g.weight_decay for eta in lrs))
        if not hand_on:
            return d, None
        steady = self.hvp(j, flat.anchor(run.end), d)(d)
        if run.opt_type == "sgd":
            steady = steady * flat.per_group(j, lambda g: (1 - g.dampening) / (1 - g.momentum)
                                             if g.momentum > 0 else 0.0)
        return d, steady

    def hvp(self, j: int, anchor: Params, d: torch.Tensor) -> Callable[[torch.Tensor],
                                                                       torch.Tensor]:
        """x -> (H_bar + lam_coupled) x, H_bar averaged on the line anchor - t*d (secant)."""
        flat = self.flat
        ts, ws = SECANT_RULES[self.config.secant_points]
        curv = flat.curvature(j)
        products = []
        for t, w in zip(ts, ws, strict=True):
            shift = flat.named(t * d)
            point = {n: anchor[n] - shift[n].to(anchor[n].dtype) for n in flat.names} \
                if t else anchor
            products.append((w, curv.hvp(point)))
        lam = flat.coupled_decay(j)

        def matvec(x: torch.Tensor) -> torch.Tensor:
            named = flat.named(x)
            total = sum(w * flat.flat(product(named)) for w, product in products)
            return total + lam * x

        return matvec

    def adam_rate(self, j: int, point: Params, d: torch.Tensor,
                  rate: torch.Tensor) -> torch.Tensor:
        """Adam's per-element rate at a propagation point (config.precond)."""
        how = self.config.precond
        if how == "actual":
            return rate
        flat = self.flat
        curv = flat.curvature(j)
        shift = flat.named(d)
        g_act = flat.flat(curv.gradient(point))
        g_cf = flat.flat(curv.gradient({n: point[n] - shift[n].to(point[n].dtype)
                                        for n in flat.names}))
        eps = flat.per_group(j, lambda g: g.eps)
        positive = rate > 0
        v = torch.where(positive, (1.0 / rate.clamp(min=1e-300) - eps).clamp(min=0) ** 2,
                        torch.zeros_like(rate))
        v_cf = v + (g_cf**2 - g_act**2).clamp(min=0)
        v_use = v_cf if how == "counterfactual" else 0.5 * (v + v_cf)
        return torch.where(positive, 1.0 / (v_use.sqrt() + eps), torch.zeros_like(rate))

    def hessian_points(self, a: StateDictReader, b: StateDictReader,
                       n: int) -> Iterator[tuple[Params, float]]:
        """(parameters where H is taken, fraction of the segment it covers), in order.

        With ``interpolate``, n substeps: a stage's ``substeps`` are shared among its
        segments in proportion to their summed lr, so the cost does not grow with the
        number of intermediate checkpoints.

        Built lazily so that each point is formed after the previous substep moved d.
        """
        flat = self.flat
        how = self.config.hessian_at
        if how == "start":
            yield flat.anchor(a), 1.0
        elif how == "end":
            yield flat.anchor(b), 1.0
        elif how == "split":
            yield flat.anchor(a), 0.5
            yield flat.anchor(b), 0.5
        else:
            for i in range(n):
                yield flat.point(a, b, (i + 0.5) / n), 1.0 / n

"""The batch-noise scale c of the Adam flow, fitted to the second moment the run recorded.

In expectation Adam's v is the running average of g^2 + c*S (S the per-example gradient
variance, c ~ 1/batch size). Over a stage of T steps the simulated actual run leaves

    v_end ~ beta2^T v_start + sum_i w_i (g_i^2 + c S_i),

w_i the weight of substep i's contribution left at the stage's end; c is chosen so that
this matches the state file's exp_avg_sq by least squares.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from acctattr import heap
from acctattr.evaluation.curvature import Curvature
from acctattr.evaluation.data import Batch
from acctattr.evaluation.evaluator import Params

# Where every group's gradient together takes at most this many elements, they come from one
# pass vectorised over the groups (fast where the model is small and each pass is mostly call
# overhead); above it, one group at a time (memory: one group's gradient and activations).
# Both give the same rows up to float32 rounding (tests/estimators/test_dynamics.py); which is
# taken depends only on the model's size and the number of groups, not on the machine.
BLOCK_ELEMENTS = 1 << 22
# the pieces the per-group sums are updated in (float64 temporaries of at most 2 MB)
PIECE = 1 << 18


def fit_noise(squares: torch.Tensor, spread: torch.Tensor, v_start: torch.Tensor,
              keep: torch.Tensor, v_end: torch.Tensor, positive: torch.Tensor,
              sizes: int | list[int] | None = None) -> float:
    """c >= 0 by least squares over the coordinates the stage trains.

    Args (flat; float32 or float64):
        squares: sum_i w_i g_i^2 over the simulated substeps.
        spread: sum_i w_i S_i.
        v_start: the stage's starting exp_avg_sq; ``keep`` (beta2^T: a scalar, or per
            element) times it is what is left of it at the stage's end.
        v_end: the state file's exp_avg_sq at the stage's end.
        positive: the coordinates the stage trains (bool).
        sizes: computed one piece of these lengths (or of this length) at a time, in
            float64: no whole-model temporaries; the whole vector at once where None.
    """
    sizes = sizes or [squares.numel()]
    keeps = torch.split(keep, sizes) if keep.dim() else [keep] * len(
        torch.split(squares, sizes))
    num = den = 0.0
    used = False
    for sq, sp, vs, kp, ve, pos in zip(*(torch.split(x, sizes) for x in (
            squares, spread, v_start)), keeps, *(torch.split(x, sizes) for x in (
            v_end, positive)), strict=True):
        use = pos & (sp > 0)
        if not bool(use.any()):
            continue
        used = True
        explained = vs.double().mul_(kp).add_(sq)  # carried + squares
        spd = sp.double()  # summed in float64 whatever they were accumulated in
        num += float(((ve - explained) * spd)[use].sum())
        den += float((spd * spd)[use].sum())
    if not used:
        return 0.0
    return max(num / den, 0.0)


# the clipped fit's coordinates: every trained one up to this many, else a fixed random
# sample of about this many (g and S of each substep kept in float32 at them: 64 substeps, 32 MB;
# more where a stage has coupled decay or per-group beta2: those terms kept alike)
CLIP_SAMPLE = 1 << 16


class ClipRecord:
    """What the fitting pass of a clipped stage keeps for fit_clipped_noise: each substep's
    |g|^2 and sum(S) (the clip factor's inputs, whole-model scalars), and at a fixed
    sample of the trained coordinates (``idx``) its mean gradient g and per-example
    variance S before clipping, the coupled decay's term lam * theta and its weight w."""

    def __init__(self, positive: torch.Tensor, tau: float) -> None:
        self.tau = tau
        self.idx = _sample(positive, CLIP_SAMPLE)
        self.norms: list[tuple[float, float]] = []
        self.rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                              torch.Tensor]] = []

    def add(self, norms: tuple[float, float], g: torch.Tensor, noise: torch.Tensor,
            lam: torch.Tensor, theta: torch.Tensor, w: torch.Tensor) -> None:
        """One substep, before clipping: (|g|^2, sum S), g, S, the coupled decay lam and
        the point theta (flat), and the substep's weight w (a scalar or flat)."""
        i = self.idx
        decay = None if not bool(lam.any()) else (
            (lam[i] if lam.dim() else lam) * theta[i]).float()
        self.norms.append(norms)
        self.rows.append((g[i].float(), noise[i].float(), decay, w[i] if w.dim() else w))


def fit_clipped_noise(record: ClipRecord, v_start: torch.Tensor, keep: torch.Tensor,
                      v_end: torch.Tensor) -> float:
    """c >= 0 by least squares, as fit_noise, but with each substep's clip factor
    rho(c) = min(1, tau / sqrt(|g|^2 + c sum S)) falling as c grows:

        v_end ~ keep v_start + sum_i w_i ((rho_i(c) g_i + lam theta_i)^2 + c rho_i(c)^2 S_i)

    over the sampled trained coordinates where the weighted S is positive. Held at their
    c = 0 values (fit_noise), the clip factors make this linear in c; under hard clipping
    (|g|^2 above tau^2) v's total then hardly moves with c, only its spread over the
    coordinates does, and the linear fit sends c to 0. The residual is minimised over a
    grid in log c, then by golden section around the best point.
    """
    i = record.idx
    if not record.rows or len(i) == 0:
        return 0.0
    g = torch.stack([r[0] for r in record.rows]).double()  # [substeps, sampled]
    s = torch.stack([r[1] for r in record.rows]).double()
    w = torch.stack([r[3].expand(len(i)) for r in record.rows]).double()
    decay = torch.stack([r[2] if r[2] is not None else torch.zeros_like(r[0])
                         for r in record.rows]).double()
    kept = keep[i].double() if keep.dim() else keep.double()
    a = v_end[i].double() - kept * v_start[i].double()
    use = (w * s).sum(0) > 0
    if not bool(use.any()):
        return 0.0
    g, s, w, decay, a = g[:, use], s[:, use], w[:, use], decay[:, use], a[use]
    g2, ns = torch.tensor(record.norms, dtype=torch.float64, device=g.device).unbind(1)

    def residual(c: float) -> float:
        total = g2 + c * ns
        rho = torch.where(total > 0, (record.tau / total.clamp(min=1e-300).sqrt())
                          .clamp(max=1.0), torch.ones_like(total))[:, None]
        predicted = (w * ((rho * g + decay).square() + (c * rho * rho) * s)).sum(0)
        return float((a - predicted).square().sum())

    return _minimise(residual)


def _minimise(f, low: int = -48, high: int = 8, per_decade: int = 8) -> float:
    """argmin of f over c >= 0: the best of 0 and 10^(k / per_decade), k in low..high,
    then golden section between that point's grid neighbours (kept if no better)."""
    grid = [0.0] + [10 ** (k / per_decade) for k in range(low, high + 1)]
    values = [f(c) for c in grid]
    best = min(range(len(grid)), key=values.__getitem__)
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (5 ** 0.5 - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    mid = (lo + hi) / 2
    return mid if f(mid) < values[best] else grid[best]


def _sample(positive: torch.Tensor, most: int) -> torch.Tensor:
    """Indices of the True elements of ``positive`` [P], in increasing order: all of them
    where there are at most ``most``, else each kept with probability most / count (about
    ``most`` in all; a fixed seed: the same on every run and thread count). Read in pieces
    of PIECE * 16 elements: no index vector of the whole model."""
    count = int(positive.sum())
    if count <= most:
        return positive.nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(0)
    picked = []
    for lo in range(0, positive.numel(), PIECE * 16):
        found = positive[lo:lo + PIECE * 16].nonzero().squeeze(1).cpu()
        kept = torch.rand(len(found), generator=gen, dtype=torch.float64) < most / count
        picked.append(found[kept] + lo)
    return torch.cat(picked).to(positive.device)


class GroupMoments:
    """Stage training loss's mean gradient and per-example gradient variance, as
    Curvature.gradient_and_noise defines them (the sample cut into ``parts`` groups by
    torch.tensor_split; g_k the mean gradient of group k, m_k examples, g their weighted
    mean; S = sum_k m_k (g_k - g)^2 / (parts - 1)), accumulated group by group into two
    flat float64 vectors; the groups' gradients come one at a time (no [parts, P] block:
    8 copies of the model for 8 groups) unless the block is small (``rows``). g is summed
    in the same order as there; S is West's weighted running update (Welford's, for
    weights), equal to the two-pass sum up to rounding."""

    def __init__(self) -> None:
        # stages whose model torch.func could not vectorise: one plain backward per group
        self.looped: set[int] = set()

    def __call__(self, curv: Curvature, j: int, params: Params, parts: int,
                 sizes: list[int], device: torch.device,
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Flat (float64) mean gradient, rounded to each parameter's dtype as
        gradient_and_noise returns it, per-element variance, and the mean training loss
        (sign-flipped for a score, as Curvature.value; from the same passes) at ``params``.

        Args:
            params: name -> parameter, in flat order (``sizes`` elements each).
        """
        if parts < 2:
            raise ValueError(f"the gradient noise needs at least 2 groups (asked for {parts})")
        names = list(params)
        total = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
        spread = torch.zeros_like(total)
        sums = torch.split(total, sizes)
        parts = min(parts, curv.n)
        if parts < 2:  # one example: every batch is the whole data, so there is no noise
            g = curv.gradient(params)
            for part, n in zip(sums, names, strict=True):
                part.copy_(g[n].reshape(-1))
            return total, spread, curv.value(params)
        seen = 0
        loss = 0.0
        for m, row, value in self.rows(curv, j, params, parts):
            loss += m * value
            # in pieces, each widened once: float64 temporaries of PIECE elements, not of
            # the parameter's size (the same values)
            for sp, qp, rp in _row_pieces(row, sizes, total, spread):
                r = rp.double()
                before = sp / seen if seen else None
                sp.add_(r, alpha=m)  # as gradient_and_noise adds each group's row
                if before is not None:
                    after = sp / (seen + m)
                    qp.add_((r - before).mul_(r - after), alpha=m)
            del row
            seen += m
        for p, s in zip(params.values(), sums, strict=True):
            s.div_(curv.n)
            s.copy_(s.to(p.dtype))  # the mean as the parameter's dtype holds it
        return total, spread.div_(parts - 1), loss / curv.n

    def gradient(self, curv: Curvature, j: int, params: Params, parts: int,
                 out: torch.Tensor) -> torch.Tensor:
        """The mean training-loss gradient at ``params`` summed over the same groups, one
        at a time, into the flat float64 ``out`` (returned): the activations of one group
        at a time instead of the whole sample's. Equal to Curvature.gradient up to
        rounding (float32 per-group gradients added in float64)."""
        parts = max(1, min(parts, curv.n))
        out.zero_()
        sizes = [p.numel() for p in params.values()]
        for m, row, _ in self.rows(curv, j, params, parts):
            for op, rp in _row_pieces(row, sizes, out):
                op.add_(rp, alpha=m)
            del row
        return out.div_(curv.n)

    def rows(self, curv: Curvature, j: int, params: Params,
             parts: int) -> Iterator[tuple[int, torch.Tensor | Params, float]]:
        """(examples, mean loss gradient, mean loss) of each of the ``parts`` groups, in
        order: all
        groups from one vectorised pass where their gradients together are small
        (BLOCK_ELEMENTS), each row then one flat vector (the parameters' in flat order);
        else one group at a time (group_gradient), name -> gradient, the C heap trimmed
        once the caller has used a group's (_row_pieces pops each parameter's as it goes)."""
        size = sum(p.numel() for p in params.values())
        if j not in self.looped and parts * size <= BLOCK_ELEMENTS:
            try:
                block, values = curv.group_gradients_and_values(params, _whole(curv), parts)
            except Exception:
                self.looped.add(j)  # as group_gradient: this model cannot be vectorised
            else:
                # one flat row per group: the caller's loop runs over pieces of the whole
                # model, not of each parameter (the same elementwise arithmetic)
                flat = torch.cat([block.pop(n).reshape(parts, -1) for n in params], 1)
                sizes = [len(ix) for ix in torch.tensor_split(torch.arange(curv.n), parts)]
                for k, m in enumerate(sizes):
                    yield m, flat[k], float(values[k])
                return
        for m, batch in _groups(curv, parts):
            yield (m, *self.group_gradient(curv, j, params, batch))
            heap.trim()  # the group's gradient, used by now

    def group_gradient(self, curv: Curvature, j: int, params: Params,
                       batch: Batch) -> tuple[Params, float]:
        """One group's mean loss gradient in the parameters' dtype, and its mean loss, as
        Curvature computes them: torch.func.grad_and_value vectorised over a group axis of
        one (the same bits as the whole block), else, where torch.func cannot, one plain
        backward pass."""
        if j not in self.looped:
            from torch.func import grad_and_value, vmap

            def group_loss(p: Params, b: Batch) -> torch.Tensor:
                vals = curv.loss.compute(curv.outputs({**curv.fixed, **p}, b),
                                         b[curv.target], b)
                return curv.sign * vals.mean()

            try:
                got, value = vmap(grad_and_value(group_loss), in_dims=(None, 0))(
                    params, {k: v.unsqueeze(0) for k, v in batch.items()})
                return {n: t[0] for n, t in got.items()}, float(value[0])
            except Exception:
                # as Curvature: the model cannot be vectorised (an op without a batching
                # rule, data-dependent control flow); a genuine error raises in the loop too
                self.looped.add(j)
        leaves = [p.detach().requires_grad_(True) for p in params.values()]
        state = {**curv.fixed, **dict(zip(params, leaves, strict=True))}
        with torch.enable_grad():
            vals = curv.loss.compute(curv.outputs(state, batch),
                                     batch[curv.target], batch)
            loss = curv.sign * vals.mean()
            got = torch.autograd.grad(loss, leaves, allow_unused=True)
        return {n: torch.zeros_like(x) if gi is None else gi
                for n, x, gi in zip(params, leaves, got, strict=True)}, float(loss.detach())


def _row_pieces(row: torch.Tensor | Params, sizes: list[int],
                *flats: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Pieces of at most PIECE elements of the flat vectors ``flats`` (parameters of
    ``sizes`` elements in flat order), each with the same elements of a group's gradient
    ``row`` (rows: flat, or name -> gradient, each popped once its pieces are used)."""
    if isinstance(row, torch.Tensor):
        yield from zip(*(torch.split(x, PIECE) for x in (*flats, row)), strict=True)
        return
    parts = zip(*(torch.split(x, sizes) for x in flats), strict=True)
    for name, pieces in zip(list(row), parts, strict=True):
        yield from zip(*(torch.split(x, PIECE) for x in pieces),
                       torch.split(row.pop(name).reshape(-1), PIECE), strict=True)


def _groups(curv: Curvature, parts: int) -> Iterator[tuple[int, Batch]]:
    """(examples, batch) of each of the ``parts`` groups torch.tensor_split cuts the
    stage's sample into, in order."""
    whole = _whole(curv)
    lo = 0
    for rows in torch.tensor_split(torch.arange(curv.n), parts):
        m = len(rows)
        yield m, {k: v[lo:lo + m] for k, v in whole.items()}
        lo += m


def _whole(curv: Curvature) -> Batch:
    """The stage's whole data sample as one batch."""
    return {k: torch.cat([c[k] for c in curv.chunks]) for k in curv.chunks[0]} \
        if len(curv.chunks) > 1 else curv.chunks[0]

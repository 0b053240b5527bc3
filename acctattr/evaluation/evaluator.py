"""The model, the eval data, the metric, and the two ways of evaluating a stage embedding.

- ``linear``: effect_i = <grad f_i(theta_T), v>, one forward-mode JVP pass (torch.func.jvp)
  over the eval set; never per-example gradients.
- ``direct``: effect_i = f_i(theta_T) - f_i(theta_T - v), one forward pass.
"""


from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, jvp

from acctattr import heap
from acctattr.errors import AcctattrError, DataError
from acctattr.evaluation import lm
from acctattr.evaluation.data import Batch, EvalData
from acctattr.evaluation.metrics import CLASS_METRICS, TOKEN_METRICS, Metric

if TYPE_CHECKING:
    from acctattr.distributed import Ranks

Params = dict[str, torch.Tensor]
HALF = (torch.bfloat16, torch.float16)


def forward(model: nn.Module, state: Params, inputs: tuple[str, ...],
            batch: Batch, extra: Params | None = None) -> torch.Tensor:
    """The model's output tensor at ``state``: model(x) for one input, model(**named) for
    several, with ``extra`` keyword tensors where given; a ``logits`` field is taken from
    dict-like outputs (Hugging Face models)."""
    if len(inputs) == 1:
        out = functional_call(model, state, (batch[inputs[0]],), extra or None)
    else:
        out = functional_call(model, state, (), {**{n: batch[n] for n in inputs},
                                                 **(extra or {})})
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    return out.logits if hasattr(out, "logits") else out


class Evaluator:
    """Per-example metric of a model at theta_T and along stage embeddings."""

    def __init__(self, model: nn.Module, params: Params, fixed: Params, data: EvalData,
                 metric: Metric) -> None:
        """
        Args:
            params: trainable parameters at theta_T (name -> tensor), on the device the
                model is evaluated on (batches are moved there).
            fixed: everything else at theta_T (frozen parameters, buffers), on that device.
        """
        self.model = model.eval()
        self.params = params
        self.fixed = fixed
        self.data = data
        self.metric = metric
        first = next(iter(params.values()), None)
        self.dtype = first.dtype if first is not None else torch.float32
        self.device = first.device if first is not None else torch.device("cpu")
        # several processes (torchrun): each evaluates its share of the batches
        self.ranks: Ranks | None = None
        # f_i(theta_T) on the first batch of an eval file, from ``probe``: ``values`` takes
        # it instead of a second forward pass (a quarter of one at 124M, bench/scale.py)
        self._probed: torch.Tensor | None = None
        # (token input, pad id) where a Hugging Face LM scored on next tokens would be
        # called without an attention_mask it takes: batches with no counted prediction
        # after a pad token get an all-ones mask (the same numbers, and no padding
        # warning: lm.attend_all)
        self._pad = lm.unmasked_pad(model, data.spec.inputs) \
            if metric.name in TOKEN_METRICS else None

    def sharded(self, ranks: Ranks) -> Evaluator:
        """This evaluator with the eval batches shared among ``ranks`` (batch b on rank
        b mod world); every rank still gets every example's value."""
        other = copy.copy(self)
        other.ranks = ranks if ranks.world > 1 else None
        return other

    def whole(self) -> Evaluator:
        """This evaluator computing every batch itself (no sharing among ranks)."""
        other = copy.copy(self)
        other.ranks = None
        return other

    def _each(self, fn: Callable[[Batch], tuple[torch.Tensor, ...]]
              ) -> tuple[torch.Tensor, ...]:
        """fn(batch) for every eval batch (this rank's share, gathered from all ranks when
        sharded), each output concatenated over the eval set in order, on the CPU."""
        ranks = self.ranks
        n = getattr(self.data, "n", None)  # a file's example count; None for a function
        if ranks is None and n:
            return self._into(fn, n)

        def local() -> list[tuple[int, tuple[torch.Tensor, ...]]]:
            return [(i, fn(self._floats(batch)))
                    for i, batch in self.data.numbered(ranks.mine if ranks else None)]

        parts = local() if ranks is None else sorted(
            (p for got in ranks.all(local) for p in got), key=lambda p: p[0])
        if not parts:
            raise DataError(f"eval.data {self.data.source}: the eval set is empty")
        return tuple(torch.cat(col) for col in zip(*(out for _, out in parts), strict=True))

    def _into(self, fn: Callable[[Batch], tuple[torch.Tensor, ...]], n: int
              ) -> tuple[torch.Tensor, ...]:
        """``_each`` for a file of ``n`` examples on one rank: each batch's outputs copied
        into [n] tensors made at the first batch, so no per-batch result outlives its batch.
        (Hundreds of small kept results pin freed batch buffers on glibc's heap, which then
        grew with the number of batches: +43 to +53 MB at 100k examples against +13 MB at
        10k under linear evaluation, bench/memory.py.) Outputs whose rows do not add up
        to ``n`` are concatenated as ``_each`` would."""
        out: tuple[torch.Tensor, ...] = ()
        rest: list[tuple[torch.Tensor, ...]] = []  # outputs that did not fit, in order
        lo = 0
        for _, batch in self.data.numbered():
            got = fn(self._floats(batch))
            if not out:
                out = tuple(g.new_empty((n, *g.shape[1:])) for g in got)
            rows = got[0].shape[0] if got[0].ndim else -1
            if rest or rows < 0 or lo + rows > n or any(
                    g.ndim != o.ndim or g.shape[1:] != o.shape[1:] or g.dtype != o.dtype
                    or g.shape[0] != rows for o, g in zip(out, got, strict=True)):
                rest.append(got)
                continue
            for o, g in zip(out, got, strict=True):
                o[lo:lo + rows] = g
            lo += rows
        if rest or lo != n:
            return tuple(torch.cat([o[:lo], *col]) for o, col
                         in zip(out, zip(*rest, strict=True), strict=True)) if rest else \
                tuple(o[:lo].clone() for o in out)
        return out

    def _metric(self, params: Params, batch: Batch) -> torch.Tensor:
        spec = self.data.spec
        extra = None
        if self._pad is not None and spec.target in batch:
            ones = lm.attend_all(batch[self._pad[0]], self._pad[1], batch[spec.target],
                                 batch.get("attention_mask"))
            extra = {"attention_mask": ones} if ones is not None else None
        try:
            out = forward(self.model, {**self.fixed, **params}, spec.inputs, batch, extra)
        except AcctattrError:
            raise
        except Exception as e:  # a forward error here is (almost always) data the model can't take
            raise DataError(
                f"eval.data {self.data.source}: model forward failed on a batch with "
                f"{_describe(batch, spec.inputs)}: {type(e).__name__}: {_first_line(e)}",
                f"check that eval.inputs ({', '.join(spec.inputs)}) hold what the model's "
                "forward takes (names, shapes, dtypes)") from e
        if isinstance(out, torch.Tensor) and out.dtype in HALF:
            out = out.float()  # a half-precision model's metric computed in float32
        target = batch[spec.target]
        if self.metric.name in (*CLASS_METRICS, *TOKEN_METRICS) and target.is_floating_point():
            raise DataError(f"eval.data {self.data.source}: eval.target '{spec.target}' is "
                            f"{target.dtype}, but eval.metric {self.metric.name} needs integer "
                            "class ids", "give the target as an integer tensor")
        try:
            vals = self.metric.compute(out, target, batch)
        except AcctattrError:
            raise
        except Exception as e:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(
                f"eval.metric {self.metric.name} failed on eval.data {self.data.source} "
                f"(model outputs {shape}, {_describe(batch, (spec.target,))}): "
                f"{type(e).__name__}: {_first_line(e)}",
                "check that eval.target holds what the metric expects (class ids below the "
                "number of model outputs for cross_entropy, margin and logprob)") from e
        if not isinstance(vals, torch.Tensor):
            raise DataError(f"eval.metric {self.metric.name} returned "
                            f"{type(vals).__name__}, not a tensor",
                            "return one value per example as a tensor")
        if vals.is_complex():  # its imaginary part would be dropped without a word
            raise DataError(f"eval.metric {self.metric.name} returned {vals.dtype} values",
                            "return one real value per example")
        if vals.ndim != 1 or vals.shape[0] != out.shape[0]:
            raise AcctattrError(f"metric {self.metric.name} returned shape {tuple(vals.shape)}; "
                                "it must return one value per example")
        return vals

    def probe(self) -> None:
        """Run the metric on the first eval batch at theta_T, so `check` finds data the model
        cannot take without computing any effect."""
        with torch.no_grad():
            for i, batch in self.data.numbered():
                vals = self._metric(self.params, self._floats(batch))
                # a function's batches are produced afresh on every call: not kept
                if i == 0 and getattr(self.data, "n", None):
                    self._probed = vals.cpu().double()
                return

    def _floats(self, batch: Batch) -> Batch:
        """The batch on the evaluation device, floating tensors in the model's dtype
        (converted before they move: MPS takes no float64)."""
        return {k: (v.to(self.dtype) if v.is_floating_point() else v).to(self.device)
                for k, v in batch.items()}

    def values(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(f_i(theta_T) for every example [N] float64, group ids [N] or None), on the CPU."""
        gname = self.data.spec.group
        # one process reading a file takes its batches in order: the first is the probe's
        kept = [self._probed] if self._probed is not None and self.ranks is None else []

        def one(batch: Batch) -> tuple[torch.Tensor, ...]:
            vals = kept.pop() if kept else self._metric(self.params, batch).cpu().double()
            return (vals, batch[gname].reshape(-1).long().cpu()) if gname else (vals,)

        with torch.no_grad():
            out = self._each(one)
        return out[0], (out[1] if gname else None)

    def linear(self, v: Params) -> torch.Tensor:
        """<grad f_i(theta_T), v> for every example [N] float64 on the CPU, by forward-mode
        JVP."""
        return self._linear(v, False)[0]

    def linear_and_values(self, v: Params
                          ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
        """``linear(v)`` and what ``values()`` returns, from the same passes: a JVP computes
        f_i(theta_T) as its primal output, so the values need no forward pass of their own
        (one of frozen's K+1 passes over the eval set, bench/scale.py)."""
        out = self._linear(v, True)
        return out[0], (out[1], out[2] if len(out) > 2 else None)

    def _linear(self, v: Params, values: bool) -> tuple[torch.Tensor, ...]:
        """(JVP [N],) or, with ``values``, (JVP, primal f_i(theta_T)[, group ids]) [N]."""
        names = list(self.params)
        primals = tuple(self.params[n] for n in names)
        tangents = tuple(_like(v[n], self.params[n]) for n in names)
        gname = self.data.spec.group if values else None

        def one(batch: Batch) -> tuple[torch.Tensor, ...]:
            def f(*ps: torch.Tensor) -> torch.Tensor:
                return self._metric(dict(zip(names, ps, strict=True)), batch)

            out = jvp(f, primals, tangents)
            primal, tangent = out[0], out[1]
            if not primal.is_floating_point():
                # an integer or bool metric (accuracy) has no derivative: every JVP is 0
                raise AcctattrError(
                    f"eval.metric {self.metric.name} returns {primal.dtype} values, which have "
                    "no derivative: linear evaluation would give every stage an effect of 0",
                    "use --evaluate direct (or return a differentiable value)")
            got: tuple[torch.Tensor, ...] = (tangent.cpu().double(),)
            if values:
                got += (primal.cpu().double(),)
            if gname:
                got += (batch[gname].reshape(-1).long().cpu(),)
            del out, primal, tangent
            heap.trim()  # what this batch's JVP freed, before the next batch's allocates
            return got

        with torch.no_grad():
            out = self._each(one)
        heap.trim()  # what the JVP freed, before the next stage allocates (acctattr.heap)
        return out

    def direct(self, v: Params, base: torch.Tensor) -> torch.Tensor:
        """f_i(theta_T) - f_i(theta_T - v) for every example [N] float64 on the CPU;
        ``base`` = f_i(theta_T)."""
        shifted = {n: subtract(p, v[n]) for n, p in self.params.items()}

        def one(batch: Batch) -> tuple[torch.Tensor, ...]:
            return (self._metric(shifted, batch).cpu().double(),)

        with torch.no_grad():
            out = base - self._each(one)[0]
        shifted.clear()  # theta_T - v: freed before the trim
        heap.trim()
        return out


def subtract(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """theta_T - v in p's dtype; for half-precision p the difference is taken in float32
    and rounded once."""
    if p.dtype in HALF:
        return (p.float() - v.to(torch.float32).to(p.device)).to(p.dtype)
    return p - _like(v, p)


def _like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` in ``ref``'s dtype on ``ref``'s device (converted before it is moved, so a
    float64 embedding never travels at double size, and never to MPS, which lacks float64)."""
    return x.to(ref.dtype).to(ref.device)


def _describe(batch: Batch, names: Iterable[str]) -> str:
    """'x [16, 7] float64' for each named tensor of a batch, for error messages."""
    return ", ".join(f"{n} {list(batch[n].shape)} {str(batch[n].dtype).replace('torch.', '')}"
                     for n in names if isinstance(batch.get(n), torch.Tensor))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"

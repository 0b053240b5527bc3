"""Gradients, batch noise and Hessian-vector products of a stage's training loss on a fixed
sample of its data (what the unrolled estimator simulates later stages on)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from acctattr.evaluation import lm
from acctattr.evaluation.data import Batch
from acctattr.evaluation.evaluator import Params, forward
from acctattr.evaluation.metrics import TOKEN_METRICS, Metric


class Curvature:
    """Hessian-vector products of a stage's mean training loss on a fixed data sample."""

    def __init__(self, model: nn.Module, fixed: Params, loss: Metric, sample: Batch,
                 inputs: tuple[str, ...], target: str, chunk: int = 1024,
                 device: torch.device | None = None) -> None:
        """
        Args:
            fixed: frozen parameters and buffers, on ``device``.
            sample: the stage's data sample (moved to ``device``).
            device: where the model is evaluated; parameters given to every method must
                be there too.
        """
        self.model = model.eval()
        pad = lm.unmasked_pad(model, inputs) if loss.name in TOKEN_METRICS else None
        # the model is given the sample's all-ones attention_mask made below (``outputs``)
        self.masked = False
        if pad is not None and target in sample:
            # a Hugging Face LM given no attention_mask (lm, "unmasked padding")
            ids, given = sample[pad[0]], sample.get("attention_mask")  # given: the metric's
            if not lm.padding_unseen(ids, pad[1], sample[target], given):
                lm.padding_matters()
            elif given is None:
                # no counted prediction sees a pad token: an all-ones mask, the same numbers
                # (as the evaluation gives it), so that transformers' padding check, which
                # reads the data, does not stop torch.func.vmap of the per-group gradients
                sample = {**sample, "attention_mask": torch.ones_like(ids)}
                self.masked = True
            else:
                lm.padding_needless()
        if device is not None:
            sample = {k: v.to(device) for k, v in sample.items()}
        self.fixed = fixed
        self.sign = -1.0 if loss.higher_is_better else 1.0  # a loss is minimised
        self.loss = loss
        self.inputs = inputs
        self.target = target
        n = sample[target].shape[0]
        self.chunks = [{k: v[lo:lo + chunk] for k, v in sample.items()}
                       for lo in range(0, n, chunk)]
        self.n = n
        # per-group gradients by one vectorised pass (gradient_and_noise); False once
        # torch.func has failed to vectorise this model
        self._batched = True

    def outputs(self, state: Params, batch: Batch) -> torch.Tensor:
        """The model's output at ``state`` (the caller's parameters with ``fixed``) on
        ``batch``, with the all-ones attention_mask as a keyword where one was made
        (``masked``; a single token input stays positional)."""
        extra = {"attention_mask": batch["attention_mask"]} if self.masked else None
        return forward(self.model, state, self.inputs, batch, extra)

    def _loss(self, params: Params, batch: Batch) -> torch.Tensor:
        out = self.outputs({**self.fixed, **params}, batch)
        vals = self.loss.compute(out, batch[self.target], batch)
        return self.sign * vals.sum() / self.n

    def probe(self, params: Params, rows: int = 2) -> object:
        """What the training loss returns on the sample's first ``rows`` examples, with
        ``params`` as leaves that require grad (the values require grad only if the loss can
        be differentiated with respect to the weights); a few rows, so that the graph kept
        is small whatever the model."""
        with torch.enable_grad():
            leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
            batch = {k: v[:rows] for k, v in self.chunks[0].items()}
            return self.loss.compute(self.outputs({**self.fixed, **leaves}, batch),
                                     batch[self.target], batch)

    @torch.no_grad()
    def value(self, params: Params) -> float:
        """The mean training loss at ``params`` (sign-flipped for a score)."""
        return float(sum(self._loss(params, batch) for batch in self.chunks))

    def gradient(self, params: Params) -> Params:
        """The mean training loss's gradient at ``params``."""
        from torch.func import grad

        total: Params | None = None
        for batch in self.chunks:
            g = grad(lambda p, b=batch: self._loss(p, b))(params)
            total = g if total is None else {k: total[k] + g[k] for k in total}
        assert total is not None
        return total

    def gradient_and_noise(self, params: Params, parts: int) -> tuple[Params, Params]:
        """The mean gradient and the per-example gradient variance, per element.

        The sample is cut into ``parts`` near-equal groups; with g_k the mean gradient of
        group k (m_k examples) and g their weighted mean, the per-example variance is
        estimated as sum_k m_k (g_k - g)^2 / (parts - 1). The groups' gradients come from
        one pass vectorised over the groups (group_gradients); a model that torch.func
        cannot vectorise gets one forward and backward pass per group.
        """
        if parts < 2:
            raise ValueError(f"the gradient noise needs at least 2 groups (asked for {parts})")
        parts = min(parts, self.n)
        if parts < 2:  # one example: every batch is the whole data, so there is no noise
            g = self.gradient(params)
            return g, {k: torch.zeros_like(v, dtype=torch.float64) for k, v in g.items()}
        whole = {k: torch.cat([c[k] for c in self.chunks]) for k in self.chunks[0]} \
            if len(self.chunks) > 1 else self.chunks[0]
        names = list(params)
        leaves = [params[n].detach() for n in names]
        grouped = None
        if self._batched:
            try:
                grouped = self.group_gradients(dict(zip(names, leaves, strict=True)), whole,
                                                parts)
            except Exception:
                # torch.func cannot vectorise this model (an op without a batching rule,
                # data-dependent control flow, an old-style autograd.Function): take the
                # loop from now on; a genuine error in the model or data raises there too
                self._batched = False
        if grouped is None:
            grouped = self._group_gradients_looped(leaves, names, whole, parts)
        sizes = [len(ix) for ix in torch.tensor_split(torch.arange(self.n), parts)]
        mean, var = {}, {}
        for n in names:  # one group at a time in float64: no [parts, P] float64 block
            rows = grouped[n]
            mu = torch.zeros(rows.shape[1:], dtype=torch.float64, device=rows.device)
            for k, m in enumerate(sizes):  # float32 rows are promoted as they are added
                mu.add_(rows[k], alpha=m)
            mu /= self.n
            spread = torch.zeros_like(mu)
            for k, m in enumerate(sizes):
                spread.add_((rows[k] - mu).square_(), alpha=m)
            mean[n] = mu.to(params[n].dtype)
            var[n] = spread / (parts - 1)
        return mean, var

    def group_gradients(self, params: Params, whole: Batch, parts: int) -> Params:
        """Each group's mean loss gradient, name -> [parts, *shape] in the parameter's dtype,
        the groups those of torch.tensor_split (group_gradients_and_values)."""
        return self.group_gradients_and_values(params, whole, parts)[0]

    def group_gradients_and_values(self, params: Params, whole: Batch,
                                   parts: int) -> tuple[Params, torch.Tensor]:
        """Each group's mean loss gradient, name -> [parts, *shape] in the parameter's dtype,
        and its mean loss [parts] (sign-flipped for a score, as ``value``), the groups those
        of torch.tensor_split: one forward and backward pass vectorised over the groups
        (torch.func.vmap of grad_and_value) for each group size (tensor_split makes at most
        two: the first n % parts groups hold one more)."""
        from torch.func import grad_and_value, vmap

        def group_loss(p: Params, batch: Batch) -> torch.Tensor:
            vals = self.loss.compute(
                self.outputs({**self.fixed, **p}, batch),
                batch[self.target], batch)
            return self.sign * vals.mean()

        per_group = vmap(grad_and_value(group_loss), in_dims=(None, 0))
        size, extra = divmod(self.n, parts)
        got: list[tuple[Params, torch.Tensor]] = []
        lo = 0
        for count, m in ((extra, size + 1), (parts - extra, size)):
            if count == 0:
                continue
            hi = lo + count * m
            groups = {k: v[lo:hi].reshape(count, m, *v.shape[1:]) for k, v in whole.items()}
            got.append(per_group(params, groups))  # (name -> [count, *shape], [count])
            lo = hi
        if len(got) == 1:
            return got[0]
        return ({n: torch.cat([g[n] for g, _ in got]) for n in params},
                torch.cat([v for _, v in got]))

    def _group_gradients_looped(self, params: list[torch.Tensor], names: list[str],
                                whole: Batch, parts: int) -> Params:
        """group_gradients by one forward and backward pass per group."""
        leaves = [x.requires_grad_(True) for x in params]
        state = {**self.fixed, **dict(zip(names, leaves, strict=True))}
        grads = []
        with torch.enable_grad():
            for cols in zip(*(torch.tensor_split(v, parts) for v in whole.values()),
                            strict=True):
                batch = dict(zip(whole, cols, strict=True))
                vals = self.loss.compute(self.outputs(state, batch),
                                         batch[self.target], batch)
                got = torch.autograd.grad(self.sign * vals.mean(), leaves, allow_unused=True)
                grads.append([torch.zeros_like(x) if gi is None else gi
                              for x, gi in zip(leaves, got, strict=True)])
        return {n: torch.stack([row[i] for row in grads]) for i, n in enumerate(names)}

    def hvp(self, anchor: Params) -> Callable[[Params], Params]:
        """v -> H(anchor) v by double backward: the gradient graph is built once per anchor
        and every product is one more backward pass through it."""
        return self.expand(anchor)[2]

    def expand(self, anchor: Params) -> tuple[float, Params, Callable[[Params], Params]]:
        """The mean training loss at ``anchor`` (as ``value``), its gradient (as
        ``gradient``) and v -> H(anchor) v (as ``hvp``), from the one forward and backward
        pass that builds the products' gradient graph."""
        names = list(anchor)
        leaves = [anchor[n].detach().clone().requires_grad_(True) for n in names]
        with torch.enable_grad():
            params = dict(zip(names, leaves, strict=True))
            losses, grads = [], []
            for batch in self.chunks:
                loss = self._loss(params, batch)
                grads.append(torch.autograd.grad(loss, leaves, create_graph=True,
                                                 allow_unused=True))
                losses.append(loss.detach())
        value = float(sum(losses))
        gradient: Params = {}
        for i, (n, x) in enumerate(zip(names, leaves, strict=True)):
            total = torch.zeros_like(x)
            for g in grads:
                if g[i] is not None:
                    total = total + g[i].detach()
            gradient[n] = total

        def product(v: Params) -> Params:
            total = [torch.zeros_like(x) for x in leaves]
            with torch.enable_grad():
                for g in grads:
                    dot = sum((gi * v[n].to(gi.dtype)).sum()
                              for gi, n in zip(g, names, strict=True) if gi is not None)
                    if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                        continue  # the loss is linear in every parameter here: H = 0
                    hv = torch.autograd.grad(dot, leaves, retain_graph=True, allow_unused=True)
                    total = [t + h if h is not None else t for t, h in zip(total, hv,
                                                                            strict=True)]
            return {n: t.detach() for n, t in zip(names, total, strict=True)}

        return value, gradient, product

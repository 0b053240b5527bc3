"""The model, the eval data, the metric, and the two ways of evaluating a stage embedding.

- ``linear``: effect_i = <grad f_i(theta_T), v>, one forward-mode JVP pass (torch.func.jvp)
  over the eval set; never per-example gradients.
- ``direct``: effect_i = f_i(theta_T) - f_i(theta_T - v), one forward pass.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.func import functional_call, jvp

from acctattr.errors import AcctattrError, DataError
from acctattr.manifest import EvalSpec, Ref

MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- user code

def load_ref(ref: Ref, what: str) -> Callable[..., Any]:
    """Import the function a ``FILE.py:FUNC`` or ``package.module:FUNC`` reference names."""
    try:
        if ref.file is not None:
            name = f"_acctattr_user_{abs(hash(str(ref.file)))}"
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, ref.file)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot import {ref.file}")
                module = importlib.util.module_from_spec(spec)
                sys.path.insert(0, str(ref.file.parent))
                # never write __pycache__ into the user's run folder: acctattr only reads it
                dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True
                try:
                    spec.loader.exec_module(module)
                finally:
                    sys.path.remove(str(ref.file.parent))
                    sys.dont_write_bytecode = dont_write
                sys.modules[name] = module
        else:
            assert ref.module is not None
            module = importlib.import_module(ref.module)
    except Exception as e:
        raise AcctattrError(f"{what} {ref.text}: importing it failed: {type(e).__name__}: {e}",
                            "fix the error in that file; ACCTATTR_DEBUG=1 shows the traceback"
                            ) from e
    fn = getattr(module, ref.func, None)
    if not callable(fn):
        raise AcctattrError(f"{what} {ref.text}: no function '{ref.func}' in it",
                            f"define {ref.func}() there or fix the name after ':'")
    return fn


def build_model(ref: Ref) -> nn.Module:
    """Call the manifest's ``model.factory`` and check that it returns a torch module."""
    fn = load_ref(ref, "model.factory")
    try:
        model = fn()
    except Exception as e:
        raise AcctattrError(f"model.factory {ref.text} raised {type(e).__name__}: {e}",
                            "the factory must build the model with no arguments") from e
    if not isinstance(model, nn.Module):
        raise AcctattrError(f"model.factory {ref.text} returned {type(model).__name__}, "
                            "not a torch.nn.Module", "return the model object itself")
    return model.eval()


@dataclass(frozen=True)
class ModelInfo:
    """What the estimators need to know of the model's parameters."""

    trainable: dict[str, tuple[int, ...]]  # name -> shape, named_parameters() order
    frozen: tuple[str, ...]  # parameters with requires_grad=False
    buffers: tuple[str, ...]
    no_decay: frozenset[str]  # biases and norm-layer parameters (HF Trainer rule)


def model_info(model: nn.Module) -> ModelInfo:
    norm_params: set[str] = set()
    for mname, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            for pname, _ in module.named_parameters(recurse=False):
                norm_params.add(f"{mname}.{pname}" if mname else pname)
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    frozen = tuple(n for n, p in model.named_parameters() if not p.requires_grad)
    no_decay = {n for n in trainable if n in norm_params or n.endswith("bias")}
    return ModelInfo(trainable, frozen, tuple(n for n, _ in model.named_buffers()),
                     frozenset(no_decay))


# ---------------------------------------------------------------- metrics

def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y.long(), reduction="none")


def _logprob(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(out, y.long(), reduction="none")


def _margin(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Target logit minus the largest other logit."""
    y = y.long()
    target = out.gather(1, y[:, None])[:, 0]
    other = out.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return target - other


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    diff = (out - y.to(out.dtype)).reshape(out.shape[0], -1)
    return (diff * diff).mean(dim=1)


# Builtin metrics whose target is a class id: a float target would be silently truncated.
CLASS_METRICS = ("cross_entropy", "logprob", "margin")

BUILTIN: dict[str, tuple[MetricFn, bool]] = {
    "cross_entropy": (_cross_entropy, False),
    "logprob": (_logprob, True),
    "margin": (_margin, True),
    "mse": (_mse, False),
}


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn  # (model outputs [B, ...], target [B, ...]) -> per-example values [B]
    higher_is_better: bool


def resolve_metric(metric: str | Ref, override: bool | None, what: str) -> Metric:
    """A builtin metric by name, or a user's ``FILE.py:FUNC(outputs, target)``.

    A user function may carry ``higher_is_better = True`` as an attribute; the manifest's
    ``eval.higher_is_better`` overrides either.
    """
    if isinstance(metric, str):
        fn, hib = BUILTIN[metric]
        return Metric(metric, fn, hib if override is None else override)
    user = load_ref(metric, what)
    hib = bool(getattr(user, "higher_is_better", False))
    return Metric(metric.text, user, hib if override is None else override)


# ---------------------------------------------------------------- data

Batch = dict[str, torch.Tensor]
_INT_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL")


class EvalData:
    """Eval batches streamed from a safetensors file (sliced per batch) or a user function."""

    def __init__(self, spec: EvalSpec) -> None:
        self.spec = spec
        self.names = (*spec.inputs, spec.target, *((spec.group,) if spec.group else ()))
        self._fn: Callable[[], Iterable[Batch]] | None = None
        if spec.data_fn is not None:
            self._fn = load_ref(spec.data_fn, "eval.data")
            self.source = spec.data_fn.text
        else:
            assert spec.data is not None
            self.source = str(spec.data)
            self._check_file()

    def _check_file(self) -> None:
        from acctattr.checkpoints import safe_open_checked  # header checks with clear messages

        handle = safe_open_checked(Path(self.source))
        keys = set(handle.keys())
        missing = [n for n in self.names if n not in keys]
        if missing:
            raise DataError(f"eval.data {self.source}: no tensor named "
                            f"{', '.join(repr(m) for m in missing)} (it has: "
                            f"{', '.join(sorted(keys)) or 'nothing'})",
                            "fix eval.inputs / eval.target / eval.group, or the file")
        lengths = {n: handle.get_slice(n).get_shape() for n in self.names}
        sizes = {n: (s[0] if s else None) for n, s in lengths.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise DataError(f"eval.data {self.source}: tensors have different numbers of "
                            f"examples (first dimensions {sizes})",
                            "every eval tensor needs one row per example")
        self.n: int = next(iter(sizes.values())) or 0  # None was refused above
        if not self.n:
            raise DataError(f"eval.data {self.source}: the eval set is empty (0 examples)",
                            "point eval.data at a file with at least one example")
        target_dtype = handle.get_slice(self.spec.target).get_dtype()
        if self.spec.metric in CLASS_METRICS and target_dtype not in _INT_DTYPES:
            raise DataError(f"eval.data {self.source}: eval.target tensor '{self.spec.target}' "
                            f"has dtype {target_dtype}, but eval.metric {self.spec.metric} "
                            "needs integer class ids",
                            "save the target as an integer tensor (e.g. torch.long), or use "
                            "metric: mse for real-valued targets")
        group = self.spec.group
        if group and handle.get_slice(group).get_dtype() not in _INT_DTYPES:
            raise DataError(f"eval.data {self.source}: eval.group tensor '{group}' has dtype "
                            f"{handle.get_slice(group).get_dtype()}; groups must be integers")

    def batches(self) -> Iterator[Batch]:
        if self._fn is not None:
            yield from self._user_batches()
            return
        bs = self.spec.batch_size
        for lo in range(0, self.n, bs):
            hi = min(lo + bs, self.n)
            # A fresh memory map per batch: slices are views into it, and it is unmapped when
            # the batch is dropped, so resident memory stays one batch deep however large the
            # file (one long-lived map would keep every page it touched resident).
            with safe_open(self.source, framework="pt") as f:
                yield {n: f.get_slice(n)[lo:hi] for n in self.names}

    def _user_batches(self) -> Iterator[Batch]:
        assert self._fn is not None
        try:
            it = iter(self._fn())
        except Exception as e:
            raise DataError(f"eval.data {self.source} raised {type(e).__name__}: {e}") from e
        seen = 0
        for i, b in enumerate(it):
            if not isinstance(b, dict):
                raise DataError(f"eval.data {self.source}: batch {i} is a {type(b).__name__}, "
                                "expected a dict of tensors")
            for n in self.names:
                if not isinstance(b.get(n), torch.Tensor):
                    raise DataError(f"eval.data {self.source}: batch {i} has no tensor '{n}'",
                                    "each batch must be a dict holding eval.inputs, "
                                    "eval.target (and eval.group)")
            seen += 1
            yield b
        if not seen:
            raise DataError(f"eval.data {self.source}: the eval set is empty (no batches)")


# ---------------------------------------------------------------- evaluation

Params = dict[str, torch.Tensor]


def forward(model: nn.Module, state: Params, inputs: tuple[str, ...],
            batch: Batch) -> torch.Tensor:
    """The model's output tensor at ``state``: model(x) for one input, model(**named) for
    several; a ``logits`` field is taken from dict-like outputs (Hugging Face models)."""
    if len(inputs) == 1:
        out = functional_call(model, state, (batch[inputs[0]],))
    else:
        out = functional_call(model, state, (), {n: batch[n] for n in inputs})
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    return out.logits if hasattr(out, "logits") else out


class Evaluator:
    """Per-example metric of a model at theta_T and along stage embeddings."""

    def __init__(self, model: nn.Module, params: Params, fixed: Params, data: EvalData,
                 metric: Metric) -> None:
        """
        Args:
            params: trainable parameters at theta_T (name -> tensor).
            fixed: everything else at theta_T (frozen parameters, buffers).
        """
        self.model = model.eval()
        self.params = params
        self.fixed = fixed
        self.data = data
        self.metric = metric
        self.dtype = next(iter(params.values())).dtype if params else torch.float32

    def _metric(self, params: Params, batch: Batch) -> torch.Tensor:
        spec = self.data.spec
        try:
            out = forward(self.model, {**self.fixed, **params}, spec.inputs, batch)
        except AcctattrError:
            raise
        except Exception as e:  # a forward error here is (almost always) data the model can't take
            raise DataError(
                f"eval.data {self.data.source}: model forward failed on a batch with "
                f"{_describe(batch, spec.inputs)}: {type(e).__name__}: {_first_line(e)}",
                f"check that eval.inputs ({', '.join(spec.inputs)}) hold what the model's "
                "forward takes (names, shapes, dtypes)") from e
        target = batch[spec.target]
        if self.metric.name in CLASS_METRICS and target.is_floating_point():
            raise DataError(f"eval.data {self.data.source}: eval.target '{spec.target}' is "
                            f"{target.dtype}, but eval.metric {self.metric.name} needs integer "
                            "class ids", "give the target as an integer tensor")
        try:
            vals = self.metric.fn(out, target)
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
        if vals.ndim != 1 or vals.shape[0] != out.shape[0]:
            raise AcctattrError(f"metric {self.metric.name} returned shape {tuple(vals.shape)}; "
                                "it must return one value per example")
        return vals

    def probe(self) -> None:
        """Run the metric on the first eval batch at theta_T, so `check` finds data the model
        cannot take without computing any effect."""
        with torch.no_grad():
            for batch in self.data.batches():
                self._metric(self.params, self._floats(batch))
                return

    def _floats(self, batch: Batch) -> Batch:
        return {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in batch.items()}

    def values(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(f_i(theta_T) for every example [N] float64, group ids [N] or None)."""
        vals, groups = [], []
        gname = self.data.spec.group
        with torch.no_grad():
            for batch in self.data.batches():
                vals.append(self._metric(self.params, self._floats(batch)).double())
                if gname:
                    groups.append(batch[gname].reshape(-1).long())
        if not vals:
            raise DataError(f"eval.data {self.data.source}: the eval set is empty")
        return torch.cat(vals), (torch.cat(groups) if gname else None)

    def linear(self, v: Params) -> torch.Tensor:
        """<grad f_i(theta_T), v> for every example [N], by forward-mode JVP."""
        names = list(self.params)
        primals = tuple(self.params[n] for n in names)
        tangents = tuple(v[n].to(self.params[n].dtype) for n in names)
        out = []
        with torch.no_grad():
            for batch in self.data.batches():
                batch = self._floats(batch)

                def f(*ps: torch.Tensor, batch: Batch = batch) -> torch.Tensor:
                    return self._metric(dict(zip(names, ps, strict=True)), batch)

                tangent_out = jvp(f, primals, tangents)[1]
                out.append(tangent_out.double())
        return torch.cat(out)

    def direct(self, v: Params, base: torch.Tensor) -> torch.Tensor:
        """f_i(theta_T) - f_i(theta_T - v) for every example [N]; ``base`` = f_i(theta_T)."""
        shifted = {n: p - v[n].to(p.dtype) for n, p in self.params.items()}
        out = []
        with torch.no_grad():
            for batch in self.data.batches():
                out.append(self._metric(shifted, self._floats(batch)).double())
        return base - torch.cat(out)


def _describe(batch: Batch, names: Iterable[str]) -> str:
    """'x [16, 7] float64' for each named tensor of a batch, for error messages."""
    return ", ".join(f"{n} {list(batch[n].shape)} {str(batch[n].dtype).replace('torch.', '')}"
                     for n in names if isinstance(batch.get(n), torch.Tensor))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


# ---------------------------------------------------------------- training loss curvature

def load_stage_sample(path: Path, names: tuple[str, ...], size: int, stage: str,
                      seed: int = 0) -> Batch:
    """A fixed random sample (``size`` examples, seeded) of a stage's training data."""
    from acctattr.checkpoints import safe_open_checked

    handle = safe_open_checked(path)
    keys = set(handle.keys())
    missing = [n for n in names if n not in keys]
    if missing:
        raise DataError(f"stage '{stage}': data {path} has no tensor named "
                        f"{', '.join(repr(m) for m in missing)} (it has: "
                        f"{', '.join(sorted(keys)) or 'nothing'})",
                        "a stage's data uses the same tensor names as eval.inputs and "
                        "eval.target")
    n = handle.get_slice(names[0]).get_shape()[0]
    if n == 0:
        raise DataError(f"stage '{stage}': data {path} is empty")
    if n <= size:
        return {k: handle.get_tensor(k) for k in names}
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
    return {k: handle.get_tensor(k)[idx] for k in names}


class Curvature:
    """Hessian-vector products of a stage's mean training loss on a fixed data sample."""

    def __init__(self, model: nn.Module, fixed: Params, loss: Metric, sample: Batch,
                 inputs: tuple[str, ...], target: str, chunk: int = 1024) -> None:
        self.model = model.eval()
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

    def _loss(self, params: Params, batch: Batch) -> torch.Tensor:
        out = forward(self.model, {**self.fixed, **params}, self.inputs, batch)
        vals = self.loss.fn(out, batch[self.target])
        return self.sign * vals.sum() / self.n

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
        one pass vectorised over the groups (_group_gradients); a model that torch.func
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
                grouped = self._group_gradients(dict(zip(names, leaves, strict=True)), whole,
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
            mu = torch.zeros(rows.shape[1:], dtype=torch.float64)
            for k, m in enumerate(sizes):  # float32 rows are promoted as they are added
                mu.add_(rows[k], alpha=m)
            mu /= self.n
            spread = torch.zeros_like(mu)
            for k, m in enumerate(sizes):
                spread.add_((rows[k] - mu).square_(), alpha=m)
            mean[n] = mu.to(params[n].dtype)
            var[n] = spread / (parts - 1)
        return mean, var

    def _group_gradients(self, params: Params, whole: Batch, parts: int) -> Params:
        """Each group's mean loss gradient, name -> [parts, *shape] in the parameter's dtype,
        the groups those of torch.tensor_split: one forward and backward pass vectorised
        over the groups (torch.func.vmap of grad) for each group size (tensor_split makes
        at most two: the first n % parts groups hold one more)."""
        from torch.func import grad, vmap

        def group_loss(p: Params, batch: Batch) -> torch.Tensor:
            vals = self.loss.fn(forward(self.model, {**self.fixed, **p}, self.inputs, batch),
                                batch[self.target])
            return self.sign * vals.mean()

        per_group = vmap(grad(group_loss), in_dims=(None, 0))
        size, extra = divmod(self.n, parts)
        got: list[Params] = []
        lo = 0
        for count, m in ((extra, size + 1), (parts - extra, size)):
            if count == 0:
                continue
            hi = lo + count * m
            groups = {k: v[lo:hi].reshape(count, m, *v.shape[1:]) for k, v in whole.items()}
            got.append(per_group(params, groups))  # name -> [count, *shape]
            lo = hi
        if len(got) == 1:
            return got[0]
        return {n: torch.cat([g[n] for g in got]) for n in params}

    def _group_gradients_looped(self, params: list[torch.Tensor], names: list[str],
                                whole: Batch, parts: int) -> Params:
        """_group_gradients by one forward and backward pass per group."""
        leaves = [x.requires_grad_(True) for x in params]
        state = {**self.fixed, **dict(zip(names, leaves, strict=True))}
        grads = []
        with torch.enable_grad():
            for cols in zip(*(torch.tensor_split(v, parts) for v in whole.values()),
                            strict=True):
                batch = dict(zip(whole, cols, strict=True))
                vals = self.loss.fn(forward(self.model, state, self.inputs, batch),
                                    batch[self.target])
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

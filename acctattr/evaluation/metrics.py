"""Per-example metrics: the builtins by name, or a user's ``FILE.py:FUNC(outputs, target)``.

A metric may read more of the batch than its target: it names those tensors in
``batch_keys`` (a user function as an attribute, ``fn.batch_keys = ("attention_mask",)``)
and gets each one the batch holds as a keyword argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from acctattr.errors import AcctattrError
from acctattr.evaluation import lm
from acctattr.evaluation.model import load_ref
from acctattr.runs.manifest import Ref

MetricFn = Callable[..., torch.Tensor]


IGNORE_INDEX = -100  # a label that counts for nothing (PyTorch's ignore_index default)


def _per_example(out: torch.Tensor, y: torch.Tensor,
                 token: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A class metric per example.

    ``out`` [B, C] with ``y`` [B]: ``token(out, y)`` as it is. ``out`` [B, T..., C] with
    ``y`` [B, T...] (a sequence): the mean of ``token`` over each example's counted labels,
    those not -100; an example with none is NaN (eval data holding one is refused before).
    """
    y = y.long()
    if y.ndim <= 1:
        return token(out, y)
    counted = y != IGNORE_INDEX
    flat = token(out.reshape(-1, out.shape[-1]), torch.where(counted, y, 0).reshape(-1))
    per = torch.where(counted, flat.reshape(y.shape), 0.0)
    total = per.reshape(y.shape[0], -1).sum(dim=1)
    n = counted.reshape(y.shape[0], -1).sum(dim=1)
    return total / n.to(total.dtype)  # 0 / 0 = NaN where nothing is counted, never 0


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _per_example(out, y, _ce)


def _logprob(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -_per_example(out, y, _ce)


def _margin_tokens(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    target = out.gather(1, y[:, None])[:, 0]
    other = out.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return target - other


def _margin(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Target logit minus the largest other logit."""
    return _per_example(out, y, _margin_tokens)


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = y.to(out.dtype)
    if y.shape != out.shape:
        # out [B, 1] - y [B] would broadcast to [B, B]: every example against every target
        if y.ndim == 0 or y.shape[0] != out.shape[0] or y.numel() != out.numel():
            raise ValueError(f"the target's shape {tuple(y.shape)} does not match the model "
                             f"outputs' {tuple(out.shape)}")
        y = y.reshape(out.shape)  # [B] against [B, 1], or [B, 1] against [B]
    diff = (out - y).reshape(out.shape[0], -1)
    return (diff * diff).mean(dim=1)


# Builtin metrics whose target is a class id: a float target would be silently truncated.
CLASS_METRICS = ("cross_entropy", "logprob", "margin")

BUILTIN: dict[str, tuple[MetricFn, bool]] = {
    "cross_entropy": (_cross_entropy, False),
    "logprob": (_logprob, True),
    "margin": (_margin, True),
    "mse": (_mse, False),
}
# Builtin next-token metrics of causal LMs (acctattr.evaluation.lm): the target is the
# labels [B, T] (-100 not counted), the batch's attention_mask is honoured.
TOKEN_METRICS = ("next_token_loss", "sequence_logprob")
BUILTIN["next_token_loss"] = (lm.next_token_loss, False)
BUILTIN["sequence_logprob"] = (lm.sequence_logprob, True)
# extra batch tensors a builtin reads (given when the batch has them)
BATCH_KEYS: dict[str, tuple[str, ...]] = {m: ("attention_mask",) for m in TOKEN_METRICS}

# The values a builtin metric can take (None: unbounded). A counterfactual estimated outside
# them is impossible: the estimate extrapolated too far (summary.summarize flags it).
RANGES: dict[str, tuple[float | None, float | None]] = {
    "cross_entropy": (0.0, None), "logprob": (None, 0.0), "mse": (0.0, None),
    "next_token_loss": (0.0, None), "sequence_logprob": (None, 0.0),
}


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn  # (model outputs [B, ...], target [B, ...]) -> per-example values [B]
    higher_is_better: bool
    # (lowest, highest) value the metric can take, None where unbounded; a user function
    # may declare it as a ``value_range = (low, high)`` attribute
    value_range: tuple[float | None, float | None] = (None, None)
    # further batch tensors fn reads, passed by keyword when the batch holds them
    batch_keys: tuple[str, ...] = ()

    def compute(self, out: object, target: torch.Tensor,
                batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example values [B]: fn(outputs, target, **the batch_keys the batch has)."""
        extra = {k: batch[k] for k in self.batch_keys if k in batch}
        return self.fn(out, target, **extra)


def resolve_metric(metric: str | Ref, override: bool | None, what: str) -> Metric:
    """A builtin metric by name, or a user's ``FILE.py:FUNC(outputs, target)``.

    A user function may carry ``higher_is_better = True`` as an attribute; the manifest's
    ``eval.higher_is_better`` overrides either.
    """
    if isinstance(metric, str):
        fn, hib = BUILTIN[metric]
        return Metric(metric, fn, hib if override is None else override,
                      RANGES.get(metric, (None, None)), BATCH_KEYS.get(metric, ()))
    user = load_ref(metric, what)
    hib = getattr(user, "higher_is_better", False)
    if not isinstance(hib, bool):  # bool("false") is True: every verdict would flip
        raise AcctattrError(f"{what} {metric.text}: higher_is_better must be True or False, "
                            f"got {hib!r}", "set it to True or False, or set "
                            "eval.higher_is_better in the manifest")
    bounds = getattr(user, "value_range", (None, None))
    ok = isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(
        b is None or (isinstance(b, (int, float)) and not isinstance(b, bool)
                      and not math.isnan(b)) for b in bounds)
    low, high = bounds if ok else (None, None)
    if not ok or (low is not None and high is not None and low > high):
        raise AcctattrError(f"{what} {metric.text}: value_range must be (low, high), each a "
                            f"number or None, low <= high; got {bounds!r}",
                            "e.g. value_range = (0.0, None) for a loss")
    return Metric(metric.text, user, hib if override is None else override, (low, high),
                  user_batch_keys(user, f"{what} {metric.text}"))


def user_batch_keys(user: Callable, where: str) -> tuple[str, ...]:
    """A user metric's ``batch_keys`` attribute: a tuple (or list) of tensor names."""
    keys = getattr(user, "batch_keys", ())
    if not isinstance(keys, (tuple, list)) or not all(isinstance(k, str) for k in keys):
        raise AcctattrError(f"{where}: batch_keys must be a tuple of tensor names, "
                            f"got {keys!r}")
    return tuple(keys)

"""Eval batches and stage training samples, read from safetensors files, JSONL text (tokenised
with the run's tokenizer, acctattr.evaluation.lm) or user functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from acctattr.errors import CheckpointError, DataError
from acctattr.evaluation import lm
from acctattr.evaluation.metrics import (
    BATCH_KEYS,
    CLASS_METRICS,
    TOKEN_METRICS,
    user_batch_keys,
)
from acctattr.evaluation.model import load_ref
from acctattr.runs.manifest import EvalSpec

Batch = dict[str, torch.Tensor]
_INT_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL")
IGNORE_INDEX = -100  # a class label that counts for nothing (PyTorch's and Hugging Face's)


def check_values(batch: Batch, names: tuple[str, ...], target: str, class_metric: bool,
                 where: str, first: int = 0, group: str | None = None) -> None:
    """Refuse NaN/Inf in any named tensor, and (``class_metric``) class labels that are
    negative other than the ignore index -100, or an example whose labels are all -100
    (nothing of it would be counted: its metric is undefined, not zero).

    Args:
        batch: name -> tensor [rows, ...]; rows are examples ``first``, ``first + 1``, ...
        where: the data's description for messages (``eval.data FILE``).
    """
    for n in names:
        t = batch[n]
        if t.is_floating_point() or t.is_complex():
            if t.is_floating_point() and t.element_size() == 1:
                t = t.float()  # fp8: isfinite is not implemented for it
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                bad = (~finite).reshape(t.shape[0], -1).any(dim=1) if t.ndim else finite
                rows = bad.nonzero().flatten().tolist() if t.ndim else [0]
                raise DataError(
                    f"{where}: tensor '{n}' has {int((~finite).sum())} NaN or Inf values "
                    f"(first in example {first + rows[0]})",
                    "remove or repair those examples; acctattr never averages NaN or Inf "
                    "into an effect")
    y = batch[target]
    if group is not None:
        g = batch[group]
        if g.ndim != 1 or (y.ndim and g.shape[0] != y.shape[0]) or g.is_floating_point() \
                or g.is_complex():
            raise DataError(f"{where}: eval.group tensor '{group}' has shape {tuple(g.shape)} "
                            f"and dtype {g.dtype}; it needs one integer group id per example")
    if not class_metric or y.is_floating_point() or y.dtype == torch.bool or y.ndim == 0:
        return
    y = y.long()
    negative = (y < 0) & (y != IGNORE_INDEX)
    if bool(negative.any()):
        i = int(negative.reshape(y.shape[0], -1).any(dim=1).nonzero()[0, 0])
        raise DataError(f"{where}: eval.target '{target}' has a negative class id "
                        f"{int(y[negative][0])} (example {first + i}); class ids are >= 0, "
                        f"or {IGNORE_INDEX} for a token that is not counted")
    empty = (y == IGNORE_INDEX).reshape(y.shape[0], -1).all(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise DataError(
            f"{where}: eval.target '{target}': {len(rows)} example(s) have every label "
            f"{IGNORE_INDEX} (the ignore index), first example {first + rows[0]}; nothing of "
            "them would be counted, so their metric is undefined",
            "drop those examples from the eval set, or give them at least one counted label")


def group_names(spec: EvalSpec) -> list[str] | None:
    """The eval set's group ids as results name them (sorted), read from the group tensor
    alone; None when they cannot be known without running a FILE.py:FUNC source."""
    if spec.group is None or spec.data is None:
        return None
    from acctattr.runs.checkpoints import safe_open_checked

    handle = safe_open_checked(spec.data)
    if spec.group not in set(handle.keys()):
        return None  # the evaluator names this problem
    ids = handle.get_tensor(spec.group)
    if ids.is_floating_point():
        return None
    return [str(g) for g in sorted(set(ids.reshape(-1).tolist()))]


class EvalData:
    """Eval batches streamed from a safetensors file (sliced per batch) or a user function."""

    def __init__(self, spec: EvalSpec, batch_size: int | None = None,
                 extra: tuple[str, ...] | None = None) -> None:
        """
        Args:
            batch_size: overrides eval.batch_size (--batch-size); a FILE.py:FUNC source
                yields its own batches, so it cannot take one.
            extra: further tensors the metric reads (Metric.batch_keys), read where the
                data holds them; default: eval.metric's own (_metric_keys).
        """
        self.spec = spec
        self.batch_size = batch_size or spec.batch_size
        if batch_size is not None and spec.data_fn is not None:
            raise DataError(f"--batch-size {batch_size}: eval.data {spec.data_fn.text} is a "
                            "function that yields its own batches",
                            "drop --batch-size, or change the batches the function yields")
        self.names = (*spec.inputs, spec.target, *((spec.group,) if spec.group else ()))
        self._fn: Callable[[], Iterable[Batch]] | None = None
        self._text_init(extra)
        if spec.data_fn is not None:
            self._fn = load_ref(spec.data_fn, "eval.data")
            self.source = spec.data_fn.text
        elif self._memory is not None:
            self.source = str(spec.data)
        else:
            assert spec.data is not None
            self.source = str(spec.data)
            self._check_file()
            self._check_file_tokens()

    def _check_file(self) -> None:
        from acctattr.runs.checkpoints import safe_open_checked  # header checks with clear messages

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
        if group and len(lengths[group]) != 1:
            raise DataError(f"eval.data {self.source}: eval.group tensor '{group}' has shape "
                            f"{tuple(lengths[group])}; it needs one group id per example "
                            f"(shape [{self.n}])")
        del handle
        self._scan()

    def _scan(self) -> None:
        """Every value checked once, up front, a slice at a time (see check_values)."""
        class_metric = isinstance(self.spec.metric, str) and self.spec.metric in CLASS_METRICS
        # batch-sized slices, each from a fresh map: the scan allocates what evaluation
        # will (larger blocks would raise glibc's mmap threshold and grow the heap)
        for lo in range(0, self.n, self.batch_size):
            hi = min(lo + self.batch_size, self.n)
            with safe_open(self.source, framework="pt") as f:
                part = {n: f.get_slice(n)[lo:hi] for n in self.names}
            check_values(part, self.names, self.spec.target, class_metric,
                         f"eval.data {self.source}", lo)

    def batches(self) -> Iterator[Batch]:
        for _, batch in self.numbered():
            yield batch

    def numbered(self, mine: Callable[[int], bool] | None = None
                 ) -> Iterator[tuple[int, Batch]]:
        """(index, batch) for every batch, or only those ``mine(index)`` keeps (a rank's
        share: a file's other batches are not even read; a function's are produced and
        dropped)."""
        if self._fn is not None:
            for i, batch in enumerate(self._counted(self._user_batches())):
                if mine is None or mine(i):
                    yield i, batch
            return
        bs = self.batch_size
        for i, lo in enumerate(range(0, self.n, bs)):
            if mine is not None and not mine(i):
                continue
            hi = min(lo + bs, self.n)
            if self._memory is not None:  # JSONL text, tokenised up front
                yield i, {n: self._memory[n][lo:hi] for n in self.names}
                continue
            # A fresh memory map per batch: slices are views into it, and it is unmapped when
            # the batch is dropped, so resident memory stays one batch deep however large the
            # file (one long-lived map would keep every page it touched resident).
            with safe_open(self.source, framework="pt") as f:
                yield i, {n: f.get_slice(n)[lo:hi] for n in self.names}

    def _user_batches(self) -> Iterator[Batch]:
        assert self._fn is not None
        try:
            it = iter(self._fn())
        except Exception as e:
            raise DataError(f"eval.data {self.source} raised {type(e).__name__}: {e}") from e
        seen = seen_rows = 0
        for i, b in enumerate(it):
            if not isinstance(b, dict):
                raise DataError(f"eval.data {self.source}: batch {i} is a {type(b).__name__}, "
                                "expected a dict of tensors")
            for n in self.names:
                if not isinstance(b.get(n), torch.Tensor):
                    raise DataError(f"eval.data {self.source}: batch {i} has no tensor '{n}'",
                                    "each batch must be a dict holding eval.inputs, "
                                    "eval.target (and eval.group)")
            y = b[self.spec.target]
            if y.ndim and y.shape[0] == 0:  # nothing to evaluate; its checks cannot reshape
                raise DataError(f"eval.data {self.source}: batch {i} holds no examples "
                                f"(eval.target '{self.spec.target}' has shape "
                                f"{tuple(y.shape)})", "yield only batches with examples")
            check_values(b, self.names, self.spec.target,
                         isinstance(self.spec.metric, str) and self.spec.metric in CLASS_METRICS,
                         f"eval.data {self.source}: batch {i}", seen_rows, self.spec.group)
            seen_rows += int(b[self.spec.target].shape[0]) if b[self.spec.target].ndim else 1
            seen += 1
            yield b
        if not seen:
            raise DataError(f"eval.data {self.source}: the eval set is empty (no batches)")

    # ---- language models: JSONL text, the metric's further tensors, counted tokens

    def _text_init(self, extra: tuple[str, ...] | None) -> None:
        """The metric's further tensors (``extra``), whether it is a next-token metric, and
        JSONL text data tokenised into memory (acctattr.evaluation.lm)."""
        spec = self.spec
        if extra is None:
            extra = _metric_keys(spec)
        self._extra = tuple(k for k in extra if k not in self.names)
        # a next-token metric: every example must count a token (its value is 0/0 else)
        self._tokens = spec.metric if spec.metric in TOKEN_METRICS else None
        self._memory: Batch | None = None
        if spec.data_fn is None and spec.data is not None and spec.data.suffix == ".jsonl":
            self._memory = lm.load_jsonl(spec.data, spec.tokenizer, spec.max_length,
                                         f"eval.data {spec.data}", spec.group, self._tokens)
            self.n = int(self._memory["input_ids"].shape[0])
            self.names = (*self.names, *(k for k in self._extra if k in self._memory))

    def _check_file_tokens(self) -> None:
        """A safetensors file: the metric's further tensors it holds are read with the rest;
        with a next-token metric, an example that counts no token is refused."""
        with safe_open(self.source, framework="pt") as f:
            keys = set(f.keys())
            self.names = (*self.names, *(k for k in self._extra if k in keys))
            dtype = f.get_slice(self.spec.target).get_dtype()
            if self._tokens is not None and dtype not in _INT_DTYPES:
                raise DataError(f"eval.data {self.source}: eval.target tensor "
                                f"'{self.spec.target}' has dtype {dtype}, but eval.metric "
                                f"{self._tokens} needs integer token ids (-100: not counted)",
                                "save the labels as an integer tensor (e.g. torch.long)")
            if self._tokens is not None:
                mask = f.get_tensor("attention_mask") if "attention_mask" in keys else None
                lm.refuse_uncounted(f.get_tensor(self.spec.target), mask,
                                    f"eval.data {self.source}", self._tokens)

    def _counted(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """A function's batches, each checked (with a next-token metric) for examples that
        count no token, named by their index over the whole eval set."""
        seen = 0
        for i, b in enumerate(batches):
            if self._tokens is not None:
                target = b[self.spec.target]
                lm.refuse_uncounted(target, b.get("attention_mask"),
                                    f"eval.data {self.source} (batch {i})", self._tokens,
                                    offset=seen)
                seen += int(target.shape[0]) if target.ndim else 1
            yield b


def _metric_keys(spec: EvalSpec) -> tuple[str, ...]:
    """The further batch tensors eval.metric reads: a builtin's, or a user function's
    ``batch_keys``."""
    if isinstance(spec.metric, str):
        return BATCH_KEYS.get(spec.metric, ())
    return user_batch_keys(load_ref(spec.metric, "eval.metric"),
                           f"eval.metric {spec.metric.text}")


def stage_sample(path: Path, names: tuple[str, ...], size: int, stage: str, seed: int = 0,
                 extra: tuple[str, ...] = (), tokens: str | None = None,
                 tokenizer: Path | None = None, max_length: int | None = None,
                 **kw: Any) -> Batch:
    """A stage's training sample (load_stage_sample), with what a language model's training
    loss needs.

    Args:
        names: (*inputs, target).
        extra: further tensors the training loss reads (Metric.batch_keys), taken where the
            data has them.
        tokens: the training loss when it is a next-token metric: examples that count no
            token are left out of the sample (they added nothing to the Trainer's loss
            either); none left is an error.
        tokenizer, max_length: how JSONL text data (``.jsonl``) is tokenised.
        kw: passed on to load_stage_sample.
    """
    if path.suffix == ".jsonl":
        return _stage_text(path, names, size, stage, seed, tokens, tokenizer, max_length)
    if extra:
        from acctattr.runs.checkpoints import safe_open_checked

        keys = set(safe_open_checked(path).keys())
        more = tuple(k for k in extra if k in keys and k not in names)
        names = (*names[:-1], *more, names[-1])  # the target stays last
    sample = load_stage_sample(path, names, size, stage, seed, **kw)
    if tokens is not None:
        sample = _drop_uncounted(sample, names[-1], f"stage '{stage}': data {path}")
    return sample


def _drop_uncounted(sample: Batch, target: str, where: str) -> Batch:
    """The sample without the examples that count no next-token label."""
    bad = lm.uncounted(sample[target], sample.get("attention_mask"))
    if not bad:
        return sample
    n = sample[target].shape[0]
    if len(bad) == n:
        raise DataError(f"{where}: no example of the sample counts a token (every next-token "
                        "label is -100 or masked)",
                        "the training loss needs label tokens; check the data's labels")
    keep = torch.ones(n, dtype=torch.bool)
    keep[bad] = False
    return {k: v[keep] for k, v in sample.items()}


def _stage_text(path: Path, names: tuple[str, ...], size: int, stage: str, seed: int,
                tokens: str | None, tokenizer: Path | None,
                max_length: int | None) -> Batch:
    """A stage's JSONL text: every line is checked, a seeded sample tokenised."""
    where = f"stage '{stage}': data {path}"
    unknown = [n for n in names if n not in lm.TOKEN_NAMES]
    if unknown:
        raise DataError(f"{where}: JSONL text is tokenised into input_ids, attention_mask and "
                        f"labels; there is no {unknown[0]!r}",
                        "name those in eval.inputs / eval.target")
    if tokenizer is None:
        raise DataError(f"{where}: JSONL text needs a tokenizer folder, and none is given",
                        "add tokenizer: DIR to the stage or to eval")
    texts, lines, _ = lm.read_jsonl(path, where)
    n = len(texts)
    picked = list(range(n))
    if n > size:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
        picked = [int(i) for i in keep.sort().values]
        texts, lines = [texts[i] for i in picked], [lines[i] for i in picked]
    tok = lm.load_tokenizer(tokenizer, f"stage '{stage}': tokenizer")
    out = lm.tokenize(texts, tok, max_length)
    if tokens is not None:
        out = _drop_uncounted(out, "labels", where)
    return out


def stage_data_header(path: Path, names: tuple[str, ...], stage: str) -> tuple[Any, int]:
    """A stage's safetensors data opened and checked from its header alone (readable, the
    tensors ``names`` present, one row per example in each, not empty): (handle, rows).
    ``acctattr check`` runs it on every stage's data; reading values is left to run."""
    from acctattr.runs.checkpoints import safe_open_checked

    try:
        handle = safe_open_checked(path)
    except CheckpointError as e:  # said of a checkpoint: name the stage and key
        raise e.within(f"stage '{stage}': data", DataError) from e
    keys = set(handle.keys())
    missing = [n for n in names if n not in keys]
    if missing:
        raise DataError(f"stage '{stage}': data {path} has no tensor named "
                        f"{', '.join(repr(m) for m in missing)} (it has: "
                        f"{', '.join(sorted(keys)) or 'nothing'})",
                        "a stage's data uses the same tensor names as eval.inputs and "
                        "eval.target")
    shapes = {k: handle.get_slice(k).get_shape() for k in names}
    firsts = {k: (s[0] if s else None) for k, s in shapes.items()}
    if len(set(firsts.values())) != 1 or None in firsts.values():
        raise DataError(f"stage '{stage}': data {path}: tensors have different numbers of "
                        f"examples (first dimensions {firsts})",
                        "every tensor of a stage's data needs one row per example")
    n = int(firsts[names[0]] or 0)
    if n == 0:
        raise DataError(f"stage '{stage}': data {path} is empty")
    return handle, n


def load_stage_sample(path: Path, names: tuple[str, ...], size: int, stage: str,
                      seed: int = 0, class_metric: bool = False) -> Batch:
    """A fixed random sample (``size`` examples, seeded) of a stage's training data, checked
    as eval data is (check_values; ``names[-1]`` is the target)."""
    handle, n = stage_data_header(path, names, stage)
    if n <= size:
        sample = {k: handle.get_tensor(k) for k in names}
    else:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
        idx = idx.sort().values
        sample = {k: handle.get_tensor(k)[idx] for k in names}
    check_values(sample, names, names[-1], class_metric, f"stage '{stage}': data {path}")
    return sample

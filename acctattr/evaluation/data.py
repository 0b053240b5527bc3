"""Eval batches and stage training samples, read from safetensors files or user functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from acctattr.errors import DataError
from acctattr.evaluation.metrics import CLASS_METRICS
from acctattr.evaluation.model import load_ref
from acctattr.runs.manifest import EvalSpec

Batch = dict[str, torch.Tensor]
_INT_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL")


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

    def __init__(self, spec: EvalSpec, batch_size: int | None = None) -> None:
        """
        Args:
            batch_size: overrides eval.batch_size (--batch-size); a FILE.py:FUNC source
                yields its own batches, so it cannot take one.
        """
        self.spec = spec
        self.batch_size = batch_size or spec.batch_size
        if batch_size is not None and spec.data_fn is not None:
            raise DataError(f"--batch-size {batch_size}: eval.data {spec.data_fn.text} is a "
                            "function that yields its own batches",
                            "drop --batch-size, or change the batches the function yields")
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

    def batches(self) -> Iterator[Batch]:
        for _, batch in self.numbered():
            yield batch

    def numbered(self, mine: Callable[[int], bool] | None = None
                 ) -> Iterator[tuple[int, Batch]]:
        """(index, batch) for every batch, or only those ``mine(index)`` keeps (a rank's
        share: a file's other batches are not even read; a function's are produced and
        dropped)."""
        if self._fn is not None:
            for i, batch in enumerate(self._user_batches()):
                if mine is None or mine(i):
                    yield i, batch
            return
        bs = self.batch_size
        for i, lo in enumerate(range(0, self.n, bs)):
            if mine is not None and not mine(i):
                continue
            hi = min(lo + bs, self.n)
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




def load_stage_sample(path: Path, names: tuple[str, ...], size: int, stage: str,
                      seed: int = 0) -> Batch:
    """A fixed random sample (``size`` examples, seeded) of a stage's training data."""
    from acctattr.runs.checkpoints import safe_open_checked

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

"""Stage embeddings v_k ~ theta_T - theta_T^(-k): the estimators and how auto chooses.

Each estimator is one module behind the interface in acctattr.estimators.base (``needs``,
``peak_memory``, ``embed``). ``auto`` is data: AUTO_ORDER, tried in order; the first
estimator whose ``needs`` is empty and whose peak memory fits is taken, and one that finds
while computing that it cannot be trusted on the run (Unsuitable) hands over to the next.
Adding an estimator means one module, one entry in ESTIMATORS and, if auto should consider
it, one in AUTO_ORDER.
"""

from __future__ import annotations

from collections.abc import Iterator

from acctattr.errors import AcctattrError
from acctattr.estimators.base import Estimator, Params, StageRun, Training, Unsuitable
from acctattr.estimators.frozen import Frozen
from acctattr.estimators.naive import Naive
from acctattr.estimators.unrolled import Reproduction, Unrolled
from acctattr.options import UnrolledConfig

ESTIMATORS: dict[str, type[Estimator]] = {e.name: e for e in (Naive, Frozen, Unrolled)}
# auto's preference, best first; the last is taken when none before it can run
AUTO_ORDER = ("unrolled", "frozen")

__all__ = ["AUTO_ORDER", "ESTIMATORS", "Estimator", "Params", "Reproduction", "StageRun",
           "Training", "Unsuitable", "Unrolled", "auto_note", "candidates", "make"]


def make(name: str, training: Training, config: UnrolledConfig | None = None,
         strict: bool = False) -> Estimator:
    """The estimator called ``name`` on this run (nothing computed yet)."""
    if name not in ESTIMATORS:
        raise AcctattrError(f"unknown estimator {name!r}",
                            f"choose one of {', '.join(ESTIMATORS)} or auto")
    return ESTIMATORS[name](training, config, strict)


def candidates(name: str, training: Training, config: UnrolledConfig | None,
               available: int | None, passed: list[str]) -> Iterator[Estimator]:
    """The estimators to try, in order, for ``--estimator name``.

    A named estimator is the only one, refused at once (AcctattrError) when it ``needs``
    something the run lacks. ``auto`` yields AUTO_ORDER's estimators that can run here
    (nothing needed, peak memory within ``available`` bytes, None: unknown), strict so that
    one the run does not suit raises Unsuitable and the caller takes the next; the reason
    each one was passed over is appended to ``passed``. The last in the order is the last
    resort: yielded whatever its memory (refused only when it cannot run at all).
    """
    if name != "auto":
        estimator = make(name, training, config)
        estimator.refuse()
        yield estimator
        return
    for i, key in enumerate(AUTO_ORDER):
        last = i == len(AUTO_ORDER) - 1
        estimator = make(key, training, config, strict=not last)
        if last:  # the last resort runs unless it cannot (then the error says why)
            estimator.refuse()
            yield estimator
            return
        why = estimator.needs()
        need = estimator.peak_memory()
        if available is not None and need > available:
            why.append(f"{key} would need about {need / 2**30:.1f} GiB (about "
                       f"{estimator.copies:g} float32 copies of the parameters) and "
                       f"{available / 2**30:.1f} GiB are available")
        if why:
            passed.extend(why)
            continue
        yield estimator


def auto_note(chosen: Estimator, passed: list[str]) -> str:
    """Why auto took ``chosen``: what stopped the estimators before it, or, when it was the
    first choice, when it is taken."""
    if passed:
        return f"auto uses {chosen.name} because " + "; ".join(passed)
    return f"auto uses {chosen.name}: {chosen.suited}"

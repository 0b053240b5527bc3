"""Several processes on one run, on torch.distributed (started by torchrun).

``torchrun --nproc-per-node N -m acctattr run MANIFEST`` starts N copies of acctattr, each
told its RANK and the WORLD_SIZE by environment variables. They share the work and every
one of them ends with the whole result:

- the eval set: batch b is evaluated by rank b mod N, and everyone gets every value;
- estimators whose embeddings are costly (``Estimator.shard_stages``, unrolled): stage k's
  embedding is built, and evaluated on the whole eval set, by rank k mod N.

Rank 0 alone prints and writes (cli.py). Each step that can fail on one rank and not on
another (files read, batches evaluated, embeddings built) goes through ``Ranks.all``: an
error on any rank is raised on every rank, so they all exit with the same code, and the
message reaches rank 0. Collectives run on gloo for the CPU and NCCL for CUDA.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from acctattr.errors import AcctattrError

if TYPE_CHECKING:  # torch is imported where it is used: the command line reads from_env
    import torch

T = TypeVar("T")


def from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    def read(key: str, default: int) -> int:
        value = os.environ.get(key, "").strip()
        return int(value) if value.isdigit() else default

    world = read("WORLD_SIZE", 1)
    if world <= 1:
        return 0, 1, 0
    return read("RANK", 0), world, read("LOCAL_RANK", 0)


def is_primary() -> bool:
    """True unless this process is a rank other than 0 of a torchrun job."""
    return from_env()[0] == 0


def local_world() -> int:
    """Processes of this job on this machine (they share its memory)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() and from_env()[1] > 1 else 1


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world`` (world 1: alone); ``group``
    the process group its collectives run on (None: torch's default one)."""

    rank: int = 0
    world: int = 1
    group: Any = None

    def mine(self, index: int) -> bool:
        """Whether item ``index`` (an eval batch, a stage) is this rank's to compute."""
        return index % self.world == self.rank

    def all(self, fn: Callable[[], T]) -> list[T]:
        """fn() on this rank, and every rank's result in rank order.

        An exception on any rank is raised on every rank, so no rank waits on one that
        has stopped and all exit alike: the one with the lowest ``order`` attribute (say,
        the stage it was raised for; else the rank), the same type and message, with
        ``shared_from`` naming the rank it came from on the others.
        """
        return self._exchange(fn, share=True)

    def together(self, fn: Callable[[], T]) -> T:
        """fn() on this rank, its own result returned (nothing else is sent); an exception
        on any rank is raised on every rank, as in ``all``."""
        return self._exchange(fn, share=False)[self.rank]

    def min(self, value: float) -> float:
        """The smallest of every rank's ``value``."""
        return min(self.all(lambda: value))

    def _exchange(self, fn: Callable[[], T], share: bool) -> list[T]:
        try:
            mine: tuple[bool, Any] = (True, fn())
        except Exception as e:
            if self.world == 1:
                raise
            mine = (False, e)
        if self.world == 1:
            return [mine[1]]
        import torch.distributed as dist

        sent = _picklable(mine) if share or not mine[0] else (True, None)
        got: list[Any] = [None] * self.world
        dist.all_gather_object(got, sent, group=self.group)
        failed = [(_order(state), r) for r, (ok, state) in enumerate(got) if not ok]
        if failed:
            _, r = min(failed)
            if r == self.rank:
                raise mine[1]
            raise _rebuilt(got[r][1], r)
        if not share:
            return [mine[1] if r == self.rank else None for r in range(self.world)]  # type: ignore[misc]
        return [value for _, value in got]


def _order(state: tuple[type[BaseException], tuple[Any, ...], dict[str, Any]]) -> int:
    """Which of several ranks' errors is raised: the lowest ``order`` (e.g. a stage index),
    0 when the error has none."""
    return int(state[2].get("order", 0))


ALONE = Ranks()


@contextmanager
def joined(device: torch.device) -> Iterator[Ranks]:
    """This process's Ranks, joining torchrun's process group for the block when it was
    started by torchrun (gloo on the CPU, NCCL on CUDA) and leaving it afterwards. A group
    the caller already started is used as it is."""
    rank, world, _ = from_env()
    if world <= 1:
        yield ALONE
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        yield Ranks(dist.get_rank(), dist.get_world_size())
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    _check_env(rank, world)
    wait = rendezvous_seconds()
    try:
        # joining waits at most ``wait`` seconds for the other ranks (a WORLD_SIZE with no
        # peers, an unreachable MASTER_ADDR: torch's default would wait 30 minutes)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=wait))
    except (RuntimeError, ValueError) as e:  # torch's DistError is a RuntimeError
        error = AcctattrError(f"{_env_text()}: could not join the other ranks within "
                              f"{wait:g} s ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else e})", _ENV_HINT)
        error.rank_local = True  # type: ignore[attr-defined]  # rank 0 cannot tell it
        raise error from e
    try:
        # the work's collectives wait as long as torch's default (a rank may compute for
        # minutes while the others wait for its result)
        group = dist.new_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        yield Ranks(dist.get_rank(), dist.get_world_size(), group)
        # every rank leaves together: a rank that tore its connections down while rank 0
        # was still writing the result made rank 0's gloo abort ("terminate called without
        # an active exception", exit -6) in one full test run under load
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group()


RENDEZVOUS_S = 30.0
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_ENV_HINT = ("start every rank with torchrun (torchrun --nproc-per-node N -m acctattr ...), "
             "or unset WORLD_SIZE to run in one process; a slow cluster can wait longer with "
             "ACCTATTR_RENDEZVOUS_TIMEOUT=SECONDS")


def rendezvous_seconds() -> float:
    """How long joining the other ranks may take: ACCTATTR_RENDEZVOUS_TIMEOUT (seconds)
    where it is a positive number, else RENDEZVOUS_S."""
    try:
        value = float(os.environ.get("ACCTATTR_RENDEZVOUS_TIMEOUT", ""))
    except ValueError:
        return RENDEZVOUS_S
    return value if 0 < value < float("inf") else RENDEZVOUS_S


def _env_text() -> str:
    return "torchrun environment " + ", ".join(
        f"{k}={os.environ[k]!r}" if k in os.environ else f"{k} unset" for k in _ENV_KEYS)


def _check_env(rank: int, world: int) -> None:
    """What torch's env:// rendezvous needs, checked before it is tried (a missing
    variable is otherwise a bare ValueError; a RANK beyond WORLD_SIZE waits for a rank 0
    that never comes)."""
    problems = [f"{k} is not set" for k in ("RANK", "MASTER_ADDR", "MASTER_PORT")
                if not os.environ.get(k, "").strip()]
    port = os.environ.get("MASTER_PORT", "").strip()
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        problems.append(f"MASTER_PORT {port!r} is not a port number (1 to 65535)")
    if os.environ.get("RANK", "").strip() and not 0 <= rank < world:
        problems.append(f"RANK {os.environ['RANK']!r} is not a whole number from 0 to "
                        f"WORLD_SIZE - 1 = {world - 1}")
    if problems:
        error = AcctattrError(f"{_env_text()}: {'; '.join(problems)}", _ENV_HINT)
        error.rank_local = True  # type: ignore[attr-defined]  # each rank says its own
        raise error


def _picklable(outcome: tuple[bool, Any]) -> tuple[bool, Any]:
    """An outcome every rank can unpickle: an exception travels as (class, args, state) when
    its class is acctattr's or a builtin, else as a RuntimeError with its type and text (a
    class from the user's model file has a different module name in every process)."""
    ok, value = outcome
    if ok:
        return outcome
    cls = type(value)
    if cls.__module__.partition(".")[0] in ("acctattr", "builtins"):
        state = (cls, value.args, dict(value.__dict__))
        try:
            pickle.dumps(state)
            return False, state
        except Exception:
            pass
    return False, (RuntimeError, (f"{cls.__name__}: {value}",), {})


def _rebuilt(state: tuple[type[BaseException], tuple[Any, ...], dict[str, Any]],
             rank: int) -> BaseException:
    """Another rank's exception, rebuilt without calling its __init__ (whose arguments need
    not be its args) and marked with the rank it came from."""
    cls, args, attrs = state
    error = cls.__new__(cls)
    BaseException.__init__(error, *args)
    error.__dict__.update(attrs)
    error.shared_from = rank  # type: ignore[attr-defined]
    return error

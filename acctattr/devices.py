"""Where a run computes (CPU, a CUDA GPU, Apple's MPS) and on how many CPU threads.

Devices: the model's passes (evaluation, unrolled's training-loss gradients) run on the
chosen device; the estimators' float64 algebra runs there too, except on MPS, which has no
float64 (there it stays on the CPU). Checkpoints are always read on the CPU and moved.

Threads: results must not depend on the thread count (README, "Devices, threads and several
processes"). Measured on torch 2.13 (CPU): forward passes and elementwise ops give the same
bits at 1 and 2 threads, but reductions over many elements do not (matmuls that split their
inner dimension across threads, LayerNorm's backward, full sums of more than 32k elements).
Everything that reduces that way runs at one intra-op thread (``single_threaded``); sums
over eval examples are exact (math.fsum). ``default_threads`` is then free to follow the machine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

from acctattr.errors import AcctattrError

DEVICES = ("auto", "cpu", "cuda", "mps")
P = ParamSpec("P")
R = TypeVar("R")
# torch's own intra-op thread count at import (its physical-core count, or OMP_NUM_THREADS)
TORCH_THREADS = torch.get_num_threads()


def resolve(name: str, local_rank: int | None = None) -> torch.device:
    """``--device`` as a torch device, checked to exist here.

    auto: the CUDA GPU when there is one, else the CPU (MPS only when asked for: it lacks
    float64 and is not tested here). Under torchrun (``local_rank``) plain ``cuda`` means
    this process's GPU, cuda:LOCAL_RANK.

    Raises:
        AcctattrError: an unknown name, or a device this machine or this torch lacks.
    """
    base, _, index = name.partition(":")
    # isascii: "²".isdigit() is true, but int("²") fails
    if base not in DEVICES or (index and (base != "cuda" or not index.isascii()
                                          or not index.isdigit())):
        raise AcctattrError(f"--device {name}: not a device acctattr knows",
                            "use cpu, cuda, cuda:N, mps or auto")
    if base == "auto":
        base = "cuda" if torch.cuda.is_available() else "cpu"
    if base == "cpu":
        return torch.device("cpu")
    if base == "mps":
        if not torch.backends.mps.is_available():
            raise AcctattrError("--device mps: this machine or this torch has no MPS device",
                                "use --device cpu (or auto)")
        return torch.device("mps")
    if not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else \
            f"built for CUDA {torch.version.cuda}, but no GPU is visible"
        raise AcctattrError(f"--device {name}: no CUDA GPU here (torch {torch.__version__} is "
                            f"{built})", "use --device cpu, or install a CUDA build of torch "
                            "on a machine with a GPU")
    n = torch.cuda.device_count()
    i = int(index) if index else (local_rank or 0)
    if i >= n:
        raise AcctattrError(f"--device {name}: GPU {i} asked for, {n} visible",
                            f"use an index below {n} (CUDA_VISIBLE_DEVICES chooses which)")
    return torch.device("cuda", i)


def math_device(device: torch.device) -> torch.device:
    """Where the estimators' float64 algebra runs on ``device``: there, except MPS (no
    float64), where it stays on the CPU."""
    return torch.device("cpu") if device.type == "mps" else device


def gpu_free_memory(device: torch.device) -> int:
    """Bytes free on a CUDA device (what auto's memory rule compares with there)."""
    return int(torch.cuda.mem_get_info(device)[0])


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" or "200000 100000" (quota, period)
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def default_threads() -> int:
    """The intra-op thread count when --threads is not given.

    OMP_NUM_THREADS when set (a scheduler or the user chose it; torchrun sets 1). Else
    the CPUs this process may use that other processes are not already using (1-minute
    load average), at most torch's own default, at least 1. On a 2-core machine busy with
    other work, torch's default of 2 threads made frozen 8-11x slower than 1 (bench/
    threads.py): OpenMP threads wait on each other at every operation when a core is taken.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    cpus = min(usable_cpus(), TORCH_THREADS)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cpus, round(cpus - busy)))


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block (None: left as it is)."""
    if n is None:
        yield
        return
    if n < 1:
        raise AcctattrError(f"--threads {n}: needs at least one thread")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` at one intra-op thread, so that its reductions (over a training sample, a
    whole parameter vector) add in the same order whatever the thread count."""

    @wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with threads(1):
            return fn(*args, **kwargs)

    return run

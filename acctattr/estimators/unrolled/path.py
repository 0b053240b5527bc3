"""The simulated actual run through one later stage, and the check that it reproduces the
run that was recorded.

Both flows simulate the actual run from each of a stage's checkpoints to the next (its
segments), in substeps that share the stage's ``flow_substeps`` by summed lr; the
counterfactual is then simulated alongside it (acctattr.estimators.unrolled.sgd_flow,
adam_flow). The path keeps each substep's step in float32 and each segment's start, in an
anonymous temporary file (Spill), not in memory; the points between are rebuilt on
iteration.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from acctattr.estimators.unrolled.flat import FlatRun
from acctattr.runs.checkpoints import StateDictReader

Span = tuple[int, int, int]  # (segment index, first step, end step)
StepAt = Callable[[int, int, int, torch.Tensor], torch.Tensor]  # (substep, k0, k1, theta)


class Spill:
    """Whole-model float32 vectors (one per key) written once to an anonymous temporary
    file and read back one at a time with plain reads.

    The file is made by tempfile.TemporaryFile in the system's temporary folder (TMPDIR):
    unlinked as it is made (O_TMPFILE where the file system has it), so it is gone when
    closed or when the process ends, however it ends; nothing is written in the user's
    folders. Reads are ``preadv`` into a buffer, not a memory map, so the pages the kernel
    caches for the file are not the process's memory (RSS). The path of a stage takes
    (segments + substeps) x 4 bytes per parameter there: 17 checkpoints at the default
    flow_substeps=16, held in memory before (bench/scale.py --steps, README "Memory,
    dtypes and scale")."""

    def __init__(self, numel: int, device: torch.device) -> None:
        self.numel = numel
        self.device = device
        self.nbytes = 4 * numel
        self._slots: dict[int, int] = {}
        self._file = tempfile.TemporaryFile(prefix="acctattr-path-", buffering=0)

    def __setitem__(self, key: int, value: torch.Tensor) -> None:
        """Write ``value`` (rounded to float32) as ``key``'s vector (once per key)."""
        assert key not in self._slots and value.numel() == self.numel
        host = value.detach().to("cpu", torch.float32).contiguous()
        view = host.numpy().data.cast("B")
        offset = len(self._slots) * self.nbytes
        try:
            _write_at(self._file.fileno(), view, offset)
        except OSError as err:
            raise OSError(err.errno, f"unrolled keeps its simulated path of a stage in a "
                          f"temporary file ({self.nbytes / 2**20:.0f} MB per substep) in "
                          f"{tempfile.gettempdir()}, which failed: {err.strerror}; set TMPDIR "
                          "to a folder with room") from err
        self._slots[key] = len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def read(self, key: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``key``'s vector, read into ``out`` (a float32 CPU tensor of numel elements) or a
        fresh one; on the run's device."""
        if out is None:
            out = torch.empty(self.numel, dtype=torch.float32)
        view = out.numpy().data.cast("B")
        _read_at(self._file.fileno(), view, self._slots[key] * self.nbytes)
        return out if self.device.type == "cpu" else out.to(self.device)

    def close(self) -> None:
        self._file.close()


@dataclass
class ActualPath:
    """The simulated actual run through one later stage: per substep its (first, end)
    optimizer step and the step it takes, and where each segment starts (a checkpoint);
    the points between are rebuilt on iteration. The steps and starts are kept in float32
    in a temporary file (Spill), one read back at a time. Adam: the noise scale and, for a
    stage the next one continues, the simulated run's exp_avg_sq at its end (v_end, the
    state file's, is read again where needed: None)."""

    spans: list[tuple[int, int]]
    starts: Spill  # substep index -> the checkpoint it restarts from
    steps: Spill  # substep index -> its step
    c: float = 0.0
    v_end: torch.Tensor | None = None
    v_sim: torch.Tensor | None = None
    # AdamW: substep (first, end) -> its decoupled decay factor, applied after the step
    decay: Callable[[int, int], torch.Tensor] | None = None
    # the learning-rate multiplier under which the simulated run reproduces the recorded
    # one's loss decrease (Adam); the counterfactual runs at the same pace
    pace: float = 1.0
    # whether the flow through the stage keeps Adam's first moment (AdamFlow.momentum_in)
    momentum: bool = False

    def close(self) -> None:
        """Close (and so delete) the temporary files."""
        self.starts.close()
        self.steps.close()

    def __iter__(self) -> Iterator[tuple[tuple[int, int], torch.Tensor, torch.Tensor]]:
        """(first step, end step), start point (float64), step (float32: promoted where it
        is added to a float64 tensor, the same values as widened first). The point is one
        buffer moved along in place, and so is the step (read into one reused buffer): use
        them before asking for the next."""
        assert len(self.steps) == len(self.spans)
        theta = torch.empty(0)
        buffer = torch.empty(self.steps.numel, dtype=torch.float32)
        for i, span in enumerate(self.spans):
            if i in self.starts:
                start = self.starts.read(i, buffer)
                theta = torch.empty(start.shape, dtype=torch.float64, device=start.device)
                theta.copy_(start)
                del start
            step = self.steps.read(i, buffer)
            yield span, theta, step
            add_in_pieces(theta, step)
            if self.decay is not None:
                theta.mul_(self.decay(*span))


def _write_at(fd: int, view: memoryview, offset: int) -> None:
    """All of ``view`` written to file ``fd`` at ``offset`` (pwrite may write less)."""
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _read_at(fd: int, view: memoryview, offset: int) -> None:
    """``view`` filled from file ``fd`` at ``offset`` with plain reads (not a mapping)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"unrolled's temporary file ended early ({offset + done} bytes)")
        done += got


# tensors smaller than this are not parked
PARK_MIN = 1 << 22


def _fills_storage(t: torch.Tensor) -> bool:
    """A CPU tensor that is its whole storage, contiguous from its start."""
    return t.device.type == "cpu" and t.is_contiguous() and t.storage_offset() == 0 and \
        t.untyped_storage().nbytes() == t.numel() * t.element_size()


class _Bytes:
    """A tensor's bytes in an anonymous temporary file (as Spill's), written and read back
    through one staging buffer of at most 8 MB."""

    def __init__(self, t: torch.Tensor) -> None:
        self.nbytes = t.untyped_storage().nbytes()
        self.stage = torch.empty(min(self.nbytes, 1 << 23), dtype=torch.uint8)
        self.view = self.stage.numpy().data.cast("B")
        self.file = tempfile.TemporaryFile(prefix="acctattr-park-", buffering=0)
        raw = t.view(-1).view(torch.uint8)
        for lo in range(0, self.nbytes, len(self.stage)):
            n = min(len(self.stage), self.nbytes - lo)
            self.stage[:n].copy_(raw[lo:lo + n])
            _write_at(self.file.fileno(), self.view[:n], lo)

    def load(self, t: torch.Tensor) -> None:
        """The bytes written back into t (its storage the size they were taken at)."""
        raw = t.view(-1).view(torch.uint8)
        for lo in range(0, self.nbytes, len(self.stage)):
            n = min(len(self.stage), self.nbytes - lo)
            _read_at(self.file.fileno(), self.view[:n], lo)
            raw[lo:lo + n].copy_(self.stage[:n])

    def close(self) -> None:
        self.file.close()


@contextmanager
def parked(t: torch.Tensor, active: bool = True) -> Iterator[None]:
    """``t``'s memory given back while the block runs, its bytes kept meanwhile in an
    anonymous temporary file (as Spill's) and put back after, the same bits, however the
    block ends: for a vector that the callers hold but the block does not touch (d while
    the actual run of a later stage is simulated: two checkpoints at the peak). The
    tensor's storage is resized to nothing and back (the tensor object and its views stay
    the callers'); where that cannot be done (not a CPU tensor filling its storage, a
    storage shared with numpy) it stays in memory, and so does one under PARK_MIN bytes
    (a small model's vectors: the file's cost, nothing worth saving)."""
    storage = t.untyped_storage()
    nbytes = storage.nbytes()
    if not active or not _fills_storage(t) or nbytes < PARK_MIN:
        yield
        return
    kept = _Bytes(t)
    try:
        try:
            storage.resize_(0)
        except RuntimeError:  # not resizable: kept in memory
            yield
            return
        try:
            yield
        finally:
            storage.resize_(nbytes)
            kept.load(t)
    finally:
        kept.close()


@contextmanager
def kept_aside(t: torch.Tensor) -> Iterator[Callable[[], None]]:
    """A copy of ``t``'s bits kept aside while the block runs, and a function that puts
    them back into t: in an anonymous temporary file where t is a CPU tensor of at least
    PARK_MIN bytes filling its storage (no second copy in memory), else a copy in host
    memory."""
    if not _fills_storage(t) or t.untyped_storage().nbytes() < PARK_MIN:
        copy = t.detach().to("cpu", copy=True)

        def put_back() -> None:
            t.copy_(copy)

        yield put_back
        return
    kept = _Bytes(t)
    try:
        yield lambda: kept.load(t)
    finally:
        kept.close()


def add_in_pieces(out: torch.Tensor, x: torch.Tensor, piece: int = 1 << 18,
                  negate: bool = False) -> None:
    """out += x (-= x with ``negate``) in pieces of ``piece`` elements: where the dtypes
    differ, torch's CPU kernels would otherwise cast all of x to a temporary (a float32
    step added to a float64 point: two checkpoints' worth). The same values."""
    for op, xp in zip(torch.split(out, piece), torch.split(x, piece), strict=True):
        if negate:
            op.sub_(xp)
        else:
            op.add_(xp)


@dataclass(frozen=True)
class Reproduction:
    """Whether unrolled's simulated actual run of a later stage reproduces the run that was
    recorded: the stage's training loss (on its data sample) at its start, and how far it
    fell from each checkpoint to the next, summed over the stage, as recorded (the next
    checkpoint) and as simulated (from the checkpoint). The flow follows the optimizer's
    expected steps; where batch noise dominates a short stage, the real run learns far less
    than that (bench/trainer_short.py), and unrolled's re-learning is not there either."""

    stage: str
    start_loss: float
    recorded_drop: float
    simulated_drop: float

    def ok(self, factor: float) -> bool:
        """The simulated drop within ``factor`` of the recorded one, either way, give or take
        1% of the starting loss (a stage that barely moves its loss)."""
        slack = 0.01 * abs(self.start_loss)
        low = self.recorded_drop / factor - slack
        return low <= self.simulated_drop <= factor * self.recorded_drop + slack

    def describe(self) -> str:
        return (f"stage '{self.stage}': its simulated run lowers the training loss by "
                f"{self.simulated_drop:.4g}, the recorded run by {self.recorded_drop:.4g} "
                f"(from {self.start_loss:.4g})")


def spans(flat: FlatRun, j: int, total: float, count: int | None = None) -> list[Span]:
    """Stage j's flow substeps as (segment index, first step, end step): ``count`` (default
    flow_substeps) shared among the segments by summed lr, at least one each."""
    run = flat.runs[j]
    out = []
    for i, (_, _, s0, s1) in enumerate(flat.segments(j)):
        if s1 <= s0:
            continue
        scale = float(sum(run.lrs[s0:s1]))
        n = max(1, round((count or flat.config.flow_substeps) * scale / total)) \
            if total > 0 else 1
        cuts = [s0 + round((s1 - s0) * q / n) for q in range(n + 1)]
        out += [(i, k0, k1) for k0, k1 in zip(cuts, cuts[1:], strict=False) if k1 > k0]
    return out


def walk(flat: FlatRun, j: int, substeps: list[Span], step_at: StepAt,
         decay: Callable[[int, int], torch.Tensor] | None = None,
         ) -> tuple[Spill, Spill, dict[int, float]]:
    """The actual run through stage j's substeps (``spans``), restarted on the run's own
    checkpoint at each segment; step_at(substep, k0, k1, theta) gives each step.

    Returns what ActualPath keeps (substep -> checkpoint it restarts from, substep -> its
    step; float32, written to temporary files as they come) and segment -> the training
    loss where the simulation ends it, theta rebuilt from the float32 steps as ActualPath
    rebuilds it. The path kept before (another stage's) is dropped first: its files are
    closed, and it is not needed again (one stage at a time)."""
    for kept in flat.paths.values():
        kept.close()
    flat.paths = {}
    segments = flat.segments(j)
    curv = flat.curvature(j)
    numel = sum(flat.sizes)
    starts, steps = Spill(numel, flat.device), Spill(numel, flat.device)
    ends: dict[int, float] = {}
    segment, theta = -1, torch.empty(0)  # set at the first span
    what = f"simulating stage '{flat.runs[j].name}' as recorded"
    for q, (i, k0, k1) in enumerate(substeps):
        flat.report(what, q, len(substeps))
        if i != segment:  # back on the run's own checkpoint
            if segment >= 0:
                ends[segment] = curv.value(flat.at(theta))
            # read for this alone (not kept: check_reproduction reads it again)
            segment, theta = i, flat.read(segments[i][0])
            starts[q] = theta
        step = step_at(q, k0, k1, theta).float()
        steps[q] = step
        add_in_pieces(theta, step)  # in place: the same values as theta + step.double()
        del step
        if decay is not None:
            theta.mul_(decay(k0, k1))
    if segment >= 0:
        ends[segment] = curv.value(flat.at(theta))
    return starts, steps, ends


def next_pace(recorded: float, tried: list[tuple[float, float]], tolerance: float,
              most: int = 3) -> float | None:
    """The next learning-rate multiplier (pace) to simulate a stage's actual run at, so that
    its loss falls as far as the recorded run's did, or None to stop.

    The flow takes the optimizer's expected steps from the mean gradient. A real run's steps
    also carry batch noise, whose curvature term (1/2 tr(H Cov)) raises the loss each step,
    and dropout: it learns less per step than its expected step suggests, and the
    counterfactual's re-learning would be overstated by the same amount. ``tried`` holds
    (pace, simulated drop) pairs, the first at pace 1. Stops once a drop is within
    ``tolerance`` (relative) of ``recorded``, after ``most`` tries, or where the drops do not
    respond to the pace; otherwise a secant step on log(drop) against log(pace) (the first
    step assumes the drop proportional to the pace). Paces stay within [1/10, 10].
    """
    pace, drop = tried[-1]
    if tolerance <= 0 or recorded <= 0 or drop <= 0 or len(tried) > most:
        return None
    if abs(drop / recorded - 1.0) <= tolerance:
        return None
    slope = 1.0
    if len(tried) > 1:
        (p0, d0), (p1, d1) = tried[-2], tried[-1]
        if d0 <= 0 or p0 == p1:
            return None
        slope = math.log(d1 / d0) / math.log(p1 / p0)
        if not 0.05 <= slope <= 5.0:
            return None  # the loss's fall barely follows the pace: nothing to calibrate
    nxt = pace * math.exp(math.log(recorded / drop) / slope)
    return min(10.0, max(0.1, nxt))


def check_reproduction(flat: FlatRun, j: int, ends: dict[int, float]) -> Reproduction:
    """How far stage j's training loss falls from each of its checkpoints to the next,
    recorded against simulated (segment -> the training loss where the simulation ends
    it, as ``walk`` returns it)."""
    curv = flat.curvature(j)
    segments = flat.segments(j)
    at_anchor: dict[int, float] = {}  # a checkpoint ends one segment and starts the next

    def anchored(reader: StateDictReader) -> float:
        if id(reader) not in at_anchor:
            at_anchor[id(reader)] = curv.value(flat.anchor(reader))
        return at_anchor[id(reader)]

    start = recorded = simulated = 0.0
    for i, end in sorted(ends.items()):
        a, b = segments[i][0], segments[i][1]
        before = anchored(a)
        if i == min(ends):
            start = before
        recorded += before - anchored(b)
        simulated += before - end
    return Reproduction(flat.runs[j].name, start, recorded, simulated)

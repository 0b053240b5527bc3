"""What every estimator shares: the stages as the estimators see them, the per-stage pieces
(Delta_k, delta_b_k, Adam's frozen preconditioner) and the one interface an estimator has.

An estimator builds stage embeddings v_k ~ theta_T - theta_T^(-k) (SPEC section 2). It
says why it cannot run on a run (``needs``), how much memory it adds at its peak
(``peak_memory``), and produces v_k one stage at a time (``embed``); the orchestrator
chooses among estimators without knowing their insides (acctattr.estimators.choose).
An embedding depends only on checkpoints, optimizer state and training data, never on the
eval set. Nothing here opens a file: readers and state come in already opened.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from acctattr.devices import math_device
from acctattr.errors import AcctattrError, CheckpointError
from acctattr.estimators.dynamics import adam_preconditioner
from acctattr.options import UnrolledConfig
from acctattr.runs.checkpoints import StateDictReader
from acctattr.runs.optim_state import OptimizerState

if TYPE_CHECKING:
    from acctattr.evaluation.curvature import Curvature
    from acctattr.evaluation.metrics import Metric

# The optimizer state that carries a parameter perturbation forward.
FIRST_MOMENT = {"sgd": "momentum_buffer", "adam": "exp_avg", "adamw": "exp_avg"}
Params = dict[str, torch.Tensor]
# elements of one parameter computed at a time where the math is elementwise: at most
# CHUNK (32 MB of float64), and a 32nd of the model where that is less but at least
# MIN_CHUNK: memory does not grow with the largest tensor (an embedding matrix), and a few
# float64 slices stay small next to the model
CHUNK = 1 << 22
MIN_CHUNK = 1 << 16


@dataclass
class StageRun:
    """Everything the estimators need about one stage, files opened lazily."""

    name: str
    start: StateDictReader
    end: StateDictReader
    opt_type: str
    lrs: Sequence[float]  # one per step; lazy (runs.schedules.Lrs) for a schedule
    fresh: bool
    step0: int  # optimizer steps taken before this stage (0 when fresh)
    state: OptimizerState
    data: Path | None = None
    checkpoints: list[tuple[int, StateDictReader]] = field(default_factory=list)
    # parameters this stage's optimizer updated; None = every trainable parameter. An
    # adapter stage trains none of the model's own weights (frozenset()).
    trained: frozenset[str] | None = None
    # the gradient-norm clipping threshold (torch.nn.utils.clip_grad_norm_, the Trainer's
    # max_grad_norm) the stage trained with; None: no clipping
    max_grad_norm: float | None = None
    # examples per optimizer step (batch × accumulation × processes); None: not recorded
    batch_size: int | None = None

    @property
    def steps(self) -> int:
        return len(self.lrs)

    @property
    def adapter(self) -> bool:
        """The stage trained none of the model's own weights (a LoRA adapter stage)."""
        return self.trained == frozenset()


@dataclass(frozen=True)
class Training:
    """The training run as the estimators see it.

    Args:
        runs: the stages in training order.
        trainable: parameter name -> shape, in the model's named_parameters() order.
        dtypes: parameter name -> the model's own dtype (what it is evaluated at).
        curvature: stage index -> that stage's training loss on a sample of its data
            (built by the pipeline on first use; estimators that simulate training use it).
        train_loss: the training loss (train.loss) those simulations run on.
        device: where the model is evaluated; the estimators' float64 tensors live there
            too, except on MPS (acctattr.devices.math_device). Checkpoints are read on the
            CPU and moved.
    """

    runs: list[StageRun]
    trainable: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    curvature: Callable[[int], Curvature]
    train_loss: Callable[[], Metric]
    device: torch.device = torch.device("cpu")

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for shape in self.trainable.values())


class Unsuitable(Exception):
    """Raised by an estimator that finds, while computing, that it cannot be trusted on this
    run; ``auto`` then moves on to the next estimator in its order, giving ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Estimator:
    """The interface every estimator implements (one module each).

    Class attributes: ``name`` (as on the command line), ``evaluate`` (the evaluation it is
    best with on the fidelity bench), ``suited`` (when auto takes it, in words), ``copies``
    (its peak memory in float32 copies of the trainable parameters, from the benches).
    """

    name: ClassVar[str]
    evaluate: ClassVar[str]
    suited: ClassVar[str] = "it can run on every run"
    copies: ClassVar[float]
    # under torchrun: False, every rank builds every embedding and evaluates its share of
    # the eval set; True (costly embeddings), rank r builds stage k's when k % world == r
    shard_stages: ClassVar[bool] = False

    def __init__(self, training: Training, config: UnrolledConfig | None = None,
                 strict: bool = False) -> None:
        """
        Args:
            strict: raise Unsuitable where the estimator finds it cannot be trusted on this
                run (auto); otherwise go on and say so in ``warnings``.
        """
        self.training = training
        self.config = config or UnrolledConfig()
        self.strict = strict
        self.stages = Stages(training.runs, training.trainable, math_device(training.device))
        # (what, done, total) for the work inside one embedding; set by the caller
        self.progress: Callable[[str, int, int], None] | None = None

    def needs(self) -> list[str]:
        """Why it cannot run here, one reason each (empty: it can). Cheap: no computing."""
        return []

    def refuse(self) -> None:
        """Raise the first of ``needs`` as a clear error (an explicitly chosen estimator)."""
        why = self.needs()
        if why:
            raise AcctattrError(why[0], "use --estimator frozen (auto takes it by itself)")

    def peak_memory(self) -> int:
        """Bytes it is expected to add at its peak (``copies`` x the trainable parameters)."""
        return int(self.copies * 4 * self.training.n_params)

    def embed(self, k: int) -> Params:
        """v_k for stage k, by parameter name: float64, or (naive, frozen: computed in
        float64 one piece at a time) the dtype ``embed_dtype`` gives."""
        raise NotImplementedError

    def embed_dtype(self, name: str) -> torch.dtype:
        """The dtype an elementwise embedding of a parameter is kept in: the model's own
        float32 or float64, float32 for half-precision parameters (the evaluation rounds
        it to the model's dtype; the sums that build it run in float64)."""
        dtype = self.training.dtypes.get(name, torch.float32)
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def streamed(self, name: str, fn: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """One parameter's embedding built from fn(start, stop), its flat elements
        start..stop (float64), CHUNK elements at a time, kept in ``embed_dtype``."""
        shape = self.training.trainable[name]
        n = math.prod(shape)
        step = min(CHUNK, max(MIN_CHUNK, self.training.n_params // 32))
        out = torch.empty(n, dtype=self.embed_dtype(name), device=self.stages.device)
        for a in range(0, n, step):
            b = min(n, a + step)
            out[a:b] = fn(a, b)
        return out.reshape(shape)

    def warnings(self) -> list[str]:
        """What the user should know about the embeddings computed so far."""
        return []


class Stages:
    """Per-stage pieces shared by the estimators: Delta_k, delta_b_k and Adam's frozen
    preconditioner, read from the files one parameter (or a flat slice start..stop of one
    parameter) at a time; nothing is kept between calls."""

    def __init__(self, runs: list[StageRun], trainable: dict[str, tuple[int, ...]],
                 device: torch.device | None = None) -> None:
        self.runs = runs
        self.trainable = trainable
        self.device = device or torch.device("cpu")
        self.groups = [r.state.group_of() for r in runs]

    def release(self) -> None:
        """Close every stage's checkpoint and optimizer state files (each is opened again
        when next read): an embedding holds only the files it reads while it is built."""
        for r in self.runs:
            for reader in (r.start, r.end, *(c for _, c in r.checkpoints)):
                reader.release()
            r.state.release()

    def held(self) -> int:
        """File handles, parsed headers and optimizer state tensors held open by every
        stage's files (0 after ``release`` where every file can be read in place)."""
        return sum(reader.held() for r in self.runs
                   for reader in {id(x): x for x in (r.start, r.end,
                                                    *(c for _, c in r.checkpoints))}.values()
                   ) + sum(r.state.held() for r in self.runs)

    def delta(self, k: int, name: str, start: int | None = None,
              stop: int | None = None) -> torch.Tensor:
        """Delta_k for one parameter (flat elements start..stop of it), float64."""
        run = self.runs[k]

        def read(reader: StateDictReader) -> torch.Tensor:
            t = reader.get(name) if start is None else reader.get_flat(
                name, start, stop if stop is not None else math.prod(self.trainable[name]))
            return t.to(self.device)

        # the start is promoted element by element inside the subtraction: the same bits
        # as end.double() - start.double(), without a float64 copy of the start (copy=True:
        # a float64 tensor of a .pt reader is its own, never written)
        return read(run.end).to(torch.float64, copy=True).sub_(read(run.start))

    def deltas(self, k: int) -> Params:
        """Delta_k for every trainable parameter (the naive embedding)."""
        return {name: self.delta(k, name) for name in self.trainable}

    def delta_state(self, k: int, name: str, start: int | None = None,
                    stop: int | None = None) -> torch.Tensor | None:
        """delta_b_k: first-moment state at the end of stage k minus at the end of stage k-1
        (flat elements start..stop of it).

        Needed only when stage k+1 continues stage k's optimizer state; None otherwise.
        """
        if k + 1 >= len(self.runs) or self.runs[k + 1].fresh:
            return None
        run, nxt = self.runs[k], self.runs[k + 1]
        key = FIRST_MOMENT[run.opt_type]
        if run.state.source is None:
            raise CheckpointError(
                f"stage '{nxt.name}' continues the optimizer state of stage '{run.name}', so "
                f"stage '{run.name}' needs optimizer.state (its {key} at the end)",
                "add optimizer.state to that stage, or set continues: false if it did not")
        now = run.state.tensor(name, key, start, stop)
        before = None
        if k > 0 and self.runs[k - 1].opt_type == nxt.opt_type:
            prev = self.runs[k - 1]
            if prev.state.source is None:
                raise CheckpointError(
                    f"skipping stage '{run.name}' makes stage '{nxt.name}' continue the state "
                    f"of stage '{prev.name}', which has no optimizer.state",
                    f"add optimizer.state to stage '{prev.name}'")
            before = prev.state.tensor(name, key, start, stop)
        if now is None and before is None:
            return None
        shape = self.trainable[name] if start is None else (
            len(range(math.prod(self.trainable[name]))[start:stop]),)
        zero = torch.zeros(shape, dtype=torch.float64, device=self.device)
        return (now.to(self.device).double() if now is not None else zero) - (
            before.to(self.device).double() if before is not None else zero)

    def preconditioner(self, j: int, name: str, start: int | None = None,
                       stop: int | None = None) -> torch.Tensor:
        """Stage j's frozen Adam preconditioner for one parameter (flat elements start..stop
        of it), float64, from its state file (read again on every call: not kept)."""
        run = self.runs[j]
        hp = run.state.groups[self.groups[j][name]]
        # amsgrad divides by the running maximum of the second moment
        moment = "max_exp_avg_sq" if hp.amsgrad else "exp_avg_sq"
        v = run.state.tensor(name, moment, start, stop)
        if v is None:
            why = "there is none" if run.state.source is None else "it lacks that tensor"
            raise CheckpointError(
                f"stage '{run.name}': the estimator needs the Adam second moment "
                f"({moment}) of '{name}' from optimizer.state, and {why}",
                "give the stage's optimizer.state (its optimizer.pt at the stage's end)")
        step = run.state.step if run.state.step is not None else run.step0 + run.steps
        return adam_preconditioner(v.to(self.device), step, hp.beta2, hp.eps)

"""The command line's shared options: the choices (enums), the option declarations that
several commands take, and what they become (Runtime, UnrolledConfig). No torch here, so
``acctattr --help`` starts fast."""

from __future__ import annotations

from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from acctattr.distributed import from_env
from acctattr.errors import AcctattrError
from acctattr.options import Runtime, UnrolledConfig

UNROLLED = UnrolledConfig()


class Format(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"


class TableOrJson(str, Enum):
    table = "table"
    json = "json"


class Estimator(str, Enum):
    auto = "auto"
    naive = "naive"
    frozen = "frozen"
    unrolled = "unrolled"


class Concrete(str, Enum):
    """The estimators validate can measure (auto is a choice among them)."""

    naive = "naive"
    frozen = "frozen"
    unrolled = "unrolled"


class HessianAt(str, Enum):
    start = "start"
    end = "end"
    halves = "split"  # (a member named "split" would shadow str.split)
    interpolate = "interpolate"


HESSIAN_AT_DEFAULT = HessianAt(UNROLLED.hessian_at)


class Dynamics(str, Enum):
    flow = "flow"
    linear = "linear"


DYNAMICS_DEFAULT = Dynamics(UNROLLED.sgd_dynamics)


class Evaluate(str, Enum):
    linear = "linear"
    direct = "direct"


ManifestArg = Annotated[Path, typer.Argument(
    help="The run's manifest.yaml.", metavar="MANIFEST", show_default=False)]


DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="cpu|cuda|cuda:N|mps|auto",
    help="Where the model runs. auto: the CUDA GPU when there is one, else the CPU.",
    rich_help_panel="Compute")]


ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", min=1, max=4096, metavar="N",
    help="CPU threads. Default: OMP_NUM_THREADS when set, else the CPUs other processes "
         "leave idle (at least 1). Results do not depend on it.",
    rich_help_panel="Compute", show_default=False)]


BatchOpt = Annotated[int | None, typer.Option(
    "--batch-size", min=1, metavar="N", help="Eval batch size (default: eval.batch_size).",
    rich_help_panel="Compute", show_default=False)]


EmbeddingsOpt = Annotated[Path | None, typer.Option(
    "--embeddings", metavar="DIR",
    help="Evaluate the stage embeddings `acctattr embed` wrote to DIR instead of computing "
         "them (refused when an input changed or DIR holds another estimator).",
    show_default=False)]


def make_runtime(device: str, threads: int | None, batch_size: int | None,
             check: bool = False) -> Runtime:
    """The compute options; the thread count defaults as devices.default_threads says.
    ``check``: resolve --device now, so a wrong one fails before any computing."""
    from acctattr.devices import default_threads, resolve

    if check:
        resolve(device, from_env()[2])
    return Runtime(device=device, threads=threads or default_threads(), batch_size=batch_size)


def unrolled_config(lanczos_iters: int, sample_size: int, dynamics: Dynamics,
                     flow_substeps: int, hessian_at: HessianAt | None,
                     substeps: int | None) -> UnrolledConfig:
    """The unrolled options as a config; linear-only options with flow are an error."""
    if dynamics is Dynamics.flow and (hessian_at is not None or substeps is not None):
        given = "--hessian-at" if hessian_at is not None else "--substeps"
        raise AcctattrError(f"{given} applies to --dynamics linear, not flow",
                            f"drop {given}, or add --dynamics linear")
    return replace(UNROLLED, lanczos_iters=lanczos_iters, sample_size=sample_size,
                   sgd_dynamics=dynamics.value, adam_dynamics=dynamics.value,
                   flow_substeps=flow_substeps,
                   hessian_at=(hessian_at or HESSIAN_AT_DEFAULT).value,
                   substeps=substeps if substeps is not None else UNROLLED.substeps)


# the options embed and ablate share (run and validate spell theirs out with their own help)
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]


ProgressOpt = Annotated[bool, typer.Option(
    "--progress", help="Progress on stderr even when it is not a terminal.")]


LanczosOpt = Annotated[int, typer.Option(
    min=1, help="unrolled: most Lanczos iterations (HVPs) per propagation.",
    rich_help_panel="Unrolled estimator")]


SampleSizeOpt = Annotated[int, typer.Option(
    min=1, help="unrolled: training examples per later stage for its curvature.",
    rich_help_panel="Unrolled estimator")]


DynamicsOpt = Annotated[Dynamics, typer.Option(
    help="unrolled: flow or linear (as for run).", rich_help_panel="Unrolled estimator")]


FlowSubstepsOpt = Annotated[int, typer.Option(
    min=1, help="unrolled, flow: substeps per later stage.",
    rich_help_panel="Unrolled estimator")]


HessianAtOpt = Annotated[HessianAt | None, typer.Option(
    help="unrolled, linear: where along a segment the Hessian is taken.",
    rich_help_panel="Unrolled estimator", show_default=False)]


SubstepsOpt = Annotated[int | None, typer.Option(
    min=1, help="unrolled, linear: integrator substeps per segment.",
    rich_help_panel="Unrolled estimator", show_default=False)]

"""The command line: parse options, call the pipeline, render.

The one place that turns AcctattrError into an exit code (2), a tripped gate into 1,
Ctrl-C into 130 and SIGTERM into 143 (acctattr.signals; the boundary is cli_io.guarded).
Results go to stdout; progress, warnings and errors to stderr, with control characters of
user strings escaped. The shared options are in cli_options.py; embed and ablate in
cli_embed.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from acctattr import signals
from acctattr.cli_embed import ablate, embed
from acctattr.cli_io import (
    check_output,
    emit,
    err,
    guarded,
    manifest_inputs,
    refuse_inputs,
    terminal_width,
    use_color,
)
from acctattr.cli_options import (
    DYNAMICS_DEFAULT,
    UNROLLED,
    BatchOpt,
    Concrete,
    DeviceOpt,
    Dynamics,
    EmbeddingsOpt,
    Estimator,
    Evaluate,
    Format,
    HessianAt,
    ManifestArg,
    TableOrJson,
    ThreadsOpt,
    make_runtime,
    unrolled_config,
)
from acctattr.distributed import is_primary
from acctattr.errors import AcctattrError
from acctattr.output.atomic import check_target

if TYPE_CHECKING:
    from acctattr.results import Result


app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Which training stage is accountable for how a model behaves.",
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("acctattr")
        except PackageNotFoundError:
            from acctattr import __version__ as text
        print(f"acctattr {text}")
        raise typer.Exit(0)


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="Print acctattr's version and exit.")] = False) -> None:
    """Which training stage is accountable for how a model behaves."""


@app.command()
def run(
    manifest: ManifestArg,
    format: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] =
    Format.table,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the result to FILE (atomically) instead of stdout.")] = None,
    estimator: Annotated[Estimator, typer.Option(
        help="How to estimate each stage's embedding. auto: unrolled when every later stage "
             "has training data (data:), else frozen.")] = Estimator.auto,
    evaluate: Annotated[Evaluate | None, typer.Option(
        help="linear: JVP along v_k; direct: f(theta_T) - f(theta_T - v_k). Default: the "
             "estimator's best on the fidelity bench (naive/frozen: linear, unrolled: direct).",
        show_default=False)] = None,
    per_example: Annotated[bool, typer.Option(
        "--per-example", help="Include every eval example's effects (JSON).")] = False,
    fail_on_harm: Annotated[float | None, typer.Option(
        "--fail-on-harm", metavar="X",
        help="Exit 1 when a stage made the metric worse by more than X (the point estimate; "
             "--confidence C asks for that with confidence C over eval examples).")]
    = None,
    confidence: Annotated[float, typer.Option(
        "--confidence", metavar="C",
        help="Trip --fail-on-harm only when harm - z_C * standard error > X (one-sided); "
             "0.5, the default, gates on the point estimate, 0.95 guards against eval-set "
             "noise.")] = 0.5,
    gate_stage: Annotated[str | None, typer.Option(
        "--gate-stage", metavar="NAME|newest",
        help="Gate only this stage (newest: the last in training order). Default: all.")]
    = None,
    gate_group: Annotated[str | None, typer.Option(
        "--gate-group", metavar="NAME|worst",
        help="Gate this eval group's harm (worst: every group). Default: all examples.")]
    = None,
    gate_behaviour: Annotated[str | None, typer.Option(
        "--gate-behaviour", metavar="NAME",
        help="With several behaviours (evals:), gate only this one. Default: every one.")]
    = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", metavar="FILE.png|FILE.svg",
        help="Also draw the effects (needs matplotlib: pip install "
             "'acctattr\\[plot]').")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
    show_progress: Annotated[bool, typer.Option(
        "--progress", help="Progress on stderr even when it is not a terminal (a CI log); "
        "on a terminal it is shown unless -q.")] = False,
    lanczos_iters: Annotated[int, typer.Option(
        min=1, help="unrolled: most Lanczos iterations (HVPs) per propagation.",
        rich_help_panel="Unrolled estimator")] = UNROLLED.lanczos_iters,
    sample_size: Annotated[int, typer.Option(
        min=1, help="unrolled: training examples per later stage for its curvature.",
        rich_help_panel="Unrolled estimator")] = UNROLLED.sample_size,
    dynamics: Annotated[Dynamics, typer.Option(
        help="unrolled: simulate both runs through each later stage (flow) or propagate "
             "by the linearised dynamics (linear).",
        rich_help_panel="Unrolled estimator")] = DYNAMICS_DEFAULT,
    flow_substeps: Annotated[int, typer.Option(
        min=1, help="unrolled, flow: substeps per later stage (4x where the Adam flow "
                    "keeps its first moment).",
        rich_help_panel="Unrolled estimator")] = UNROLLED.flow_substeps,
    hessian_at: Annotated[HessianAt | None, typer.Option(
        help=f"unrolled, linear: where along a segment the Hessian is taken "
             f"(default {UNROLLED.hessian_at}).",
        rich_help_panel="Unrolled estimator", show_default=False)] = None,
    substeps: Annotated[int | None, typer.Option(
        min=1, help=f"unrolled, linear: integrator substeps per segment (with --hessian-at "
                    f"interpolate; default {UNROLLED.substeps}).",
        rich_help_panel="Unrolled estimator", show_default=False)] = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    batch_size: BatchOpt = None,
    embeddings: EmbeddingsOpt = None,
) -> None:
    """Estimate every stage's effect on the eval set and print them ranked.

    Under torchrun (torchrun --nproc-per-node N -m acctattr run ...) the processes share
    the work; rank 0 alone prints and writes, and every rank exits with the same code.
    """

    def go() -> None:
        from acctattr import pipeline
        from acctattr.output import report
        from acctattr.output.progress import progress_bar

        check_output(output)
        if output is not None and plot is not None and output.resolve() == plot.resolve():
            raise AcctattrError(f"--output {output} and --plot {plot} name the same file; the "
                                "plot would replace the result", "give each its own file")
        inputs = manifest_inputs(manifest) + ([embeddings] if embeddings is not None else [])
        refuse_inputs(output, inputs, root=manifest.resolve().parent)
        refuse_inputs(plot, inputs, "--plot", root=manifest.resolve().parent)
        _check_gate_options(manifest, fail_on_harm, confidence, gate_stage, gate_group)
        _check_gate_behaviour(manifest, fail_on_harm, gate_behaviour)
        if plot is not None:
            from acctattr.output import plots

            plots.check_target(plot)
        config = unrolled_config(lanczos_iters, sample_size, dynamics, flow_substeps,
                                  hessian_at, substeps)
        runtime = make_runtime(device, threads, batch_size, check=True)
        if per_example and format is not Format.json:
            err(f"warning: --per-example adds every example's effects to JSON only; the "
                 f"{format.value} output shows stages and groups (use --format json)")
        with progress_bar(not quiet and is_primary(), show_progress) as progress:
            result = pipeline.run(manifest, estimator.value,
                                  evaluate.value if evaluate else None, per_example, progress,
                                  config, runtime, embeddings)
        gate = None
        if result.behaviours is not None:
            _several(result, format, output, plot, confidence, fail_on_harm, gate_stage,
                     gate_group, gate_behaviour)
            return
        if fail_on_harm is not None:
            from acctattr.output import gates

            gate = gates.evaluate(result, fail_on_harm, confidence, gate_stage, gate_group)
        if result.estimator_note:
            err(f"estimator: {result.estimator} ({result.estimator_note})")
        for w in result.warnings:
            err(f"warning: {w}")
        if format is Format.json:
            text = report.to_json(result, gate)
        elif format is Format.markdown:
            text = report.to_markdown(result, gate)
        else:
            color = use_color(output)
            text = report.to_table(result, color=color, width=terminal_width(output))
        emit(text, output)
        if plot is not None and is_primary():
            plots.render(result, plot, confidence)
            err(f"wrote {plot}")
        if gate is not None:
            from acctattr.output.gates import describe

            err(describe(gate, result.metric))
            if gate.tripped:
                raise typer.Exit(1)

    guarded(go)


def _several(result: Result, format: Format, output: Path | None, plot: Path | None,
             confidence: float, fail_on_harm: float | None, gate_stage: str | None,
             gate_group: str | None, gate_behaviour: str | None) -> None:
    """Render a run over several behaviours (evals:): one table per behaviour and a stage ×
    behaviour summary (JSON acctattr.effects/2); gate each behaviour asked, exit 1 on any."""
    from acctattr.output import gates, report

    assert result.behaviours is not None
    checked = {}
    if fail_on_harm is not None:
        checked = {name: gates.evaluate(r, fail_on_harm, confidence, gate_stage, gate_group)
                   for name, r in result.behaviours if gate_behaviour in (None, name)}
    if result.estimator_note:
        err(f"estimator: {result.estimator} ({result.estimator_note})")
    shown: list[str] = []
    for name, r in result.behaviours:
        for w in r.warnings:
            shared = all(w in other.warnings for _, other in result.behaviours)
            line = f"warning: {w}" if shared else f"warning: behaviour {name}: {w}"
            if line not in shown:
                shown.append(line)
                err(line)
    if format is Format.json:
        text = report.behaviours_to_json(result, checked, gate_behaviour)
    elif format is Format.markdown:
        text = report.behaviours_to_markdown(result, checked)
    else:
        text = report.behaviours_to_table(result, color=use_color(output),
                                          width=terminal_width(output))
    emit(text, output)
    if plot is not None and is_primary():
        from acctattr.output import plots

        for name, r in result.behaviours:
            target = plot.with_name(f"{plot.stem}.{name}{plot.suffix}")
            plots.render(r, target, confidence)
            err(f"wrote {target}")
    for name, gate in checked.items():
        err(f"behaviour {name}: {gates.describe(gate, dict(result.behaviours)[name].metric)}")
    if any(g.tripped for g in checked.values()):
        raise typer.Exit(1)


def _check_gate_behaviour(manifest: Path, fail_on_harm: float | None,
                          gate_behaviour: str | None) -> None:
    """A --gate-behaviour that names no behaviour, or comes without --fail-on-harm, fails
    before any computing (exit 2)."""
    if gate_behaviour is None:
        return
    if fail_on_harm is None:
        raise AcctattrError("--gate-behaviour chooses what --fail-on-harm checks",
                            "add --fail-on-harm X")
    from acctattr.runs.manifest import load_manifest

    names = [n for n, _ in load_manifest(manifest).behaviours]
    if gate_behaviour not in names:
        raise AcctattrError(f"--gate-behaviour {gate_behaviour!r}: {manifest} has no behaviour "
                            "of that name", f"choose one of {', '.join(names)}")


def _check_paths(paths: list[Path], what: str) -> None:
    """Paths the OS cannot use (symlink loop, NUL, too long) or that are FIFOs or devices
    are refused before anything reads them; a missing one is left to the command."""
    from acctattr.files import path_problem

    for p in paths:
        problem = path_problem(p)
        if problem is not None and problem != "not found":
            raise AcctattrError(f"{what} {p}: {problem}")


def _check_workdir(workdir: Path | None) -> None:
    """--workdir: an existing folder, or one that can be created, that takes new files."""
    if workdir is None:
        return
    from acctattr.files import path_problem

    folder = workdir
    while path_problem(folder) == "not found" and folder.parent != folder:
        folder = folder.parent  # the nearest existing ancestor is where it will be made
    problem = path_problem(folder, "folder")
    if problem is not None:
        raise AcctattrError(f"--workdir {workdir}: {folder}: {problem}",
                            "name a folder (or a new one) where replay may write")
    check_target(folder / ".acctattr-workdir-probe", "--workdir")


def _check_gate_options(manifest: Path, fail_on_harm: float | None, confidence: float,
                        gate_stage: str | None, gate_group: str | None) -> None:
    """Bad gate options fail before any computing (exit 2)."""
    from acctattr.output import gates

    gates.z_value(confidence)
    if fail_on_harm is None:
        if gate_stage is not None or gate_group is not None:
            raise AcctattrError("--gate-stage and --gate-group choose what --fail-on-harm "
                                "checks", "add --fail-on-harm X")
        return
    gates.check_threshold(fail_on_harm)
    if gate_stage is not None or gate_group is not None:
        from acctattr.evaluation.data import group_names
        from acctattr.runs.manifest import load_manifest

        m = load_manifest(manifest)
        gates.check_stage_name(gate_stage, [s.name for s in m.stages])
        if gate_group is not None:
            gates.check_group_name(gate_group, m.eval.group is not None,
                                   group_names(m.eval))


# embed and ablate (cli_embed.py) come after run in the command list
app.command()(embed)
app.command()(ablate)


@app.command()
def validate(
    manifest: ManifestArg,
    estimator: Annotated[list[Concrete] | None, typer.Option(
        "--estimator", help="Estimators to measure (repeat the option). Default: every one "
        "the manifest allows.", show_default=False)] = None,
    format: Annotated[TableOrJson, typer.Option("--format", "-f", help="Output format.")] =
    TableOrJson.table,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the table to FILE (atomically) instead of stdout.")]
    = None,
    workdir: Annotated[Path | None, typer.Option(
        help="Where replay writes its checkpoints (default: a temporary folder, removed "
             "afterwards).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
    show_progress: Annotated[bool, typer.Option(
        "--progress", help="Progress on stderr even when it is not a terminal.")] = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    batch_size: BatchOpt = None,
) -> None:
    """Retrain with each stage skipped (the manifest's replay) and measure every estimator."""

    def go() -> None:
        from acctattr import validation
        from acctattr.output import report
        from acctattr.output.progress import progress_bar

        check_output(output)
        if output is not None and workdir is not None and output.resolve() == workdir.resolve():
            # the workdir is made first: the result would find a folder after the retraining
            raise AcctattrError(f"--output {output} and --workdir {workdir} name the same path",
                                "name a file for --output and a folder for --workdir")
        inputs = manifest_inputs(manifest)
        refuse_inputs(output, inputs, root=manifest.resolve().parent)
        # replay writes its checkpoints there: never into (or as) a checkpoint folder
        refuse_inputs(workdir, inputs, "--workdir", root=manifest.resolve().parent)
        _check_workdir(workdir)
        chosen = None
        if estimator:
            chosen = tuple(e.value for e in estimator)
        runtime = make_runtime(device, threads, batch_size, check=True)
        with progress_bar(not quiet, show_progress) as progress:
            v = validation.validate(manifest, chosen, workdir=workdir, progress=progress,
                                    runtime=runtime)
        if format is TableOrJson.json:
            text = report.validation_to_json(v)
        else:
            color = use_color(output)
            text = report.validation_to_table(v, color=color, width=110)
        emit(text, output)

    guarded(go)


@app.command()
def diff(
    old: Annotated[Path, typer.Argument(help="The earlier result (acctattr run --format json).",
                                        show_default=False)],
    new: Annotated[Path, typer.Argument(help="The later result.", show_default=False)],
    format: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] =
    Format.table,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the diff to FILE (atomically) instead of stdout.")] = None,
    fail_on_growth: Annotated[float | None, typer.Option(
        "--fail-on-growth", metavar="X",
        help="Exit 1 when a stage in both results now makes the metric worse by more than "
             "X beyond before.")] = None,
) -> None:
    """Compare two result JSONs stage by stage (matched by name) and group by group."""

    def go() -> None:
        from acctattr.output import diff as diffs
        from acctattr.output import report

        check_output(output)
        refuse_inputs(output, [old, new])
        d = diffs.compare(diffs.load(old), diffs.load(new), fail_on_growth)
        for w in d.warnings:
            err(f"warning: {w}")
        if format is Format.json:
            text = report.diff_to_json(d)
        elif format is Format.markdown:
            text = report.diff_to_markdown(d)
        else:
            color = use_color(output)
            text = report.diff_to_table(d, color=color)
        emit(text, output)
        if fail_on_growth is not None:
            err(report.describe_growth(d))
            if d.tripped:
                raise typer.Exit(1)

    guarded(go)


@app.command()
def check(manifest: ManifestArg) -> None:
    """Validate the manifest and every file it names, listing every problem at once."""

    def go() -> None:
        from acctattr import pipeline

        # every checkpoint's tensors read once, and the later stages' training data as
        # unrolled samples it: what `run` would meet minutes in is found here
        loaded = pipeline.check(manifest, scan=True, more=pipeline.check_training_data)
        stages = ", ".join(r.name for r in loaded.runs)
        n_params = sum(_numel(s) for s in loaded.info.trainable.values())
        evals = f"eval data {loaded.evaluator.data.source}"
        if len(loaded.evaluators) > 1:
            evals = f"{len(loaded.evaluators)} behaviours (" + ", ".join(
                f"{n}: {e.data.source}" for n, e in loaded.evaluators.items()) + ")"
        emit(f"ok: {manifest}: {len(loaded.runs)} stages ({stages}), {n_params:,} trainable "
              f"parameters, {evals}\n", None)
        for w in loaded.warnings:
            err(f"warning: {w}")

    guarded(go)


@app.command()
def init(
    paths: Annotated[list[Path], typer.Argument(
        help="Each stage's end checkpoint, in training order, or a folder holding them: "
             "Hugging Face Trainer output_dirs (checkpoint-N/ inside) or checkpoint-N "
             "folders, PEFT adapter folders, Lightning .ckpt files or folders of them, a run "
             "root with one folder per stage, weight folders.",
        metavar="PATH...", show_default=False)],
    start: Annotated[Path | None, typer.Option(
        help="The checkpoint before the first stage.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the manifest to FILE (atomically) instead of stdout.")]
    = None,
) -> None:
    """Draft a manifest from checkpoints; what they do not say is left as TODO(acctattr).

    PATH: each stage's end, in training order, or a folder holding stages: a Hugging Face
    Trainer output_dir (its last checkpoint-N is the end, the others intermediate
    checkpoints), a run root with one folder per stage, a PEFT adapter folder, a folder of
    Lightning .ckpt files, a folder of weights.
    """

    def go() -> None:
        from acctattr.runs.scaffold import scaffold

        _check_paths([*paths, *([start] if start is not None else [])], "acctattr init:")
        check_output(output)
        # a new manifest beside (or inside) the run folder it scans is what init is for
        refuse_inputs(output, [*paths, *([start] if start is not None else [])], inside=False)
        root = output.resolve().parent if output is not None else Path.cwd()
        text = scaffold(list(paths), start, root)
        emit(text, output)
        n = text.count("TODO(acctattr):")
        if n and is_primary():
            err(f"{n} placeholder(s) to fill in; `acctattr check` lists them")

    guarded(go)


@app.command()
def schema(
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the schema to FILE (atomically) instead of stdout.")]
    = None,
) -> None:
    """Print the manifest's JSON Schema, for editors: save it and start a manifest with
    # yaml-language-server: $schema=acctattr.schema.json"""

    def go() -> None:
        from acctattr.runs.schema import schema_text

        check_output(output)
        emit(schema_text(), output)

    guarded(go)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main() -> None:
    """The console command (via acctattr.__main__, which handles signals from the start)."""
    signals.install()
    try:
        app()
    except SystemExit as e:
        got = signals.received()
        if got is None:
            raise
        if e.code != signals.EXIT_CODES[got]:
            # a signal while typer parsed the command line (click calls it "Aborted!")
            err(signals.WORDS[got])
        signals.exit_now(got)
    except (KeyboardInterrupt, signals.Terminated):
        signals.say_and_exit()


if __name__ == "__main__":
    main()

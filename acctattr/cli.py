"""The command line: parse options, call the pipeline, render.

The one place that turns AcctattrError into an exit code (2), a tripped gate into 1, and
Ctrl-C into 130. Results go to stdout; progress, warnings and errors to stderr.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from acctattr.atomic import write_atomic
from acctattr.errors import AcctattrError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Which training stage is accountable for how a model behaves.",
)
T = TypeVar("T")


class Format(str, Enum):
    table = "table"
    json = "json"


class Estimator(str, Enum):
    naive = "naive"
    frozen = "frozen"


class Evaluate(str, Enum):
    linear = "linear"
    direct = "direct"


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def guarded(fn: Callable[[], T]) -> T:
    """The error boundary: bad input -> exit 2 with a message, Ctrl-C -> 130, no traceback."""
    debug = bool(os.environ.get("ACCTATTR_DEBUG"))
    try:
        return fn()
    except AcctattrError as e:
        if debug:
            traceback.print_exc()
        _err(f"error: {e}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        _err("interrupted")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as e:
        if debug:
            traceback.print_exc()
        _err(f"internal error: {type(e).__name__}: {e}\n  this is a bug in acctattr; rerun "
             "with ACCTATTR_DEBUG=1 for the traceback and report it")
        raise typer.Exit(3) from None


ManifestArg = Annotated[Path, typer.Argument(help="The run's manifest.yaml.", show_default=False)]


@app.command()
def run(
    manifest: ManifestArg,
    format: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] =
    Format.table,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the result to FILE (atomically) instead of stdout.")] = None,
    estimator: Annotated[Estimator, typer.Option(help="How to estimate each stage's embedding.")]
    = Estimator.frozen,
    evaluate: Annotated[Evaluate, typer.Option(
        help="linear: JVP along v_k; direct: f(theta_T) - f(theta_T - v_k).")] = Evaluate.linear,
    per_example: Annotated[bool, typer.Option(
        "--per-example", help="Include every eval example's effects (JSON).")] = False,
    fail_on_harm: Annotated[float | None, typer.Option(
        "--fail-on-harm", metavar="X",
        help="Exit 1 when a stage made the metric worse by more than X.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
) -> None:
    """Estimate every stage's effect on the eval set and print them ranked."""

    def go() -> None:
        from acctattr import pipeline, report

        with report.progress_bar(not quiet) as progress:
            result = pipeline.run(manifest, estimator.value, evaluate.value, per_example,
                                  progress)
        for w in result.warnings:
            _err(f"warning: {w}")
        if format is Format.json:
            text = report.to_json(result)
        else:
            color = output is None and sys.stdout.isatty() and "NO_COLOR" not in os.environ
            text = report.to_table(result, color=color)
        if output is not None:
            write_atomic(output, text)
            _err(f"wrote {output}")
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        if fail_on_harm is not None:
            worst = max(result.stages, key=lambda s: result.harm(s.effect))
            harm = result.harm(worst.effect)
            if harm > fail_on_harm:
                _err(f"gate tripped: stage '{worst.name}' made {result.metric} worse by "
                     f"{harm:.4g} > {fail_on_harm:g}")
                raise typer.Exit(1)
            _err(f"gate passed: no stage made {result.metric} worse by more than "
                 f"{fail_on_harm:g} (worst: '{worst.name}', {harm:+.4g})")

    guarded(go)


@app.command()
def check(manifest: ManifestArg) -> None:
    """Validate the manifest and every file it names, listing every problem at once."""

    def go() -> None:
        from acctattr import pipeline

        loaded = pipeline.check(manifest)
        stages = ", ".join(r.name for r in loaded.runs)
        n_params = sum(_numel(s) for s in loaded.info.trainable.values())
        print(f"ok: {manifest}: {len(loaded.runs)} stages ({stages}), "
              f"{n_params:,} trainable parameters, eval data {loaded.evaluator.data.source}")
        for w in loaded.warnings:
            _err(f"warning: {w}")

    guarded(go)


@app.command()
def init(
    paths: Annotated[list[Path], typer.Argument(
        help="Each stage's end checkpoint, in training order: Hugging Face Trainer folders, "
             "PEFT adapter folders, Lightning .ckpt files, weight folders.",
        show_default=False)],
    start: Annotated[Path | None, typer.Option(
        help="The checkpoint before the first stage.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the manifest to FILE (atomically) instead of stdout.")]
    = None,
) -> None:
    """Draft a manifest from checkpoints; what they do not say is left as TODO(acctattr)."""

    def go() -> None:
        from acctattr.scaffold import scaffold

        root = output.resolve().parent if output is not None else Path.cwd()
        text = scaffold(list(paths), start, root)
        if output is not None:
            write_atomic(output, text)
            _err(f"wrote {output}")
        else:
            sys.stdout.write(text)
        n = text.count("TODO(acctattr)")
        if n:
            _err(f"{n} placeholder(s) to fill in; `acctattr check` lists them")

    guarded(go)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""``acctattr embed`` and ``acctattr ablate``: stage embeddings as artifacts (a folder of
v_k, a checkpoint with a stage taken out). acctattr.cli registers them in its command
order."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from acctattr.cli_io import emit, err, guarded, manifest_inputs, refuse_inputs
from acctattr.cli_options import (
    DYNAMICS_DEFAULT,
    UNROLLED,
    BatchOpt,
    DeviceOpt,
    DynamicsOpt,
    EmbeddingsOpt,
    Estimator,
    FlowSubstepsOpt,
    HessianAtOpt,
    LanczosOpt,
    ManifestArg,
    ProgressOpt,
    QuietOpt,
    SampleSizeOpt,
    SubstepsOpt,
    ThreadsOpt,
    make_runtime,
    unrolled_config,
)
from acctattr.distributed import is_primary


def embed(
    manifest: ManifestArg,
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="DIR",
        help="The folder to write (atomically; an earlier embed folder is replaced). Never "
             "inside the run's folder.", show_default=False)],
    estimator: Annotated[Estimator, typer.Option(
        help="How to estimate each stage's embedding (as for run).")] = Estimator.auto,
    quiet: QuietOpt = False,
    show_progress: ProgressOpt = False,
    lanczos_iters: LanczosOpt = UNROLLED.lanczos_iters,
    sample_size: SampleSizeOpt = UNROLLED.sample_size,
    dynamics: DynamicsOpt = DYNAMICS_DEFAULT,
    flow_substeps: FlowSubstepsOpt = UNROLLED.flow_substeps,
    hessian_at: HessianAtOpt = None,
    substeps: SubstepsOpt = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Compute every stage's embedding v_k once and write it to DIR, for
    `acctattr run --embeddings DIR` (any eval set) and `acctattr ablate --embeddings DIR`."""

    def go() -> None:
        from acctattr import embeddings
        from acctattr.output.progress import progress_bar

        # checkpoints and data may lie outside the run's folder (absolute paths): never
        # write into them either
        refuse_inputs(output, manifest_inputs(manifest), root=manifest.resolve().parent)
        config = unrolled_config(lanczos_iters, sample_size, dynamics, flow_substeps,
                                  hessian_at, substeps)
        runtime = make_runtime(device, threads, None, check=True)
        with progress_bar(not quiet and is_primary(), show_progress) as progress:
            index = embeddings.compute(manifest, output, estimator.value, config, runtime,
                                       progress)
        est = index["estimator"]
        if est["note"]:
            err(f"estimator: {est['name']} ({est['note']})")
        for w in est["warnings"]:
            err(f"warning: {w}")
        err(f"wrote {output}: {len(index['stages'])} stage embeddings ({est['name']}), "
             f"{len(index['inputs'])} input files hashed")

    guarded(go)


def ablate(
    manifest: ManifestArg,
    stage: Annotated[str, typer.Option(
        "--stage", metavar="NAME", help="The stage to take out.", show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="OUT",
        help="Where to write the model (atomically; never inside the run's folder): a "
             "folder, or FILE.safetensors for a plain state dict.", show_default=False)],
    scale: Annotated[float, typer.Option(
        "--scale", metavar="S",
        help="Write theta_T - S * v_k: 1 removes the stage, 0 < S < 1 damps it.")] = 1.0,
    estimator: Annotated[Estimator, typer.Option(
        help="How to estimate the stage's embedding (as for run).")] = Estimator.auto,
    embeddings: EmbeddingsOpt = None,
    quiet: QuietOpt = False,
    show_progress: ProgressOpt = False,
    lanczos_iters: LanczosOpt = UNROLLED.lanczos_iters,
    sample_size: SampleSizeOpt = UNROLLED.sample_size,
    dynamics: DynamicsOpt = DYNAMICS_DEFAULT,
    flow_substeps: FlowSubstepsOpt = UNROLLED.flow_substeps,
    hessian_at: HessianAtOpt = None,
    substeps: SubstepsOpt = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    batch_size: BatchOpt = None,
) -> None:
    """Write the model as if a stage never ran (theta_T - S * v_k) in the final checkpoint's
    format, and print the eval value the estimate predicts for it (stdout)."""

    def go() -> None:
        from acctattr import ablate as ablation
        from acctattr.output.progress import progress_bar

        # a checkpoint outside the run's folder (an absolute path) is never overwritten, nor
        # the embeddings read
        refuse_inputs(output, manifest_inputs(manifest) + ([embeddings] if embeddings else []),
                      root=manifest.resolve().parent)
        config = unrolled_config(lanczos_iters, sample_size, dynamics, flow_substeps,
                                  hessian_at, substeps)
        runtime = make_runtime(device, threads, batch_size, check=True)
        with progress_bar(not quiet and is_primary(), show_progress) as progress:
            a = ablation.ablate(manifest, stage, output, scale, estimator.value, config,
                                runtime, embeddings, progress)
        if a.estimator_note:
            err(f"estimator: {a.estimator} ({a.estimator_note})")
        for w in a.warnings:
            err(f"warning: {w}")
        what = "a Hugging Face folder" if a.format == "hf" else "a safetensors state dict"
        err(f"wrote {a.written} ({what})")
        lines = [f"stage {a.stage} taken out (scale {a.scale:g}, estimator {a.estimator}); "
                 "eval value the estimate predicts for the written model:"]
        for p in a.predictions:
            lines.append(f"  {p.behaviour}: {p.metric} {p.predicted:.6g} (deployed model "
                         f"{p.final_value:.6g}, {'higher' if p.higher_is_better else 'lower'} "
                         "is better)")
        emit("\n".join(lines) + "\n", None)

    guarded(go)

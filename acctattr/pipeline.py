"""The one orchestrator: manifest -> checkpoints, optimizer state, data -> stage effects.

Doubles as the Python API::

    from acctattr.pipeline import run
    result = run("manifest.yaml", estimator="frozen", evaluate="linear")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from acctattr.behavior import (
    EvalData,
    Evaluator,
    ModelInfo,
    build_model,
    model_info,
    resolve_metric,
)
from acctattr.checkpoints import StateDictReader, open_checkpoint, read_trainer_state
from acctattr.errors import AcctattrError, CheckpointError, ManifestError
from acctattr.estimators import Embedder, StageRun
from acctattr.manifest import Manifest, Stage, load_manifest
from acctattr.optim_state import load_optimizer_state
from acctattr.schedules import interpolate_logged_lrs, lrs_from_spec

ESTIMATORS = ("naive", "frozen")
EVALUATIONS = ("linear", "direct")
Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class StageEffect:
    name: str
    rank: int
    effect: float
    verdict: str  # hurt | helped | neutral
    share: float  # |effect| / sum of |effect| over stages
    counterfactual_value: float
    groups: dict[str, float] | None


@dataclass(frozen=True)
class ExampleEffects:
    index: int
    group: str | None
    effects: dict[str, float]


@dataclass(frozen=True)
class Result:
    """Everything a report needs; report.py depends on this and nothing else."""

    metric: str
    higher_is_better: bool
    estimator: str
    evaluate: str
    n_examples: int
    final_value: float
    stages: tuple[StageEffect, ...]  # ranked
    examples: tuple[ExampleEffects, ...] | None = None
    warnings: tuple[str, ...] = ()

    def harm(self, effect: float) -> float:
        """How much an effect made the metric worse (negative: it helped)."""
        return -effect if self.higher_is_better else effect


# ---------------------------------------------------------------- loading

@dataclass
class Loaded:
    """A manifest opened for computation: model, readers, stage runs, evaluator."""

    manifest: Manifest
    model: torch.nn.Module
    info: ModelInfo
    runs: list[StageRun]
    evaluator: Evaluator
    warnings: list[str]


def _stage_lrs(stage: Stage, warnings: list[str]) -> list[float]:
    spec = stage.optimizer.lr
    steps = stage.optimizer.steps
    if spec.trainer_state is None:
        return lrs_from_spec(spec, steps)
    points, global_step = read_trainer_state(spec.trainer_state)
    last = global_step if global_step is not None else max(s for s, _ in points)
    lrs, guessed = interpolate_logged_lrs(points, last - steps, steps)
    if guessed:
        warnings.append(f"stage '{stage.name}': {guessed} of {steps} learning rates were "
                        f"interpolated between the steps logged in {spec.trainer_state}")
    return lrs


class _Readers:
    """One reader per checkpoint path, shared between a stage's end and the next's start."""

    def __init__(self) -> None:
        self._open: dict[Path, StateDictReader] = {}

    def __call__(self, path: Path) -> StateDictReader:
        if path not in self._open:
            self._open[path] = open_checkpoint(path)
        return self._open[path]


def _check_params(reader: StateDictReader, info: ModelInfo, stage: str, key: str) -> None:
    """Every trainable parameter present with the model's shape, or say which are not."""
    missing = [n for n in info.trainable if n not in reader]
    wrong = [f"{n} {reader.shape(n)} vs model {s}" for n, s in info.trainable.items()
             if n in reader and reader.shape(n) != s]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} parameter(s): {', '.join(missing[:5])}")
        if wrong:
            parts.append(f"shape differs for {len(wrong)}: {'; '.join(wrong[:5])}")
        raise CheckpointError(f"stage '{stage}': {key} {reader.path}: {' and '.join(parts)}",
                              "every checkpoint of a run must hold the same parameter names "
                              "and shapes as the model the factory builds")


def open_manifest(manifest: Manifest, collect: list[str] | None = None) -> Loaded:
    """Open everything the manifest names; with ``collect``, record problems and go on."""

    def report(err: AcctattrError) -> None:
        if collect is None:
            raise err
        if str(err) not in collect:  # a file shared by two stages is reported once
            collect.append(str(err))

    def attempt(fn: Callable[[], object]) -> object:
        try:
            return fn()
        except AcctattrError as e:
            report(e)
            return None

    warnings: list[str] = []
    model = build_model(manifest.factory)
    info = model_info(model)
    if not info.trainable:
        raise AcctattrError(f"model.factory {manifest.factory.text}: the model has no "
                            "trainable parameters")
    readers = _Readers()
    runs: list[StageRun] = []
    step0 = 0
    prev: Stage | None = None
    for stage in manifest.stages:
        opt = stage.optimizer
        start = attempt(lambda s=stage: readers(s.start))
        end = attempt(lambda s=stage: readers(s.end))
        for reader, key in ((start, "start"), (end, "end")):
            if isinstance(reader, StateDictReader):
                attempt(lambda r=reader, k=key, s=stage: _check_params(r, info, s.name, k))
        ckpts = []
        for ref in stage.checkpoints:
            r = attempt(lambda p=ref.path: readers(p))
            if isinstance(r, StateDictReader):
                attempt(lambda r=r, s=stage, st=ref.step: _check_params(
                    r, info, s.name, f"checkpoints step {st}"))
                ckpts.append((ref.step, r))
        if opt.continues and prev is not None and prev.optimizer.state is None:
            report(CheckpointError(
                f"stage '{stage.name}': optimizer.continues is true but the previous stage "
                f"'{prev.name}' has no optimizer.state, so there is no state to continue",
                f"add optimizer.state (its optimizer.pt at the end) to stage '{prev.name}', "
                "or set continues: false if this stage started a fresh optimizer"))
        if opt.continues and prev is not None and prev.optimizer.type != opt.type:
            report(CheckpointError(
                f"stage '{stage.name}': optimizer.continues is true but the previous stage "
                f"'{prev.name}' used {prev.optimizer.type}, not {opt.type}",
                "a stage can only continue the state of the same optimizer type"))
        state = attempt(lambda s=stage: load_optimizer_state(
            s.optimizer, s.name, info.trainable, set(info.no_decay)))
        if state is not None:
            for g in state.groups:  # type: ignore[attr-defined]
                if g.nesterov and (g.momentum <= 0 or g.dampening != 0):
                    report(CheckpointError(
                        f"stage '{stage.name}': optimizer.nesterov needs momentum > 0 and "
                        "dampening 0 (as torch.optim.SGD requires)"))
        lrs = attempt(lambda s=stage: _stage_lrs(s, warnings))
        if not opt.continues:
            step0 = 0
        if start is not None and end is not None and state is not None and lrs is not None:
            runs.append(StageRun(stage.name, start, end, opt.type, lrs,  # type: ignore[arg-type]
                                 not opt.continues, step0, state,  # type: ignore[arg-type]
                                 stage.data, ckpts))
        step0 += opt.steps
        prev = stage

    final = runs[-1].end if len(runs) == len(manifest.stages) else None
    evaluator = None
    data = attempt(lambda: EvalData(manifest.eval))
    metric = attempt(lambda: resolve_metric(manifest.eval.metric,
                                            manifest.eval.higher_is_better, "eval.metric"))
    if final is not None and data is not None and metric is not None:
        params = {n: final.get(n) for n in info.trainable}
        fixed = _fixed_tensors(model, final, info)
        evaluator = Evaluator(model, params, fixed, data, metric)  # type: ignore[arg-type]
    return Loaded(manifest, model, info, runs, evaluator, warnings)  # type: ignore[arg-type]


def _fixed_tensors(model: torch.nn.Module, final: StateDictReader,
                   info: ModelInfo) -> dict[str, torch.Tensor]:
    """Frozen parameters and buffers at theta_T (the model's own where not saved)."""
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    return {n: (final.get(n) if n in final else own[n].detach())
            for n in (*info.frozen, *info.buffers)}


def check(path: str | Path) -> Loaded:
    """Validate the manifest and every file it names; raise once listing every problem."""
    manifest = load_manifest(path)
    problems: list[str] = []
    try:
        loaded = open_manifest(manifest, collect=problems)
    except AcctattrError as e:
        problems.append(str(e))
        raise ManifestError(str(path), problems) from e
    if not problems and loaded.evaluator is not None:
        try:  # one forward pass on the first batch: data the model cannot take shows here
            loaded.evaluator.probe()
        except AcctattrError as e:
            problems.append(str(e))
    if problems:
        raise ManifestError(str(path), problems)
    return loaded


# ---------------------------------------------------------------- computing

def embeddings(loaded: Loaded, estimator: str):
    """Yield (stage index, v_k) one stage at a time."""
    if estimator not in ESTIMATORS:
        raise AcctattrError(f"unknown estimator {estimator!r}",
                            f"choose one of {', '.join(ESTIMATORS)}")
    embedder = Embedder(loaded.runs, loaded.info.trainable)
    for k in range(len(loaded.runs)):
        yield k, (embedder.naive(k) if estimator == "naive" else embedder.frozen(k))


def run(path: str | Path, estimator: str = "frozen", evaluate: str = "linear",
        per_example: bool = False, progress: Progress | None = None) -> Result:
    """Estimate every stage's effect on the eval set (SPEC sections 1, 2 and 5)."""
    if evaluate not in EVALUATIONS:
        raise AcctattrError(f"unknown evaluation {evaluate!r}",
                            f"choose one of {', '.join(EVALUATIONS)}")
    if estimator not in ESTIMATORS:
        raise AcctattrError(f"unknown estimator {estimator!r}",
                            f"choose one of {', '.join(ESTIMATORS)}")
    loaded = check(path)
    ev = loaded.evaluator
    base, groups = ev.values()
    names = [r.name for r in loaded.runs]
    per_stage: list[torch.Tensor] = []
    try:
        for k, v in embeddings(loaded, estimator):
            if progress:
                progress(f"stage {names[k]}", k, len(names))
            per_stage.append(ev.linear(v) if evaluate == "linear" else ev.direct(v, base))
    except AcctattrError as e:  # say which stage was being estimated (checkpoints are shared)
        if isinstance(e, ManifestError):
            raise
        stage = names[len(per_stage)]
        raise type(e)(f"while estimating stage '{stage}': {e.message}", e.hint) from e
    if progress:
        progress("done", len(names), len(names))
    return summarize(loaded, estimator, evaluate, base, groups, per_stage, per_example)


def summarize(loaded: Loaded, estimator: str, evaluate: str, base: torch.Tensor,
              groups: torch.Tensor | None, per_stage: list[torch.Tensor],
              per_example: bool) -> Result:
    """Per-example effects [K][N] -> ranked stage effects (and per-example rows)."""
    metric = loaded.evaluator.metric
    names = [r.name for r in loaded.runs]
    final = float(base.mean())
    effects = [float(e.mean()) for e in per_stage]
    total = sum(abs(x) for x in effects)
    group_ids = sorted(set(groups.tolist())) if groups is not None else []
    order = sorted(range(len(names)), key=lambda k: (-abs(effects[k]), k))
    stages = []
    for rank, k in enumerate(order, start=1):
        harm = -effects[k] if metric.higher_is_better else effects[k]
        g = None
        if groups is not None:
            g = {str(gid): float(per_stage[k][groups == gid].mean()) for gid in group_ids}
        stages.append(StageEffect(
            name=names[k], rank=rank, effect=effects[k],
            verdict="hurt" if harm > 0 else "helped" if harm < 0 else "neutral",
            share=abs(effects[k]) / total if total > 0 else 0.0,
            counterfactual_value=final - effects[k], groups=g))
    examples = None
    if per_example:
        matrix = torch.stack(per_stage).tolist()
        glist = groups.tolist() if groups is not None else None
        examples = tuple(ExampleEffects(
            index=i, group=str(glist[i]) if glist is not None else None,
            effects={names[k]: matrix[k][i] for k in range(len(names))})
            for i in range(base.shape[0]))
    return Result(metric=metric.name, higher_is_better=metric.higher_is_better,
                  estimator=estimator, evaluate=evaluate, n_examples=int(base.shape[0]),
                  final_value=final, stages=tuple(stages), examples=examples,
                  warnings=tuple(loaded.warnings))

"""The one orchestrator: manifest -> checkpoints, optimizer state, data -> stage effects.

Opening the run is loading.py's, turning effects into a Result summary.py's, validation
against retraining validation.py's; the estimators are chosen through their interface
(acctattr.estimators) without knowing their insides. Doubles as the Python API::

    from acctattr.pipeline import run
    result = run("manifest.yaml", estimator="frozen", evaluate="linear")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from acctattr import devices, distributed, estimators
from acctattr.distributed import ALONE, Ranks
from acctattr.errors import AcctattrError, DataError, ManifestError
from acctattr.estimators import Estimator, Params, StageRun, Training, Unsuitable
from acctattr.evaluation.curvature import Curvature
from acctattr.evaluation.data import Batch, stage_sample
from acctattr.evaluation.evaluator import Evaluator
from acctattr.evaluation.metrics import CLASS_METRICS, TOKEN_METRICS, Metric, resolve_metric
from acctattr.loading import Loaded, check
from acctattr.options import Runtime, UnrolledConfig
from acctattr.results import Progress, Result
from acctattr.summary import summarize

ESTIMATORS = tuple(estimators.ESTIMATORS)
T = TypeVar("T")
EVALUATIONS = ("linear", "direct")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def training(loaded: Loaded, config: UnrolledConfig | None = None) -> Training:
    """The run as the estimators see it; each stage's training-loss sample is read on first
    use (only estimators that simulate training ask for it)."""
    config = config or UnrolledConfig()
    cache: dict[int, Curvature] = {}

    def curvature(j: int) -> Curvature:
        if j not in cache:
            cache[j] = _curvature(loaded, j, config.sample_size)
            _probe_training(cache[j], loaded, loaded.runs[j])
        return cache[j]

    dtypes = {n: p.dtype for n, p in loaded.model.named_parameters()}
    return Training(loaded.runs, loaded.info.trainable, dtypes, curvature,
                    partial(_train_loss, loaded), loaded.evaluator.device)


def _train_loss(loaded: Loaded) -> Metric:
    return resolve_metric(loaded.manifest.train_loss, None, "train.loss")


def _curvature(loaded: Loaded, j: int, size: int, probe_rows: int | None = None) -> Curvature:
    """Stage j's training loss on its data sample (``size`` examples, checked as eval data
    is); ``probe_rows``: on the sample's first rows only (check_training_data)."""
    run = loaded.runs[j]
    if run.data is None:
        raise AcctattrError(
            f"stage '{run.name}': the unrolled estimator needs the stage's training "
            "data (key 'data') to measure its curvature",
            "add data: to every stage after the first, or use --estimator frozen")
    spec = loaded.manifest.eval
    loss = _train_loss(loaded)
    stage = loaded.manifest.stage(run.name)
    sample = stage_sample(
        run.data, (*spec.inputs, spec.target), size, run.name,
        extra=loss.batch_keys,
        tokens=loss.name if loss.name in TOKEN_METRICS else None,
        tokenizer=stage.tokenizer, max_length=stage.max_length,
        class_metric=loaded.manifest.train_loss in CLASS_METRICS)
    if probe_rows is not None:
        sample = _probe_sample(sample, probe_rows)
    return Curvature(loaded.model, loaded.evaluator.fixed, loss, sample,
                     spec.inputs, spec.target, device=loaded.evaluator.device)


def _probe_sample(sample: Batch, rows: int) -> Batch:
    """The sample's first ``rows`` rows, and each integer tensor's row with its largest
    value (a class id or token id the model may not have: what the probe is for)."""
    n = next(iter(sample.values())).shape[0]
    keep = set(range(min(rows, n)))
    for v in sample.values():
        if not v.is_floating_point() and v.numel() and v.dtype != torch.bool:
            keep.add(int(v.reshape(n, -1).amax(dim=1).argmax()))
    ix = torch.tensor(sorted(keep))
    return {k: v[ix] for k, v in sample.items()}


def check_training_data(loaded: Loaded, config: UnrolledConfig | None = None) -> list[str]:
    """What ``run`` (auto, unrolled) would refuse in a later stage's training data, one line
    per stage (``acctattr check``): the same sample read and checked (NaN, Inf, labels),
    and the training loss run on its first eval batch's worth of rows and its largest-id
    rows (_probe_sample; not the whole sample: a check runs about one batch per file)."""
    config = config or UnrolledConfig()
    problems: list[str] = []
    if loaded.evaluator is None:  # no model to run (problems elsewhere say why)
        return problems
    first = loaded.manifest.stages[0].name
    for j, run in enumerate(loaded.runs):
        if run.name == first or run.data is None:  # only later stages are simulated
            continue
        try:
            _probe_training(_curvature(loaded, j, config.sample_size,
                                        loaded.evaluator.data.batch_size), loaded, run)
        except AcctattrError as e:
            problems.append(str(e))
    return problems


def _probe_training(curvature: Curvature, loaded: Loaded, run: StageRun) -> None:
    """The training loss once on the stage's sample at theta_T: data the model or the loss
    cannot take (a label beyond the model's classes) is the data's fault, exit 2."""
    try:
        with torch.no_grad():
            total = curvature.value(loaded.evaluator.params)
        vals = curvature.probe(loaded.evaluator.params)
    except AcctattrError:
        raise
    except Exception as e:
        raise DataError(f"stage '{run.name}': data {run.data}: the training loss failed on "
                        f"the stage's sample: {type(e).__name__}: {str(e).splitlines()[0]}",
                        "a stage's data must hold what eval data holds: inputs the model "
                        "takes and targets the loss accepts (class ids below the number "
                        "of model outputs)") from e
    # unrolled differentiates the loss (HVPs, gradients): values it cannot differentiate
    # or that are not finite failed deep inside torch (exit 3)
    where = f"stage '{run.name}': train.loss {curvature.loss.name} on data {run.data}"
    if not isinstance(vals, torch.Tensor) or not vals.is_floating_point():
        kind = vals.dtype if isinstance(vals, torch.Tensor) else type(vals).__name__
        raise DataError(f"{where} returned {kind} values; the unrolled estimator "
                        "differentiates the training loss",
                        "return one real floating-point loss per example (a tensor)")
    if not vals.requires_grad:
        raise DataError(f"{where}: its values do not depend differentiably on the weights "
                        "(detached, or computed from argmax / comparisons); the unrolled "
                        "estimator differentiates the training loss",
                        "return the differentiable per-example loss the stage was trained on")
    if not math.isfinite(total):
        raise DataError(f"{where}: its values on the stage's sample are NaN or Inf at the "
                        f"final weights (their mean is {total})",
                        "repair those examples, or use --estimator frozen (it reads no "
                        "stage data)")


def estimator(loaded: Loaded, name: str, config: UnrolledConfig | None = None) -> Estimator:
    """The estimator ``name`` (naive | frozen | unrolled) on this run, nothing computed yet."""
    return estimators.make(name, training(loaded, config), config)


def run(path: str | Path, estimator: str = "auto", evaluate: str | None = None,
        per_example: bool = False, progress: Progress | None = None,
        config: UnrolledConfig | None = None, runtime: Runtime | None = None,
        embeddings: Path | None = None) -> Result:
    """Estimate every stage's effect on the eval set (SPEC sections 1, 2 and 5).

    Args:
        estimator: naive | frozen | unrolled | auto (the first of estimators.AUTO_ORDER
            that can run on this run, see acctattr.estimators).
        evaluate: linear | direct; None takes the estimator's own default.
        runtime: device, CPU threads, eval batch size (default: the CPU, torch's thread
            count, the manifest's batch size). Started by torchrun (WORLD_SIZE > 1), the
            processes share the work (acctattr.distributed) and each returns the whole
            result.
        embeddings: a folder written by ``acctattr embed`` (acctattr.embeddings): its
            stored v_k are evaluated instead of being computed; refused when an input
            changed or it holds another estimator than ``estimator``.
    """
    if estimator not in (*ESTIMATORS, "auto"):
        raise AcctattrError(f"unknown estimator {estimator!r}",
                            f"choose one of {', '.join(ESTIMATORS)} or auto")
    if evaluate is not None and evaluate not in EVALUATIONS:
        raise AcctattrError(f"unknown evaluation {evaluate!r}",
                            f"choose one of {', '.join(EVALUATIONS)}")
    runtime = runtime or Runtime()
    try:
        device = devices.resolve(runtime.device, distributed.from_env()[2])
    except AcctattrError as e:  # machines differ: only this rank may lack the device
        e.rank_local = True  # type: ignore[attr-defined]
        raise
    with ExitStack() as stack:
        stack.enter_context(devices.threads(runtime.threads))
        ranks = stack.enter_context(distributed.joined(device))
        loaded = ranks.together(lambda: check(path, device, runtime.batch_size))
        passed: list[str] = []  # why auto passed over the estimators before the one it took
        stored_note: str | None = None
        if embeddings is not None:
            from acctattr import embeddings as stored

            chosen, stored_note = ranks.together(lambda: stored.load(
                embeddings, loaded.manifest, loaded.info.trainable,
                [r.name for r in loaded.runs], estimator, config or UnrolledConfig()))
            tried: Iterator[Estimator] = iter(())
        else:
            available = auto_memory(device, ranks) if estimator == "auto" else None
            tried = estimators.candidates(estimator, training(loaded, config), config,
                                          available, passed)
            chosen = next(tried)  # before any work: a named estimator that cannot run is refused
        behaviours = list(loaded.evaluators.items())
        values = Bases([ev.sharded(ranks) for _, ev in behaviours])
        while True:
            modes = stage_evaluations(len(loaded.runs), evaluate or chosen.evaluate)
            try:  # each embedding computed once, then evaluated for every behaviour
                effects = _effects(loaded, chosen, modes, values, progress,
                                   ranks, [ev for _, ev in behaviours])
                break
            except Unsuitable as e:
                passed.append(e.reason)
                chosen = next(tried)
    note = estimators.auto_note(chosen, passed) if estimator == "auto" else None
    if embeddings is not None:
        note = stored_note
    results = [summarize(loaded, chosen.name, evaluate or chosen.evaluate, base, groups,
                         per_stage, per_example, note, chosen.warnings(), modes, ev)
               for (base, groups), per_stage, (_, ev) in zip(values.all(), effects,
                                                             behaviours, strict=True)]
    if len(results) == 1:
        return results[0]
    # several behaviours: the first one's result, carrying every behaviour's
    return replace(results[0], behaviours=tuple(
        (name, r) for (name, _), r in zip(behaviours, results, strict=True)))


def auto_memory(device: torch.device, ranks: Ranks = ALONE) -> int | None:
    """The memory auto lets an estimator take, in bytes (None: unknown): a GPU's own free
    memory; on the CPU MemAvailable shared by the ranks on this machine; the least over
    ranks."""
    mem = devices.gpu_free_memory(device) if device.type == "cuda" else available_memory()
    share = 1 if device.type == "cuda" else distributed.local_world()
    least = ranks.min(math.inf if mem is None else mem / share)
    return None if math.isinf(least) else int(least)


def stage_evaluations(n_stages: int, evaluate: str) -> list[str]:
    """The evaluation of each stage: ``evaluate``, except the last stage, always ``direct``.

    Nothing runs after the last stage, so every estimator's v_K is Delta_K and
    f(theta_T) - f(theta_T - Delta_K) = f(theta_T) - f(theta_start(K)) is its true effect:
    direct is exact there, while a linear JVP can be far off (digits' last stage: +0.415
    linear, +0.094 direct and retrained), which is what a CI gate on the newest stage checks.
    """
    return [evaluate] * (n_stages - 1) + ["direct"]


class Bases:
    """f_i(theta_T) and group ids of each behaviour (``Evaluator.values``), computed once,
    when first needed: by a linear evaluation's JVPs, whose primal output they are, where
    the first stage is evaluated linearly (frozen, naive), else by a forward pass of their
    own."""

    def __init__(self, evaluators: list[Evaluator]) -> None:
        """``evaluators``: each behaviour's, sharded among the ranks as the values are."""
        self.evaluators = evaluators
        self._got: list[tuple[torch.Tensor, torch.Tensor | None] | None] = \
            [None] * len(evaluators)

    def missing(self, b: int) -> bool:
        return self._got[b] is None

    def put(self, b: int, got: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        self._got[b] = got

    def get(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        got = self._got[b]
        if got is None:
            got = self._got[b] = self.evaluators[b].values()
        return got

    def all(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [self.get(b) for b in range(len(self.evaluators))]


def _effects(loaded: Loaded, estimator: Estimator, modes: list[str], bases: Bases,
             progress: Progress | None, ranks: Ranks = ALONE,
             evaluators: list[Evaluator] | None = None) -> list[list[torch.Tensor]]:
    """Per-example effects [B][K][N] of every stage on every behaviour (stage k evaluated by
    ``modes[k]``), one embedding in memory at a time, each computed once and evaluated for
    every behaviour. ``bases``: f_i(theta_T) per behaviour (filled by the first stage's
    evaluation where it is linear); ``evaluators``: the behaviours' (default the manifest's
    first).

    With several ranks: every rank builds every embedding and evaluates its share of the
    eval set; or, for an estimator with ``shard_stages``, rank r builds and evaluates (on
    the whole eval set) the stages k with k % world == r. Either way every rank ends with
    every effect.
    """
    names = [r.name for r in loaded.runs]
    by_stage = ranks.world > 1 and estimator.shard_stages
    evs = [e.whole() if by_stage else e.sharded(ranks)
           for e in (evaluators or [loaded.evaluator])]
    if progress:
        estimator.progress = partial(progress, level=1)

    def staged(k: int, fn: Callable[[], T]) -> T:
        """fn(), its errors saying which stage was being estimated (checkpoints are shared
        between stages) and ordered by stage, so ranks all raise the first stage's."""
        try:
            return fn()
        except AcctattrError as e:
            if isinstance(e, ManifestError) or getattr(e, "unstaged", False):
                raise
            error = type(e)(f"while estimating stage '{names[k]}': {e.message}", e.hint)
            error.__dict__.update({a: getattr(e, a) for a in ("shared_from", "rank_local")
                                   if hasattr(e, a)})
            error.order = k  # type: ignore[attr-defined]
            raise error from e
        except Unsuitable as e:
            e.order = k  # type: ignore[attr-defined]
            raise

    def embed(k: int) -> Params:
        if progress:
            progress(f"stage {names[k]}", k, len(names))
        return staged(k, partial(estimator.embed, k))

    def one(ev: Evaluator, b: int, k: int, v: Params) -> torch.Tensor:
        if modes[k] == "direct":
            return ev.direct(v, bases.get(b)[0])
        if not bases.missing(b):
            return ev.linear(v)
        try:
            effect, got = ev.linear_and_values(v)
        except DataError as e:
            # the eval set's own error, said as where the values are computed alone: the
            # stage being evaluated has nothing to do with it
            e.unstaged = True  # type: ignore[attr-defined]
            raise
        bases.put(b, got)
        return effect

    def evaluated(k: int, v: Params) -> list[torch.Tensor]:
        return [staged(k, partial(one, ev, b, k, v)) for b, ev in enumerate(evs)]

    if by_stage or modes[0] != "linear":
        # each behaviour's values by a pass of their own, before any stage: no collective
        # may run inside a rank's own stages (by_stage)
        bases.all()
    if by_stage:  # no collective inside: each rank's stages, then one exchange
        done: dict[int, list[torch.Tensor]] = {}
        for got in ranks.all(lambda: {k: evaluated(k, embed(k)) for k in range(len(names))
                                      if ranks.mine(k)}):
            done.update(got)
        per_stage = [done[k] for k in range(len(names))]
    else:  # one exchange for each embedding (errors), one inside each evaluation
        per_stage = [evaluated(k, ranks.together(partial(embed, k)))
                     for k in range(len(names))]
    if progress:
        progress("done", len(names), len(names))
    return [[per_stage[k][b] for k in range(len(names))] for b in range(len(evs))]


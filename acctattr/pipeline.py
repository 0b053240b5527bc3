"""The one orchestrator: manifest -> checkpoints, optimizer state, data -> stage effects.

Doubles as the Python API::

    from acctattr.pipeline import run
    result = run("manifest.yaml", estimator="frozen", evaluate="linear")
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from acctattr import devices, distributed, estimators
from acctattr.distributed import ALONE, Ranks
from acctattr.errors import AcctattrError, CheckpointError, DataError, ManifestError
from acctattr.estimators import Estimator, Params, StageRun, Training, Unsuitable
from acctattr.evaluation import fidelity
from acctattr.evaluation.curvature import Curvature
from acctattr.evaluation.data import EvalData, stage_sample
from acctattr.evaluation.evaluator import Evaluator
from acctattr.evaluation.metrics import CLASS_METRICS, TOKEN_METRICS, Metric, resolve_metric
from acctattr.evaluation.model import ModelInfo, build_model, load_ref, model_info
from acctattr.options import Runtime, UnrolledConfig
from acctattr.results import ExampleEffects, Progress, Result, StageEffect, Validation
from acctattr.runs import formats
from acctattr.runs.checkpoints import (
    FLOAT_DTYPES,
    StateDictReader,
    align_names,
    open_checkpoint,
)
from acctattr.runs.manifest import Manifest, Stage, load_manifest
from acctattr.runs.optim_state import GroupHparams, OptimizerState, load_optimizer_state
from acctattr.runs.schedules import interpolate_logged_lrs, lrs_from_spec

ESTIMATORS = tuple(estimators.ESTIMATORS)
T = TypeVar("T")
EVALUATIONS = ("linear", "direct")


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
    # every behaviour's evaluator (name -> Evaluator) in manifest order; ``evaluator`` is
    # the first. They share theta_T's tensors.
    evaluators: dict[str, Evaluator] = field(default_factory=dict)


def _stage_lrs(stage: Stage, warnings: list[str]) -> Sequence[float]:
    spec = stage.optimizer.lr
    steps = stage.optimizer.steps
    if spec.trainer_state is None:
        return lrs_from_spec(spec, steps)
    try:
        ts = formats.read_trainer_state(spec.trainer_state)
    except formats.FormatError as e:
        raise CheckpointError(f"stage '{stage.name}': optimizer.lr: {e}") from e
    if not ts.lr_points:
        raise CheckpointError(f"stage '{stage.name}': {spec.trainer_state}: log_history has no "
                              "learning_rate entries",
                              "set logging_steps so the Trainer logs the learning rate, or give "
                              "optimizer.lr as a schedule or a per-step list")
    lrs, guessed = interpolate_logged_lrs(ts.lr_points, ts.global_step - steps, steps)
    if guessed:
        warnings.append(f"stage '{stage.name}': {guessed} of {steps} learning rates were "
                        f"interpolated between the steps logged in {spec.trainer_state}")
    return lrs


class _Readers:
    """One reader per checkpoint path, shared between a stage's end and the next's start.

    Names are aligned to the model's (a ``model.`` prefix of a Lightning file is dropped).
    """

    def __init__(self, expected: list[str]) -> None:
        self._open: dict[Path, StateDictReader] = {}
        self._expected = expected

    def __call__(self, path: Path) -> StateDictReader:
        if path not in self._open:
            if formats.kind(path) == "peft-adapter":
                raise CheckpointError(f"{path} is a PEFT adapter folder, not model weights",
                                      "name it as the end of the stage that trained it: "
                                      "end: {adapter: " + str(path) + "}")
            self._open[path] = align_names(open_checkpoint(path), self._expected)
        return self._open[path]

    def put(self, path: Path, reader: StateDictReader) -> None:
        self._open[path] = reader


def _check_params(reader: StateDictReader, info: ModelInfo, stage: str, key: str) -> None:
    """Every trainable parameter present with the model's shape, or say which are not."""
    missing = [n for n in info.trainable if n not in reader]
    wrong = [f"{n} {reader.shape(n)} vs model {s}" for n, s in info.trainable.items()
             if n in reader and reader.shape(n) != s]
    dtypes = {n: reader.dtype(n) for n in info.trainable if n in reader}
    kinds = [f"{n} {d}" for n, d in dtypes.items() if d not in FLOAT_DTYPES]
    if kinds:
        raise CheckpointError(f"stage '{stage}': {key} {reader.path}: {len(kinds)} trainable "
                              f"parameter(s) are not floating point: {', '.join(kinds[:5])}",
                              "acctattr reads float16, bfloat16, float32 and float64 weights "
                              "(no integer, bool, complex or fp8 checkpoints); point the "
                              "manifest at the full-precision checkpoint")
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} parameter(s): {', '.join(missing[:5])}")
        if wrong:
            parts.append(f"shape differs for {len(wrong)}: {'; '.join(wrong[:5])}")
        raise CheckpointError(f"stage '{stage}': {key} {reader.path}: {' and '.join(parts)}",
                              "every checkpoint of a run must hold the same parameter names "
                              "and shapes as the model the factory builds")


def open_manifest(manifest: Manifest, collect: list[str] | None = None,
                  device: torch.device | None = None, batch_size: int | None = None) -> Loaded:
    """Open everything the manifest names; with ``collect``, record problems and go on.

    Args:
        device: where the model is evaluated (theta_T is moved there); default the CPU.
        batch_size: overrides eval.batch_size.
    """
    device = device or torch.device("cpu")

    def report(err: AcctattrError) -> None:
        if collect is None:
            raise err
        if str(err) not in collect:  # a file shared by two stages is reported once
            collect.append(str(err))

    def attempt(fn: Callable[..., object]) -> object:
        try:
            return fn()
        except AcctattrError as e:
            report(e)
            return None

    warnings: list[str] = []
    if manifest.hf is not None:
        from acctattr.runs.hf import build_hf_model

        model = build_hf_model(manifest.hf, manifest.hf_class)
        source = f"model.hf {manifest.hf}"
    else:
        assert manifest.factory is not None
        model = build_model(manifest.factory)
        source = f"model.factory {manifest.factory.text}"
    info = model_info(model)
    if not info.trainable:
        raise AcctattrError(f"{source}: the model has no trainable parameters")
    readers = _Readers(list(info.trainable))
    runs: list[StageRun] = []
    step0 = 0
    prev: Stage | None = None
    for stage in manifest.stages:
        opt = stage.optimizer
        start = attempt(lambda s=stage: readers(s.start))
        if stage.adapter:
            end = None
            if isinstance(start, StateDictReader):
                end = attempt(partial(_merged, start, stage, info))
                if isinstance(end, StateDictReader):
                    readers.put(stage.end, end)
        else:
            end = attempt(lambda s=stage: readers(s.end))
        for reader, key in ((start, "start"), (end, "end")):
            if isinstance(reader, StateDictReader):
                attempt(lambda r=reader, k=key, s=stage: _check_params(r, info, s.name, k))
        if isinstance(start, StateDictReader) and isinstance(end, StateDictReader):
            attempt(lambda a=start, b=end, s=stage: _check_dtypes(a, b, info, s.name))
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
        state: object
        if stage.adapter:
            # the adapter's optimizer held its own matrices: no base weight had any state
            state = OptimizerState([GroupHparams(names=tuple(info.trainable))])
        else:
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
                                 stage.data, ckpts,
                                 trained=frozenset() if stage.adapter else None,
                                 max_grad_norm=opt.max_grad_norm, batch_size=opt.batch_size))
        step0 += opt.steps
        prev = stage

    final = runs[-1].end if len(runs) == len(manifest.stages) else None
    evaluators: dict[str, Evaluator] = {}
    at_end: tuple[Params, Params] | None = None  # theta_T, shared by every behaviour
    for name, spec in manifest.behaviours:
        key = f"evals.{name}" if manifest.evals else "eval"
        data = attempt(lambda spec=spec: EvalData(spec, batch_size))
        metric = attempt(lambda spec=spec, key=key: resolve_metric(
            spec.metric, spec.higher_is_better, f"{key}.metric"))
        if final is not None and data is not None and metric is not None:
            if at_end is None:
                at_end = (_final_params(model, final, info, device),
                          {n: t.to(device) for n, t in _fixed_tensors(model, final, info).items()})
            evaluators[name] = Evaluator(model, at_end[0], at_end[1], data,  # type: ignore[arg-type]
                                         metric)  # type: ignore[arg-type]
    evaluator = next(iter(evaluators.values()), None)
    return Loaded(manifest, model, info, runs, evaluator, warnings,  # type: ignore[arg-type]
                  evaluators)


def _merged(base: StateDictReader, stage: Stage, info: ModelInfo) -> StateDictReader:
    from acctattr.runs.lora import LoraMergedReader

    return LoraMergedReader(base, stage.end, stage.name, set(info.trainable))


# how much of a stage's update the rounding between its checkpoints' dtypes may be
ROUNDING_SHARE = 0.1


def _check_dtypes(start: StateDictReader, end: StateDictReader, info: ModelInfo,
                  stage: str) -> None:
    """A stage whose start and end hold a parameter in different floating dtypes is refused
    where the rounding between the dtypes is more than ROUNDING_SHARE of the stage's update
    (Delta_k would be mostly rounding); otherwise Delta_k is computed in float32 or better."""
    mixed = [n for n in info.trainable if n in start and n in end  # else _check_params
             and start.shape(n) == end.shape(n)
             and (da := start.torch_dtype(n)) is not None and (db := end.torch_dtype(n)) is not None
             and da != db and da.is_floating_point and db.is_floating_point]
    if not mixed:
        return
    rounding = update = 0.0
    for n in mixed:
        a, b = start.get(n, native=True), end.get(n, native=True)
        low = a.dtype if torch.finfo(a.dtype).eps > torch.finfo(b.dtype).eps else b.dtype
        high = b if low == a.dtype else a
        rounding += float((high.to(low).double() - high.double()).square().sum())
        update += float((b.double() - a.double()).square().sum())
    share = math.sqrt(rounding / update) if update > 0 else math.inf
    if share > ROUNDING_SHARE:
        n = mixed[0]
        raise CheckpointError(
            f"stage '{stage}': start {start.path} holds '{n}' as "
            f"{str(start.torch_dtype(n)).replace('torch.', '')} but end {end.path} as "
            f"{str(end.torch_dtype(n)).replace('torch.', '')} ({len(mixed)} parameter(s) differ): "
            f"rounding between the two dtypes alone is {share:.0%} of the stage's update, so "
            "its Delta would be mostly rounding, not training",
            "save the stage's start and end in the same dtype (convert the start to the "
            "end's dtype: that is the weights the stage began from)")


def _final_params(model: torch.nn.Module, final: StateDictReader, info: ModelInfo,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """theta_T's trainable parameters on ``device`` in the checkpoint's own dtype (a bf16
    run is evaluated in bf16), read one at a time into the model's own parameters (the
    factory's initial values freed as they go: one copy of the model, not two)."""
    own = dict(model.named_parameters())
    params = {}
    for n in info.trainable:
        t = final.get(n, native=True).to(device)
        own[n].data = t
        params[n] = t
    return params


def _fixed_tensors(model: torch.nn.Module, final: StateDictReader,
                   info: ModelInfo) -> dict[str, torch.Tensor]:
    """Frozen parameters and buffers at theta_T (the model's own where not saved)."""
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    return {n: (final.get(n, native=True) if n in final else own[n].detach())
            for n in (*info.frozen, *info.buffers)}


def check_stage_text(stage: Stage) -> None:
    """A stage's JSONL data: every line well-formed, its tokenizer loadable (nothing is
    tokenised: unrolled tokenises its sample when it runs)."""
    from acctattr.evaluation import lm

    assert stage.data is not None
    where = f"stage '{stage.name}': data {stage.data}"
    lm.read_jsonl(stage.data, where)
    if stage.tokenizer is None:
        raise DataError(f"{where}: JSONL text needs a tokenizer folder, and none is given",
                        "add tokenizer: DIR to the stage or to eval")
    lm.load_tokenizer(stage.tokenizer, f"stage '{stage.name}': tokenizer")


def check(path: str | Path, device: torch.device | None = None,
          batch_size: int | None = None) -> Loaded:
    """Validate the manifest and every file it names; raise once listing every problem.

    Args:
        device, batch_size: as open_manifest.
    """
    manifest = load_manifest(path)
    for _, spec in manifest.behaviours:
        if batch_size is not None and spec.data_fn is not None:
            raise AcctattrError(f"--batch-size {batch_size}: eval.data {spec.data_fn.text} "
                                "is a function that yields its own batches",
                                "drop --batch-size, or change the batches the function yields")
    problems: list[str] = []
    try:
        loaded = open_manifest(manifest, collect=problems, device=device, batch_size=batch_size)
    except AcctattrError as e:
        problems.append(str(e))
        raise ManifestError(str(path), problems) from e
    for ev in loaded.evaluators.values() if not problems else ():
        try:  # one forward pass on the first batch: data the model cannot take shows here
            ev.probe()
        except AcctattrError as e:
            problems.append(str(e))
    problems += _text_problems(manifest)
    if problems:
        raise ManifestError(str(path), problems)
    return loaded


def _text_problems(manifest: Manifest) -> list[str]:
    """What is wrong with the stages' JSONL data (check_stage_text), one line each."""
    problems = []
    for stage in manifest.stages:
        if stage.data is not None and stage.data.suffix == ".jsonl":
            try:
                check_stage_text(stage)
            except AcctattrError as e:
                problems.append(str(e))
    return problems


# ---------------------------------------------------------------- computing

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
    spec = loaded.manifest.eval
    cache: dict[int, Curvature] = {}

    def train_loss() -> Metric:
        return resolve_metric(loaded.manifest.train_loss, None, "train.loss")

    def curvature(j: int) -> Curvature:
        if j not in cache:
            run = loaded.runs[j]
            if run.data is None:
                raise AcctattrError(
                    f"stage '{run.name}': the unrolled estimator needs the stage's training "
                    "data (key 'data') to measure its curvature",
                    "add data: to every stage after the first, or use --estimator frozen")
            loss = train_loss()
            stage = loaded.manifest.stage(run.name)
            sample = stage_sample(
                run.data, (*spec.inputs, spec.target), config.sample_size, run.name,
                extra=loss.batch_keys,
                tokens=loss.name if loss.name in TOKEN_METRICS else None,
                tokenizer=stage.tokenizer, max_length=stage.max_length,
                class_metric=loaded.manifest.train_loss in CLASS_METRICS)
            cache[j] = Curvature(loaded.model, loaded.evaluator.fixed, loss, sample,
                                 spec.inputs, spec.target, device=loaded.evaluator.device)
            _probe_training(cache[j], loaded, run)
        return cache[j]

    dtypes = {n: p.dtype for n, p in loaded.model.named_parameters()}
    return Training(loaded.runs, loaded.info.trainable, dtypes, curvature, train_loss,
                    loaded.evaluator.device)


def _probe_training(curvature: Curvature, loaded: Loaded, run: StageRun) -> None:
    """The training loss once on the stage's sample at theta_T: data the model or the loss
    cannot take (a label beyond the model's classes) is the data's fault, exit 2."""
    try:
        with torch.no_grad():
            curvature.value(loaded.evaluator.params)
    except AcctattrError:
        raise
    except Exception as e:
        raise DataError(f"stage '{run.name}': data {run.data}: the training loss failed on "
                        f"the stage's sample: {type(e).__name__}: {str(e).splitlines()[0]}",
                        "a stage's data must hold what eval data holds: inputs the model "
                        "takes and targets the loss accepts (class ids below the number "
                        "of model outputs)") from e


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
        values = [ev.sharded(ranks).values() for _, ev in behaviours]
        while True:
            modes = stage_evaluations(len(loaded.runs), evaluate or chosen.evaluate)
            try:  # each embedding computed once, then evaluated for every behaviour
                effects = _effects(loaded, chosen, modes, [b for b, _ in values], progress,
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
               for (base, groups), per_stage, (_, ev) in zip(values, effects, behaviours,
                                                             strict=True)]
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


def _effects(loaded: Loaded, estimator: Estimator, modes: list[str], bases: list[torch.Tensor],
             progress: Progress | None, ranks: Ranks = ALONE,
             evaluators: list[Evaluator] | None = None) -> list[list[torch.Tensor]]:
    """Per-example effects [B][K][N] of every stage on every behaviour (stage k evaluated by
    ``modes[k]``), one embedding in memory at a time, each computed once and evaluated for
    every behaviour. ``bases``: f_i(theta_T) per behaviour; ``evaluators``: the behaviours'
    (default the manifest's first).

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
            if isinstance(e, ManifestError):
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

    def one(ev: Evaluator, base: torch.Tensor, k: int, v: Params) -> torch.Tensor:
        return ev.linear(v) if modes[k] == "linear" else ev.direct(v, base)

    def evaluated(k: int, v: Params) -> list[torch.Tensor]:
        return [staged(k, partial(one, ev, base, k, v))
                for ev, base in zip(evs, bases, strict=True)]

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


def _fsum_mean(x: torch.Tensor) -> float:
    """The mean of ``x`` [n], exactly rounded (math.fsum): the same bits however torch would
    split the sum among threads."""
    return math.fsum(x.double().tolist()) / x.numel()


def _out_of_range(values: torch.Tensor, bounds: tuple[float | None, float | None]) -> int:
    """How many of ``values`` lie outside [low, high] (a small tolerance for rounding)."""
    low, high = bounds
    tol = 1e-9 * max(1.0, float(values.abs().max())) if values.numel() else 0.0
    n = 0
    if low is not None:
        n += int((values < low - tol).sum())
    if high is not None:
        n += int((values > high + tol).sum())
    return n


def _range_text(bounds: tuple[float | None, float | None]) -> str:
    low, high = bounds
    return f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"


def standard_error(x: torch.Tensor) -> float:
    """Standard error of the mean of ``x`` [n]: sample std (n − 1) / sqrt(n); NaN if n < 2."""
    n = int(x.numel())
    if n < 2:
        return float("nan")
    mean = _fsum_mean(x)
    var = math.fsum((v - mean) ** 2 for v in x.double().tolist()) / (n - 1)
    return math.sqrt(var) / math.sqrt(n)


def summarize(loaded: Loaded, estimator: str, evaluate: str, base: torch.Tensor,
              groups: torch.Tensor | None, per_stage: list[torch.Tensor],
              per_example: bool, estimator_note: str | None = None,
              warnings: list[str] | None = None, modes: list[str] | None = None,
              evaluator: Evaluator | None = None) -> Result:
    """Per-example effects [K][N] -> ranked stage effects (and per-example rows).

    ``modes``: each stage's evaluation (default ``evaluate`` for every stage). A stage whose
    estimated counterfactual values f_i(theta_T) - effect_i leave the metric's range (a
    cross-entropy below 0) is flagged: the estimate extrapolated too far there.
    """
    metric = (evaluator or loaded.evaluator).metric
    names = [r.name for r in loaded.runs]
    modes = modes or [evaluate] * len(names)
    outside = [_out_of_range(base - e, metric.value_range) for e in per_stage]
    warnings = [*(warnings or []), *(
        f"stage '{names[k]}': its estimated counterfactual {metric.name} lies outside the "
        f"metric's range {_range_text(metric.value_range)} for {n} of {base.shape[0]} eval "
        f"examples, which no model can reach: its {modes[k]} estimate extrapolated too far"
        + (" (try --evaluate direct)" if modes[k] == "linear" else "")
        for k, n in enumerate(outside) if n)]
    undefined = int((~torch.isfinite(base)).sum())
    if undefined:  # a user metric can yield NaN or Inf; such effects are reported, gates trip
        warnings.append(f"{metric.name} is NaN or infinite at the final model for {undefined} "
                        f"of {base.shape[0]} eval examples: the final value and every effect "
                        "are undefined (a gate on them trips)")
        per_stage = [torch.where(torch.isfinite(base), e, math.nan) for e in per_stage]
    final = _fsum_mean(base)
    effects = [_fsum_mean(e) for e in per_stage]
    total = sum(abs(x) for x in effects)
    group_ids = sorted(set(groups.tolist())) if groups is not None else []
    order = sorted(range(len(names)), key=lambda k: (-abs(effects[k]), k))
    stages = []
    for rank, k in enumerate(order, start=1):
        harm = -effects[k] if metric.higher_is_better else effects[k]
        g = g_se = None
        if groups is not None:
            members = {gid: per_stage[k][groups == gid] for gid in group_ids}
            g = {str(gid): _fsum_mean(m) for gid, m in members.items()}
            g_se = {str(gid): standard_error(m) for gid, m in members.items()}
        stages.append(StageEffect(
            name=names[k], rank=rank, effect=effects[k],
            verdict=("undefined" if not math.isfinite(harm) else  # a gate on it trips
                     "hurt" if harm > 0 else "helped" if harm < 0 else "neutral"),
            share=abs(effects[k]) / total if total > 0 else 0.0,
            counterfactual_value=final - effects[k], groups=g,
            effect_se=standard_error(per_stage[k]), groups_se=g_se, position=k + 1,
            evaluate=modes[k], out_of_range=outside[k]))
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
                  warnings=(*loaded.warnings, *(warnings or [])),
                  estimator_note=estimator_note)


# ---------------------------------------------------------------- validation against retraining


def true_effects(loaded: Loaded, base: torch.Tensor, workdir: Path,
                 progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """Per-example true effects f_i(theta_T) - f_i(theta_T^(-k)) by calling ``replay``.

    ``replay(skip, out_dir)`` retrains the pipeline with stage ``skip`` skipped, writes the
    final checkpoint under ``out_dir`` and returns its path. Returns (effects, seconds).
    """
    ref = loaded.manifest.replay
    if ref is None:
        raise AcctattrError(f"{loaded.manifest.path}: no 'replay' key; validation needs a "
                            "function that retrains the pipeline with one stage skipped",
                            "add replay: FILE.py:FUNC, with FUNC(skip: str, out_dir: str) "
                            "returning the final checkpoint's path")
    replay = load_ref(ref, "replay")
    ev = loaded.evaluator
    truth: dict[str, torch.Tensor] = {}
    seconds = 0.0
    names = [r.name for r in loaded.runs]
    for k, name in enumerate(names):
        if progress:
            progress(f"retraining without {name}", k, len(names))
        out = workdir / f"without-{k}"
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AcctattrError(f"--workdir {workdir}: cannot make {out} ({e.strerror or e})",
                                "name a folder (or a new one) where replay may write") from e
        t0 = time.perf_counter()
        try:
            got = replay(name, str(out))
        except Exception as e:
            raise AcctattrError(f"replay {ref.text} raised {type(e).__name__} while retraining "
                                f"without stage '{name}': {e}") from e
        seconds += time.perf_counter() - t0
        if not isinstance(got, (str, Path)):
            raise AcctattrError(f"replay {ref.text} returned {type(got).__name__}, not the "
                                "path of the final checkpoint")
        reader = open_checkpoint(Path(got))
        _check_params(reader, loaded.info, name, f"replay {ref.text} result")
        params = {n: reader.get(n).to(ev.device) for n in loaded.info.trainable}
        fixed = {n: t.to(ev.device)
                 for n, t in _fixed_tensors(loaded.model, reader, loaded.info).items()}
        cf, _ = Evaluator(loaded.model, params, fixed, ev.data, ev.metric).values()
        truth[name] = base - cf
    return truth, seconds


def validate(path: str | Path, names: tuple[str, ...] | None = None,
             evaluations: tuple[str, ...] = EVALUATIONS, workdir: Path | None = None,
             progress: Progress | None = None,
             config: UnrolledConfig | None = None,
             runtime: Runtime | None = None) -> Validation:
    """Retrain with each stage skipped and measure every estimator against that truth.

    Args:
        names: the estimators to measure; default every one that can run on this run
            (unrolled needs stage data, Adam state, and stages it can simulate).
        workdir: where ``replay`` writes its checkpoints; default a temporary folder that is
            removed afterwards (never the run's own folders).
        runtime: as for run (one process: validation does not run under torchrun).
    """
    if distributed.from_env()[1] > 1:
        raise AcctattrError("validate runs in one process: under torchrun every rank would "
                            "retrain every stage into the same folders",
                            "run it without torchrun")
    runtime = runtime or Runtime()
    with devices.threads(runtime.threads):
        return _validate(path, names, evaluations, workdir, progress, config,
                         devices.resolve(runtime.device), runtime.batch_size)


def _validate(path: str | Path, names: tuple[str, ...] | None, evaluations: tuple[str, ...],
              workdir: Path | None, progress: Progress | None, config: UnrolledConfig | None,
              device: torch.device, batch_size: int | None) -> Validation:
    loaded = check(path, device, batch_size)
    run_view = training(loaded, config)
    chosen = [estimators.make(name, run_view, config) for name in names or ESTIMATORS]
    if names is None:
        chosen = [e for e in chosen if not e.needs()]
    for e in chosen:
        e.refuse()
    base, _ = loaded.evaluator.values()
    with tempfile.TemporaryDirectory(prefix="acctattr-validate-") as tmp:
        truth, retrain = true_effects(loaded, base, workdir or Path(tmp), progress)
    results: list[fidelity.Fidelity] = []
    stage_names = [r.name for r in loaded.runs]
    ev = loaded.evaluator
    for est in chosen:
        if progress:
            progress(est.name, len(results), len(chosen) * len(evaluations))
        # one embedding in memory at a time, evaluated in every mode as it comes
        estimated: dict[str, dict[str, torch.Tensor]] = {e: {} for e in evaluations}
        seconds = dict.fromkeys(evaluations, 0.0)
        t0 = time.perf_counter()
        for k in range(len(stage_names)):
            v = est.embed(k)
            embed = time.perf_counter() - t0
            for evaluate in evaluations:
                t1 = time.perf_counter()
                estimated[evaluate][stage_names[k]] = (ev.linear(v) if evaluate == "linear"
                                                 else ev.direct(v, base))
                seconds[evaluate] += embed + time.perf_counter() - t1
            t0 = time.perf_counter()
        results += [fidelity.compare(est.name, e, estimated[e], truth, seconds[e])
                    for e in evaluations]
    return Validation(loaded.evaluator.metric.name, int(base.shape[0]),
                      loaded.manifest.replay.text if loaded.manifest.replay else "",
                      retrain, tuple(results))

"""A manifest opened for computation (``Loaded``): the model, a reader per checkpoint,
each stage's run (optimizer state, learning rates), every behaviour's evaluator; and
``check``, which opens everything and lists every problem at once."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from acctattr.errors import AcctattrError, CheckpointError, DataError, ManifestError
from acctattr.estimators import Params, StageRun
from acctattr.evaluation.data import EvalData, stage_data_header
from acctattr.evaluation.evaluator import Evaluator
from acctattr.evaluation.metrics import resolve_metric
from acctattr.evaluation.model import ModelInfo, build_model, model_info
from acctattr.runs import formats
from acctattr.runs.checkpoints import (
    FLOAT_DTYPES,
    StateDictReader,
    align_names,
    open_checkpoint,
)
from acctattr.runs.manifest import Manifest, Stage, load_manifest
from acctattr.runs.optim_state import GroupHparams, OptimizerState, load_optimizer_state
from acctattr.runs.schedules import (
    Lrs,
    interpolate_logged_lrs,
    lrs_from_spec,
    settle_convention,
    stated_trainer_lrs,
)


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
        ts = settle_convention(formats.read_trainer_state(spec.trainer_state))
    except formats.FormatError as e:
        raise CheckpointError(f"stage '{stage.name}': optimizer.lr: {e}") from e
    first = ts.global_step - steps
    lrs, guessed = interpolate_logged_lrs(ts.lr_points, first, steps) if ts.lr_points \
        else (None, steps)
    if guessed:
        # some steps' lrs were not logged: the schedule training_args.bin names, where it
        # gives every lr that was logged or saved
        stated = stated_trainer_lrs(ts)
        if stated is not None:
            at, how = stated
            if lrs is None:
                warnings.append(f"stage '{stage.name}': {spec.trainer_state} logged no learning "
                                f"rate; they follow training_args.bin's schedule ({how}), "
                                "checked against scheduler.pt's last one")
            return Lrs(lambda i: at(first + i), 0, steps)
    if lrs is None:
        raise CheckpointError(f"stage '{stage.name}': {spec.trainer_state}: log_history has no "
                              "learning_rate entries",
                              "set logging_steps so the Trainer logs the learning rate, or give "
                              "optimizer.lr as a schedule or a per-step list")
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

    def release(self) -> None:
        """Close every reader's files (StateDictReader.release)."""
        for reader in self._open.values():
            reader.release()


def check_params(reader: StateDictReader, info: ModelInfo, stage: str, key: str) -> None:
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
    # tensors of submodules the model has none of (a config with fewer layers than the run
    # trained): they would be left out silently and a smaller model evaluated
    foreign = [n for n in reader.names()
               if info.modules and n.rpartition(".")[0] not in info.modules]
    if missing or wrong or foreign:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} parameter(s): {', '.join(missing[:5])}")
        if wrong:
            parts.append(f"shape differs for {len(wrong)}: {'; '.join(wrong[:5])}")
        if foreign:
            parts.append(f"{len(foreign)} tensor(s) of modules the model does not have: "
                         f"{', '.join(foreign[:5])}")
        raise CheckpointError(f"stage '{stage}': {key} {reader.path}: {' and '.join(parts)}",
                              "every checkpoint of a run must hold the same parameter names "
                              "and shapes as the model the factory builds")


def open_manifest(manifest: Manifest, collect: list[str] | None = None,
                  device: torch.device | None = None, batch_size: int | None = None,
                  scan: bool = False) -> Loaded:
    """Open everything the manifest names; with ``collect``, record problems and go on.

    Args:
        device: where the model is evaluated (theta_T is moved there); default the CPU.
        batch_size: overrides eval.batch_size.
        scan: read every tensor the model takes from every checkpoint once, refusing NaN
            or Inf (``acctattr check``); otherwise only theta_T is read here, and the other
            checkpoints' tensors are checked as an estimator reads them.
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

    def passes(fn: Callable[[], None]) -> bool:
        """Whether fn raised no AcctattrError (one it raised is reported)."""
        try:
            fn()
        except AcctattrError as e:
            report(e)
            return False
        return True

    warnings: list[str] = []
    read: set[int] = set()  # the readers scanned (a stage's end is the next one's start)

    def scanned(reader: StateDictReader, stage: str, key: str) -> None:
        if id(reader) not in read:
            read.add(id(reader))
            scan_finite(reader, info, stage, key)

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
        end_ok = isinstance(end, StateDictReader)
        for reader, key in ((start, "start"), (end, "end")):
            if isinstance(reader, StateDictReader):
                passed = passes(partial(check_params, reader, info, stage.name, key))
                if key == "end" and not passed:
                    end_ok = False  # theta_T is never read from an end that failed its check
                if scan and passed:
                    attempt(lambda r=reader, k=key, s=stage: scanned(r, s.name, k))
        if isinstance(start, StateDictReader) and isinstance(end, StateDictReader):
            attempt(lambda a=start, b=end, s=stage: _check_dtypes(a, b, info, s.name))
        ckpts = []
        for ref in stage.checkpoints:
            r = attempt(lambda p=ref.path: readers(p))
            if isinstance(r, StateDictReader):
                key = f"checkpoints step {ref.step}"
                if passes(partial(check_params, r, info, stage.name, key)) and scan:
                    attempt(lambda r=r, s=stage, k=key: scanned(r, s.name, k))
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
        if start is not None and end_ok and state is not None and lrs is not None:
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
                          {n: t.to(device) for n, t in fixed_tensors(model, final, info).items()})
            evaluators[name] = Evaluator(model, at_end[0], at_end[1], data,  # type: ignore[arg-type]
                                         metric)  # type: ignore[arg-type]
    evaluator = next(iter(evaluators.values()), None)
    readers.release()  # checked and theta_T read: every file is opened again when needed
    for r in runs:
        r.state.release()
    return Loaded(manifest, model, info, runs, evaluator, warnings,  # type: ignore[arg-type]
                  evaluators)


def scan_finite(reader: StateDictReader, info: ModelInfo, stage: str, key: str) -> None:
    """Every floating tensor the model takes from a checkpoint (an adapter stage's end: the
    merged weights) free of NaN and Inf, read one at a time in its own dtype and freed."""
    for n in (*info.trainable, *info.frozen, *info.buffers):
        dtype = reader.torch_dtype(n) if n in reader else None
        if dtype is not None and dtype.is_floating_point:
            try:
                reader.get(n, native=True)  # refuses NaN or Inf, naming the tensor
            except CheckpointError as e:
                raise e.within(f"stage '{stage}': {key}") from e
    reader.release()


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
    mixed = [n for n in info.trainable if n in start and n in end  # else check_params
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


def fixed_tensors(model: torch.nn.Module, final: StateDictReader,
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
          batch_size: int | None = None, scan: bool = False,
          more: Callable[[Loaded], list[str]] | None = None) -> Loaded:
    """Validate the manifest and every file it names; raise once listing every problem.

    Args:
        device, batch_size, scan: as open_manifest (``acctattr check`` scans).
        more: further problems of the opened run, listed with the rest (``acctattr
            check``: pipeline.check_training_data).
    """
    manifest = load_manifest(path)
    for _, spec in manifest.behaviours:
        if batch_size is not None and spec.data_fn is not None:
            raise AcctattrError(f"--batch-size {batch_size}: eval.data {spec.data_fn.text} "
                                "is a function that yields its own batches",
                                "drop --batch-size, or change the batches the function yields")
    problems: list[str] = []
    try:
        loaded = open_manifest(manifest, collect=problems, device=device,
                               batch_size=batch_size, scan=scan)
    except AcctattrError as e:
        problems.append(str(e))
        raise ManifestError(str(path), problems) from e
    for ev in loaded.evaluators.values() if not problems else ():
        try:  # one forward pass on the first batch: data the model cannot take shows here
            ev.probe()
        except AcctattrError as e:
            problems.append(str(e))
    problems += _text_problems(manifest) + _data_problems(manifest)
    if more is not None and not problems:
        problems += more(loaded)  # a later stage's data is read only where its headers passed
    if problems:
        raise ManifestError(str(path), problems)
    return loaded


def _data_problems(manifest: Manifest) -> list[str]:
    """What the headers of the later stages' safetensors data say is wrong (unreadable, a
    tensor missing, rows that differ, empty), one line each: auto's unrolled reads them (the
    first stage's it never reads), so a run refused them after check passed. Values (NaN,
    labels) are read by pipeline.check_training_data under `acctattr check`, and by run."""
    problems = []
    names = (*manifest.eval.inputs, manifest.eval.target)
    for stage in manifest.stages[1:]:
        if stage.data is not None and stage.data.suffix != ".jsonl":
            try:
                stage_data_header(stage.data, names, stage.name)
            except AcctattrError as e:
                problems.append(str(e))
    return problems


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

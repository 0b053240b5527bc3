"""Validation against retraining (``acctattr validate``): the manifest's ``replay``
retrains with each stage skipped, and every estimator is measured against that truth
(acctattr.evaluation.fidelity)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from acctattr import devices, distributed, estimators
from acctattr.errors import AcctattrError
from acctattr.evaluation import fidelity
from acctattr.evaluation.evaluator import Evaluator
from acctattr.evaluation.model import load_ref
from acctattr.loading import Loaded, check, check_params, fixed_tensors
from acctattr.options import Runtime, UnrolledConfig
from acctattr.pipeline import ESTIMATORS, EVALUATIONS, training
from acctattr.results import Progress, Validation
from acctattr.runs.checkpoints import open_checkpoint


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
        check_params(reader, loaded.info, name, f"replay {ref.text} result")
        params = {n: reader.get(n).to(ev.device) for n in loaded.info.trainable}
        fixed = {n: t.to(ev.device)
                 for n, t in fixed_tensors(loaded.model, reader, loaded.info).items()}
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

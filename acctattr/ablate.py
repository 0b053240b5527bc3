"""Act on the answer: the deployed model without a stage, theta_T - S * v_k, as a checkpoint.

``acctattr ablate MANIFEST --stage NAME [--scale S] -o OUT`` estimates v_k (as ``run``
does, or reads it from ``--embeddings``) and writes the model as if stage k had never run
(S = 1), or with the stage damped (0 < S < 1), in the final checkpoint's own format:

- a Hugging Face folder (``config.json`` and the tokenizer files copied from the final
  checkpoint's folder, weights in ``model.safetensors``) when the final checkpoint, or the
  base a final PEFT adapter was trained on, is one, or the manifest builds the model from
  one (``model: {hf: DIR}``): loadable by ``from_pretrained(OUT)``. A final PEFT adapter
  stage is merged into its base first (the adapter's own folder is not written: the result
  is one plain model);
- otherwise a plain safetensors state dict: OUT itself when it ends in ``.safetensors``,
  else ``OUT/model.safetensors``.

Every tensor of the model's ``state_dict()`` is written: trainable parameters ablated,
the rest (frozen parameters, persistent buffers) as in theta_T, each in the dtype the final
checkpoint stores it in. The ablated weights are exactly the ones ``run --evaluate direct``
evaluates (theta_T - v_k in the dtype theta_T is evaluated in, float32 for fp32/bf16/fp16
checkpoints), so the eval value printed for them, the mean over the eval set of
f_i(theta_T - S v_k), is what the written model measures; a bf16 / fp16 checkpoint's are
rounded back to its dtype on writing (a warning says so).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from acctattr import devices
from acctattr.errors import AcctattrError
from acctattr.estimators import Estimator, Params, Unsuitable
from acctattr.evaluation.evaluator import subtract
from acctattr.options import Runtime, UnrolledConfig
from acctattr.results import Progress

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
            "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
            "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
MARKER = "acctattr-ablate.json"


@dataclass(frozen=True)
class Prediction:
    """One behaviour's eval value at theta_T and the value the estimate predicts for the
    ablated model (the mean of f_i(theta_T - S v_k), a direct evaluation)."""

    behaviour: str
    metric: str
    higher_is_better: bool
    final_value: float
    predicted: float


@dataclass(frozen=True)
class Ablation:
    stage: str
    scale: float
    estimator: str
    estimator_note: str | None
    format: str  # hf | safetensors
    written: Path  # the folder, or the safetensors file
    predictions: tuple[Prediction, ...]
    warnings: tuple[str, ...]


def _hf_source(manifest: Any) -> Path | None:
    """The folder whose config.json describes the final model: the final checkpoint's, the
    base of a final adapter stage (walking back over adapter stages), or model.hf."""
    stages = manifest.stages
    j = len(stages) - 1
    while j >= 0:
        s = stages[j]
        path = s.start if s.adapter else s.end
        if path.is_dir() and (path / "config.json").is_file():
            return path
        if not s.adapter:
            break
        j -= 1
    if manifest.hf is not None and (manifest.hf / "config.json").is_file():
        return manifest.hf
    return None


def ablate(path: str | Path, stage: str, out: Path, scale: float = 1.0,
           estimator: str = "auto", config: UnrolledConfig | None = None,
           runtime: Runtime | None = None, embeddings: Path | None = None,
           progress: Progress | None = None) -> Ablation:
    """Write theta_T - scale * v_k for stage ``stage`` to ``out`` (module doc) and return what
    was written with the eval value predicted for it on every behaviour."""
    from acctattr import distributed, estimators, pipeline, summary
    from acctattr.output.atomic import (
        atomic_file,
        atomic_folder,
        check_folder_target,
        check_target,
        refuse_inside,
    )
    from acctattr.runs.manifest import load_manifest

    if distributed.from_env()[1] > 1:
        raise AcctattrError("ablate runs in one process", "run it without torchrun")
    if not 0.0 < scale < float("inf"):
        raise AcctattrError(f"--scale {scale:g}: must be a number above 0",
                            "1 removes the stage; between 0 and 1 damps it")
    manifest = load_manifest(path)
    names = [s.name for s in manifest.stages]
    if stage not in names:
        raise AcctattrError(f"--stage {stage!r}: {path} has no stage of that name",
                            f"choose one of {', '.join(names)}")
    refuse_inside(out, manifest.root, "--output")
    if out.suffix == ".safetensors":
        check_target(out, "--output")
    else:
        check_folder_target(out, "--output", MARKER)
    k = names.index(stage)
    config = config or UnrolledConfig()
    runtime = runtime or Runtime()
    device = devices.resolve(runtime.device)
    with devices.threads(runtime.threads):
        loaded = pipeline.check(path, device, runtime.batch_size)
        passed: list[str] = []
        note = None
        if embeddings is not None:
            from acctattr import embeddings as stored

            chosen, note = stored.load(embeddings, loaded.manifest, loaded.info.trainable,
                                       names, estimator, config)
            tried: Iterator[Estimator] = iter(())
        else:
            available = pipeline.auto_memory(device) if estimator == "auto" else None
            tried = estimators.candidates(estimator, pipeline.training(loaded, config), config,
                                          available, passed)
            chosen = next(tried)
        if progress:
            progress(f"stage {stage}", 0, 1)
            chosen.progress = lambda *a, **kw: progress(*a, **kw, level=1)
        while True:
            try:
                v = chosen.embed(k)
                break
            except Unsuitable as e:
                passed.append(e.reason)
                chosen = next(tried)
        if embeddings is None and estimator == "auto":
            note = estimators.auto_note(chosen, passed)
        if progress:
            progress("done", 1, 1)
        params = loaded.evaluator.params
        # exactly what Evaluator.direct evaluates: theta_T - v in theta_T's dtype
        shift: Params = {n: (v[n] * scale if scale != 1.0 else v[n]) for n in params}
        predictions = []
        for name, ev in loaded.evaluators.items():
            base, _ = ev.values()
            final = summary.fsum_mean(base)
            effect = summary.fsum_mean(ev.direct(shift, base))
            predictions.append(Prediction(name, ev.metric.name, ev.metric.higher_is_better,
                                          final, final - effect))
        # theta_T - v exactly as Evaluator.direct evaluated it (half precision: the difference
        # taken in float32 and rounded once to the checkpoint's dtype)
        ablated = {n: subtract(p, shift[n]).cpu() for n, p in params.items()}
        state, rounded = _state_dict(loaded, ablated)
        bad = sorted(n for n, t in state.items()
                     if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        if bad:  # a model of NaN/Inf weights is no answer to "what if the stage never ran"
            raise AcctattrError(
                f"stage '{stage}': theta_T - {scale:g} * v_k has NaN or Inf values in "
                f"{len(bad)} tensor(s) ({', '.join(bad[:3])}) in the final checkpoint's "
                "dtypes; nothing was written",
                "use a smaller --scale (1 removes the stage), or another --estimator")
        notes = [f"the ablated weights are written in {', '.join(sorted(rounded))}, as the "
                 "final checkpoint stores them; the predicted values are for the weights "
                 "before that rounding"] if rounded else []
        source = _hf_source(loaded.manifest)
        provenance = {
            "acctattr": "ablate", "manifest": str(path), "stage": stage, "scale": scale,
            "estimator": chosen.name, "estimator_note": note,
            "predicted": {p.behaviour: {"metric": p.metric, "final_value": p.final_value,
                                        "predicted_value": p.predicted} for p in predictions},
        }
        meta = {"acctattr_ablate": json.dumps(provenance)}
        if source is not None:
            fmt = "hf"
            with atomic_folder(out, "--output", MARKER) as tmp:
                for f in HF_FILES:
                    src = source / f
                    last = loaded.manifest.stages[-1]
                    if not src.is_file() and last.adapter and (last.end / f).is_file():
                        src = last.end / f  # PEFT saves the tokenizer beside the adapter
                    if src.is_file():
                        shutil.copyfile(src, tmp / f)
                save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt",
                                                                          **meta})
                (tmp / MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
            written = out
        elif out.suffix == ".safetensors":
            fmt = "safetensors"
            with atomic_file(out, "--output", binary=True) as fh:
                from safetensors.torch import save

                fh.write(save(state, metadata={"format": "pt", **meta}))
            written = out
        else:
            fmt = "safetensors"
            with atomic_folder(out, "--output", MARKER) as tmp:
                save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt",
                                                                          **meta})
                (tmp / MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
            written = out / "model.safetensors"
    return Ablation(stage, scale, chosen.name, note, fmt, written, tuple(predictions),
                    (*loaded.warnings, *chosen.warnings(), *notes))


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                       "F64": torch.float64}


def stored_dtype(reader: Any, name: str) -> torch.dtype | None:
    """The dtype ``name`` is stored in by a checkpoint reader (acctattr reads floats as
    float32); None where it cannot tell. A merged LoRA stage: its base's."""
    try:
        from acctattr.runs.checkpoints import RenamedReader
        from acctattr.runs.lora import LoraMergedReader

        if isinstance(reader, LoraMergedReader):
            return stored_dtype(reader.base, name)
        if isinstance(reader, RenamedReader):
            return stored_dtype(reader.inner, reader.prefix + name)
        tensors = getattr(reader, "_tensors", None)
        if tensors is not None:
            t = tensors.get(name)
            return t.dtype if t is not None else None
        file = getattr(reader, "_shards", {}).get(name)
        if file is None:
            return None
        return _SAFETENSORS_DTYPES.get(reader._handle(file).get_slice(name).get_dtype())
    except Exception:  # a reader that does not say: the dtype acctattr computed in
        return None


def _state_dict(loaded: Any, ablated: Params) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The model's state_dict() names (persistent tensors), trainable ones ablated, the rest
    as in theta_T, each floating tensor in the dtype the final checkpoint stores it in
    (bf16 stays bf16); each its own contiguous tensor (safetensors refuses shared
    storage). Also returns the dtypes trainable parameters were rounded to."""
    final = loaded.runs[-1].end
    rounded: set[str] = set()
    fixed = loaded.evaluator.fixed
    model = loaded.model
    own = model.state_dict()
    # a tied weight (an output layer sharing the embedding) is one parameter under two names
    canonical = {id(p): n for n, p in model.named_parameters()}
    alias = {n: canonical.get(id(p), n)
             for n, p in model.named_parameters(remove_duplicate=False)}
    out = {}
    for name in own:
        key = alias.get(name, name)
        t = ablated.get(key)
        if t is None:
            t = fixed.get(key, own[name])
        dtype = stored_dtype(final, key) if t.is_floating_point() else None
        if dtype is not None and dtype != t.dtype:
            t = t.to(dtype)
            if key in ablated:
                rounded.add(str(dtype).replace("torch.", ""))
        out[name] = t.detach().cpu().contiguous().clone()
    return out, rounded

"""A manifest's behaviours: the ``eval:`` / ``evals:`` sections, their metrics, and the
language-model defaults (JSONL text tokenised with the run's tokenizer, a causal LM's
next-token loss). Never imports torch."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from acctattr.runs.collector import Collector, kind_of
from acctattr.runs.manifest_spec import EvalSpec, Ref, Stage

BUILTIN_METRICS = ("cross_entropy", "margin", "logprob", "mse", "next_token_loss",
                   "sequence_logprob")


# JSONL text is tokenised into these tensors (acctattr.evaluation.lm): the defaults of
# eval.inputs and eval.target for such data
JSONL_INPUTS = ("input_ids", "attention_mask")


JSONL_TARGET = "labels"


_EVAL_KEYS = {"data", "inputs", "target", "group", "metric", "batch_size", "higher_is_better",
              "tokenizer", "max_length"}


def parse_metric(c: Collector, value: Any, where: str) -> str | Ref | None:
    if isinstance(value, str) and value in BUILTIN_METRICS:
        return value
    if isinstance(value, str) and ":" in value:
        return c.ref(value, where)
    c.add(where, f"expected one of {', '.join(BUILTIN_METRICS)} or FILE.py:FUNC, "
          f"got {kind_of(value)}")
    return None


def parse_evals(c: Collector, top: dict,
                 causal: bool = False) -> tuple[tuple[str, EvalSpec], ...]:
    """The behaviours: ``eval:`` (one, named "eval") or ``evals:`` (name -> eval section),
    each with the defaults of language models (_parse_eval_text)."""
    if ("eval" in top) == ("evals" in top):
        c.add("", "give exactly one of 'eval' (one eval section) or 'evals' (a mapping of "
              "behaviour name -> eval section)" if "eval" in top else
              "missing required key 'eval' (or 'evals', several named eval sections)")
        return ()
    if "eval" in top:
        ev = _parse_eval_text(c, top["eval"], causal)
        return (("eval", ev),) if ev is not None else ()
    value = top["evals"]
    if not isinstance(value, dict) or not value:
        c.add("evals", f"expected a mapping of behaviour name -> eval section, got "
              f"{kind_of(value)}")
        return ()
    out = []
    for name, section in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            c.add("evals", f"behaviour name {name!r}: use letters, digits, '_', '.', '-'")
            continue
        ev = _parse_eval_text(c, section, causal, f"evals.{name}")
        if ev is not None:
            out.append((name, ev))
    return tuple(out) if len(out) == len(value) else ()


def _parse_eval(c: Collector, value: Any, where: str = "eval") -> EvalSpec | None:
    e = c.mapping(value, where, _EVAL_KEYS, {"data", "inputs", "target"})
    data: Path | None = None
    data_fn: Ref | None = None
    if "data" in e:
        d = e["data"]
        if isinstance(d, str) and ":" in d and d.rpartition(":")[0].endswith(".py"):
            data_fn = c.ref(d, f"{where}.data")
        else:
            data = c.path(d, f"{where}.data")
    inputs: tuple[str, ...] | None = None
    if "inputs" in e:
        v = e["inputs"]
        if isinstance(v, str) and v:
            inputs = (v,)
        elif isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
            if len(set(v)) != len(v):
                c.add(f"{where}.inputs", "tensor names must be unique")
            inputs = tuple(v)
        else:
            c.add(f"{where}.inputs", f"expected a list of tensor names, got {kind_of(v)}")
    target = c.string(e["target"], f"{where}.target") if "target" in e else None
    group = c.string(e["group"], f"{where}.group") if "group" in e else None
    metric = parse_metric(c, e.get("metric", "cross_entropy"), f"{where}.metric")
    batch = c.integer(e.get("batch_size", 256), f"{where}.batch_size", lo=1)
    hib = c.boolean(e["higher_is_better"], f"{where}.higher_is_better") \
        if "higher_is_better" in e else None
    if (data is None and data_fn is None) or inputs is None or target is None \
            or metric is None or batch is None:
        return None
    return EvalSpec(inputs=inputs, target=target, metric=metric, data=data, data_fn=data_fn,
                    group=group, batch_size=batch, higher_is_better=hib)


def _parse_eval_text(c: Collector, value: Any, causal: bool = False,
                     where: str = "eval") -> EvalSpec | None:
    """An eval section (_parse_eval) with the defaults of language models: JSONL text data
    (``data: FILE.jsonl``, tokenised with ``tokenizer`` to ``max_length``) is tokenised into
    input_ids, attention_mask and labels, the defaults of inputs and target; a causal LM's
    default metric is next_token_loss."""
    if not isinstance(value, dict):
        return _parse_eval(c, value, where)
    section = dict(value)
    d = section.get("data")
    text = isinstance(d, str) and d.endswith(".jsonl")
    raw_tok, raw_len = section.pop("tokenizer", None), section.pop("max_length", None)
    tokenizer = c.path(raw_tok, f"{where}.tokenizer") if raw_tok is not None else None
    max_length = c.integer(raw_len, f"{where}.max_length", lo=1) if raw_len is not None \
        else None
    for key, got in (("tokenizer", raw_tok), ("max_length", raw_len)):
        if got is not None and not text:
            c.add(f"{where}.{key}", f"'{key}' goes with JSONL text data (data: FILE.jsonl)")
    if text:
        section.setdefault("inputs", list(JSONL_INPUTS))
        section.setdefault("target", JSONL_TARGET)
    if causal:
        section.setdefault("metric", "next_token_loss")
    ev = _parse_eval(c, section, where)
    if ev is None:
        return None
    if text:
        for key, names in (("inputs", ev.inputs), ("target", (ev.target,))):
            unknown = [n for n in names if n not in (*JSONL_INPUTS, JSONL_TARGET)]
            if unknown:
                c.add(f"{where}.{key}", f"JSONL text is tokenised into input_ids, "
                      f"attention_mask and labels; there is no {unknown[0]!r}")
    return replace(ev, tokenizer=tokenizer, max_length=max_length)


def is_jsonl(path: Path) -> bool:
    return path.suffix == ".jsonl"


# files a tokenizer's save_pretrained() writes (any one will do)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _tokenizer_folder(folder: Path) -> Path | None:
    """``folder`` when it holds a saved tokenizer (a Trainer folder given one does)."""
    return folder if any((folder / f).is_file() for f in _TOKENIZER_FILES) else None


def attach_tokenizers(c: Collector, stages: tuple[Stage, ...],
                evals: tuple[tuple[str, EvalSpec], ...], hf: Path | None
                ) -> tuple[tuple[Stage, ...], tuple[tuple[str, EvalSpec], ...]]:
    """JSONL eval data without a tokenizer takes the model.hf folder's own tokenizer files;
    a stage's JSONL data takes its own, else the first behaviour's (_stage_tokenizer)."""
    own = _tokenizer_folder(hf) if hf is not None else None
    out = []
    for name, ev in evals:
        if ev.data is not None and is_jsonl(ev.data) and ev.tokenizer is None:
            where = "eval" if name == "eval" else f"evals.{name}"
            if own is None:
                c.add(f"{where}.tokenizer", f"{where}.data {ev.data.name} is JSONL text and "
                      "needs the run's tokenizer folder (tokenizer: DIR); model.hf holds no "
                      "tokenizer files")
            ev = replace(ev, tokenizer=own)
        out.append((name, ev))
    first = out[0][1] if out else None
    return tuple(_stage_tokenizer(c, s, first, own) for s in stages), tuple(out)


def _stage_tokenizer(c: Collector, stage: Stage, ev: EvalSpec | None,
                     own: Path | None) -> Stage:
    """A stage with JSONL data gets its tokenizer and max_length: its own, else eval's, else
    the model.hf folder's tokenizer."""
    if stage.data is None or not is_jsonl(stage.data):
        return stage
    tokenizer = stage.tokenizer or (ev.tokenizer if ev is not None else None) or own
    if tokenizer is None:
        c.add(f"stage '{stage.name}': tokenizer", f"data {stage.data.name} is JSONL text and "
              "needs the run's tokenizer folder (tokenizer: DIR here or under eval)")
    max_length = stage.max_length if stage.max_length is not None else \
        (ev.max_length if ev is not None else None)
    return replace(stage, tokenizer=tokenizer, max_length=max_length)


def is_causal_lm(folder: Path, cls: str | None) -> bool:
    """Whether model.hf is a causal LM: its class (model.class, else config.json's
    architectures[0]) is a *ForCausalLM or *LMHeadModel."""
    name = cls
    if name is None:
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False  # building the model reports an unreadable config
        archs = config.get("architectures") if isinstance(config, dict) else None
        name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) \
            else None
    return name is not None and name.endswith(("ForCausalLM", "LMHeadModel"))

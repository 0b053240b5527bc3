"""Causal language models: next-token metrics, and JSONL text tokenised with the run's own
tokenizer.

The metrics follow Hugging Face's causal-LM loss: the logits at position t predict the label
at t + 1 (``logits[:, :-1]`` against ``labels[:, 1:]``), labels equal to -100 are not
counted, and neither are positions whose ``attention_mask`` is 0.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from acctattr.errors import DataError

IGNORE = -100  # Hugging Face's ignore_index: a label that is not predicted
# the tensors a JSONL file is tokenised into
TOKEN_NAMES = ("input_ids", "attention_mask", "labels")


def token_nll(out: Any, labels: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token negative log-likelihoods and how many tokens each example counts.

    Args:
        out: logits [B, T, V] (or a model output with ``.logits``).
        labels: [B, T] token ids, -100 where not counted.
        attention_mask: [B, T] or None; positions with 0 are not counted.
    Returns:
        (per-token loss [B, T-1], 0 where not counted; counted tokens per example [B])
    """
    logits = out.logits if hasattr(out, "logits") else out
    logits = logits[:, :-1]
    target = labels[:, 1:].long()
    keep = target != IGNORE
    if attention_mask is not None:
        keep = keep & (attention_mask[:, 1:] != 0)
    target = torch.where(keep, target, torch.full_like(target, IGNORE))
    b, t, v = logits.shape
    nll = F.cross_entropy(logits.reshape(b * t, v), target.reshape(b * t),
                          ignore_index=IGNORE, reduction="none").reshape(b, t)
    return nll, keep.sum(dim=1)


def next_token_loss(out: Any, labels: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example mean next-token cross-entropy over the counted tokens [B] (NaN for an
    example with none; the data checks refuse such examples before)."""
    nll, n = token_nll(out, labels, attention_mask)
    return nll.sum(dim=1) / n


def sequence_logprob(out: Any, labels: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example sum of next-token log-probabilities over the counted tokens [B] (NaN for
    an example with none, never a silent 0)."""
    nll, n = token_nll(out, labels, attention_mask)
    total = -nll.sum(dim=1)
    return torch.where(n > 0, total, torch.full_like(total, float("nan")))


def uncounted(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    """Indices of the examples with no counted next-token label."""
    keep = labels[:, 1:] != IGNORE
    if attention_mask is not None:
        keep = keep & (attention_mask[:, 1:] != 0)
    return [int(i) for i in torch.nonzero(~keep.any(dim=1)).flatten()]


def refuse_uncounted(labels: torch.Tensor, attention_mask: torch.Tensor | None, where: str,
                     metric: str, offset: int = 0, lines: list[int] | None = None,
                     examples: list[int] | None = None) -> None:
    """Raise DataError naming the first examples that count no token (their metric would be
    0/0).

    Args:
        where: the data, as the message names it (``eval.data eval.jsonl``).
        offset: the index of the batch's first example in the data.
        lines: the file's line number of each example (JSONL), when known.
        examples: each row's example index in the data (a sample's), default offset + row.
    """
    bad = uncounted(labels, attention_mask)
    if not bad:
        return

    def name(i: int) -> str:
        index = examples[i] if examples is not None else offset + i
        return f"example {index}" + (f" (line {lines[i]})" if lines is not None else "")

    shown = ", ".join(name(i) for i in bad[:5]) + (f" and {len(bad) - 5} more"
                                                   if len(bad) > 5 else "")
    raise DataError(f"{where}: {shown} has no token that {metric} counts (every next-token "
                    f"label is -100{' or masked' if attention_mask is not None else ''})",
                    "give each example at least one label token after its first (a "
                    "completion that is not empty, a text longer than one token), or drop it")


# ---------------------------------------------------------------- unmasked padding
#
# A Hugging Face model called without an attention_mask, whose config has a pad_token_id,
# prints once per process "We strongly recommend passing in an `attention_mask` since your
# input_ids may be padded" where a pad token is in the first or last column. For a causal
# LM scored on next tokens that is needless where no counted prediction sees a pad token
# (right padding after the labels, as in sample_runs/lm): the evaluation then passes an
# all-ones mask (the same numbers), and so do the stages' training samples (unrolled's
# Curvature; transformers' padding check reads the data, which stops torch.func.vmap of
# the per-group gradients, one pass of 8 groups instead of 8 passes). A sample whose
# metric has an attention_mask the model is not given has the message dropped by a
# logging filter once its padding is found needless. Padding that does matter (left
# padding, a pad token inside a counted context) keeps the warning.

PADDING_WARNING = "We strongly recommend passing in an `attention_mask`"
_TRANSFORMERS_LOGGER = "transformers.modeling_utils"


def unmasked_pad(model: Any, inputs: tuple[str, ...]) -> tuple[str, int] | None:
    """(the token input's name, the pad token id) where a Hugging Face model would be called
    without an attention_mask although it takes one and checks for padding without it
    (``config.pad_token_id`` set); None otherwise."""
    if "attention_mask" in inputs:
        return None
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if isinstance(pad, bool) or not isinstance(pad, int):
        return None
    try:
        takes = "attention_mask" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if not takes:
        return None
    name = "input_ids" if "input_ids" in inputs else inputs[0] if len(inputs) == 1 else None
    return (name, pad) if name is not None else None


def padding_unseen(ids: torch.Tensor, pad: int, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> bool:
    """Whether no counted next-token prediction of token ids [B, T] sees a pad token: the
    context of the prediction at t (positions 0..t of a causal LM) holds none. True with
    no padding, or right padding after every counted label; False with left padding or a
    pad token inside a counted context. ``labels`` and ``attention_mask`` (the batch's,
    which the metric honours) say which predictions count, as the metrics count them."""
    if ids.ndim != 2 or ids.is_floating_point() or labels.shape != ids.shape:
        return False
    keep = labels[:, 1:] != IGNORE
    if attention_mask is not None:
        keep = keep & (attention_mask[:, 1:] != 0)
    seen = (ids == pad).cumsum(dim=1)[:, :-1] > 0  # a pad token at or before t
    return not bool((seen & keep).any())


def attend_all(ids: torch.Tensor, pad: int, labels: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """An all-ones attention_mask for token ids [B, T] where ``padding_unseen``; None where
    the padding may matter (the model is then called as before, and warns).

    An all-ones mask is what the model assumes without one: every number is the same as
    without it (the lm sample run's JSON is byte-identical), and the model no longer warns
    that the input "may be padded"."""
    if not padding_unseen(ids, pad, labels, attention_mask):
        padding_matters()
        return None
    return torch.ones_like(ids)


class _NeedlessPadding(logging.Filter):
    """Drops transformers' padding warning while every padded input seen was found
    needless (``padding_needless``), and none that matters (``padding_matters``)."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.matters = False
        self.dropped: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if self.active and not self.matters and text.startswith(PADDING_WARNING):
            self.dropped = text
            return False
        return True


_FILTER = _NeedlessPadding()


def padding_needless() -> None:
    """Inputs given to the model unmasked were found to have needless padding: drop
    transformers' padding warning (unless padding that matters was seen)."""
    log = logging.getLogger(_TRANSFORMERS_LOGGER)
    if _FILTER not in log.filters:
        log.addFilter(_FILTER)
    _FILTER.active = True


def padding_matters() -> None:
    """Inputs whose padding may matter go to the model unmasked: the warning stands from
    now on, and is given now if it was dropped before (transformers gives it only once)."""
    _FILTER.matters = True
    if _FILTER.dropped is not None:
        text, _FILTER.dropped = _FILTER.dropped, None
        logging.getLogger(_TRANSFORMERS_LOGGER).warning(text)


# ---------------------------------------------------------------- JSONL text

def load_tokenizer(folder: Path, where: str) -> Any:
    """The tokenizer saved in ``folder`` (the run's own files), never downloaded."""
    try:
        import transformers
    except ImportError as e:
        raise DataError(f"{where}: tokenising JSONL text needs transformers, which is not "
                        "installed", "pip install 'acctattr[hf]'") from e
    if not folder.is_dir():
        raise DataError(f"{where}: tokenizer folder {folder} not found",
                        "point tokenizer at the folder the run's tokenizer was saved to "
                        "(save_pretrained)")
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise DataError(f"{where}: no tokenizer could be loaded from {folder}: "
                        f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}",
                        "point tokenizer at a folder holding tokenizer.json or the files "
                        "save_pretrained() wrote") from e


def read_jsonl(path: Path, where: str, group: str | None = None
               ) -> tuple[list[tuple[str, str | None]], list[int], list[int] | None]:
    """Each example's (text, None) or (prompt, completion), its line number, and its group.

    A line holds ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}``, strings, and
    the ``group`` field (an integer) when one is named. Blank lines are skipped.
    """
    texts: list[tuple[str, str | None]] = []
    lines: list[int] = []
    groups: list[int] | None = [] if group else None
    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{where}: cannot read {path}: {e}") from e
    with handle:
        for no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            at = f"{where}, line {no}"
            try:
                doc = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{at}: not valid JSON ({e.msg})",
                                "each line must be one JSON object") from e
            if not isinstance(doc, dict):
                raise DataError(f"{at}: expected a JSON object, got {type(doc).__name__}")
            if "text" in doc:
                keys: tuple[str, ...] = ("text",)
            elif "prompt" in doc or "completion" in doc:
                keys = ("prompt", "completion")
            else:
                raise DataError(f"{at}: no key 'text' (nor 'prompt' and 'completion'); it has "
                                f"{', '.join(sorted(doc)) or 'no keys'}",
                                "give each line a 'text' string, or 'prompt' and 'completion'")
            for k in keys:
                if k not in doc:
                    raise DataError(f"{at}: key '{k}' is missing (a line with "
                                    f"'{keys[0]}' needs '{keys[1]}' too)")
                if not isinstance(doc[k], str):
                    raise DataError(f"{at}: key '{k}' must be a string, got "
                                    f"{type(doc[k]).__name__}")
            if groups is not None:
                assert group is not None
                g = doc.get(group)
                if isinstance(g, bool) or not isinstance(g, int):
                    raise DataError(f"{at}: key '{group}' (eval.group) must be an integer, got "
                                    f"{'nothing' if g is None else type(g).__name__}")
                groups.append(g)
            texts.append((doc[keys[0]], doc[keys[1]] if len(keys) == 2 else None))
            lines.append(no)
    if not texts:
        raise DataError(f"{where}: no examples (the file is empty)")
    return texts, lines, groups


def tokenize(texts: list[tuple[str, str | None]], tokenizer: Any,
             max_length: int | None) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels [N, T], right-padded to the longest example
    (truncated to ``max_length``).

    labels are the input ids (the model shifts nothing: the metric does), -100 on padding
    and on a prompt's tokens: the prompt's token count is that of the prompt tokenised
    alone, the rest of prompt + completion tokenised together is the completion.
    """
    rows: list[list[int]] = []
    starts: list[int] = []
    for first, completion in texts:
        if completion is None:
            ids = tokenizer(first)["input_ids"]
            start = 0
        else:
            ids = tokenizer(first + completion)["input_ids"]
            start = len(tokenizer(first)["input_ids"])
        if max_length is not None:
            ids = ids[:max_length]
        rows.append(list(ids))
        starts.append(start)
    width = max(1, max(len(r) for r in rows))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    n = len(rows)
    ids = torch.full((n, width), int(pad), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
        labels[i, start:len(row)] = ids[i, start:len(row)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def load_jsonl(path: Path, tokenizer_dir: Path | None, max_length: int | None, where: str,
               group: str | None = None, metric: str | None = None
               ) -> dict[str, torch.Tensor]:
    """A JSONL file tokenised (tokenize), with ``group`` [N] when named. With ``metric`` (a
    next-token metric) an example that counts no token is refused, naming its line."""
    if tokenizer_dir is None:
        raise DataError(f"{where}: JSONL text needs a tokenizer folder, and none is given",
                        "add tokenizer: DIR (the run's own tokenizer files) beside data:")
    texts, lines, groups = read_jsonl(path, where, group)
    tok = load_tokenizer(tokenizer_dir, f"{where}: tokenizer")
    out = tokenize(texts, tok, max_length)
    if metric is not None:
        refuse_uncounted(out["labels"], out["attention_mask"], where, metric, lines=lines)
    if group is not None and groups is not None:
        out[group] = torch.tensor(groups, dtype=torch.long)
    return out

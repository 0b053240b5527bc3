"""A JSON Schema of manifest v1 (``acctattr schema``), draft-07: what editors read.

It says what ``manifest.py`` accepts, key for key: the tests hold every property set here
equal to manifest.py's allowed keys, and validate the sample manifests against it. What a
schema cannot say (files exist, a Trainer folder supplies steps and lr, per-step list
lengths) ``acctattr check`` still checks. No torch here.
"""

from __future__ import annotations

import json
from typing import Any

from acctattr.runs import evals
from acctattr.runs import manifest as m

_REF = {"type": "string", "pattern": r"^.+:[A-Za-z_][A-Za-z0-9_]*$",
        "description": "FILE.py:FUNC (relative to the manifest) or package.module:FUNC"}
_PATH = {"type": "string", "minLength": 1,
         "description": "a path relative to the manifest file"}
_NUM = {"type": "number", "minimum": 0}
_UNIT = {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
_METRIC = {"anyOf": [{"enum": list(evals.BUILTIN_METRICS)}, _REF]}


def _obj(props: dict[str, Any], required: list[str] | None = None,
         description: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False,
                           "properties": props}
    if required:
        out["required"] = required
    if description:
        out["description"] = description
    return out


def _d(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {**schema, "description": description}


LR = {"anyOf": [
    _d(_NUM, "a constant learning rate"),
    {"type": "array", "items": _NUM, "minItems": 1,
     "description": "one learning rate per optimizer step (steps values)"},
    _obj({"schedule": {"enum": list(m.SCHEDULES)},
          "base": _d(_NUM, "the peak learning rate"),
          "warmup": {"type": "integer", "minimum": 0,
                     "description": "linear warmup steps from 0 (as Hugging Face)"},
          "min": _d(_NUM, "the final learning rate (linear, cosine)")},
         ["schedule", "base"], "a named schedule (get_scheduler's linear, cosine, "
         "constant[_with_warmup], cosine_with_min_lr)"),
    _obj({"trainer_state": _d(_PATH, "a Hugging Face trainer_state.json")}, ["trainer_state"],
         "the learning rates a Hugging Face Trainer logged"),
]}

OPTIMIZER_PROPS: dict[str, Any] = {
    "type": {"enum": list(m.OPTIMIZER_TYPES)},
    "steps": {"type": "integer", "minimum": 1,
              "description": "optimizer steps in the stage (a Trainer folder supplies them)"},
    "lr": LR,
    "momentum": _d(_UNIT, "sgd"),
    "dampening": {"type": "number", "minimum": 0, "maximum": 1, "description": "sgd"},
    "nesterov": {"type": "boolean", "description": "sgd"},
    "betas": {"type": "array", "items": _UNIT, "minItems": 2, "maxItems": 2,
              "description": "adam, adamw"},
    "eps": {"type": "number", "exclusiveMinimum": 0, "description": "adam, adamw"},
    "weight_decay": _NUM,
    "state": _d(_PATH, "the optimizer state at the stage's end (optimizer.pt, a Lightning "
                "checkpoint, or safetensors <param>.<state>)"),
    "continues": {"type": "boolean",
                  "description": "the stage kept the previous stage's optimizer state"},
    "param_names": {"anyOf": [
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "minItems": 1,
         "items": {"type": "array", "items": {"type": "string"}}}],
        "description": "parameter names per optimizer param group, in state-file order"},
    "max_grad_norm": {"anyOf": [_NUM, {"type": "null"}],
                      "description": "gradient-norm clipping threshold; null or 0: none"},
    "batch_size": {"type": "integer", "minimum": 1,
                   "description": "examples per forward pass and process"},
    "grad_accumulation": {"type": "integer", "minimum": 1,
                          "description": "forward passes per optimizer step"},
}

STAGE_PROPS: dict[str, Any] = {
    "name": {"type": "string", "minLength": 1},
    "start": _d(_PATH, "the checkpoint before the stage (first stage: required)"),
    "end": {"anyOf": [_PATH, _obj({"adapter": _d(_PATH, "a PEFT adapter folder")},
                                  ["adapter"])],
            "description": "the checkpoint after the stage, or {adapter: DIR}"},
    "optimizer": _obj(OPTIMIZER_PROPS, ["type"]),
    "data": _d(_PATH, "the stage's training data (.safetensors, or .jsonl text), for "
               "unrolled"),
    "checkpoints": {"type": "array", "items": _obj(
        {"step": {"type": "integer", "minimum": 1}, "path": _PATH}, ["step", "path"]),
        "description": "intermediate checkpoints inside the stage"},
    "tokenizer": _d(_PATH, "with .jsonl data: the run's tokenizer folder (default: eval's)"),
    "max_length": {"type": "integer", "minimum": 1,
                   "description": "with .jsonl data: tokens kept per example (default: eval's)"},
}

EVAL_PROPS: dict[str, Any] = {
    "data": _d(_PATH, "a .safetensors file, .jsonl text, or FILE.py:FUNC yielding dict "
               "batches"),
    "inputs": {"anyOf": [{"type": "string", "minLength": 1},
                         {"type": "array", "items": {"type": "string", "minLength": 1},
                          "minItems": 1, "uniqueItems": True}],
               "description": "tensor name(s) given to the model"},
    "target": {"type": "string", "minLength": 1},
    "group": {"type": "string", "minLength": 1,
              "description": "tensor of integer group ids: per-group effects"},
    "metric": _METRIC,
    "batch_size": {"type": "integer", "minimum": 1},
    "higher_is_better": {"type": "boolean"},
    "tokenizer": _d(_PATH, "with .jsonl data: the run's tokenizer folder (default: the "
                    "model.hf folder's)"),
    "max_length": {"type": "integer", "minimum": 1,
                   "description": "with .jsonl data: tokens kept per example"},
}


def _eval_obj() -> dict[str, Any]:
    """An eval section: inputs and target are required unless the data is JSONL text
    (tokenised into input_ids, attention_mask and labels, their defaults)."""
    return {**_obj(EVAL_PROPS, ["data"]),
            "if": {"properties": {"data": {"type": "string", "pattern": r"\.jsonl$"}}},
            "else": {"required": ["inputs", "target"]}}

MODEL_PROPS: dict[str, Any] = {
    "factory": _d(_REF, "builds the model: FILE.py:FUNC -> torch.nn.Module"),
    "hf": _d(_PATH, "a local folder with a Hugging Face config.json"),
    "class": {"type": "string", "description": "with hf: the transformers class to build"},
}

TRAIN_PROPS: dict[str, Any] = {"loss": _METRIC}

TOP_PROPS: dict[str, Any] = {
    "version": {"const": 1},
    "model": {**_obj(MODEL_PROPS), "oneOf": [{"required": ["factory"]}, {"required": ["hf"]}]},
    "stages": {"type": "array", "minItems": 1, "items": {
        **_obj(STAGE_PROPS, ["name", "end"]),
        # a stage that trained the model itself names its optimizer; an adapter stage need not
        "if": {"properties": {"end": {"type": "string"}}},
        "then": {"required": ["optimizer"]}}},
    "eval": _eval_obj(),
    "train": _obj(TRAIN_PROPS),
    "replay": _d(_REF, "validate: FILE.py:FUNC that retrains with a stage skipped"),
}


_REQUIRED = ["version", "model", "stages", "eval"]
_ONE_EVAL: dict[str, Any] = {}
if "evals" in m._TOP_KEYS:  # several named eval sections, where the manifest takes them
    TOP_PROPS["evals"] = {
        "type": "object", "minProperties": 1,
        "propertyNames": {"pattern": "^[A-Za-z0-9_.-]+$"},
        "additionalProperties": _eval_obj(),
        "description": "several behaviours: name -> eval section (instead of eval)"}
    _REQUIRED = ["version", "model", "stages"]
    _ONE_EVAL = {"oneOf": [{"required": ["eval"]}, {"required": ["evals"]}]}


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of manifest v1."""
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "acctattr manifest, version 1",
        **_obj(TOP_PROPS, _REQUIRED),
        **_ONE_EVAL,
    }


def schema_text() -> str:
    return json.dumps(manifest_schema(), indent=2) + "\n"

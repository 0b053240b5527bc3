"""acctattr schema: a JSON Schema that says what manifest.py accepts, key for key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from acctattr.cli import app
from acctattr.runs import evals
from acctattr.runs import manifest as m
from acctattr.runs import schema as s
from acctattr.runs.manifest import ManifestError, parse_manifest
from acctattr.runs.yaml_load import Loader

jsonschema = pytest.importorskip("jsonschema")
ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "sample_runs").glob("*/manifest.yaml"))


def _validator():
    schema = s.manifest_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_every_allowed_key_is_in_the_schema():
    """Each mapping's properties are exactly manifest.py's allowed keys."""
    assert set(s.TOP_PROPS) == m._TOP_KEYS
    assert set(s.MODEL_PROPS) == m._MODEL_KEYS
    assert set(s.STAGE_PROPS) == m._STAGE_KEYS
    assert set(s.OPTIMIZER_PROPS) == m._OPT_KEYS
    assert set(s.EVAL_PROPS) == evals._EVAL_KEYS
    assert set(s.TRAIN_PROPS) == m._TRAIN_KEYS
    schedule = next(x for x in s.LR["anyOf"] if "schedule" in x.get("properties", {}))
    assert set(schedule["properties"]) == m._LR_SCHEDULE_KEYS
    assert schedule["properties"]["schedule"]["enum"] == list(m.SCHEDULES)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.parent.name)
def test_sample_manifests_validate(path):
    """The shipped sample manifests validate against the schema."""
    assert SAMPLES, "sample runs must exist"
    doc = yaml.load(path.read_text(), Loader=Loader)
    errors = list(_validator().iter_errors(doc))
    assert errors == [], [e.message for e in errors]


BASE = {"version": 1, "model": {"hf": "init"},
        "stages": [{"name": "sft", "start": "init", "end": "sft/checkpoint-6",
                    "optimizer": {"type": "adamw"}},
                   {"name": "lora", "end": {"adapter": "lora/checkpoint-4"}}],
        "eval": {"data": "eval.safetensors", "inputs": ["input_ids"], "target": "label"}}


@pytest.mark.parametrize("change", [
    {}, {"lr": 3e-4}, {"lr": [0.1, 0.2]}, {"lr": {"schedule": "cosine", "base": 0.1}},
    {"lr": {"trainer_state": "x.json"}}, {"max_grad_norm": None}, {"grad_accumulation": 4},
    {"betas": [0.9, 0.95], "eps": 1e-8, "param_names": [["a"], ["b"]]},
])
def test_valid_variants_validate(change):
    """Forms manifest.py accepts (lr as number, list, schedule, trainer_state; adapter
    stages without an optimizer) validate."""
    doc = json.loads(json.dumps(BASE))
    doc["stages"][0]["optimizer"].update(change)
    assert list(_validator().iter_errors(doc)) == []


@pytest.mark.parametrize("where,key,value", [
    ("opt", "momentum", 1.5), ("opt", "colour", 1), ("opt", "type", "lion"),
    ("opt", "lr", {"schedule": "poly", "base": 0.1}), ("opt", "eps", 0),
    ("eval", "colour", "red"), ("eval", "metric", "accuracy"), ("top", "version", 2),
    ("stage", "optimizer", None),
])
def test_invalid_variants_fail_like_the_parser(where, key, value, tmp_path):
    """What manifest.py refuses, the schema refuses too."""
    doc = json.loads(json.dumps(BASE))
    target = {"opt": doc["stages"][0]["optimizer"], "eval": doc["eval"], "top": doc,
              "stage": doc["stages"][0]}[where]
    if value is None:
        del target[key]
    else:
        target[key] = value
    assert list(_validator().iter_errors(doc)), "the schema must refuse it"
    for d in ("init", "sft/checkpoint-6", "lora/checkpoint-4"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    (tmp_path / "init" / "config.json").write_text("{}")
    (tmp_path / "lora/checkpoint-4/adapter_config.json").write_text("{}")
    (tmp_path / "eval.safetensors").write_bytes(b"")
    with pytest.raises(ManifestError):
        parse_manifest(doc, tmp_path / "manifest.yaml")


def test_schema_command(tmp_path):
    """acctattr schema prints the schema; -o writes it."""
    res = CliRunner().invoke(app, ["schema"])
    assert res.exit_code == 0
    assert json.loads(res.stdout) == s.manifest_schema()
    res = CliRunner().invoke(app, ["schema", "-o", str(tmp_path / "a.json")])
    assert res.exit_code == 0
    assert json.loads((tmp_path / "a.json").read_text()) == s.manifest_schema()

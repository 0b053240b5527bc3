"""Manifest v1 parsing and validation (acctattr/manifest.py, SPEC section 3)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from acctattr.errors import ManifestError
from acctattr.runs.manifest import (
    EvalSpec,
    LrSpec,
    Manifest,
    OptimizerSpec,
    Ref,
    Stage,
    load_manifest,
)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder holding (empty) files for every path VALID names; parsing never opens them."""
    root = tmp_path / "run"
    (root / "model.py").parent.mkdir(parents=True)
    (root / "model.py").write_text("def build():\n    pass\n")
    for d in ("ckpt/init", "ckpt/pre", "ckpt/ft", "ckpt/pre-5"):
        (root / d).mkdir(parents=True)
    for f in ("ckpt/pre/optimizer.pt", "ckpt/ft/optimizer.pt", "data/eval.safetensors",
              "data/pre.safetensors", "metric.py"):
        _touch(root / f)
    return root


VALID: dict[str, Any] = {
    "version": 1,
    "model": {"factory": "model.py:build"},
    "stages": [
        {"name": "pre", "start": "ckpt/init", "end": "ckpt/pre",
         "optimizer": {"type": "sgd", "steps": 10,
                       "lr": {"schedule": "cosine", "base": 0.1, "warmup": 2, "min": 0.01},
                       "momentum": 0.9, "dampening": 0.1, "nesterov": False,
                       "weight_decay": 0.001, "state": "ckpt/pre/optimizer.pt"},
         "data": "data/pre.safetensors",
         "checkpoints": [{"step": 5, "path": "ckpt/pre-5"}]},
        {"name": "ft", "end": "ckpt/ft",
         "optimizer": {"type": "adamw", "steps": 3, "lr": [0.1, 0.2, 0.3],
                       "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.01,
                       "state": "ckpt/ft/optimizer.pt", "continues": False,
                       "param_names": [["w"], ["b"]]}},
    ],
    "eval": {"data": "data/eval.safetensors", "inputs": ["x"], "target": "y",
             "group": "g", "metric": "margin", "batch_size": 32},
}


def write(root: Path, doc: Any, name: str = "manifest.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def problems(root: Path, doc: Any) -> ManifestError:
    """Load ``doc`` and return the ManifestError it must raise."""
    path = write(root, doc)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return info.value


def edited(**paths: Any) -> dict[str, Any]:
    """VALID with values replaced at paths spelt stages__0__optimizer__lr; None deletes."""
    doc = copy.deepcopy(VALID)
    for dotted, value in paths.items():
        *head, last = dotted.split("__")
        node: Any = doc
        for part in head:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) else last
        if value is None:
            del node[key]
        else:
            node[key] = value
    return doc


# ---------------------------------------------------------------- valid


def test_valid_manifest_parses_into_dataclasses(run_dir):
    """A valid manifest becomes frozen dataclasses holding every value it states."""
    m = load_manifest(write(run_dir, VALID))
    assert isinstance(m, Manifest)
    assert m.factory == Ref("model.py:build", (run_dir / "model.py").resolve(), None, "build")
    pre, ft = m.stages
    assert isinstance(pre, Stage) and isinstance(pre.optimizer, OptimizerSpec)
    assert pre.optimizer == OptimizerSpec(
        type="sgd", steps=10, lr=LrSpec(schedule="cosine", base=0.1, warmup=2, min=0.01),
        momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.001,
        state=(run_dir / "ckpt/pre/optimizer.pt").resolve())
    assert [(c.step, c.path) for c in pre.checkpoints] == [(5, (run_dir / "ckpt/pre-5").resolve())]
    assert ft.optimizer.lr == LrSpec(values=(0.1, 0.2, 0.3))
    assert ft.optimizer.betas == (0.8, 0.99) and ft.optimizer.eps == 1e-6
    assert ft.optimizer.param_names == (("w",), ("b",))
    assert m.eval == EvalSpec(inputs=("x",), target="y", metric="margin",
                              data=(run_dir / "data/eval.safetensors").resolve(), group="g",
                              batch_size=32)
    with pytest.raises(AttributeError):
        m.stages[0].name = "other"  # type: ignore[misc]


def test_paths_resolve_relative_to_the_manifest_not_the_cwd(run_dir, tmp_path, monkeypatch):
    """Paths are anchored at the manifest's folder whatever the working directory is."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    m = load_manifest(os.path.relpath(write(run_dir, VALID), elsewhere))
    assert m.path == (run_dir / "manifest.yaml").resolve()
    assert m.stages[0].start == (run_dir / "ckpt/init").resolve()
    assert m.stages[0].data == (run_dir / "data/pre.safetensors").resolve()
    assert m.eval.data == (run_dir / "data/eval.safetensors").resolve()


def test_later_stage_starts_at_previous_end(run_dir):
    """A stage without 'start' starts from the previous stage's end checkpoint."""
    m = load_manifest(write(run_dir, VALID))
    assert m.stages[1].start == m.stages[0].end


def test_defaults(run_dir):
    """Omitted optional keys take their documented defaults (cross_entropy, 256, constant lr)."""
    doc = edited(eval__metric=None, eval__batch_size=None, eval__group=None,
                 stages__1__optimizer__continues=None)
    doc["stages"][0]["optimizer"]["lr"] = 0.5
    m = load_manifest(write(run_dir, doc))
    assert m.eval.metric == "cross_entropy" and m.eval.batch_size == 256
    assert m.eval.group is None
    assert m.stages[0].optimizer.lr == LrSpec(value=0.5)
    assert m.stages[1].optimizer.continues is False
    assert m.train_loss == "cross_entropy" and m.replay is None


def test_user_metric_and_data_function_refs(run_dir):
    """eval.metric and eval.data accept FILE.py:FUNC, resolved against the manifest."""
    doc = edited(eval__metric="metric.py:score", eval__data="metric.py:batches")
    m = load_manifest(write(run_dir, doc))
    assert m.eval.metric == Ref("metric.py:score", (run_dir / "metric.py").resolve(), None,
                                "score")
    assert m.eval.data is None
    assert m.eval.data_fn == Ref("metric.py:batches", (run_dir / "metric.py").resolve(), None,
                                 "batches")


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(("where", "key"), [
    ((), "extras"),
    (("stages", 0), "notes"),
    (("stages", 1, "optimizer"), "lr_decay"),
    (("eval",), "shuffle"),
])
def test_unknown_keys_are_rejected_by_name(run_dir, where, key):
    """An unknown key anywhere (top level, stage, optimizer, eval) is an error naming the key."""
    doc = copy.deepcopy(VALID)
    node: Any = doc
    for part in where:
        node = node[part]
    node[key] = 1
    err = problems(run_dir, doc)
    assert len(err.problems) == 1
    assert f"unknown key '{key}'" in err.problems[0]
    assert str(run_dir / "manifest.yaml") in str(err)


# ---------------------------------------------------------------- single problems


@pytest.mark.parametrize(("doc", "expect"), [
    (edited(stages__0__end="ckpt/nope"), ["stage 'pre': end", "ckpt/nope not found"]),
    (edited(stages__0__optimizer__state="ckpt/pre/missing.pt"), ["optimizer.state",
                                                                  "missing.pt not found"]),
    (edited(eval__data="data/none.safetensors"), ["eval.data", "none.safetensors not found"]),
    (edited(model__factory="nofile.py:build"), ["model.factory", "nofile.py not found"]),
    (edited(stages__0__checkpoints=[{"step": 5, "path": "ckpt/x"}]),
     ["checkpoints[0].path", "ckpt/x not found"]),
    (edited(stages__1__name="pre"), ["stages[1].name", "duplicate stage name 'pre'"]),
    (edited(stages__0__optimizer__lr={"schedule": "exponential", "base": 0.1}),
     ["optimizer.lr.schedule", "exponential"]),
    (edited(stages__0__optimizer__lr={"schedule": "cosine", "base": 0.1, "warmup": 11}),
     ["optimizer.lr.warmup", "warmup 11 is longer than the stage's 10 steps"]),
    (edited(stages__1__optimizer__lr=[0.1, 0.2]),
     ["optimizer.lr", "has 2 values but the stage has steps: 3"]),
    (edited(stages__0__start=None), ["stage 'pre': start", "first stage needs a start"]),
    (edited(stages__0__optimizer__continues=True),
     ["stage 'pre': optimizer.continues", "no earlier optimizer state"]),
    (edited(stages__0__optimizer__betas=[0.9, 0.99]),
     ["optimizer.betas", "'betas' belongs to adam/adamw, not sgd"]),
    (edited(stages__1__optimizer__momentum=0.9),
     ["optimizer.momentum", "'momentum' belongs to sgd, not adamw"]),
    (edited(stages__1__optimizer__nesterov=True), ["'nesterov' belongs to sgd, not adamw"]),
    (edited(stages__0__optimizer__eps=1e-8), ["'eps' belongs to adam/adamw, not sgd"]),
    (edited(stages__0__optimizer__weight_decay=-0.1), ["optimizer.weight_decay", "must be >= 0"]),
    (edited(stages__0__optimizer__weight_decay=float("nan")),
     ["optimizer.weight_decay", "must be finite"]),
    (edited(stages__0__optimizer__momentum=float("inf")), ["optimizer.momentum", "finite"]),
    (edited(stages__0__optimizer__momentum=1.0), ["optimizer.momentum", "must be < 1"]),
    (edited(stages__0__optimizer__lr=-0.1), ["optimizer.lr", "must be >= 0"]),
    (edited(stages__0__optimizer__lr=float("nan")), ["optimizer.lr", "finite"]),
    (edited(stages__1__optimizer__lr=[0.1, float("inf"), 0.3]), ["optimizer.lr[1]", "finite"]),
    (edited(stages__1__optimizer__eps=0.0), ["optimizer.eps", "must be > 0"]),
    (edited(stages__1__optimizer__betas=[0.9, 1.5]), ["optimizer.betas[1]", "must be < 1"]),
    (edited(stages__0__optimizer__steps=0), ["optimizer.steps", "must be >= 1"]),
    (edited(stages__0__optimizer__type="lion"), ["optimizer.type", "lion"]),
    (edited(eval__batch_size=0), ["eval.batch_size", "must be >= 1"]),
    (edited(eval__metric="accuracy"), ["eval.metric", "accuracy"]),
    (edited(version=2), ["version", "only version 1"]),
    (edited(eval__target=None), ["eval", "missing required key 'target'"]),
])
def test_single_problem_is_reported_where_it_is(run_dir, doc, expect):
    """Each kind of mistake gives exactly one problem that names its place and its cause."""
    err = problems(run_dir, doc)
    assert len(err.problems) == 1, err.problems
    for text in expect:
        assert text in err.problems[0], (text, err.problems[0])


def test_all_problems_are_reported_at_once(run_dir):
    """Several independent mistakes all appear in one ManifestError's message."""
    doc = edited(
        extras=1,
        stages__0__start=None,
        stages__0__optimizer__betas=[0.9, 0.99],
        stages__1__optimizer__lr=[0.1],
        stages__1__name="pre",
        eval__data="data/none.safetensors",
        eval__batch_size=-3,
    )
    err = problems(run_dir, doc)
    text = str(err)
    for fragment in ("unknown key 'extras'", "first stage needs a start",
                     "'betas' belongs to adam/adamw", "has 1 values but the stage has steps: 3",
                     "duplicate stage name 'pre'", "none.safetensors not found",
                     "eval.batch_size"):
        assert fragment in text, fragment
    assert len(err.problems) == 7
    assert text.startswith(f"{run_dir / 'manifest.yaml'}: 7 problems")


def test_python_object_tags_are_refused_without_running(run_dir):
    """A `!!python/object` tag is refused by the YAML loader and never constructs the object."""
    marker = run_dir / "ran"
    path = run_dir / "manifest.yaml"
    path.write_text(
        "version: 1\n"
        f"model: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
        f"['{marker}']]\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert "!!python/object" in str(info.value)
    assert not marker.exists()


def test_missing_manifest_file(tmp_path):
    """A manifest path that does not exist is a ManifestError naming the path."""
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(tmp_path / "none.yaml")


def test_not_a_mapping(run_dir):
    """A YAML document that is not a mapping is one clear problem, not a crash."""
    err = problems(run_dir, ["version", 1])
    assert "expected a mapping" in str(err)


def test_exponent_floats_without_a_dot_are_numbers(run_dir):
    """`lr: 3e-4`, `eps: 1e-8` and list items like `1e-3` are floats, as ML configs write them."""
    text = yaml.safe_dump(VALID, sort_keys=False)
    text = text.replace("weight_decay: 0.001", "weight_decay: 1e-3")
    text = text.replace("eps: 1.0e-06", "eps: 1e-6").replace("- 0.1\n", "- 1E-1\n", 1)
    text = text.replace("base: 0.1", "base: 3e-4").replace("min: 0.01", "min: -1e+0")
    assert "weight_decay: 1e-3" in text and "eps: 1e-6" in text and "- 1E-1" in text
    path = run_dir / "manifest.yaml"
    path.write_text(text.replace("min: -1e+0", "min: 1e+0"))
    m = load_manifest(path)
    pre, ft = m.stages
    assert pre.optimizer.weight_decay == 1e-3 and pre.optimizer.lr.base == 3e-4
    assert pre.optimizer.lr.min == 1.0
    assert ft.optimizer.eps == 1e-6 and ft.optimizer.lr.values == (0.1, 0.2, 0.3)
    path.write_text(text)
    with pytest.raises(ManifestError, match=r"optimizer.lr.min: must be >= 0, got -1.0"):
        load_manifest(path)


def test_clipping_and_batch_size_keys(run_dir):
    """max_grad_norm and batch_size × grad_accumulation reach the stage's optimizer; null or 0
    means no clipping; omitted (no Trainer folder) means none and unknown."""
    doc = edited(stages__0__optimizer__max_grad_norm=1.5, stages__0__optimizer__batch_size=8,
                 stages__0__optimizer__grad_accumulation=4)
    doc["stages"][1]["optimizer"]["max_grad_norm"] = 0
    m = load_manifest(write(run_dir, doc))
    assert m.stages[0].optimizer.max_grad_norm == 1.5
    assert m.stages[0].optimizer.batch_size == 32
    assert m.stages[1].optimizer.max_grad_norm is None
    assert m.stages[1].optimizer.batch_size is None
    err = problems(run_dir, edited(stages__0__optimizer__batch_size=0,
                                   stages__0__optimizer__max_grad_norm=-1.0))
    assert "stage 'pre'" in str(err) and "batch_size" in str(err) and "max_grad_norm" in str(err)

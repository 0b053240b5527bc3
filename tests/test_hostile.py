"""Hostile input (issue 13): every input is checked before use, gates fail closed.

Each case breaks one thing in a copy of a tiny real staged run (tests/staged.py, trained with
torch.optim) and asserts exit 2 (or 1 for a gate), a message naming what is wrong, and no
traceback. A small seeded fuzzer damages paths and file contents. Most cases run in-process
(typer's CliRunner); those about signals, FIFOs and the console entry point run a
subprocess with a 60 s timeout as a hang guard (never a timing assertion).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from staged import StageCfg, write_run
from typer.testing import CliRunner

from acctattr.cli import app

STAGES = [
    StageCfg("a", "sgd", 6, 0.05, {"momentum": 0.9}, (0.01, 0.0)),
    StageCfg("b", "sgd", 5, 0.03, {"momentum": 0.9}, (0.01, 0.0), continues=True),
    StageCfg("c", "adamw", 4, 0.01, {}, (0.1, 0.0)),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("hostile") / "run", STAGES, with_data=True).parent


@pytest.fixture
def run_dir(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of a valid three-stage run with stage data (unrolled can run)."""
    dst = tmp_path / "run"
    shutil.copytree(pristine, dst)
    return dst


def cli(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def no_traceback(result: Any) -> None:
    out = result.stdout + result.stderr
    assert "Traceback" not in out and "internal error" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)


def refused(result: Any, *needles: str) -> str:
    """Exit 2, no traceback, nothing on stdout, every needle on stderr."""
    err = result.stderr
    assert result.exit_code == 2, f"exit {result.exit_code}\nstderr:\n{err}\n{result.exception!r}"
    no_traceback(result)
    assert result.stdout == ""
    for n in needles:
        assert n in err, f"{n!r} not in stderr:\n{err}"
    return err


def manifest(run_dir: Path) -> Path:
    return run_dir / "manifest.yaml"


def edit(run_dir: Path, fn) -> Path:
    path = manifest(run_dir)
    doc = yaml.safe_load(path.read_text())
    fn(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def edit_eval(run_dir: Path, fn) -> None:
    path = run_dir / "data" / "eval.safetensors"
    data = load_file(path)
    fn(data)
    save_file(data, path)


# ---------------------------------------------------------------- gates fail closed


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_eval_input_is_refused_up_front(run_dir, value):
    """One NaN or Inf anywhere in the eval inputs: exit 2 from check and run, naming the
    file, the tensor and the example (never `final nan` and a passing gate)."""
    def poison(d):
        d["x"][23, 4] = value
    edit_eval(run_dir, poison)
    for args in (("check",), ("run", "-q", "--fail-on-harm", "0", "--confidence", "0.5")):
        refused(cli(args[0], manifest(run_dir), *args[1:]), "eval.safetensors",
                "tensor 'x'", "NaN or Inf", "example 23")


def test_ignore_index_label_alone_is_refused(run_dir):
    """A -100 label on a one-label example leaves nothing counted: refused, never loss 0."""
    def ignore(d):
        d["y"][5] = -100
    edit_eval(run_dir, ignore)
    refused(cli("check", manifest(run_dir)), "eval.target 'y'", "-100", "first example 5")


def test_negative_label_other_than_ignore_index_is_refused(run_dir):
    """Class ids are >= 0 or -100; -3 is refused with the example."""
    def neg(d):
        d["y"][7] = -3
    edit_eval(run_dir, neg)
    refused(cli("check", manifest(run_dir)), "negative class id -3", "example 7")


def test_sequence_labels_exclude_ignore_index_from_the_mean():
    """Per-token cross-entropy is averaged over counted tokens only; an example with no
    counted token is NaN (refused earlier), never 0."""
    import torch.nn.functional as F

    from acctattr.evaluation.metrics import BUILTIN

    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, -100, 2, 3], [-100, -100, 4, -100], [-100] * 4])
    ce = BUILTIN["cross_entropy"][0](out, y)
    assert ce[0].item() == pytest.approx(F.cross_entropy(out[0, [0, 2, 3]], y[0, [0, 2, 3]]).item())
    assert ce[1].item() == pytest.approx(F.cross_entropy(out[1, 2:3], y[1, 2:3]).item())
    assert torch.isnan(ce[2])
    lp = BUILTIN["logprob"][0](out, y)
    assert lp[0].item() == pytest.approx(-ce[0].item())


def test_sequence_eval_data_with_an_uncounted_example_is_refused():
    """check_values refuses a sequence example whose every label is -100."""
    from acctattr.errors import DataError
    from acctattr.evaluation.data import check_values

    batch = {"x": torch.zeros(3, 4), "y": torch.tensor([[1, -100], [-100, -100], [0, 0]])}
    with pytest.raises(DataError, match="1 example\\(s\\) have every label -100"):
        check_values(batch, ("x", "y"), "y", True, "eval.data f")
    check_values({"x": batch["x"], "y": batch["y"][[0, 2]]}, ("x", "y"), "y", True, "f")


METRIC_INF = """import torch


def inf_for_some(out, y):
    v = torch.nn.functional.cross_entropy(out, y.long(), reduction="none")
    return torch.where(y == 0, torch.full_like(v, float("inf")), v)
"""


def test_metric_yielding_inf_trips_the_gate_and_says_why(run_dir):
    """A user metric that yields Inf: effects undefined, --fail-on-harm trips (exit 1) even
    at confidence 0.5, and the JSON gate object records the reason."""
    (run_dir / "metric.py").write_text(METRIC_INF)
    path = edit(run_dir, lambda d: d["eval"].__setitem__("metric", "metric.py:inf_for_some"))
    r = cli("run", path, "-q", "-f", "json", "--estimator", "frozen", "--fail-on-harm", "100",
            "--confidence", "0.5")
    assert r.exit_code == 1, r.stderr
    no_traceback(r)
    doc = json.loads(r.stdout)
    assert doc["final_value"] is None
    assert all(s["verdict"] == "undefined" for s in doc["stages"])
    gate = doc["gate"]
    assert gate["tripped"] and all(c["tripped"] for c in gate["checks"])
    assert "the effect is NaN" in gate["worst"]["reason"]
    assert "fail closed" in r.stderr and "NaN or infinite" in r.stderr


def test_undefined_standard_error_trips_a_confident_gate(run_dir):
    """One eval example: the standard error is undefined; a gate at confidence 0.95 trips
    (fail closed) and says why; at 0.5 (the point estimate) it does not need it."""
    edit_eval(run_dir, lambda d: d.update({k: v[:1].clone() for k, v in d.items()}))
    r = cli("run", manifest(run_dir), "-q", "-f", "json", "--estimator", "frozen",
            "--fail-on-harm", "1000", "--confidence", "0.95")
    assert r.exit_code == 1, r.stderr
    no_traceback(r)
    assert "standard error is undefined" in json.loads(r.stdout)["gate"]["worst"]["reason"]
    r = cli("run", manifest(run_dir), "-q", "-f", "json", "--estimator", "frozen",
            "--fail-on-harm", "1000", "--confidence", "0.5")
    assert r.exit_code == 0, r.stderr


def test_training_labels_out_of_range_under_unrolled(run_dir):
    """A class id beyond the model's outputs in a stage's training data: exit 2 naming the
    stage and file (the same fault in eval data is caught the same way)."""
    def bad(d):
        d.pop("train")
    path = edit(run_dir, bad)
    data = load_file(run_dir / "data" / "b.safetensors")
    data["y"][0] = 99
    save_file(data, run_dir / "data" / "b.safetensors")
    r = cli("run", path, "-q", "--estimator", "unrolled")
    refused(r, "stage 'b'", "b.safetensors", "training loss failed")


def test_nan_in_training_data_under_unrolled(run_dir):
    """NaN in a stage's training data is refused like NaN in eval data."""
    data = load_file(run_dir / "data" / "c.safetensors")
    data["x"][2, 0] = float("nan")
    save_file(data, run_dir / "data" / "c.safetensors")
    refused(cli("run", manifest(run_dir), "-q", "--estimator", "unrolled"),
            "stage 'c'", "c.safetensors", "tensor 'x'", "NaN or Inf")

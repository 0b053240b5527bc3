"""Every option and output path is checked before any computing: bad ones exit 2 at once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from acctattr import pipeline, validation
from acctattr.cli import app

runner = CliRunner()
DIGITS = Path(__file__).resolve().parents[1] / "sample_runs" / "digits" / "manifest.yaml"


@pytest.fixture
def no_compute(monkeypatch):
    """pipeline.run / validation.validate replaced by a tripwire: reaching them fails the test."""
    calls: list[str] = []

    def trip(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} was reached")
        return f

    monkeypatch.setattr(pipeline, "run", trip("run"))
    monkeypatch.setattr(validation, "validate", trip("validate"))
    return calls


@pytest.mark.parametrize("args,needle", [
    (["--output", "/nonexist/r.json"], "does not exist"),
    (["--output", "."], "is a folder"),
    (["--fail-on-harm", "0.1", "--gate-group", "nosuchgroup"], "choose one of 0, 1"),
    (["--fail-on-harm", "0.1", "--gate-stage", "nosuch"], "no stage of that name"),
    (["--fail-on-harm", "nan"], "finite"),
    (["--confidence", "1.5"], "outside [0.5, 1)"),
    (["--gate-stage", "newest"], "add --fail-on-harm"),
    (["--device", "gpu"], "not a device"),
    (["--plot", "effects.txt"], "unknown image type"),
    (["--plot", "/nonexist/p.png"], "does not exist"),
    (["--dynamics", "flow", "--substeps", "3"], "--dynamics linear"),
])
def test_run_rejects_bad_options_before_computing(no_compute, args, needle):
    """run: a bad option is exit 2 with its message, and the pipeline never starts."""
    res = runner.invoke(app, ["run", str(DIGITS), *args])
    assert res.exit_code == 2, res.output
    assert needle in res.stderr
    assert no_compute == []


def test_gate_group_without_eval_group_is_refused_early(no_compute, tmp_path):
    """--gate-group on a manifest without eval.group fails before computing."""
    doc = yaml.safe_load(DIGITS.read_text())
    del doc["eval"]["group"]
    root = DIGITS.parent
    path = root / ".nogroup-test.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        res = runner.invoke(app, ["run", str(path), "--fail-on-harm", "0.1",
                                  "--gate-group", "1"])
    finally:
        path.unlink()
    assert res.exit_code == 2 and "names no eval.group" in res.stderr
    assert no_compute == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder_is_refused_early(no_compute, tmp_path):
    """--output in a folder this user cannot write: exit 2 before computing."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        res = runner.invoke(app, ["run", str(DIGITS), "--output", str(ro / "r.json")])
    finally:
        ro.chmod(0o700)
    assert res.exit_code == 2 and "not writable" in res.stderr
    assert no_compute == []


@pytest.mark.parametrize("cmd", [
    ["validate", str(DIGITS), "--output", "/nonexist/v.json"],
    ["validate", str(DIGITS), "--device", "gpu"],
    ["init", str(DIGITS.parent / "ckpt" / "polish"), "--output", "/nonexist/m.yaml"],
    ["diff", str(DIGITS), str(DIGITS), "--output", "/nonexist/d.md"],
])
def test_other_commands_check_outputs_first(no_compute, cmd):
    """validate, init and diff check their output path (and device) before anything else."""
    res = runner.invoke(app, cmd)
    assert res.exit_code == 2, res.output
    assert "does not exist" in res.stderr or "not a device" in res.stderr
    assert no_compute == []

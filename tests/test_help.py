"""Help texts, --version, colour and the table at a narrow terminal."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from acctattr import __version__, cli, pipeline
from acctattr.cli import app
from acctattr.output import report

runner = CliRunner()
DIGITS = Path(__file__).resolve().parents[1] / "sample_runs" / "digits" / "manifest.yaml"


def _help(*cmd: str) -> str:
    res = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    return re.sub(r"\s+", " ", res.output.replace("│", " "))


def test_positional_help_is_shown():
    """init's help lists the inputs it takes; run's names its manifest argument."""
    text = _help("init")
    assert "Trainer output_dir" in text and "Lightning .ckpt" in text
    assert "PEFT adapter" in text
    assert "The run's manifest.yaml." in _help("run")


def test_plot_help_keeps_the_extra_name():
    """--plot's help shows acctattr[plot] (rich markup does not eat the brackets)."""
    assert "acctattr[plot]" in _help("run")


def test_validate_offers_only_what_it_accepts():
    """validate --help offers table|json and concrete estimators; markdown and auto are
    usage errors (exit 2) before anything runs."""
    text = _help("validate")
    assert "markdown" not in text
    assert not re.search(r"auto\|naive|unrolled\|auto", text)
    for bad in (["--format", "markdown"], ["--estimator", "auto"]):
        res = runner.invoke(app, ["validate", str(DIGITS), *bad])
        assert res.exit_code == 2


def test_version():
    """acctattr --version prints the package version and exits 0."""
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.stdout.strip() == f"acctattr {__version__}"


@pytest.mark.parametrize("value,colour", [("", True), ("1", False), (None, True)])
def test_no_color_only_when_non_empty(monkeypatch, value, colour):
    """NO_COLOR turns colour off only when set to something (no-color.org)."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    if value is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", value)
    assert cli.use_color(None) is colour
    assert cli.use_color(Path("out.txt")) is False


@pytest.fixture(scope="module")
def digits_result():
    return pipeline.run(DIGITS, "naive", "direct")


@pytest.mark.parametrize("width", [60, 80, 100])
def test_narrow_terminal_never_cuts_numbers(digits_result, width):
    """At 60-100 columns every line fits and every effect, ± and group value is whole."""
    text = report.to_table(digits_result, color=False, width=width)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    for s in digits_result.stages:
        assert report._fmt(s.effect) in text and report._se(s.effect_se) in text
        for g in s.groups or {}:
            assert report._group_cell(s, g) in text


def test_zero_share_draws_no_bar():
    """A share that shows as 0% draws no bar; 1% draws one block."""
    assert report._bar(0.0) == "" and report._bar(0.004) == ""
    assert report._bar(0.006) == "█"
    assert report._bar(1.0) == "█" * report._BAR


def test_per_example_with_table_warns(digits_result, monkeypatch):
    """--per-example with the table says it only reaches JSON instead of being ignored."""
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: digits_result)
    res = runner.invoke(app, ["run", str(DIGITS), "--per-example", "-q"])
    assert res.exit_code == 0, res.output
    assert "--per-example" in res.stderr and "--format json" in res.stderr

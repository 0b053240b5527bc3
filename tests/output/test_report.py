"""Reports (acctattr/report.py, plots.py) and the `run` options that produce them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import yaml
from reportkit import DIGITS, ROOT, TRAP, digits_run, invoke, markdown_tables

from acctattr.cli import app
from acctattr.output import gates, plots, report

SPEC_FIELDS = ["name", "rank", "effect", "verdict", "share", "counterfactual_value", "groups"]


def test_real_run_keeps_stdout_pure_json_and_progress_on_stderr():
    """A real `run --format json`: stdout parses as JSON, progress lines are on stderr."""
    run = digits_run()
    doc = json.loads(run.stdout)
    assert doc["schema"] == "acctattr.effects/1"
    assert "[1/3] stage pretrain" in run.stderr
    assert "stage" not in run.stdout.split("{", 1)[0]


def test_json_adds_standard_errors_after_the_spec_fields():
    """Per stage: SPEC fields in SPEC order, then effect_se, groups_se, position."""
    doc = digits_run().doc
    assert list(doc)[:6] == ["schema", "metric", "estimator", "n_examples", "final_value",
                             "stages"]
    for s in doc["stages"]:
        assert list(s) == [*SPEC_FIELDS, "effect_se", "groups_se", "position", "evaluate",
                           "out_of_range"]
        assert s["effect_se"] > 0 and set(s["groups_se"]) == set(s["groups"]) == {"0", "1"}
    result = digits_run().result
    assert report.to_json(result) == report.to_json(result)  # byte-stable
    assert report.to_json(result).startswith(digits_run().stdout[:200])


def test_json_gate_object_and_exit_1_when_tripped(monkeypatch):
    """--fail-on-harm below the trap group's harm: exit 1, a gate object, words on stderr."""
    out = invoke(monkeypatch, ["run", str(DIGITS), "--estimator", "frozen", "-f", "json",
                               "--fail-on-harm", "0.5", "--confidence", "0.95",
                               "--gate-stage", "shortcut", "--gate-group", TRAP])
    assert out.exit_code == 1, out.stderr
    gate = json.loads(out.stdout)["gate"]
    assert list(gate) == ["threshold", "confidence", "z", "stage", "group", "tripped",
                          "worst", "checks"]
    assert gate["tripped"] and gate["threshold"] == 0.5 and gate["confidence"] == 0.95
    assert gate["worst"]["stage"] == "shortcut" and gate["worst"]["group"] == TRAP
    assert gate["worst"]["bound"] == pytest.approx(
        gate["worst"]["harm"] - gate["z"] * gate["worst"]["se"])
    assert "gate tripped: stage 'shortcut', group '1'" in out.stderr
    assert "lower bound" in out.stderr


def test_gate_passes_with_exit_0_and_says_so(monkeypatch):
    """A threshold above every harm: exit 0, 'gate passed' on stderr, tripped false."""
    out = invoke(monkeypatch, ["run", str(DIGITS), "--estimator", "frozen", "-f", "json",
                               "--fail-on-harm", "5", "--gate-group", "worst"])
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["gate"]["tripped"] is False
    assert "gate passed" in out.stderr


@pytest.mark.parametrize("args", [
    ["--gate-stage", "shortcut"],  # without --fail-on-harm
    ["--fail-on-harm", "0.1", "--confidence", "1"],
    ["--fail-on-harm", "0.1", "--gate-stage", "nope"],
    ["--fail-on-harm", "0.1", "--gate-group", "nope"],
    ["--plot", "figure.gif"],
])
def test_bad_gate_and_plot_options_exit_2(monkeypatch, args):
    """Bad gate or plot options: exit 2, a message on stderr, nothing on stdout."""
    out = invoke(monkeypatch, ["run", str(DIGITS), "-f", "json", *args])
    assert out.exit_code == 2
    assert out.stderr.startswith("error: ") and out.stdout == ""


def test_markdown_is_a_table_with_verdicts_and_the_gate(monkeypatch):
    """--format markdown: one well-formed GFM table, verdicts, the gate outcome; no noise."""
    out = invoke(monkeypatch, ["run", str(DIGITS), "--estimator", "frozen", "-f", "markdown",
                               "--fail-on-harm", "0.5", "--gate-stage", "newest"])
    assert out.exit_code in (0, 1), out.stderr
    (table,) = markdown_tables(out.stdout)
    header, *rows = table
    assert header[:6] == ["rank", "stage", "effect", "±", "share", "verdict"]
    assert header[6:] == ["group 0", "group 1"]
    assert [r[1] for r in rows] == [s.name for s in digits_run().result.stages]
    assert {r[5] for r in rows} <= {"**hurt**", "helped", "neutral"}
    assert "**hurt**" in {r[5] for r in rows}
    assert re.search(r"gate (tripped|passed)", out.stdout)
    assert out.stdout.startswith("### Stage effects on cross_entropy")
    assert "gate" in out.stderr and "[1/3]" not in out.stdout


def test_markdown_escapes_pipes_in_stage_names():
    """A stage name with a pipe stays in one cell."""
    from dataclasses import replace

    result = digits_run().result
    odd = replace(result, stages=(replace(result.stages[0], name="a|b"), *result.stages[1:]))
    (table,) = markdown_tables(report.to_markdown(odd))
    assert table[1][1] == r"a\|b"


def test_table_has_a_plus_minus_column():
    """The rich table shows a ± column and ± inside group cells."""
    text = report.to_table(digits_run().result, width=140)
    assert "±" in text.splitlines()[2] and " ±0.0" in text


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_writes_an_image_of_the_expected_size(monkeypatch, tmp_path, suffix):
    """--plot writes a PNG of figure_size × DPI pixels, or an SVG that parses as XML."""
    target = tmp_path / f"effects{suffix}"
    target.write_text("old")  # replaced atomically
    out = invoke(monkeypatch, ["run", str(DIGITS), "-f", "json", "--plot", str(target)])
    assert out.exit_code == 0, out.stderr
    json.loads(out.stdout)
    assert f"wrote {target}" in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary left
    width, height = plots.figure_size(digits_run().result)
    if suffix == ".png":
        import matplotlib.image

        pixels = matplotlib.image.imread(target)
        assert pixels.shape[:2] == (round(height * plots.DPI), round(width * plots.DPI))
    else:
        root = ET.parse(target).getroot()
        assert root.tag.endswith("svg")
        assert float(root.get("width", "0").removesuffix("pt")) == pytest.approx(width * 72)


def test_plot_without_matplotlib_exits_2_before_computing(monkeypatch, tmp_path):
    """No matplotlib: exit 2 naming the extra, and the pipeline never runs."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    def boom(*a, **k):
        raise AssertionError("computed before checking matplotlib")

    monkeypatch.setattr("acctattr.pipeline.run", boom)
    from typer.testing import CliRunner

    out = CliRunner().invoke(app, ["run", str(DIGITS), "--plot", str(tmp_path / "e.png")])
    assert out.exit_code == 2
    assert "acctattr[plot]" in out.stderr and out.stdout == ""


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def test_readme_jq_lines_run_on_real_output(tmp_path):
    """The README's three jq one-liners run as written on a real result.json."""
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (apt-get install -y jq); the README's jq lines "
                    "cannot be checked")
    block = re.search(r"```sh\n(.*?)```", _section("With jq"), re.S)
    assert block
    lines = [ln for ln in block.group(1).splitlines() if ln.startswith("jq ")]
    assert len(lines) == 3
    (tmp_path / "result.json").write_text(digits_run().stdout)
    outs = [subprocess.run(ln, shell=True, cwd=tmp_path, capture_output=True, text=True,
                           check=True).stdout for ln in lines]
    assert outs[0] == "shortcut\n"
    assert "shortcut" in outs[1].split() and "pretrain" not in outs[1].split()
    rows = [r.split("\t") for r in outs[2].splitlines()]
    assert rows[0] == ["stage", "effect", "effect_se", "verdict"]
    assert len(rows) == 4 and all(len(r) == 4 for r in rows)
    assert {r[0] for r in rows[1:]} == {"pretrain", "shortcut", "polish"}


def test_readme_ci_job_is_valid_yaml_using_real_options():
    """The README's GitHub Actions job parses, and its acctattr line uses real options."""
    import typer.main

    block = re.search(r"```yaml\n(.*?)```", _section("In CI"), re.S)
    assert block
    job = yaml.safe_load(block.group(1))
    steps = job["jobs"]["acctattr"]["steps"]
    line = next(s["run"] for s in steps if "acctattr run" in s.get("run", ""))
    assert "$GITHUB_STEP_SUMMARY" in line and "--format markdown" in line
    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    known = {o for p in command.params for o in p.opts}
    used = set(re.findall(r"(?<!\S)--[a-z-]+", line))
    assert used and used <= known, used - known


def test_markdown_in_a_real_process_keeps_stdout_clean():
    """A real process with NO_COLOR: markdown alone on stdout, progress and gate on stderr."""
    proc = subprocess.run([sys.executable, "-m", "acctattr.cli", "run", str(DIGITS),
                           "--estimator", "frozen", "-f", "markdown", "--fail-on-harm", "9",
                           "--progress"],
                          capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr
    assert len(markdown_tables(proc.stdout)) == 1
    assert "\x1b[" not in proc.stdout and "[1/3]" not in proc.stdout
    assert "[1/3] stage pretrain" in proc.stderr and "gate passed" in proc.stderr
    assert "|" not in proc.stderr


def test_gate_words_match_the_gate():
    """describe() names the deciding stage and group and says tripped or passed."""
    result = digits_run().result
    tripped = gates.evaluate(result, 0.1, 0.95, "shortcut", TRAP)
    assert gates.describe(tripped, "cross_entropy").startswith(
        "gate tripped: stage 'shortcut', group '1'")
    passed = gates.evaluate(result, 9.0, 0.95, None, "worst")
    assert gates.describe(passed, "cross_entropy").startswith("gate passed: no stage")

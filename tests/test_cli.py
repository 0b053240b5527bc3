"""The command line (acctattr/cli.py): exit codes, stdout for results only, stderr for the rest."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import typer.testing
import yaml
from typer.testing import CliRunner

from acctattr.cli import app

DIGITS = Path(__file__).resolve().parent.parent / "sample_runs" / "digits" / "manifest.yaml"
ANSI = re.compile(r"\x1b\[")
PROGRESS = re.compile(r"^\[\d+/\d+\] stage \S+$|estimator: .*")
TOP_FIELDS = ["schema", "metric", "estimator", "n_examples", "final_value", "stages"]
STAGE_FIELDS = ["name", "rank", "effect", "verdict", "share", "counterfactual_value", "groups"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str, env: dict | None = None) -> typer.testing.Result:
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def digits_json() -> dict:
    result = CliRunner().invoke(app, ["run", str(DIGITS), "--format", "json", "-q"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_run_prints_a_ranked_table(runner):
    """`run` on the digits sample exits 0 with the ranked table on stdout, progress on stderr
    (asked for with --progress, since stderr is not a terminal here)."""
    result = invoke(runner, "run", DIGITS, "--progress")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Stage effects on cross_entropy" in out
    rows = [line for line in out.splitlines() if re.match(r"^│\s+\d+ │", line)]
    assert [int(r.split("│")[1]) for r in rows] == [1, 2, 3]
    assert {r.split("│")[2].strip() for r in rows} == {"pretrain", "shortcut", "polish"}
    assert "[1/3] stage" in result.stderr and "[1/3]" not in out
    # inside the unrolled estimate: each later stage simulated, each counterfactual carried
    assert "carrying the counterfactual through stage 'shortcut' (" in result.stderr
    quiet = invoke(runner, "run", DIGITS, "--estimator", "frozen")  # not a terminal: silent
    assert quiet.exit_code == 0 and "[1/" not in quiet.stderr


def test_json_has_the_spec_fields_in_order(runner):
    """--format json prints only JSON, with SPEC section 5's fields in order; stderr is progress."""
    result = invoke(runner, "run", DIGITS, "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert list(doc) == TOP_FIELDS
    assert doc["schema"] == "acctattr.effects/1"
    assert doc["metric"] == {"name": "cross_entropy", "higher_is_better": False}
    # the default estimator is auto: unrolled (every later stage has data) with its best
    # evaluation, direct; the reason is said
    assert doc["estimator"]["name"] == "unrolled" and doc["estimator"]["evaluate"] == "direct"
    assert "auto uses unrolled" in doc["estimator"]["reason"]
    assert list(doc["metric"]) == ["name", "higher_is_better"]
    assert list(doc["estimator"]) == ["name", "evaluate", "reason"]
    assert isinstance(doc["n_examples"], int) and doc["n_examples"] > 0
    stages = doc["stages"]
    assert [s["rank"] for s in stages] == [1, 2, 3]
    for s in stages:
        assert list(s)[:len(STAGE_FIELDS)] == STAGE_FIELDS  # later fields come after
        assert s["verdict"] in ("hurt", "helped", "neutral")
        assert list(s["groups"]) == ["0", "1"]
        assert s["counterfactual_value"] == pytest.approx(doc["final_value"] - s["effect"])
    effects = [abs(s["effect"]) for s in stages]
    assert effects == sorted(effects, reverse=True)
    assert sum(s["share"] for s in stages) == pytest.approx(1.0)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(PROGRESS.match(line) for line in lines), lines


def test_estimator_and_evaluation_options_reach_the_output(runner):
    """--estimator naive --evaluate direct are reported in the JSON and change the effects."""
    result = invoke(runner, "run", DIGITS, "-f", "json", "-q", "--estimator", "naive",
                    "--evaluate", "direct")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["estimator"] == {"name": "naive", "evaluate": "direct"}
    assert result.stderr == ""


def test_per_example_adds_examples(runner, digits_json):
    """--per-example adds one `examples` row per eval example, each with every stage's effect."""
    result = invoke(runner, "run", DIGITS, "-f", "json", "-q", "--per-example")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert list(doc) == [*TOP_FIELDS, "examples"]
    assert "examples" not in digits_json
    ex = doc["examples"]
    assert len(ex) == doc["n_examples"]
    assert [e["index"] for e in ex] == list(range(len(ex)))
    assert list(ex[0]) == ["index", "group", "effects"]
    names = {s["name"] for s in doc["stages"]}
    for s in doc["stages"]:
        mean = sum(e["effects"][s["name"]] for e in ex) / len(ex)
        assert mean == pytest.approx(s["effect"], rel=1e-6, abs=1e-9)
        group1 = [e["effects"][s["name"]] for e in ex if e["group"] == "1"]
        assert sum(group1) / len(group1) == pytest.approx(s["groups"]["1"], rel=1e-6)
    assert all(set(e["effects"]) == names for e in ex)


def test_output_file_gets_the_result_and_stdout_stays_empty(runner, tmp_path, digits_json):
    """--output FILE writes the JSON there, nothing to stdout, and says so on stderr."""
    out = tmp_path / "effects.json"
    result = invoke(runner, "run", DIGITS, "-f", "json", "-q", "--output", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert json.loads(out.read_text()) == digits_json
    assert f"wrote {out}" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["effects.json"]  # no temporary left


def test_fail_on_harm_gate(runner, digits_json):
    """--fail-on-harm X exits 1 when the worst harm exceeds X and 0 when it does not."""
    worst = max(s["effect"] for s in digits_json["stages"])  # lower is better: harm = effect
    assert worst > 0, "the digits sample has a stage that hurt"
    below = invoke(runner, "run", DIGITS, "-q", "-f", "json", "--fail-on-harm", worst * 0.99,
                   "--confidence", 0.5)  # 0.5: gate on the point estimate
    assert below.exit_code == 1, below.stderr
    assert "gate tripped" in below.stderr
    printed = json.loads(below.stdout)
    assert printed.pop("gate")["tripped"] is True
    assert printed == digits_json  # the result is still printed
    above = invoke(runner, "run", DIGITS, "-q", "-f", "json", "--fail-on-harm", worst * 1.01,
                   "--confidence", 0.5)
    assert above.exit_code == 0, above.stderr
    assert "gate passed" in above.stderr


def test_bad_manifest_exits_2_naming_key_and_file(runner, tmp_path):
    """A manifest with an unknown key exits 2, naming the key and the file, with no traceback."""
    doc = yaml.safe_load(DIGITS.read_text())
    doc["stages"][1]["optimizer"]["learning_rate"] = 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = invoke(runner, "run", bad)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "learning_rate" in result.stderr and str(bad) in result.stderr
    assert "stage 'shortcut'" in result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.output


def test_missing_manifest_exits_2(runner, tmp_path):
    """A manifest path that does not exist exits 2 with a one-line cause, no traceback."""
    result = invoke(runner, "run", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "file not found" in result.stderr and "Traceback" not in result.stderr


def test_check_lists_every_manifest_problem_at_once(runner, tmp_path):
    """`check` reports several manifest problems together and exits 2."""
    doc = yaml.safe_load(DIGITS.read_text())
    doc["stages"][0]["optimizer"]["betas"] = [0.9, 0.99]
    doc["stages"][1]["optimizer"]["lr"] = [0.1, 0.2]
    doc["eval"]["batch_size"] = 0
    doc["stages"][2]["end"] = "ckpt/missing"
    bad = tmp_path / "manifest.yaml"
    shutil.copytree(DIGITS.parent, tmp_path, dirs_exist_ok=True)  # the files it names
    bad.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = invoke(runner, "check", bad)
    assert result.exit_code == 2
    err = result.stderr
    assert "4 problems" in err
    for fragment in ("'betas' belongs to adam/adamw", "has 2 values but the stage has steps: 150",
                     "eval.batch_size", "ckpt/missing not found"):
        assert fragment in err, fragment
    assert result.stdout == "" and "Traceback" not in err


def test_check_lists_every_file_problem_at_once(runner, tmp_path):
    """`check` opens every file and lists all broken ones together, exiting 2."""
    run = tmp_path / "digits"
    shutil.copytree(DIGITS.parent, run)
    (run / "ckpt" / "shortcut" / "model.safetensors").write_bytes(b"\x00" * 4)
    (run / "ckpt" / "polish" / "optimizer.pt").write_bytes(b"not a pickle")
    result = invoke(runner, "check", run / "manifest.yaml")
    assert result.exit_code == 2
    err = result.stderr
    assert "shortcut/model.safetensors" in err and "polish/optimizer.pt" in err
    assert "Traceback" not in err


def test_check_passes_on_a_valid_run(runner):
    """`check` on the digits sample exits 0 and summarises the run on stdout."""
    result = invoke(runner, "check", DIGITS)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("ok: ")
    assert "3 stages (pretrain, shortcut, polish)" in result.stdout


def test_no_color_removes_ansi_escapes(runner, monkeypatch):
    """On a terminal the table is coloured, and with NO_COLOR set it has no ANSI escapes."""
    # the runner's stdout wrapper: typer's own where typer vendors click, else click's
    import importlib

    for where in ("typer.testing", "typer._click.testing", "click.testing"):
        try:
            wrapper = getattr(importlib.import_module(where), "_NamedTextIOWrapper", None)
        except ImportError:
            wrapper = None
        if wrapper is not None:
            break
    monkeypatch.setattr(wrapper, "isatty", lambda self: True, raising=False)
    env = {"TERM": "xterm-256color", "NO_COLOR": None, "FORCE_COLOR": None}
    coloured = invoke(runner, "run", DIGITS, "-q", env=env)
    assert coloured.exit_code == 0, coloured.stderr
    assert ANSI.search(coloured.stdout), "a terminal gets colours (else this test proves nothing)"
    plain = invoke(runner, "run", DIGITS, "-q", env={**env, "NO_COLOR": "1"})
    assert plain.exit_code == 0, plain.stderr
    assert not ANSI.search(plain.stdout) and not ANSI.search(plain.stderr)
    assert "pretrain" in plain.stdout


def test_two_runs_give_byte_identical_json(runner):
    """Running twice on the same inputs gives byte-identical JSON, per-example rows included."""
    args = ("run", DIGITS, "-f", "json", "-q", "--per-example")
    first, second = invoke(runner, *args), invoke(runner, *args)
    assert first.exit_code == second.exit_code == 0
    assert first.stdout_bytes == second.stdout_bytes


def test_debug_env_shows_the_traceback(runner, tmp_path):
    """ACCTATTR_DEBUG=1 adds the traceback that is otherwise hidden; the exit code stays 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodel: {factory: none.py:build}\n")
    result = invoke(runner, "run", bad, env={"ACCTATTR_DEBUG": "1"})
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


def test_linear_only_unrolled_options_are_refused_with_the_flow(runner):
    """--hessian-at and --substeps shape the linear propagator only: with the default flow
    dynamics they would change nothing, so they are an error (exit 2) naming the fix; with
    --dynamics linear they are used, and change the estimate."""
    bad = invoke(runner, "run", DIGITS, "-q", "--hessian-at", "end")
    assert bad.exit_code == 2
    assert "--hessian-at applies to --dynamics linear" in bad.output
    flow = json.loads(invoke(runner, "run", DIGITS, "-q", "--format", "json").stdout)
    outs = [json.loads(invoke(runner, "run", DIGITS, "-q", "--format", "json", "--dynamics",
                              "linear", "--hessian-at", at).stdout) for at in ("end", "start")]
    effects = [[s["effect"] for s in o["stages"]] for o in (flow, *outs)]
    assert effects[0] != effects[1] != effects[2]

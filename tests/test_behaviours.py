"""Several behaviours in one manifest (``evals:``): each embedding computed once, evaluated
per behaviour; one table per behaviour and a stage × behaviour summary; JSON
acctattr.effects/2 whose behaviours are each the effects/1 document of a run on that eval
section alone; gates per behaviour."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from reportkit import cli

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"



def _copy(tmp_path: Path, run: str, evals: dict | None) -> Path:
    """A copy of a sample run whose manifest's eval section becomes ``evals`` (name ->
    changes to the sample's eval section)."""
    folder = tmp_path / run
    shutil.copytree(SAMPLES / run, folder, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = folder / "manifest.yaml"
    doc = yaml.safe_load(manifest.read_text())
    if evals is not None:
        section = doc.pop("eval")
        doc["evals"] = {name: {**section, **change} for name, change in evals.items()}
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return manifest


@pytest.fixture
def two(tmp_path) -> Path:
    return _copy(tmp_path / "two", "digits", {"loss": {}, "margin": {"metric": "margin"}})


@pytest.mark.parametrize("run", ["digits", "toxicity"])
def test_each_behaviour_equals_a_run_on_it_alone(tmp_path, run):
    """Each behaviour's document inside the effects/2 JSON is byte for byte the effects/1
    document a run on that eval section alone prints."""
    evals = {"loss": {}, "margin": {"metric": "margin", "batch_size": 100}}
    both = _copy(tmp_path / "both", run, evals)
    got = cli("run", both, "--estimator", "frozen", "-f", "json", "-q", "--per-example")
    assert got.exit_code == 0, got.stderr
    doc = json.loads(got.stdout)
    assert doc["schema"] == "acctattr.effects/2" and list(doc["behaviours"]) == list(evals)
    for name, change in evals.items():
        alone = _copy(tmp_path / name, run, {name: change})
        one = cli("run", alone, "--estimator", "frozen", "-f", "json", "-q", "--per-example")
        assert one.exit_code == 0, one.stderr
        assert json.loads(one.stdout)["schema"] == "acctattr.effects/1"  # one: today's shape
        assert json.dumps(doc["behaviours"][name], indent=2) + "\n" == one.stdout
    stages = {s["name"]: s for s in doc["behaviours"]["margin"]["stages"]}
    for row in doc["summary"]:
        assert row["effects"]["margin"] == stages[row["stage"]]["effect"]
        assert row["verdicts"]["margin"] == stages[row["stage"]]["verdict"]


def test_each_embedding_is_computed_once(two, monkeypatch):
    """With two behaviours the estimator embeds each stage once (3 calls for 3 stages)."""
    from acctattr.estimators.frozen import Frozen

    calls = []
    original = Frozen.embed

    def counted(self, k):
        calls.append(k)
        return original(self, k)

    monkeypatch.setattr(Frozen, "embed", counted)
    got = cli("run", two, "--estimator", "frozen", "-f", "json", "-q")
    assert got.exit_code == 0, got.stderr
    assert calls == [0, 1, 2]


def test_table_per_behaviour_and_summary(two):
    """The table output has one table per behaviour, then the stage × behaviour summary."""
    got = cli("run", two, "--estimator", "frozen", "-q")
    assert got.exit_code == 0, got.stderr
    out = got.stdout
    assert out.index("behaviour loss") < out.index("behaviour margin") < out.index(
        "Stage × behaviour")
    assert "cross_entropy (lower is better)" in out and "margin (higher is better)" in out
    md = cli("run", two, "--estimator", "frozen", "-q", "-f", "markdown")
    assert "## Behaviour `margin`" in md.stdout and "### Stage × behaviour" in md.stdout


def test_gate_names_a_behaviour(two):
    """--gate-behaviour gates that behaviour alone; an unknown one, or one without
    --fail-on-harm, is exit 2 before computing."""
    # digits' newest stage polish: +0.094 cross-entropy (hurt), -0.47 margin (hurt)
    args = ["run", two, "--estimator", "frozen", "-q", "-f", "json", "--fail-on-harm", "0.2",
            "--gate-stage", "newest"]
    loss = cli(*args, "--gate-behaviour", "loss")
    assert loss.exit_code == 0, loss.stderr
    assert json.loads(loss.stdout)["gate"] == {"behaviour": "loss", "tripped": False}
    margin = cli(*args, "--gate-behaviour", "margin")
    assert margin.exit_code == 1
    doc = json.loads(margin.stdout)
    assert doc["gate"] == {"behaviour": "margin", "tripped": True}
    assert doc["behaviours"]["margin"]["gate"]["tripped"] is True
    assert "gate" not in doc["behaviours"]["loss"]
    assert cli(*args).exit_code == 1  # every behaviour by default
    bad = cli(*args, "--gate-behaviour", "nope")
    assert bad.exit_code == 2 and "nope" in bad.stderr and "loss, margin" in bad.stderr
    alone = cli("run", two, "-q", "--gate-behaviour", "loss")
    assert alone.exit_code == 2 and "--fail-on-harm" in alone.stderr


def test_manifest_takes_eval_or_evals(tmp_path, two):
    """eval and evals together, evals not a mapping, and a bad section inside evals are
    manifest errors naming the key."""
    doc = yaml.safe_load(two.read_text())
    doc["eval"] = doc["evals"]["loss"]
    two.write_text(yaml.safe_dump(doc))
    got = cli("check", two)
    assert got.exit_code == 2 and "exactly one of 'eval'" in got.stderr
    del doc["eval"]
    doc["evals"]["margin"]["batch_size"] = 0
    two.write_text(yaml.safe_dump(doc))
    got = cli("check", two)
    assert got.exit_code == 2 and "evals.margin.batch_size" in got.stderr
    doc["evals"] = ["x"]
    two.write_text(yaml.safe_dump(doc))
    got = cli("check", two)
    assert got.exit_code == 2 and "evals" in got.stderr


def test_embeddings_serve_several_behaviours(two, tmp_path):
    """embed once, then run --embeddings with two behaviours equals run with them."""
    out = tmp_path / "emb"
    assert cli("embed", two, "-o", out, "--estimator", "frozen", "-q").exit_code == 0
    args = ["run", two, "--estimator", "frozen", "-q", "-f", "json"]
    assert cli(*args).stdout == cli(*args, "--embeddings", out).stdout


def test_readme_jq_lines_on_several_behaviours(two, tmp_path):
    """The README's jq lines for an effects/2 document give the stages that hurt some
    behaviour and each behaviour's most harmful stage on digits (shortcut for both)."""
    import subprocess

    if shutil.which("jq") is None:
        pytest.skip("jq is not installed")
    got = cli("run", two, "--estimator", "frozen", "-q", "-f", "json")
    result = tmp_path / "result.json"
    result.write_text(got.stdout)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Several behaviours")[1].split("## With jq")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("jq ")]
    assert len(lines) == 2
    outs = [subprocess.run(ln, shell=True, cwd=tmp_path, capture_output=True, text=True,
                           check=True).stdout for ln in lines]
    assert outs[0].split() == ["shortcut", "polish"]
    assert outs[1] == "loss\tshortcut\nmargin\tshortcut\n"

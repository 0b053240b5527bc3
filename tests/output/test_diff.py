"""`acctattr diff` (acctattr/diff.py): stage matching, harm growth, exit codes 0/1/2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reportkit import digits_run, markdown_tables
from typer.testing import CliRunner

from acctattr.cli import app
from acctattr.errors import AcctattrError
from acctattr.output import diff


def _write(tmp_path: Path, name: str, doc: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _pair(tmp_path: Path, grow: float = 0.2) -> tuple[Path, Path]:
    """OLD = the digits run; NEW = shortcut's harm grown by ``grow``, polish gone, dpo new."""
    old = digits_run().doc
    new = json.loads(digits_run().stdout)
    for s in new["stages"]:
        if s["name"] == "shortcut":
            s["effect"] += grow
            s["groups"]["1"] += 2 * grow
    new["stages"] = [s for s in new["stages"] if s["name"] != "polish"]
    new["stages"].append({"name": "dpo", "rank": 3, "effect": 0.01, "verdict": "hurt"})
    return _write(tmp_path, "old.json", old), _write(tmp_path, "new.json", new)


def _diff(*args: str):
    return CliRunner().invoke(app, ["diff", *args])


def test_same_result_diffs_to_zero_with_exit_0(tmp_path):
    """A result against itself: every change 0, nothing only on one side, exit 0."""
    path = _write(tmp_path, "r.json", digits_run().doc)
    out = _diff(str(path), str(path), "-f", "json", "--fail-on-growth", "0")
    assert out.exit_code == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["schema"] == "acctattr.diff/1"
    assert [s["change"] for s in doc["stages"]] == [0, 0, 0]
    assert doc["only_old"] == doc["only_new"] == []
    assert doc["gate"]["tripped"] is False and "gate passed" in out.stderr


def test_growth_beyond_the_threshold_exits_1_and_names_the_stage(tmp_path):
    """shortcut's harm grew by 0.2: --fail-on-growth 0.1 exits 1, 0.3 exits 0."""
    old, new = _pair(tmp_path)
    out = _diff(str(old), str(new), "-f", "json", "--fail-on-growth", "0.1")
    assert out.exit_code == 1, out.stderr
    doc = json.loads(out.stdout)
    top = doc["stages"][0]
    assert top["name"] == "shortcut" and top["harm_growth"] == pytest.approx(0.2)
    assert top["groups"]["1"]["change"] == pytest.approx(0.4)
    assert [s["name"] for s in doc["only_new"]] == ["dpo"]
    assert [s["name"] for s in doc["only_old"]] == ["polish"]
    assert "gate tripped: stage 'shortcut'" in out.stderr
    assert _diff(str(old), str(new), "--fail-on-growth", "0.3").exit_code == 0


def test_growth_is_signed_by_the_metric_direction():
    """On a higher-is-better metric a falling effect is growing harm."""
    def doc(effect: float) -> diff.ResultDoc:
        return diff.parse({"schema": "acctattr.effects/1",
                           "metric": {"name": "accuracy", "higher_is_better": True},
                           "estimator": {"name": "frozen", "evaluate": "linear"},
                           "n_examples": 10, "final_value": 0.9,
                           "stages": [{"name": "a", "effect": effect}]}, "x.json")

    d = diff.compare(doc(0.1), doc(-0.05), threshold=0.1)
    assert d.stages[0].harm_growth == pytest.approx(0.15) and d.tripped


def test_markdown_and_table_list_every_stage(tmp_path):
    """Markdown is one well-formed table with matched, new and removed stages."""
    old, new = _pair(tmp_path)
    out = _diff(str(old), str(new), "-f", "markdown", "--fail-on-growth", "0.1")
    assert out.exit_code == 1
    (table,) = markdown_tables(out.stdout)
    assert [r[0] for r in table[1:]] == ["shortcut", "pretrain", "dpo", "polish"]
    assert "gate tripped" in out.stdout
    text = _diff(str(old), str(new)).stdout
    assert "new stage" in text and "removed" in text


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("{not json", "not valid JSON"),
    ('{"schema": "acctattr.effects/2"}', "schema is"),
    ("[1, 2]", "not an object"),
    ('{"schema": "acctattr.effects/1", "metric": {"name": "x"}}', "metric must be"),
])
def test_unreadable_or_wrong_schema_json_exits_2(tmp_path, content, message):
    """A missing, non-JSON or off-schema file: exit 2 naming the file, nothing on stdout."""
    good = _write(tmp_path, "good.json", digits_run().doc)
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    out = _diff(str(good), str(bad))
    assert out.exit_code == 2
    assert out.stdout == "" and f"error: {bad}: " in out.stderr and message in out.stderr


def test_different_metrics_cannot_be_compared(tmp_path):
    """Results on different metrics: exit 2; different estimators only warn."""
    doc = digits_run().doc
    other = json.loads(json.dumps(doc))
    other["metric"]["name"] = "margin"
    out = _diff(str(_write(tmp_path, "a.json", doc)), str(_write(tmp_path, "b.json", other)))
    assert out.exit_code == 2 and "different units" in out.stderr
    naive = json.loads(json.dumps(doc))
    naive["estimator"]["name"] = "naive"
    out = _diff(str(tmp_path / "a.json"), str(_write(tmp_path, "c.json", naive)))
    assert out.exit_code == 0 and "warning: the results come from different estimators" \
        in out.stderr


def test_older_results_without_standard_errors_still_parse():
    """A SPEC-section-5 document without effect_se reads with NaN standard errors."""
    doc = digits_run().doc
    for s in doc["stages"]:
        s.pop("effect_se")
        s.pop("groups_se")
    parsed = diff.parse(doc, "old.json")
    assert all(s.effect_se != s.effect_se for s in parsed.stages)
    with pytest.raises(AcctattrError, match="appears twice"):
        diff.parse({**doc, "stages": doc["stages"] + doc["stages"][:1]}, "dup.json")

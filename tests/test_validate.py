"""acctattr validate: retraining through the manifest's replay, fidelity of every estimator."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import yaml
from staged import StageCfg, write_run
from typer.testing import CliRunner

from acctattr.cli import app

STAGES = [
    StageCfg("a", "sgd", 20, 0.05, {"momentum": 0.9}, (0.02, 0.0)),
    StageCfg("b", "adamw", 20, {"schedule": "cosine", "base": 0.02, "warmup": 4, "min": 0.0},
             {}, (0.2, 0.0)),
    StageCfg("c", "sgd", 15, 0.03, {"momentum": 0.5}, (0.05, 0.0), continues=False),
]

REPLAY_PY = """import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from safetensors.torch import save_file
from staged import StageCfg, train

STAGES = [StageCfg(**c) for c in json.loads((Path(__file__).parent / "stages.json").read_text())]


def replay(skip, out_dir):
    names = [s.name for s in STAGES]
    state = train(STAGES, skip=names.index(skip) if skip is not None else None)
    save_file(state, Path(out_dir) / "model.safetensors")
    return out_dir
"""


def _run_with_replay(root: Path) -> Path:
    manifest = write_run(root, STAGES)
    (root / "stages.json").write_text(json.dumps([asdict(s) for s in STAGES]))
    (root / "replay.py").write_text(REPLAY_PY.format(tests=str(Path(__file__).parent)))
    doc = yaml.safe_load(manifest.read_text())
    doc["replay"] = "replay.py:replay"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return manifest


def test_validate_measures_frozen_as_exact_on_a_linear_loss(tmp_path):
    """Through a real replay, frozen+direct correlates 1.0 with retraining and ranks right."""
    manifest = _run_with_replay(tmp_path / "run")
    out = CliRunner().invoke(app, ["validate", str(manifest), "-q", "--format", "json",
                                   "--estimator", "naive", "--estimator", "frozen"])
    assert out.exit_code == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["schema"] == "acctattr.validation/1" and doc["retrain_seconds"] > 0
    by = {(r["estimator"], r["evaluate"]): r for r in doc["results"]}
    assert set(by) == {(e, v) for e in ("naive", "frozen") for v in ("linear", "direct")}
    frozen = by[("frozen", "direct")]
    assert frozen["ranking_ok"]
    for s in frozen["stages"]:
        assert s["pearson"] > 0.99999 and s["sign_ok"], s
        assert abs(s["effect"] - s["true_effect"]) <= 1e-4 * abs(s["true_effect"])
    # naive ignores later weight decay, so on stage "a" it is measurably less exact
    naive_a = by[("naive", "direct")]["stages"][0]
    assert abs(naive_a["effect"] - naive_a["true_effect"]) > 1e-3 * abs(naive_a["true_effect"])


def test_validate_without_replay_is_exit_2(tmp_path):
    """A manifest with no replay key gets exit 2 and a message saying what to add."""
    manifest = write_run(tmp_path / "run", STAGES)
    out = CliRunner().invoke(app, ["validate", str(manifest), "-q"])
    assert out.exit_code == 2
    assert "replay" in out.stderr and "Traceback" not in out.stderr


def test_validate_leaves_the_run_folder_untouched(tmp_path):
    """replay writes into a temporary folder, never into the run's own folders."""
    manifest = _run_with_replay(tmp_path / "run")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    out = CliRunner().invoke(app, ["validate", str(manifest), "-q", "--estimator", "frozen"])
    assert out.exit_code == 0, out.stderr
    assert "frozen" in out.stdout and "pearson" in out.stdout
    after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    assert after == before

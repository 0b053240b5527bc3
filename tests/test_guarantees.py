"""Run-wide promises: the user's files are never touched, the same inputs give the same bytes,
thread count does not change the answer, and size (stages, eval examples) stays bounded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest
import torch
from reportkit import cli
from safetensors.torch import save_file
from staged import StageCfg, metric_values, train, write_run

from acctattr.cli import app
from acctattr.evaluation.data import EvalData
from acctattr.runs.manifest import EvalSpec

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    StageCfg("a", "sgd", 6, 0.05, {"momentum": 0.9}, (0.01, 0.0)),
    StageCfg("b", "sgd", 5, 0.03, {"momentum": 0.9}, (0.01, 0.0), continues=True),
    StageCfg("c", "adamw", 4, 0.01, {}, (0.1, 0.0)),
]



def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """relative path -> (sha256, mtime_ns, mode) for every file and folder under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (digest, st.st_mtime_ns, st.st_mode)
    return out


def test_users_files_are_never_modified(tmp_path):
    """Every command on a read-only run leaves every file's bytes, mtime and mode as they were,
    and creates nothing in the run's folder (no __pycache__, no temp files).

    Tests may run as root, where a-w is not enforced, hence the byte-level comparison.
    Commands added to cli.py later are run with the manifest (and with the folder) as their
    argument; they must keep this promise too.
    """
    run = tmp_path / "run"
    manifest = write_run(run, STAGES)
    out = tmp_path / "out"
    out.mkdir()
    for p in [run, *run.rglob("*")]:
        p.chmod(stat.S_IMODE(p.stat().st_mode) & ~0o222)
    before = snapshot(run)
    calls = [
        ["check", manifest],
        ["run", manifest, "-q"],
        ["run", manifest, "-q", "--format", "json", "--per-example"],
        ["run", manifest, "-q", "--format", "table", "--output", out / "r.txt"],
        ["run", manifest, "-q", "--format", "json", "--output", out / "r.json"],
        ["run", manifest, "-q", "--estimator", "naive", "--evaluate", "direct",
         "--format", "json", "--output", out / "r2.json", "--fail-on-harm", "0"],
    ]
    known = {"run", "check"}
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    for other in sorted(names - known):
        calls += [[other, manifest], [other, run]]
    for args in calls:
        result = cli(*args)
        if args[0] in known:
            assert result.exit_code in (0, 1), (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert snapshot(run) == before
    assert sorted(p.name for p in out.iterdir()) == ["r.json", "r.txt", "r2.json"]
    for p in [run, *run.rglob("*")]:
        p.chmod(stat.S_IMODE(p.stat().st_mode) | 0o200)


def test_same_inputs_give_identical_bytes(tmp_path):
    """Two runs, and a run on a copy in another folder, print byte-identical JSON."""
    manifest = write_run(tmp_path / "run", STAGES)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(manifest.parent, copy)
    args = ["-q", "--format", "json", "--per-example"]
    outs = [cli("run", m, *args) for m in (manifest, manifest, copy / "manifest.yaml")]
    assert all(r.exit_code == 0 for r in outs)
    assert outs[0].stdout == outs[1].stdout == outs[2].stdout
    json.loads(outs[0].stdout)


THREADS_SCRIPT = """
import json, sys
from typer.testing import CliRunner
from acctattr.cli import app

out = {}
for run in ("digits", "toxicity"):
    for est in ("naive", "frozen", "unrolled", "auto"):
        r = CliRunner().invoke(app, ["run", f"sample_runs/{run}/manifest.yaml", "-q",
                                     "-f", "json", "--per-example", "--estimator", est])
        assert r.exit_code == 0, r.stderr
        out[f"{run} {est}"] = r.stdout
from acctattr.devices import default_threads
out["threads"] = default_threads()
json.dump(out, sys.stdout)
"""


def test_thread_count_does_not_change_the_answer():
    """The same command under OMP_NUM_THREADS=1 and =2 (acctattr's default thread count,
    checked) prints byte-identical JSON, per-example effects included, for every estimator
    on both sample runs."""
    import os
    import subprocess
    import sys

    got = []
    for n in ("1", "2"):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        done = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], cwd=ROOT, text=True,
                              capture_output=True, env=env | {"OMP_NUM_THREADS": n},
                              timeout=1800)
        assert done.returncode == 0, done.stderr
        got.append(json.loads(done.stdout))
    one, two = got
    assert (one.pop("threads"), two.pop("threads")) == (1, 2)
    assert len(one) == 8
    for key in one:
        assert one[key] == two[key], key
        json.loads(one[key])


def test_fifty_stages(tmp_path):
    """A 50-stage run (SGD, every other stage continuing) ranks all 50, frozen = retraining."""
    stages = [StageCfg(f"s{k:02d}", "sgd", 2, 0.02 + 0.001 * k, {"momentum": 0.5},
                       (0.01, 0.0), continues=k % 2 == 1) for k in range(50)]
    manifest = write_run(tmp_path / "run", stages)
    result = cli("run", manifest, "-q", "--format", "json", "--evaluate", "direct")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert sorted(s["rank"] for s in doc["stages"]) == list(range(1, 51))
    assert abs(sum(s["share"] for s in doc["stages"]) - 1) < 1e-6
    final = metric_values(train(stages))
    effects = {s["name"]: s["effect"] for s in doc["stages"]}
    for k in (0, 1, 24, 49):  # retraining truth for a few stages (first, continued, middle, last)
        ref = float((final - metric_values(train(stages, skip=k))).mean())
        assert abs(effects[stages[k].name] - ref) <= 1e-4 * max(abs(ref), 1e-3)


def test_eval_batches_are_sliced_from_the_file(tmp_path):
    """EvalData.batches reads batch_size rows at a time, lazily, in order.

    The slices are zero-copy views of the memory-mapped file (safetensors), so rows are
    paged in as batches touch them; bench/memory.py measures that memory stays flat.
    """
    n, width, bs = 1000, 32, 64
    x = torch.randn(n, width)
    y = torch.arange(n) % 5
    save_file({"x": x, "y": y}, tmp_path / "eval.safetensors")
    data = EvalData(EvalSpec(inputs=("x",), target="y", metric="cross_entropy",
                             data=tmp_path / "eval.safetensors", batch_size=bs))
    it = data.batches()
    assert iter(it) is it  # a generator: nothing is read before it is asked for
    seen = []
    for batch in it:
        rows = batch["x"].shape[0]
        assert rows <= bs
        seen.append(batch)
    assert len(seen) == -(-n // bs)
    assert torch.equal(torch.cat([b["x"] for b in seen]), x)
    assert torch.equal(torch.cat([b["y"] for b in seen]), y)


@pytest.mark.parametrize("n", [1, 17])
def test_last_partial_batch(tmp_path, n):
    """Eval sets smaller than, or not a multiple of, batch_size are read whole."""
    save_file({"x": torch.randn(n, 3), "y": torch.zeros(n, dtype=torch.long)},
              tmp_path / "e.safetensors")
    data = EvalData(EvalSpec(inputs=("x",), target="y", metric="cross_entropy",
                             data=tmp_path / "e.safetensors", batch_size=8))
    assert sum(b["x"].shape[0] for b in data.batches()) == n

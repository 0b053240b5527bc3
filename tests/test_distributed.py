"""Several processes on one run (acctattr/distributed.py): torchrun ranks on gloo (CPU) share
the eval set or the stages, rank 0 alone prints and writes, every rank exits alike, and the
result equals the single-process one. Everything listens on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from acctattr.cli import app

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "sample_runs" / "digits" / "manifest.yaml"
TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_env(**extra: str) -> dict[str, str]:
    """The environment for ranks on this machine: loopback only, one thread each."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return env | {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **extra}


def spawn(args: list[str], world: int = 2) -> list[subprocess.CompletedProcess]:
    """``python ARGS`` as ranks 0..world-1 of one job, as torchrun starts them (its
    environment variables), so that each rank's exit code and output can be checked."""
    port = str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=local_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r),
                                 WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                 LOCAL_WORLD_SIZE=str(world)))
        for r in range(world)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def single(*args: str | Path) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code in (0, 1), result.stderr
    return result.stdout


def assert_close(a: object, b: object, rel: float = 1e-6, where: str = "") -> None:
    """Two JSON values equal, numbers to ``rel`` relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_close(a[k], b[k], rel, f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, rel, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= rel * max(abs(a), abs(b), 1e-12), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_torchrun_two_ranks_print_the_single_process_json():
    """`torchrun --nproc-per-node 2 -m acctattr run sample_runs/digits/manifest.yaml -f json`
    (auto: unrolled, its stages shared between the ranks) prints one JSON document, equal to
    the single-process run's to 1e-6."""
    port = str(free_port())
    got = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", port,
         "-m", "acctattr", "run", str(DIGITS), "-f", "json"],
        cwd=ROOT, capture_output=True, text=True, env=local_env(), timeout=TIMEOUT)
    assert got.returncode == 0, got.stderr
    doc = json.loads(got.stdout)  # one document, nothing else on stdout
    assert doc["estimator"]["name"] == "unrolled"
    assert_close(doc, json.loads(single("run", DIGITS, "-f", "json", "-q")))


def test_ranks_share_the_eval_set_and_trip_the_gate_alike(tmp_path):
    """frozen under two ranks (eval batches shared, 6 batches of 100): both ranks exit 1 on
    a tripped gate; rank 0 alone writes --output and says so; rank 1 prints nothing; the
    file equals the single-process result byte for byte, per-example effects included."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["run", str(DIGITS), "-f", "json", "--per-example", "--estimator", "frozen",
            "--batch-size", "100", "--fail-on-harm", "0", "--confidence", "0.5"]
    ranks = spawn(["-m", "acctattr", *args, "--output", str(out / "r.json")])
    assert [r.returncode for r in ranks] == [1, 1], [r.stderr for r in ranks]
    assert ranks[1].stdout == "" and ranks[1].stderr == ""
    assert ranks[0].stdout == ""
    assert "gate tripped" in ranks[0].stderr and f"wrote {out / 'r.json'}" in ranks[0].stderr
    assert sorted(p.name for p in out.iterdir()) == ["r.json"]
    assert (out / "r.json").read_text() == single(*args)


def test_bad_input_exits_2_on_every_rank_and_is_said_once(tmp_path):
    """A manifest naming a missing checkpoint: every rank exits 2; rank 0 prints the error,
    the other ranks nothing."""
    text = DIGITS.read_text().replace("end: ckpt/shortcut", "end: ckpt/nowhere")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(text.replace("factory: model.py:build",
                                     f"factory: {DIGITS.parent / 'model.py'}:build"))
    for name in ("ckpt", "data", "model.py", "make_run.py"):
        (tmp_path / name).symlink_to(DIGITS.parent / name)
    ranks = spawn(["-m", "acctattr", "run", str(manifest), "-q", "--estimator", "frozen"])
    assert [r.returncode for r in ranks] == [2, 2]
    assert ranks[0].stderr.count("error:") == 1 and "ckpt/nowhere" in ranks[0].stderr
    assert ranks[1].stderr == "" and ranks[1].stdout == ""


def test_a_batch_only_rank_1_evaluates_fails_on_every_rank(tmp_path):
    """A metric that fails on the eval set's last, short batch (rank 1's: 567 examples in
    batches of 500): both ranks exit 2, and rank 0 prints rank 1's error, marked as such."""
    (tmp_path / "picky.py").write_text(
        "import torch.nn.functional as F\n\n\n"
        "def metric(logits, y):\n"
        "    if y.shape[0] < 100:\n"
        "        raise ValueError('short batch')\n"
        "    return F.cross_entropy(logits, y, reduction='none')\n")
    text = DIGITS.read_text().replace("metric: cross_entropy", "metric: picky.py:metric")
    (tmp_path / "manifest.yaml").write_text(text)
    for name in ("ckpt", "data", "model.py", "make_run.py"):
        (tmp_path / name).symlink_to(DIGITS.parent / name)
    ranks = spawn(["-m", "acctattr", "run", str(tmp_path / "manifest.yaml"), "-q",
                   "--estimator", "frozen", "--batch-size", "500"])
    assert [r.returncode for r in ranks] == [2, 2], [r.stderr for r in ranks]
    assert ranks[0].stderr.startswith("rank 1: error: eval.metric picky.py:metric failed")
    assert "short batch" in ranks[0].stderr and ranks[0].stderr.count("error:") == 1
    assert ranks[1].stderr == ""


def test_an_error_on_one_rank_is_raised_on_every_rank():
    """Ranks.all: an exception on rank 1 (a ManifestError, whose __init__ takes other
    arguments than its args) is raised on rank 0 too, same type and text, marked with the
    rank it came from; among several, the lowest ``order`` wins; results come in rank
    order."""
    script = textwrap.dedent("""
        import torch
        from acctattr.distributed import joined
        from acctattr.errors import DataError, ManifestError

        def fail(error, order):
            error.order = order
            raise error

        with joined(torch.device("cpu")) as ranks:
            print(ranks.all(lambda: ranks.rank * 10))
            try:
                ranks.all(lambda: fail(ManifestError("m.yaml", ["a", "b"]), 0)
                          if ranks.rank == 1 else None)
            except ManifestError as e:
                print(type(e).__name__, e.problems, getattr(e, "shared_from", None))
            try:
                ranks.together(lambda: fail(DataError(f"rank {ranks.rank}"), 5 - ranks.rank))
            except DataError as e:
                print(e.message, getattr(e, "shared_from", None))
    """)
    ranks = spawn(["-c", script])
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    assert ranks[0].stdout.split("\n")[:3] == ["[0, 10]", "ManifestError ['a', 'b'] 1",
                                               "rank 1 1"]
    assert ranks[1].stdout.split("\n")[:3] == ["[0, 10]", "ManifestError ['a', 'b'] None",
                                               "rank 1 None"]


def test_validate_refuses_to_run_under_torchrun():
    """validate under two ranks exits 2 on both (every rank would retrain into the same
    folders), said once."""
    ranks = spawn(["-m", "acctattr", "validate", str(DIGITS), "-q"])
    assert [r.returncode for r in ranks] == [2, 2]
    assert "validate runs in one process" in ranks[0].stderr and ranks[1].stderr == ""


@pytest.mark.parametrize("world", [3])
def test_more_ranks_than_batches_and_stages(world):
    """Three ranks on toxicity with auto (unrolled: stages shared, rank 2 one stage) and
    frozen with one eval batch (two ranks with none) print the single-process results."""
    toxicity = ROOT / "sample_runs" / "toxicity" / "manifest.yaml"
    for extra in ([], ["--estimator", "frozen", "--batch-size", "100000"]):
        args = ["run", str(toxicity), "-f", "json", "-q", *extra]
        ranks = spawn(["-m", "acctattr", *args], world)
        assert [r.returncode for r in ranks] == [0] * world, [r.stderr for r in ranks]
        assert all(r.stdout == "" for r in ranks[1:])
        assert_close(json.loads(ranks[0].stdout), json.loads(single(*args)))


def _alone(env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m acctattr run digits`` as one process with torchrun's variables ``env``
    (no other rank is started)."""
    return subprocess.run([sys.executable, "-m", "acctattr", "run", str(DIGITS), "-q",
                           "--estimator", "naive"], cwd=ROOT, capture_output=True, text=True,
                          env=local_env(**env), timeout=TIMEOUT)


@pytest.mark.parametrize("env,needle", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
     "MASTER_PORT '99999' is not a port number"),
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "RANK '5' is not a whole number from 0 to WORLD_SIZE - 1 = 1"),
])
def test_inconsistent_torchrun_variables_are_refused(env, needle):
    """torchrun's variables missing or out of range: exit 2 at once with a message naming
    them (was an internal error, exit 3, or a wait for a rank 0 that never comes)."""
    got = _alone(env)
    assert got.returncode == 2, got.stderr
    assert needle in got.stderr and "Traceback" not in got.stderr, got.stderr


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_rank_whose_peers_never_come_exits_2(rank):
    """WORLD_SIZE=2 with no other process (rank 0 waits for a client, rank 1 for a server
    nobody started): exit 2 after the rendezvous timeout (2 s here), naming the
    variables, instead of torch's 30-minute wait."""
    got = _alone({"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank,
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                  "ACCTATTR_RENDEZVOUS_TIMEOUT": "2"})
    assert got.returncode == 2, got.stderr
    assert "could not join the other ranks within 2 s" in got.stderr, got.stderr
    assert "Traceback" not in got.stderr

"""--output is all or nothing under SIGKILL; Ctrl-C exits 130 with one line, no traceback.

Each case runs `python -m acctattr.cli run ... --output out.json` in a subprocess and kills
it. ACCTATTR_TEST_SLOW_WRITE (test-only, acctattr/atomic.py) pauses halfway through writing
the temporary file, so a kill can land mid-write deterministically.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from staged import StageCfg, write_run

STAGES = [StageCfg("a", "sgd", 6, 0.05, {"momentum": 0.9}, (0.01, 0.0)),
          StageCfg("b", "adamw", 4, 0.01, {}, (0.1, 0.0))]
OLD = '{"old": true}\n'


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("atomic") / "run", STAGES)


def start(manifest: Path, out: Path, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "acctattr.cli", "run", str(manifest), "-q", "--format", "json",
           "--estimator", "frozen", "--output", str(out)]
    # A shell starts background jobs with SIGINT ignored, and Python then installs no Ctrl-C
    # handler; restore the default so the Ctrl-C tests do not depend on how pytest was run.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def temps(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def whole_result(out: Path) -> bool:
    doc = json.loads(out.read_text())
    return doc["schema"] == "acctattr.effects/1" and len(doc["stages"]) == 2


def test_uninterrupted_write_leaves_no_temp(manifest, tmp_path):
    """A run that finishes replaces the old file with the whole result and leaves no temp."""
    out = tmp_path / "out.json"
    out.write_text(OLD)
    proc = start(manifest, out)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert whole_result(out) and temps(out) == []


def test_sigkill_mid_write_keeps_old_file(manifest, tmp_path):
    """SIGKILL halfway through the write: out.json is untouched; only the partial temp is left.

    No process can clean up after SIGKILL, so one `.out.json.XXXX.tmp` remains (documented
    in acctattr/atomic.py); it never has the result's name.
    """
    out = tmp_path / "out.json"
    out.write_text(OLD)
    proc = start(manifest, out, ACCTATTR_TEST_SLOW_WRITE="60")
    wait_for(lambda: any(t.stat().st_size > 0 for t in temps(out)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert out.read_text() == OLD
    left = temps(out)
    assert len(left) == 1 and 0 < left[0].stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.json", left[0].name])


@pytest.mark.parametrize("delay,old", [(0.2, True), (1.5, False), (3.0, True)])
def test_sigkill_at_any_moment_leaves_old_or_whole(manifest, tmp_path, delay, old):
    """SIGKILL after `delay` seconds: out.json is the old file (or absent) or the whole result."""
    out = tmp_path / "out.json"
    if old:
        out.write_text(OLD)
    proc = start(manifest, out)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if out.exists() and out.read_text() != OLD:
        assert whole_result(out)
    elif not old:
        assert not out.exists()
    assert len(temps(out)) <= 1


def test_ctrl_c_mid_write_exits_130_and_cleans_up(manifest, tmp_path):
    """SIGINT while writing: exit 130, one line on stderr, old file kept, temp removed."""
    out = tmp_path / "out.json"
    out.write_text(OLD)
    proc = start(manifest, out, ACCTATTR_TEST_SLOW_WRITE="60")
    wait_for(lambda: any(t.stat().st_size > 0 for t in temps(out)), proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted"] and stdout == ""
    assert out.read_text() == OLD and temps(out) == []


def test_ctrl_c_while_computing_exits_130(manifest, tmp_path):
    """SIGINT in the middle of a run (inside the user's model factory): exit 130, one line."""
    run = manifest.parent
    marker = tmp_path / "building"
    slow = tmp_path / "slow_model.py"
    slow.write_text(f"import pathlib\nimport time\n\n\ndef build():\n"
                    f"    pathlib.Path({str(marker)!r}).touch()\n    time.sleep(60)\n")
    text = manifest.read_text().replace("factory: model.py:build", f"factory: {slow}:build")
    slow_manifest = run / "slow.yaml"
    slow_manifest.write_text(text)
    out = tmp_path / "out.json"
    proc = start(slow_manifest, out)
    wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted"] and stdout == ""
    assert not out.exists() and temps(out) == []


def test_output_gets_the_umask_mode_not_mkstemps_0600(tmp_path):
    """A result written through the temporary file ends with 0666 & ~umask, like any file."""
    import os
    import stat

    from acctattr.output.atomic import write_atomic

    old = os.umask(0o022)
    try:
        target = tmp_path / "r.json"
        write_atomic(target, "{}\n")
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        assert target.read_text() == "{}\n"
    finally:
        os.umask(old)

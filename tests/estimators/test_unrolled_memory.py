"""unrolled's peak memory, counted as bench/unrolled_memory.py counts it: in copies of the
model's float32 parameters, within what auto assumes for it (Unrolled.copies)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from acctattr.estimators.unrolled import Unrolled

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # its `from memory import ...`
    spec = importlib.util.spec_from_file_location("acctattr_bench_unrolled_memory",
                                                  BENCH / "unrolled_memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unrolled_peak_stays_within_its_declared_copies(tmp_path, monkeypatch):
    """On the bench's three-stage AdamW run (4.2M parameters, a continued stage), unrolled's
    peak anonymous memory in a fresh process stays within Unrolled.copies copies of the
    parameters, and far below the 73 copies it took when every substep kept whole-model
    float64 temporaries and every noise group's gradient at once."""
    bench = _bench(monkeypatch)
    manifest, n_params = bench._write_run(tmp_path)
    p = subprocess.run([sys.executable, str(BENCH / "unrolled_memory.py"), "--child",
                        str(manifest), "unrolled", ""], capture_output=True, text=True,
                       check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    added_mb = json.loads(p.stdout.strip().splitlines()[-1])["added_mb"]
    copies = added_mb / (n_params * 4 / 2**20)
    assert copies <= Unrolled.copies < 73, f"unrolled peaked at {copies:.1f} copies"

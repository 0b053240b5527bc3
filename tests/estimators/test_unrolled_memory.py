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
    parameters, and far below the 45 copies it took when the path was kept in memory and
    every substep's vectors were float64 (73 before that)."""
    bench = _bench(monkeypatch)
    manifest, n_params = bench._write_run(tmp_path)
    p = subprocess.run([sys.executable, str(BENCH / "unrolled_memory.py"), "--child",
                        str(manifest), "unrolled", ""], capture_output=True, text=True,
                       check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    added_mb = json.loads(p.stdout.strip().splitlines()[-1])["added_mb"]
    copies = added_mb / (n_params * 4 / 2**20)
    assert copies <= Unrolled.copies < 45, f"unrolled peaked at {copies:.1f} copies"


def test_spilled_path_reads_back_the_same_bits_and_leaves_no_file(tmp_path, monkeypatch):
    """The stored path's vectors go to an anonymous temporary file in the system's
    temporary folder (none named there, none in the working folder) and come back with
    the same bits, into the one buffer given; closing it frees the file."""
    import tempfile

    import torch

    from acctattr.estimators.unrolled.path import Spill

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    vectors = {3: torch.randn(1000, generator=g, dtype=torch.float64),
               0: torch.randn(1000, generator=g), 7: torch.full((1000,), float("nan"))}
    spill = Spill(1000, torch.device("cpu"))
    for key, v in vectors.items():
        spill[key] = v
    assert os.listdir(tmp_path) == []  # unlinked as made: nothing named anywhere
    assert len(spill) == 3 and 7 in spill and 1 not in spill
    buffer = torch.empty(1000, dtype=torch.float32)
    for key, v in vectors.items():
        got = spill.read(key, buffer)
        assert got.data_ptr() == buffer.data_ptr()
        assert torch.equal(got.view(torch.int32), v.float().view(torch.int32))
    spill.close()
    assert spill._file.closed
    assert os.listdir(tmp_path) == []


def test_parked_vector_gives_its_memory_back_and_returns_the_same_bits(tmp_path, monkeypatch):
    """d is parked in an anonymous temporary file while a later stage's path is simulated:
    its storage is empty meanwhile and holds the same bits after, also when the block
    raises; a view taken before sees them again. A tensor whose storage cannot be resized
    (shared with numpy) is left in memory, untouched."""
    import tempfile

    import pytest
    import torch

    from acctattr.estimators.unrolled.path import parked

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    g = torch.Generator().manual_seed(1)
    d = torch.randn(3_000_001, generator=g, dtype=torch.float64)  # not a multiple of 8 MB
    d[5] = float("nan")
    want = d.clone()
    view = d[10:20]
    with parked(d):
        assert d.untyped_storage().nbytes() == 0
        assert os.listdir(tmp_path) == []
    assert torch.equal(d.view(torch.int64), want.view(torch.int64))
    assert torch.equal(view, want[10:20])
    with pytest.raises(ValueError), parked(d):
        raise ValueError("the block failed")
    assert torch.equal(d.view(torch.int64), want.view(torch.int64))
    with parked(d, active=False):
        assert d.untyped_storage().nbytes() == d.numel() * 8
    shared = torch.randn(100, generator=g, dtype=torch.float64)
    shared.numpy()  # its storage is no longer resizable
    before = shared.clone()
    with parked(shared):
        assert torch.equal(shared, before)
    assert torch.equal(shared, before)


def test_kept_aside_puts_back_the_same_bits_large_or_small(tmp_path, monkeypatch):
    """The momentum step keeps m_hat aside while its guard decides (kept_aside): written
    back, a large vector (in an anonymous temporary file) and a small one (a copy) hold
    their bits from before the block, NaN included, and no file is left."""
    import tempfile

    import torch

    from acctattr.estimators.unrolled.path import PARK_MIN, kept_aside

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    g = torch.Generator().manual_seed(2)
    for n in (PARK_MIN // 8 + 3, 100):
        m = torch.randn(n, generator=g, dtype=torch.float64)
        m[1] = float("nan")
        want = m.clone()
        with kept_aside(m) as restore:
            m.mul_(3.0).add_(1.0)
            assert not torch.equal(m[2:], want[2:])
            restore()
            assert torch.equal(m.view(torch.int64), want.view(torch.int64))
        assert os.listdir(tmp_path) == []

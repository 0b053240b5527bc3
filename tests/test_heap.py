"""acctattr.heap: trimming glibc's heap is safe to call anywhere and keeps every value."""

from __future__ import annotations

import sys

import pytest
import torch

from acctattr import heap


def test_trim_keeps_live_tensors_and_releases_freed_blocks():
    """Freed blocks are given back (glibc on Linux) while live tensors keep their values."""
    keep = [torch.full((1 << 16,), float(i)) for i in range(64)]
    drop = [torch.empty(1 << 18) for _ in range(64)]
    for t in drop:
        t.fill_(1.0)
    del drop[::2]  # holes between live blocks, as a stage's evaluation leaves them
    released = heap.trim()
    if sys.platform.startswith("linux") and heap._TRIM is not None:
        assert isinstance(released, bool)
    else:
        assert released is False
    assert all(bool((t == float(i)).all()) for i, t in enumerate(keep))
    assert all(bool((t == 1.0).all()) for t in drop)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_trim_is_a_no_op_without_malloc_trim(monkeypatch):
    """Without a malloc_trim (macOS, musl), trim() does nothing and says so."""
    monkeypatch.setattr(heap, "_TRIM", None)
    assert heap.trim() is False

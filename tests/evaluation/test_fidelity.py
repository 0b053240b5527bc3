"""Fidelity statistics against scipy's."""

from __future__ import annotations

import torch
from scipy import stats

from acctattr.evaluation.fidelity import compare, pearson, spearman


def test_pearson_and_spearman_match_scipy_with_ties():
    """Pearson and tie-aware Spearman equal scipy.stats on data with repeated values."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (200,), generator=g).double()
    b = a + torch.randn(200, generator=g, dtype=torch.float64)
    assert abs(pearson(a, b) - stats.pearsonr(a, b)[0]) < 1e-12
    assert abs(spearman(a, b) - stats.spearmanr(a, b)[0]) < 1e-12


def test_compare_flags_wrong_sign_and_ranking():
    """A stage with the wrong sign and a swapped ranking are both reported."""
    truth = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.1, 0.2, 0.4])}
    est = {"a": torch.tensor([0.1, 0.2, 0.3]), "b": torch.tensor([-1.0, -2.0, -4.0])}
    f = compare("x", "direct", est, truth)
    assert [s.sign_ok for s in f.stages] == [True, False]
    assert not f.ranking_ok

"""The batch-noise scale c of the Adam flow, fitted to the second moment the run recorded.

In expectation Adam's v is the running average of g^2 + c*S (S the per-example gradient
variance, c ~ 1/batch size). Over a stage of T steps the simulated actual run leaves

    v_end ~ beta2^T v_start + sum_i w_i (g_i^2 + c S_i),

w_i the weight of substep i's contribution left at the stage's end; c is chosen so that
this matches the state file's exp_avg_sq by least squares.
"""

from __future__ import annotations

import torch


def fit_noise(squares: torch.Tensor, spread: torch.Tensor, carried: torch.Tensor,
              v_end: torch.Tensor, positive: torch.Tensor) -> float:
    """c >= 0 by least squares over the coordinates the stage trains.

    Args (flat, float64):
        squares: sum_i w_i g_i^2 over the simulated substeps.
        spread: sum_i w_i S_i.
        carried: beta2^T v_start, what is left of the stage's starting second moment.
        v_end: the state file's exp_avg_sq at the stage's end.
        positive: the coordinates the stage trains (bool).
    """
    explained = carried + squares
    use = positive & (spread > 0)
    if not bool(use.any()):
        return 0.0
    c = float(((v_end - explained) * spread)[use].sum() / (spread * spread)[use].sum())
    return max(c, 0.0)

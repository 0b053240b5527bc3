"""Estimator options, kept free of torch so the command line starts fast."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UnrolledConfig:
    """Knobs of the curvature-aware propagator.

    The defaults were chosen with bench/fidelity.py on both sample runs (README, "Fidelity"):
    fewer Lanczos iterations lost fidelity (6: digits pretrain Pearson 0.87), more iterations,
    substeps, secant points or samples cost 2-6x the time without a consistent gain.
    """

    lanczos_iters: int = 8
    sample_size: int = 1024
    # where along a segment H is taken: start | end | split (half the segment at each
    # anchor) | interpolate (at each substep's midpoint on the line between the anchors)
    hessian_at: str = "interpolate"
    substeps: int = 2  # exponential-integrator substeps per segment (interpolate only)
    # points on the line from the actual run to the counterfactual (theta - t*d) where H is
    # averaged: 0 = at the actual run only, 1 = midpoint, 2 = two-point Gauss-Legendre
    secant_points: int = 1
    # Adam's preconditioner in the propagator: "actual" (the stage's state file) or
    # "counterfactual" (its second moment raised by the counterfactual run's larger mean
    # gradient: v + max(g(theta - d)^2 - g(theta)^2, 0)), or "mean" of the two v's
    precond: str = "counterfactual"
    # Adam moves a coordinate at most ~lr per step (|m_hat / sqrt(v_hat)| <= 1 in steady
    # state), so relearning in a substep is capped at adam_cap * (summed lr); None: no cap
    adam_cap: float | None = 1.0
    # Adam/AdamW later stages: "linear" (the exponential propagator above) or "flow":
    # integrate the difference of Adam's steps u = g / (sqrt(v_hat) + eps) between the actual
    # and the counterfactual run, each with its own second moment v, the running average of
    # g^2 + c*S (S the per-example gradient variance, c fitted to the state file's
    # exp_avg_sq), in flow_substeps Euler steps per stage (two gradient passes each)
    adam_dynamics: str = "flow"
    flow_substeps: int = 16
    # groups the stage's data sample is cut into to estimate S (flow only)
    noise_chunks: int = 8
    # the batch-noise scale c (~ 1/batch size); None: fitted to the state file's exp_avg_sq
    noise_scale: float | None = None


HESSIAN_AT = ("start", "end", "split", "interpolate")
SECANT_RULES = {0: ([0.0], [1.0]), 1: ([0.5], [1.0]),
             2: ([0.5 - 0.5 / 3**0.5, 0.5 + 0.5 / 3**0.5], [0.5, 0.5])}

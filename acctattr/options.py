"""Estimator options, kept free of torch so the command line starts fast."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UnrolledConfig:
    """Knobs of the unrolled estimator (acctattr.estimators.Unrolled).

    The defaults were chosen with bench/fidelity.py and bench/scaling.py (README,
    "Fidelity"). Both flows are converged at 16 substeps: 32 agree to 0.01 on both sample
    runs trained 1x, 2x and 4x as long; 8 are not enough at 4x. For the linear propagator,
    fewer Lanczos iterations lost fidelity (6: digits pretrain 0.87), while more iterations,
    substeps, secant points or samples cost 2-6x the time without a consistent gain.
    """

    lanczos_iters: int = 8
    # Lanczos stops before lanczos_iters products once successive estimates of the result
    # differ by at most this fraction of its norm (0: always all of them). On digits, 1e-4
    # takes 5.6 products per call instead of 8 and moves per-example effects by 3e-5
    # (relative); 1e-3: 4.7 and 9e-5; 1e-2: 3.8 but 1e-2
    lanczos_rtol: float = 1e-4
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
    # simulate both runs' expected Adam steps u = g / (sqrt(v_hat) + eps), the actual run
    # from each checkpoint, the counterfactual at theta - d, each with its own second moment
    # v (running average of g^2 + c*S, S the per-example gradient variance), in
    # flow_substeps Euler steps per stage, each cut where the gradient would change sign
    # (estimators.Unrolled._adam_flow). Per substep: two gradient passes per run.
    adam_dynamics: str = "flow"
    # Adam flow: each run's first moment m_hat (beta1) kept alongside it, per coordinate
    # as a damped oscillator on the local quadratic, solved exactly over each substep, a
    # substep that would raise the training loss taken again critically damped
    # (AdamFlow.momentum_step); off: m_hat = g and the settled step (the default before
    # 2026-12-06). On the lm sample run pretrain -3% (off: -21%), LoRA's sft +13% (+25%),
    # and the adapter-stage and short Trainer runs come out right where the flow without
    # it got signs wrong. A stage that keeps it takes MOMENTUM_SUBSTEPS x flow_substeps
    # substeps (adam_flow): at flow_substeps, lm 4x's pretrain was -34% (-17% off) and not
    # converged in substeps; at 4x, +9% (README "Fidelity")
    adam_momentum: bool = True
    # SGD later stages: "linear" (the exponential propagator above, substeps and
    # hessian_at apply) or "flow": simulate both runs' gradient flow theta' = -r g in
    # flow_substeps exponential Euler steps (lanczos_iters HVPs each), a step that would
    # raise the training loss halved, at most max_halvings deep or down to one optimizer
    # step where a substep spans more than 2^max_halvings of them (SgdFlow.halvings)
    sgd_dynamics: str = "flow"
    max_halvings: int = 5
    # per later stage (4x where the Adam flow keeps its first moment: MOMENTUM_SUBSTEPS)
    flow_substeps: int = 16
    # groups the stage's data sample is cut into to estimate S (flow only)
    noise_chunks: int = 8
    # the batch-noise scale c (~ 1/batch size); None: fitted so that the simulated actual
    # run's v at each stage's end equals its state file's exp_avg_sq (costs one more
    # simulation of the actual run per stage)
    noise_scale: float | None = None
    # a stage clipped by max_grad_norm: c fitted with each substep's clip factor falling as
    # c grows (noise.fit_clipped_noise); off: held at its c = 0 value, which makes the fit
    # linear in c but, where the mean gradient alone is clipped, sends c to 0 (the default
    # before 2026-12-06; README "Fidelity")
    clip_aware_noise: bool = True
    # Adam later stages: the simulated actual run is re-paced (its learning rates scaled,
    # the counterfactual's alike) until its training loss falls within this fraction of
    # the recorded fall (path.next_pace; up to 3 more simulations per stage); 0: never,
    # the default: on the lm sample run and its variants it moved mean effects both ways
    # (README "Language models")
    pace_tolerance: float = 0.0
    # a later stage's simulated actual run "reproduces" the recorded one when its training
    # loss falls, from checkpoint to checkpoint, within this factor of the recorded fall
    # (either way). Where one does not, auto takes frozen and an explicit unrolled warns
    # (estimators.Reproduction). Simulated / recorded: 0.96-1.77 on the bench runs where
    # unrolled is right; without adam_momentum 2.39 on the Trainer run of
    # tests/estimators/test_adapter_stage.py and 15.1 on the short GPT-2 Trainer run of
    # bench/trainer_short.py, where it got signs wrong; with it (adam_momentum) 1.01 and
    # 1.62, and right there (Pearson 0.93-0.997; README "Fidelity").
    reproduce_factor: float = 2.0


HESSIAN_AT = ("start", "end", "split", "interpolate")
SECANT_RULES = {0: ([0.0], [1.0]), 1: ([0.5], [1.0]),
             2: ([0.5 - 0.5 / 3**0.5, 0.5 + 0.5 / 3**0.5], [0.5, 0.5])}


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes; none of it changes what it computes (README,
    "Devices, threads and several processes").

    Args:
        device: cpu | cuda | cuda:N | mps | auto (the CUDA GPU when there is one).
        threads: torch's intra-op CPU threads for the run; None leaves torch's setting.
        batch_size: eval batch size, overriding eval.batch_size; None keeps it.
    """

    device: str = "cpu"
    threads: int | None = None
    batch_size: int | None = None

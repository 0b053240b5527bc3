"""An experiment, not the default: fit the Adam flow's batch-noise scale c letting the clip
factor fall with c, and compare unrolled's per-stage effects with retraining.

The default fit (``noise.fit_noise``) is linear in c with each substep's clip factor held
at its c = 0 value. Under hard clipping (a mean gradient norm above ``max_grad_norm``)
v ~ tau^2 (g^2 + c S) / (|g|^2 + c sum S): adding noise hardly changes v's total, only its
spread over coordinates, so the linear fit sends c to 0 and the simulated Adam takes
full-size steps (README "Fidelity", the llama run at 4x). Here each substep's clip factor
is recomputed for each trial c from its |g|^2 and sum S (scalars, recorded in the fitting
pass), their ratio to the c = 0 factors scales the recorded sums, and c minimises the same
squared residual over the trained coordinates (a grid in log c, then golden section).

For each manifest (a run with a ``truth.json`` beside it, as ``sample_runs/lm/make_run.py
--truth`` writes): unrolled with the default fit, then with this one; per stage the
fitted c's, Pearson with the truth's per-example effects, mean and the truth's mean.

    OMP_NUM_THREADS=1 python bench/noise_fit.py sample_runs/lm/manifest.yaml [MORE ...]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from acctattr import pipeline
from acctattr.estimators.unrolled import adam_flow


class ClipAwareFit:
    """Patches adam_flow while active: records (|g|^2, sum S, clip factor, mean weight) of
    each substep of the fitting pass and replaces fit_noise by the clip-aware fit."""

    def __init__(self) -> None:
        self.records: list[tuple[float, float, float, float]] = []
        self.last: tuple[float, float, float] | None = None
        self.fitted: list[tuple[float, float]] = []  # (linear c, clip-aware c) per fit

    def __enter__(self) -> ClipAwareFit:
        self.saved = (adam_flow.AdamFlow.clip_factor, adam_flow._add_weighted,
                      adam_flow.fit_noise)
        clip, add, linear = self.saved

        def clip_factor(flow, j, g, noise, c):
            r = clip(flow, j, g, noise, c)
            self.last = (float(g.square().sum()), float(noise.sum()), r)
            return r

        def add_weighted(sums, g, noise, w):
            assert self.last is not None
            wbar = float(w.double().mean()) if isinstance(w, torch.Tensor) else float(w)
            self.records.append((*self.last, wbar))
            return add(sums, g, noise, w)

        def fit(squares, spread, v_start, keep, v_end, positive, sizes=None):
            c_lin = linear(squares, spread, v_start, keep, v_end, positive, sizes)
            c = self.fit(squares, spread, v_start, keep, v_end, positive)
            self.fitted.append((c_lin, c))
            self.records = []
            return c

        adam_flow.AdamFlow.clip_factor = clip_factor  # type: ignore[method-assign]
        adam_flow._add_weighted = add_weighted
        adam_flow.fit_noise = fit
        return self

    def __exit__(self, *exc) -> None:
        (adam_flow.AdamFlow.clip_factor, adam_flow._add_weighted,  # type: ignore[method-assign]
         adam_flow.fit_noise) = self.saved

    def fit(self, squares, spread, v_start, keep, v_end, positive) -> float:
        use = positive & (spread > 0)
        if not bool(use.any()):
            return 0.0
        sq, sp = squares.double()[use], spread.double()[use]
        kp = keep.double()[use] if keep.dim() else keep.double()
        a = v_end.double()[use] - kp * v_start.double()[use]
        s = {"aa": float(a @ a), "asq": float(a @ sq), "asp": float(a @ sp),
             "sqsq": float(sq @ sq), "sqsp": float(sq @ sp), "spsp": float(sp @ sp)}
        taus = [r * math.sqrt(g2) for g2, _, r, _ in self.records if r < 1.0]
        tau = taus[0] if taus else None

        def ratio(c: float) -> float:  # v's scale at c against the c = 0 clip factors'
            if tau is None:
                return 1.0
            num = den = 0.0
            for g2, ns, r0, w in self.records:
                total = g2 + c * ns
                rc = min(1.0, tau / math.sqrt(total)) if total > 0 else 1.0
                num += w * rc * rc * total
                den += w * r0 * r0 * total
            return num / den if den > 0 else 1.0

        def residual(c: float) -> float:
            r = ratio(c)
            return (s["aa"] - 2 * r * (s["asq"] + c * s["asp"])
                    + r * r * (s["sqsq"] + 2 * c * s["sqsp"] + c * c * s["spsp"]))

        grid = [0.0] + [10 ** (k / 8) for k in range(-48, 9)]
        best = min(grid, key=residual)
        lo, hi = best / 10 ** (1 / 8), max(best, 1e-6) * 10 ** (1 / 8)
        for _ in range(60):
            m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
            if residual(m1) < residual(m2):
                hi = m2
            else:
                lo = m1
        mid = (lo + hi) / 2
        return mid if residual(mid) < residual(best) else best


def compare(manifest: Path) -> None:
    truth = json.loads((manifest.parent / "truth.json").read_text())["stages"]
    for label in ("default fit", "clip-aware fit"):
        if label == "default fit":
            result, fitted = pipeline.run(manifest, "unrolled", per_example=True), None
        else:
            with ClipAwareFit() as patch:
                result = pipeline.run(manifest, "unrolled", per_example=True)
            fitted = patch.fitted
        print(f"{manifest}: {label}" + (", c (linear -> clip-aware) per fitted stage: "
                                       + ", ".join(f"{a:.4g} -> {b:.4g}" for a, b in fitted)
                                       if fitted else ""))
        for st in result.stages:
            est = torch.tensor([e.effects[st.name] for e in result.examples],
                               dtype=torch.float64)
            ref = torch.tensor(truth[st.name]["examples"], dtype=torch.float64)
            pearson = float(torch.corrcoef(torch.stack([est, ref]))[0, 1])
            mean = float(ref.mean())
            print(f"  {st.name:<10} Pearson {pearson:.3f}  mean {st.effect:+.4f}  "
                  f"true {mean:+.4f}  ratio {st.effect / mean:.2f}", flush=True)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    torch.set_num_threads(1)
    for m in sys.argv[1:]:
        compare(Path(m))


if __name__ == "__main__":
    main()

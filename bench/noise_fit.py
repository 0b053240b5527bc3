"""The Adam flow's batch-noise fit on clipped stages: unrolled with the linear fit (each
substep's clip factor held at its c = 0 value; the default before 2026-12-06) and with the
clipped fit (the factor falling as c grows; ``noise.fit_clipped_noise``, the default), per
stage against retraining.

For each manifest (a run with a ``truth.json`` beside it, as ``sample_runs/lm/make_run.py
--truth`` writes): per fit, the c fitted for each simulated stage, and per stage Pearson
with the truth's per-example effects, the estimate's mean and its ratio to the truth's
(seed 0's, and the seed mean's where the truth has one).

    OMP_NUM_THREADS=1 python bench/noise_fit.py sample_runs/lm/manifest.yaml [MORE ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from acctattr import pipeline
from acctattr.estimators.unrolled import adam_flow
from acctattr.options import UnrolledConfig
from acctattr.results import Result


def _fitted(manifest: Path, config: UnrolledConfig) -> tuple[Result, list[float]]:
    """unrolled's result, and the c of each fit in the order they were made."""
    made: list[float] = []
    saved = adam_flow.fit_noise, adam_flow.fit_clipped_noise

    def wrap(fit):
        def fitted(*args, **kwargs):
            made.append(fit(*args, **kwargs))
            return made[-1]
        return fitted

    adam_flow.fit_noise, adam_flow.fit_clipped_noise = map(wrap, saved)
    try:
        return pipeline.run(manifest, "unrolled", per_example=True, config=config), made
    finally:
        adam_flow.fit_noise, adam_flow.fit_clipped_noise = saved


def compare(manifest: Path) -> None:
    truth = json.loads((manifest.parent / "truth.json").read_text())["stages"]
    for label, clip_aware in (("linear fit", False), ("clipped fit", True)):
        result, made = _fitted(manifest, UnrolledConfig(clip_aware_noise=clip_aware))
        print(f"{manifest}: {label}, c per fitted stage: "
              + ", ".join(f"{c:.4g}" for c in made))
        assert result.examples is not None  # per_example
        for st in result.stages:
            est = torch.tensor([e.effects[st.name] for e in result.examples],
                               dtype=torch.float64)
            line = f"  {st.name:<10} mean {st.effect:+.4f}"
            refs = [("seed 0", truth[st.name]["examples"])]
            if "seed_mean" in truth[st.name]:
                refs.append(("seed mean", truth[st.name]["seed_mean"]["examples"]))
            for name, examples in refs:
                ref = torch.tensor(examples, dtype=torch.float64)
                pearson = float(torch.corrcoef(torch.stack([est, ref]))[0, 1])
                line += (f" | {name}: Pearson {pearson:.3f} true {float(ref.mean()):+.4f}"
                         f" ratio {st.effect / float(ref.mean()):.2f}")
            print(line, flush=True)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    torch.set_num_threads(1)
    for m in sys.argv[1:]:
        compare(Path(m))


if __name__ == "__main__":
    main()

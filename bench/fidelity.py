"""Fidelity and cost of every estimator against retraining, on the bundled sample runs.

For each sample run (SPEC section 6): retrain with each stage skipped through the run's
``replay`` function, then per estimator and evaluation mode print, per stage, the Pearson
and Spearman correlation of per-example effects with that truth, whether the sign of the
mean effect is right, and whether the ranking of stages by |effect| matches. Then the cost:
the wall time of ``acctattr run`` (the default, auto estimator, in process) divided by the
time retraining took, both measured in this one run, interleaved, --repeat times (median);
and the same ratio for frozen, which only reads the run's files and evaluates: the floor.

    python bench/fidelity.py [--runs digits toxicity] [--estimators naive frozen unrolled]
                             [--lanczos-iters N] [--sample-size N] [--substeps N] ...
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

from acctattr import pipeline
from acctattr.options import UnrolledConfig

ROOT = Path(__file__).resolve().parents[1] / "sample_runs"


def cost(manifest: Path, repeat: int, config: UnrolledConfig | None = None,
         estimator: str = "auto"):
    """`acctattr run` (``estimator``, default auto) against retraining its counterfactuals,
    interleaved ``repeat`` times each (this machine is shared and noisy).

    Returns (the run's result, median ratio, its run seconds, its retraining seconds,
    (lowest ratio, highest ratio)).
    """
    loaded = pipeline.check(manifest)
    base, _ = loaded.evaluator.values()
    pairs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = pipeline.run(manifest, estimator, config=config)
        seconds = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix="acctattr-bench-") as tmp:
            _, retrain = pipeline.true_effects(loaded, base, Path(tmp))
        pairs.append((seconds / retrain, seconds, retrain))
    pairs.sort()
    ratio, seconds, retrain = pairs[len(pairs) // 2]
    return result, ratio, seconds, retrain, (pairs[0][0], pairs[-1][0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runs = sorted(p.name for p in ROOT.iterdir() if (p / "manifest.yaml").is_file())
    ap.add_argument("--runs", nargs="+", default=runs)
    ap.add_argument("--estimators", nargs="+", default=list(pipeline.ESTIMATORS))
    ap.add_argument("--evaluate", nargs="+", default=list(pipeline.EVALUATIONS))
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--repeat", type=int, default=3, help="timings of the cost ratio")
    defaults = UnrolledConfig()
    for f in fields(UnrolledConfig):
        kind = type(getattr(defaults, f.name))
        ap.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                        type=float if kind in (float, type(None)) else kind)
    args = ap.parse_args(argv)
    config = UnrolledConfig(**{f.name: getattr(args, f.name) for f in fields(UnrolledConfig)
                               if getattr(args, f.name) is not None})
    print(f"unrolled settings: {config}")
    print(f"{'run':<10} {'estimator':<9} {'eval':<6} {'stage':<18} {'pearson':>8} "
          f"{'spearman':>8} {'effect':>9} {'truth':>9} sign rank")
    report = []
    for run in args.runs:
        manifest = ROOT / run / "manifest.yaml"
        v = pipeline.validate(manifest, tuple(args.estimators), tuple(args.evaluate),
                              config=config)
        for fid in v.results:
            for i, s in enumerate(fid.stages):
                rank = ("ok" if fid.ranking_ok else "BAD") if i == 0 else ""
                print(f"{run:<10} {fid.estimator:<9} {fid.evaluate:<6} {s.stage:<18} "
                      f"{s.pearson:8.3f} {s.spearman:8.3f} {s.effect:+9.4f} "
                      f"{s.true_effect:+9.4f} {'ok ' if s.sign_ok else 'BAD'}  {rank}")
        result, ratio, seconds, retrain, spread = cost(manifest, args.repeat, config)
        print(f"{run:<10} cost: acctattr run ({result.estimator}/{result.evaluate}) "
              f"{seconds:.2f} s; retraining {len(v.results[0].stages)} counterfactuals "
              f"{retrain:.2f} s; ratio {ratio:.1%} (median of {args.repeat}; "
              f"{spread[0]:.1%}-{spread[1]:.1%})")
        if ratio > 0.05:
            # the estimators' work does not grow with the number of training steps
            print(f"{run:<10} cost: under 5% once training runs {ratio / 0.05:.1f}x "
                  "as many steps as this sample run")
        # the floor: frozen only reads the checkpoints and state files and evaluates
        _, floor, f_seconds, f_retrain, _ = cost(manifest, args.repeat, config, "frozen")
        print(f"{run:<10} cost: for reference, frozen (no simulation) {f_seconds:.2f} s; "
              f"retraining {f_retrain:.2f} s; ratio {floor:.1%}")
        sys.stdout.flush()
        report.append({"run": run, "run_seconds": seconds, "retrain_seconds": retrain,
                       "cost_ratio": ratio, "frozen_cost_ratio": floor, "results": [
                           {"estimator": f.estimator, "evaluate": f.evaluate,
                            "ranking_ok": f.ranking_ok, "stages": [s.__dict__ for s in f.stages]}
                           for f in v.results]})
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

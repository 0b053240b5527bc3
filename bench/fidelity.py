"""Fidelity of every estimator against retraining truth on the bundled sample runs (SPEC 6).

For each sample run, estimator and evaluation mode: per stage, the Pearson and Spearman
correlation of per-example effects with truth.json, whether the sign of the mean effect is
right, and whether the ranking of stages by |effect| matches the truth's.

    python bench/fidelity.py [--runs digits toxicity] [--estimators naive frozen]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from acctattr import pipeline
from acctattr.options import UnrolledConfig

ROOT = Path(__file__).resolve().parents[1] / "sample_runs"


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=x.dtype)
    # average ranks over ties
    for v in torch.unique(x):
        mask = x == v
        if int(mask.sum()) > 1:
            r[mask] = r[mask].mean()
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(ranks(a), ranks(b))


def fidelity(run: str, estimator: str, evaluate: str, config=None) -> dict:
    folder = ROOT / run
    truth = json.loads((folder / "truth.json").read_text())
    t0 = time.perf_counter()
    result = pipeline.run(folder / "manifest.yaml", estimator, evaluate, per_example=True,
                          config=config)
    seconds = time.perf_counter() - t0
    assert result.examples is not None
    rows = []
    est_mean, true_mean = {}, {}
    for s in result.stages:
        est = torch.tensor([e.effects[s.name] for e in result.examples], dtype=torch.float64)
        ref = torch.tensor(truth["stages"][s.name]["examples"], dtype=torch.float64)
        est_mean[s.name], true_mean[s.name] = s.effect, truth["stages"][s.name]["effect"]
        rows.append({"stage": s.name, "pearson": pearson(est, ref),
                     "spearman": spearman(est, ref), "effect": s.effect,
                     "true_effect": true_mean[s.name],
                     "sign_ok": (s.effect > 0) == (true_mean[s.name] > 0)})
    rank_est = sorted(est_mean, key=lambda n: -abs(est_mean[n]))
    rank_true = sorted(true_mean, key=lambda n: -abs(true_mean[n]))
    return {"run": run, "estimator": result.estimator, "evaluate": evaluate,
            "seconds": seconds, "ranking_ok": rank_est == rank_true, "stages": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runs = sorted(p.name for p in ROOT.iterdir() if (p / "truth.json").is_file())
    ap.add_argument("--runs", nargs="+", default=runs)
    ap.add_argument("--estimators", nargs="+", default=list(pipeline.ESTIMATORS))
    ap.add_argument("--hessian-at", default=None)
    ap.add_argument("--secant-points", type=int, default=None)
    ap.add_argument("--substeps", type=int, default=None)
    ap.add_argument("--precond", default=None)
    ap.add_argument("--adam-cap", type=float, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--sample", type=int, default=None)
    ap.add_argument("--evaluate", nargs="+", default=list(pipeline.EVALUATIONS))
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    kw = {}
    if args.hessian_at:
        kw["hessian_at"] = args.hessian_at
    if args.secant_points is not None:
        kw["secant_points"] = args.secant_points
    if args.substeps:
        kw["substeps"] = args.substeps
    if args.precond:
        kw["precond"] = args.precond
    if args.adam_cap:
        kw["adam_cap"] = args.adam_cap
    if args.iters:
        kw["lanczos_iters"] = args.iters
    if args.sample:
        kw["sample_size"] = args.sample
    config = UnrolledConfig(**kw)
    out = []
    print(f"{'run':<10} {'estimator':<9} {'eval':<6} {'stage':<18} {'pearson':>8} "
          f"{'spearman':>8} {'effect':>9} {'truth':>9} sign rank")
    for run in args.runs:
        for est in args.estimators:
            for ev in args.evaluate:
                f = fidelity(run, est, ev, config)
                out.append(f)
                for i, r in enumerate(f["stages"]):
                    print(f"{run:<10} {est:<9} {ev:<6} {r['stage']:<18} {r['pearson']:8.3f} "
                          f"{r['spearman']:8.3f} {r['effect']:+9.4f} {r['true_effect']:+9.4f} "
                          f"{'ok ' if r['sign_ok'] else 'BAD'}  "
                          f"{('ok' if f['ranking_ok'] else 'BAD') if i == 0 else ''}")
                sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fidelity and cost of every estimator against retraining, on the bundled sample runs.

For each sample run (SPEC section 6): retrain with each stage skipped through the run's
``replay`` function, then per estimator and evaluation mode print, per stage, the Pearson
and Spearman correlation of per-example effects with that truth, whether the sign of the
mean effect is right, and whether the ranking of stages by |effect| matches. Then the cost:
the wall time of ``acctattr run`` (the default, auto estimator, in process) divided by the
time retraining took, both measured in this one run, interleaved, --repeat times (median);
and the same ratio for frozen, which only reads the run's files and evaluates: the floor.

Beside the estimates: the truth floor where the run's truth.json records one (``floor``:
the Pearson correlation of the per-example truth retrained under a second seed with the
first's; the lm run has it), and the baseline a user would otherwise reach for, Captum's
TracInCP summed over each stage's training examples (bench/tracin.py).

``--lm-variants`` also writes the lm run at 4x its steps, with sft as a LoRA adapter, and
as a tiny Llama under a cosine schedule (sample_runs/lm/make_run.py, with truth and floor:
about 6 minutes) and prints auto's fidelity on each against its truth. The Llama's truth is
retrained under five Trainer seeds: beside the first seed's truth, each stage is also
measured against the mean of the five (``seed mean``; its sft truth moves between seeds
more than the others': README "Fidelity").

    python bench/fidelity.py [--runs digits toxicity lm] [--estimators naive frozen unrolled]
                             [--lm-variants [lm-4x lm-lora lm-llama]] [--no-tracin]
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

import torch

from acctattr import pipeline, validation
from acctattr.options import UnrolledConfig

ROOT = Path(__file__).resolve().parents[1] / "sample_runs"


def floors(manifest: Path) -> dict[str, float]:
    """Per stage, the truth floor truth.json records (empty where it records none)."""
    path = manifest.parent / "truth.json"
    if not path.is_file():
        return {}
    stages = json.loads(path.read_text())["stages"]
    return {k: v["floor"]["pearson"] for k, v in stages.items() if "floor" in v}


def against_truth_file(manifest: Path, estimator: str = "auto",
                       config: UnrolledConfig | None = None) -> list[dict]:
    """``estimator`` on ``manifest`` against the truth.json beside it: per stage Pearson,
    mean effect, true mean, and the floor; where the truth records ``seed_mean`` (the
    per-example truth averaged over several Trainer seeds), the Pearson with it and its
    mean as well."""
    truth = json.loads((manifest.parent / "truth.json").read_text())["stages"]
    result = pipeline.run(manifest, estimator, per_example=True, config=config)
    assert result.examples is not None
    rows = []
    for s in result.stages:
        est = torch.tensor([e.effects[s.name] for e in result.examples], dtype=torch.float64)
        ref = torch.tensor(truth[s.name]["examples"], dtype=torch.float64)
        rows.append({"stage": s.name, "estimator": f"{result.estimator}/{result.evaluate}",
                     "pearson": float(torch.corrcoef(torch.stack([est, ref]))[0, 1]),
                     "effect": s.effect, "true_effect": float(ref.mean()),
                     "floor": truth[s.name].get("floor", {}).get("pearson")})
        if "seed_mean" in truth[s.name]:
            mean = torch.tensor(truth[s.name]["seed_mean"]["examples"], dtype=torch.float64)
            rows[-1]["seed_mean"] = {
                "seeds": len(truth[s.name]["seed_mean"]["seeds"]),
                "pearson": float(torch.corrcoef(torch.stack([est, mean]))[0, 1]),
                "true_effect": float(mean.mean())}
    return rows


def tracin_rows(manifest: Path) -> list[dict]:
    """Captum TracInCP summed per stage (bench/tracin.py) against the truth.json."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tracin import stage_effects

    truth = json.loads((manifest.parent / "truth.json").read_text())["stages"]
    rows = []
    for name, eff in stage_effects(manifest).items():
        ref = torch.tensor(truth[name]["examples"], dtype=torch.float64)
        rows.append({"stage": name, "pearson": None if eff is None else float(
            torch.corrcoef(torch.stack([eff, ref]))[0, 1]),
            "effect": None if eff is None else float(eff.mean()),
            "true_effect": float(ref.mean())})
    return rows


def print_rows(run: str, what: str, rows: list[dict]) -> None:
    for r in rows:
        if r["pearson"] is None:
            print(f"{run:<10} {what:<16} {r['stage']:<18} n/a (adapter stage)")
            continue
        floor = f"{r['floor']:6.3f}" if r.get("floor") is not None else "     -"
        ratio = r["effect"] / r["true_effect"] if r["true_effect"] else float("nan")
        print(f"{run:<10} {what:<16} {r['stage']:<18} {r['pearson']:8.3f} {floor} "
              f"{r['effect']:+10.4g} {r['true_effect']:+9.4f} mean ratio {ratio:6.2f}")
        if "seed_mean" in r:
            m = r["seed_mean"]
            ratio = r["effect"] / m["true_effect"] if m["true_effect"] else float("nan")
            print(f"{run:<10} {what:<16} {r['stage']:<18} {m['pearson']:8.3f}  (vs the mean "
                  f"of {m['seeds']} seeds' truth: {m['true_effect']:+.4f}, mean ratio "
                  f"{ratio:.2f})")


VARIANTS = {"lm-4x": ["--scale", "4"], "lm-lora": ["--lora"],
            "lm-llama": ["--arch", "llama", "--seeds", "5"]}


def lm_variants(config: UnrolledConfig | None, estimator: str = "auto",
                names: list[str] | None = None) -> list[dict]:
    """The lm run at 4x steps, with a LoRA sft and as a cosine-scheduled Llama, written with
    truth into a temporary folder; ``estimator``'s fidelity on each (auto's unless one
    estimator is asked for); ``names``: only these of VARIANTS."""
    import subprocess

    make = ROOT / "lm" / "make_run.py"
    out = []
    with tempfile.TemporaryDirectory(prefix="acctattr-lm-") as tmp:
        for name, flags in VARIANTS.items():
            if names and name not in names:
                continue
            folder = Path(tmp) / name
            subprocess.run([sys.executable, str(make), "--truth", "--out", str(folder), *flags],
                           check=True, stdout=subprocess.DEVNULL)
            rows = against_truth_file(folder / "manifest.yaml", estimator, config)
            print_rows(name, estimator, rows)
            sys.stdout.flush()
            out.append({"run": name, "stages": rows})
    return out


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
            _, retrain = validation.true_effects(loaded, base, Path(tmp))
        pairs.append((seconds / retrain, seconds, retrain))
    pairs.sort()
    ratio, seconds, retrain = pairs[len(pairs) // 2]
    return result, ratio, seconds, retrain, (pairs[0][0], pairs[-1][0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runs = sorted(p.name for p in ROOT.iterdir() if (p / "manifest.yaml").is_file())
    ap.add_argument("--runs", nargs="*", default=runs, help="none: only --lm-variants")
    ap.add_argument("--estimators", nargs="+", default=list(pipeline.ESTIMATORS))
    ap.add_argument("--evaluate", nargs="+", default=list(pipeline.EVALUATIONS))
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--repeat", type=int, default=3, help="timings of the cost ratio")
    ap.add_argument("--lm-variants", nargs="*", choices=list(VARIANTS), default=None,
                    help="also the lm run at 4x steps, with a LoRA sft and as a cosine-"
                         "scheduled Llama (about 6 minutes): auto on them, or the one "
                         "estimator --estimators names; names: only those")
    ap.add_argument("--no-tracin", action="store_true", help="skip the TracInCP baseline")
    defaults = UnrolledConfig()
    for f in fields(UnrolledConfig):
        kind = type(getattr(defaults, f.name))
        if kind is bool:  # bool("0") is True: read 1/0, true/false, yes/no
            kind = lambda s: s.lower() in ("1", "true", "yes")  # noqa: E731
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
        v = validation.validate(manifest, tuple(args.estimators), tuple(args.evaluate),
                                config=config)
        floor = floors(manifest)
        for fid in v.results:
            for i, s in enumerate(fid.stages):
                rank = ("ok" if fid.ranking_ok else "BAD") if i == 0 else ""
                print(f"{run:<10} {fid.estimator:<9} {fid.evaluate:<6} {s.stage:<18} "
                      f"{s.pearson:8.3f} {s.spearman:8.3f} {s.effect:+9.4f} "
                      f"{s.true_effect:+9.4f} {'ok ' if s.sign_ok else 'BAD'}  {rank}")
        for name, r in floor.items():
            print(f"{run:<10} truth floor (second seed) {name:<18} {r:8.3f}")
        tracin = [] if args.no_tracin else tracin_rows(manifest)
        print_rows(run, "TracInCP", tracin)
        result, ratio, seconds, retrain, spread = cost(manifest, args.repeat, config)
        print(f"{run:<10} cost: acctattr run ({result.estimator}/{result.evaluate}) "
              f"{seconds:.2f} s; retraining {len(v.results[0].stages)} counterfactuals "
              f"{retrain:.2f} s; ratio {ratio:.1%} (median of {args.repeat}; "
              f"{spread[0]:.1%}-{spread[1]:.1%})")
        if ratio > 0.05:
            # an extrapolation: unrolled's passes grow slowly with the steps a substep spans
            # (the SGD flow's halvings and Lanczos products); bench/scaling.py measures it
            print(f"{run:<10} cost: under 5% at {ratio / 0.05:.1f}x this run's steps if "
                  "unrolled's cost stayed flat (measured: bench/scaling.py)")
        # the floor: frozen only reads the checkpoints and state files and evaluates
        _, f_ratio, f_seconds, f_retrain, _ = cost(manifest, args.repeat, config, "frozen")
        print(f"{run:<10} cost: for reference, frozen (no simulation) {f_seconds:.2f} s; "
              f"retraining {f_retrain:.2f} s; ratio {f_ratio:.1%}")
        sys.stdout.flush()
        report.append({"run": run, "run_seconds": seconds, "retrain_seconds": retrain,
                       "cost_ratio": ratio, "frozen_cost_ratio": f_ratio,
                       "truth_floor": floor, "tracin": tracin, "results": [
                           {"estimator": f.estimator, "evaluate": f.evaluate,
                            "ranking_ok": f.ranking_ok, "stages": [s.__dict__ for s in f.stages]}
                           for f in v.results]})
    if args.lm_variants is not None:
        one = args.estimators[0] if len(args.estimators) == 1 else "auto"
        report.append({"variants": lm_variants(config, one, args.lm_variants)})
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

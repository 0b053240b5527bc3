"""Cost and fidelity of acctattr's default estimator as the sample runs train longer.

The sample runs retrain in about a second, so a fixed cost weighs heavily against them;
real runs train far longer. For each sample run and each factor s in --scales, this writes
the run again with every stage trained s times as many steps (same data, more epochs;
warmup and intermediate checkpoints scaled with it) into a temporary folder, then reports,
all measured in this one run:

- fidelity of `acctattr run`'s default (auto) estimator against retraining that scaled run
  without each stage (per-example Pearson, sign, ranking; SPEC section 6). The defaults
  were chosen on the s = 1 runs, so s > 1 are runs they were not tuned on;
- cost: `acctattr run` time / time to retrain its counterfactuals, the median of --repeat
  interleaved pairs;
- how well unrolled's simulation reproduces each later stage: its training loss's fall
  from checkpoint to checkpoint, simulated / recorded (auto takes frozen outside 1/2-2);
- unrolled's passes over the later stages' data samples (``passes``): counts that, unlike
  seconds, do not depend on the machine's load;
- per run, the run's length (optimizer steps, all stages) where the cost ratio falls to
  5% (``crossing``): from straight lines through the run and retraining seconds against
  the steps measured (two or more scales), or, from one scale, assuming the run's cost
  flat and retraining's proportional to the steps.

    python bench/scaling.py [--runs digits toxicity lm] [--scales 1 2 4] [--repeat 3]
                            [--variants digits-adamw toxicity-sgd lm-lora ...]

--variants also runs the sample runs with other optimizers and hyperparameters (VARIANTS:
digits with AdamW, digits with fresh nesterov stages, toxicity with SGD, toxicity with
other Adam betas and eps) and the lm run with its sft a LoRA adapter (lm-lora), the same
way. The lm run is written by transformers.Trainer (sample_runs/lm/make_run.py), about
20 s per 1x copy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import ModuleType

from acctattr import pipeline, validation
from acctattr.evaluation.curvature import Curvature

ROOT = Path(__file__).resolve().parents[1] / "sample_runs"
sys.path.insert(0, str(Path(__file__).resolve().parent))

ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8}


def _short(stage, div: int):
    """The stage trained ``div`` times fewer steps (at least 4), no intermediate checkpoints."""
    steps = max(4, stage.steps // div)
    return replace(stage, steps=steps, checkpoints=(),
                   lr={**stage.lr, "warmup": min(stage.lr["warmup"] // div, steps - 1)})


# Other optimizers and hyperparameters for the same runs (--variants): name -> (run,
# stage index and stage -> the variant's stage). Learning rates are rescaled so that
# each run still trains.
VARIANTS = {
    "digits-adamw": ("digits", lambda i, st: replace(
        st, optimizer="adamw", hparams=ADAMW, weight_decay=0.01,
        lr={**st.lr, "base": st.lr["base"] * 0.03})),
    "digits-nesterov-fresh": ("digits", lambda i, st: replace(
        st, hparams={"momentum": 0.8, "dampening": 0.0, "nesterov": True}, continues=False)),
    "toxicity-sgd": ("toxicity", lambda i, st: replace(
        st, optimizer="sgd", hparams={"momentum": 0.9, "dampening": 0.0, "nesterov": False},
        weight_decay=1e-4, lr={**st.lr, "base": st.lr["base"] * 20})),
    "digits-short": ("digits", lambda i, st: _short(st, 16)),
    "toxicity-short": ("toxicity", lambda i, st: _short(st, 16)),
    "toxicity-adam-betas": ("toxicity", lambda i, st: replace(
        st, hparams={"betas": (0.8, 0.99), "eps": 1e-6},
        lr={**st.lr, "base": st.lr["base"] * 0.5})),
}

# written next to a scaled run's manifest: its model factory and replay, scaled
WRAPPER = '''"""sample_runs/{run} x{scale}, variant {variant}: written by bench/scaling.py."""
import importlib.util
import sys

_spec = importlib.util.spec_from_file_location("acctattr_bench_scaling", {bench!r})
B = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = B
_spec.loader.exec_module(B)
MR = B.load_make_run({run!r})
STAGES = B.stages_of({run!r}, {scale}, {variant!r})
build = MR.M.build


def replay(skip, out_dir):
    return MR.replay(skip, out_dir, STAGES)
'''


def load_make_run(run: str) -> ModuleType:
    name = f"acctattr_bench_{run}_make_run"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / run / "make_run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# the lm run's variant: its sft stage a PEFT LoRA adapter (sample_runs/lm/make_run.py)
LM_VARIANTS = ("lm-lora",)


def stages_of(run: str, scale: int, variant: str | None = None) -> tuple:
    """The sample run's stages, trained ``scale`` times longer, as ``variant`` changes them."""
    mr = load_make_run(run)
    stages = mr.C.scaled(mr.STAGES, scale)
    if variant is not None:
        vrun, change = VARIANTS[variant]
        if vrun != run:
            raise ValueError(f"variant {variant} is of run {vrun}, not {run}")
        stages = tuple(change(i, st) for i, st in enumerate(stages))
    return stages


def write_scaled(run: str, scale: int, folder: Path, variant: str | None = None) -> Path:
    """The sample run trained ``scale`` times longer (and changed by ``variant``), laid out
    as make_run.py does."""
    mr = load_make_run(run)
    if run == "lm":  # written by transformers.Trainer: make_run.py lays out its variants
        return mr.build_run(folder, scale, lora=variant == "lm-lora")
    c = mr.C
    stages = stages_of(run, scale, variant)
    stage_data, eval_set = mr.make_data()
    inputs = [k for k in eval_set if k not in ("y", "group")]
    for name, (x, y) in stage_data.items():
        c.save_data(str(folder / "data" / f"{name}.safetensors"), {inputs[0]: x, "y": y})
    c.save_data(str(folder / "data" / "eval.safetensors"), eval_set)
    c.train_pipeline(c.build_seeded(mr.M.build, mr.INIT_SEED), stages, stage_data,
                     out_dir=str(folder))
    (folder / "scaled.py").write_text(WRAPPER.format(
        run=run, scale=scale, variant=variant, bench=str(Path(__file__).resolve())))
    text = c.manifest_text(stages, inputs, f"{run} x{scale} {variant or ''}".strip())
    text = text.replace("factory: model.py:build", "factory: scaled.py:build")
    text = text.replace("replay: make_run.py:replay", "replay: scaled.py:replay")
    manifest = folder / "manifest.yaml"
    manifest.write_text(text)
    return manifest


def passes(manifest: Path) -> dict[str, int]:
    """How many passes over the later stages' data samples `acctattr run --estimator
    unrolled` makes, by kind (acctattr.evaluation.curvature.Curvature's calls): loss
    (forward), gradient, expand (the loss, gradient and product graph: the SGD flow's
    point), hvp (one more backward through that graph), noise (the Adam flow's noise
    groups' gradients, one vectorised pass; not counted where they are taken one group at a
    time)."""
    counts: Counter[str] = Counter()
    kinds = {"value": "loss", "gradient": "gradient", "expand": "expand",
             "group_gradients_and_values": "noise"}
    originals = {name: getattr(Curvature, name) for name in kinds}

    def counted(name):
        def call(self, *args, **kwargs):
            counts[kinds[name]] += 1
            out = originals[name](self, *args, **kwargs)
            if name != "expand":
                return out
            value, grad, product = out

            def hvp(v):
                counts["hvp"] += 1
                return product(v)

            return value, grad, hvp
        return call

    try:
        for name in kinds:
            setattr(Curvature, name, counted(name))
        pipeline.run(manifest, "unrolled")
    finally:
        for name, fn in originals.items():
            setattr(Curvature, name, fn)
    return dict(sorted(counts.items()))


def measure(manifest: Path, repeat: int, also: tuple[str, ...] = ()) -> dict:
    """Fidelity of the default estimator (and of ``also``, direct), and its cost ratio."""
    from fidelity import cost  # bench/fidelity.py, next to this file

    chosen = pipeline.run(manifest)
    v = validation.validate(manifest, (chosen.estimator, *also), (chosen.evaluate,))
    fid = v.results[0]
    _, ratio, seconds, retrain, spread = cost(manifest, repeat)
    loaded = pipeline.check(manifest)
    unrolled = pipeline.estimator(loaded, "unrolled")
    unrolled.embed(0)  # simulates every later stage: its reproduction checks
    reproduced = {r.stage: r.simulated_drop / r.recorded_drop if r.recorded_drop else
                  float("nan") for _, r in sorted(unrolled.reproduction.items())}
    return {"estimator": f"{chosen.estimator}/{chosen.evaluate}",
            "steps": sum(r.steps for r in loaded.runs),
            "stages": [s.__dict__ for s in fid.stages], "ranking_ok": fid.ranking_ok,
            "run_seconds": seconds, "retrain_seconds": retrain, "cost_ratio": ratio,
            "ratio_range": list(spread),
            "also": {f.estimator: [s.pearson for s in f.stages] for f in v.results[1:]},
            "reproduced": reproduced, "passes": passes(manifest)}


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs (at least two distinct xs)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / \
        sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def crossing(points: list[tuple[int, float, float]], bar: float = 0.05) -> tuple[float, str]:
    """The run's length in optimizer steps where run seconds / retraining seconds falls to
    ``bar``, from (steps, run seconds, retraining seconds) measured at one or more lengths,
    and how it was found.

    Two or more lengths: retraining's seconds a straight line in the steps, the run's in
    log2(steps). The run's passes grow by about the same count per doubling of the length
    (bench output: a substep twice as long is halved once more where the flow needs short
    pieces, and Lanczos nears its lanczos_iters), not in proportion to it. One length: the
    run's cost taken as flat and retraining's as proportional to the steps. inf where the
    ratio does not reach ``bar`` below 2^40 steps."""
    if len({p[0] for p in points}) < 2:
        steps, run, retrain = points[0]
        return steps * (run / retrain) / bar, "one length: run flat, retraining ~ steps"
    xs = [float(p[0]) for p in points]
    a, b = _line([math.log2(x) for x in xs], [p[1] for p in points])
    c, e = _line(xs, [p[2] for p in points])

    def over(n: float) -> bool:  # the ratio still above the bar at n steps
        retrain = c + e * n
        return retrain <= 0 or a + b * math.log2(n) > bar * retrain

    lo = min(xs)
    if not over(lo):
        return lo, "run ~ log2(steps), retraining ~ steps, fitted"
    hi = lo
    while over(hi):
        if hi > 2.0**40:
            return float("inf"), "run ~ log2(steps), retraining ~ steps, fitted"
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if over(mid) else (lo, mid)
    return hi, "run ~ log2(steps), retraining ~ steps, fitted"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="*", default=["digits", "toxicity"])
    ap.add_argument("--scales", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=[],
                    choices=sorted(VARIANTS) + list(LM_VARIANTS),
                    help="also these changed runs, at scale 1")
    ap.add_argument("--also", nargs="*", default=[], choices=["naive", "frozen"],
                    help="also print these estimators' Pearson per stage")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    print(f"{'run':<22} {'x':>3} {'estimator':<16} {'pearson per stage':<26} {'sign':<5} "
          f"{'rank':<5} {'run s':>6} {'retrain s':>9} {'ratio':>7}")
    cases = [(run, scale, None) for run in args.runs for scale in args.scales]
    cases += [("lm" if v in LM_VARIANTS else VARIANTS[v][0], 1, v) for v in args.variants]
    report = []
    for run, scale, variant in cases:
        with tempfile.TemporaryDirectory(prefix=f"acctattr-{run}-x{scale}-") as tmp:
            m = measure(write_scaled(run, scale, Path(tmp), variant), args.repeat,
                        tuple(args.also))
        pearson = " ".join(f"{s['pearson']:.3f}" for s in m["stages"])
        signs = "ok" if all(s["sign_ok"] for s in m["stages"]) else "BAD"
        print(f"{variant or run:<22} {scale:>3} {m['estimator']:<16} {pearson:<26} "
              f"{signs:<5} {'ok' if m['ranking_ok'] else 'BAD':<5} {m['run_seconds']:6.2f} "
              f"{m['retrain_seconds']:9.2f} {m['cost_ratio']:7.1%}")
        print(f"{'':<22} {'':>3} unrolled's simulated / recorded training-loss fall: "
              + ", ".join(f"{k} {x:.2f}" for k, x in m["reproduced"].items()))
        print(f"{'':<22} {'':>3} unrolled's passes over the stages' data samples: "
              + ", ".join(f"{n} {k}" for k, n in m["passes"].items()))
        for est, values in m["also"].items():
            print(f"{'':<22} {'':>3} {est + '/' + m['estimator'].split('/')[1]:<16} "
                  + " ".join(f"{x:.3f}" for x in values))
        sys.stdout.flush()
        report.append({"run": run, "scale": scale, "variant": variant, **m})
    for run in args.runs:
        points = [(m["steps"], m["run_seconds"], m["retrain_seconds"]) for m in report
                  if m["run"] == run and m["variant"] is None]
        if points:
            steps, how = crossing(points)
            longest = max(points)
            base = next(m["steps"] // m["scale"] for m in report if m["run"] == run)
            print(f"{run}: the cost ratio reaches 5% at about {steps:,.0f} optimizer steps, "
                  f"{steps / base:.0f}x the sample run's {base} ({how}); at {longest[0]:,} "
                  f"steps it is {longest[1] / longest[2]:.1%}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

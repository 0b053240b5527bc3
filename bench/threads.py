"""How the CPU thread count changes a run's time, and that it does not change its result.

For each sample run and estimator, ``acctattr run`` (in process, everything but the start-up)
at each thread count, interleaved --repeat times, median seconds and the ratio to one
thread; the JSON of every run is compared byte for byte. With --unpinned, unrolled's
simulation also runs at the thread count (as before acctattr pinned it to one thread; README,
"Devices, threads and several processes"), to see what the pin costs or saves here. The
1-minute load average before and after says how busy the machine was.

    python bench/threads.py [--threads 1 2] [--repeat 3] [--runs digits toxicity]
                            [--estimators frozen unrolled] [--unpinned]
    python bench/threads.py --where     # which computations change with the thread count

--where computes, at 1 and at 2 threads, each sample run's training-loss gradient and a
Hessian-vector product (unrolled's sample of the second stage's data, at its end), the
eval values, a JVP and a direct evaluation, and float64 sums and dot products of 10^6
elements, and says per tensor whether the bits agree (largest relative difference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from acctattr import devices, pipeline
from acctattr.estimators.unrolled.estimator import Unrolled
from acctattr.options import Runtime
from acctattr.output import report

ROOT = Path(__file__).resolve().parents[1] / "sample_runs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--runs", nargs="+", default=["digits", "toxicity"])
    ap.add_argument("--estimators", nargs="+", default=["frozen", "unrolled"])
    ap.add_argument("--unpinned", action="store_true",
                    help="run unrolled's simulation at the thread count too")
    ap.add_argument("--where", action="store_true",
                    help="which computations change with the thread count (1 vs 2)")
    args = ap.parse_args(argv)
    if args.where:
        return where(args.runs)
    if args.unpinned:
        Unrolled.embed = Unrolled.embed.__wrapped__  # type: ignore[attr-defined]
    print(f"usable CPUs {devices.usable_cpus()}, torch default {devices.TORCH_THREADS} "
          f"threads, acctattr default {devices.default_threads()}, load average "
          f"{os.getloadavg()[0]:.2f}" + (", unrolled unpinned" if args.unpinned else ""))
    print(f"{'run':10} {'estimator':9} " + " ".join(f"{f'{n} thr':>8}" for n in args.threads)
          + "  " + " ".join(f"{f'{n}/1':>6}" for n in args.threads[1:]) + "  same JSON")
    for run in args.runs:
        manifest = ROOT / run / "manifest.yaml"
        for est in args.estimators:
            times: dict[int, list[float]] = {n: [] for n in args.threads}
            texts: set[str] = set()
            for _ in range(args.repeat):
                for n in args.threads:
                    t0 = time.perf_counter()
                    result = pipeline.run(manifest, est, per_example=True,
                                          runtime=Runtime(threads=n))
                    times[n].append(time.perf_counter() - t0)
                    texts.add(report.to_json(result, None))
            med = {n: statistics.median(ts) for n, ts in times.items()}
            one = med[args.threads[0]]
            print(f"{run:10} {est:9} " + " ".join(f"{med[n]:7.2f}s" for n in args.threads)
                  + "  " + " ".join(f"{med[n] / one:5.2f}x" for n in args.threads[1:])
                  + f"  {'yes' if len(texts) == 1 else 'NO'}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


def at_threads(fn: Callable[[], object]) -> list[dict[str, torch.Tensor]]:
    """fn() at 1 and at 2 intra-op threads, each result as name -> float64 tensor."""
    out = []
    for n in (1, 2):
        with devices.threads(n):
            got = fn()
        if isinstance(got, dict):
            out.append({k: v.double() for k, v in got.items()})
        else:
            out.append({"": torch.as_tensor(got).double()})
    return out


def compare(what: str, fn: Callable[[], object]) -> None:
    one, two = at_threads(fn)
    for k in one:
        a, b = one[k], two[k]
        rel = float((a - b).abs().max() / a.abs().max().clamp(min=1e-300))
        print(f"  {what + (' ' + k if k else ''):38} {'same' if torch.equal(a, b) else 'DIFFER'}"
              f"  max rel {rel:.1e}")


def where_run(run: str) -> None:
    print(run)
    loaded = pipeline.check(ROOT / run / "manifest.yaml")
    curv = pipeline.training(loaded).curvature(1)
    at = {n: loaded.runs[1].end.get(n) for n in loaded.info.trainable}
    gen = torch.Generator().manual_seed(0)
    v = {n: torch.randn(x.shape, generator=gen) for n, x in at.items()}
    ev = loaded.evaluator
    base = ev.values()[0]
    compare("training-loss gradient", lambda: curv.gradient(at))
    compare("Hessian-vector product", lambda: curv.hvp(at)(v))
    compare("eval values", lambda: ev.values()[0])
    compare("eval JVP", lambda: ev.linear(v))
    compare("eval direct", lambda: ev.direct(v, base))


def where(runs: list[str]) -> int:
    print(f"torch {torch.__version__}: bits at 1 vs 2 intra-op threads")
    for run in runs:
        where_run(run)
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(1_000_003, dtype=torch.float64, generator=gen) for _ in range(2))
    print("float64 vectors of 10^6 + 3 elements")
    compare("sum", lambda: (x * y).sum())
    compare("dot", lambda: x @ y)
    compare("elementwise x * y + x", lambda: x * y + x)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How the CPU thread count changes a run's time, and that it does not change its result.

For each sample run and estimator, ``acctattr run`` (in process, everything but the start-up)
at each thread count, interleaved --repeat times, median seconds and the ratio to one
thread; the JSON of every run is compared byte for byte. With --unpinned, unrolled's
simulation also runs at the thread count (as before acctattr pinned it to one thread,
README "Threads"), to see what the pin costs or saves on this machine. The 1-minute load
average before and after says how busy the machine was.

    python bench/threads.py [--threads 1 2] [--repeat 3] [--runs digits toxicity]
                            [--estimators frozen unrolled] [--unpinned]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

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
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())

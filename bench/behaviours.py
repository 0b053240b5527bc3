"""What asking k behaviours costs against asking one: one embedding pass plus k evaluations.

For each sample run and estimator, ``acctattr run`` (in process, start-up excluded) on a copy
of the run's manifest whose ``evals:`` holds k behaviours (the sample's eval set under the
metrics cross_entropy, margin, logprob, and cross_entropy again at another batch size),
k = 1, 2, 4, interleaved --repeat times; median seconds and the ratio to k = 1. The last
column is a run on one behaviour from stored embeddings (``--embeddings``): the evaluation
alone. Run it with OMP_NUM_THREADS=1; all ratios come from one run of this script.

    OMP_NUM_THREADS=1 python bench/behaviours.py [--repeat 3] [--runs digits toxicity]
                                                 [--estimators frozen unrolled]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from acctattr import embeddings, pipeline
from acctattr.options import Runtime

ROOT = Path(__file__).resolve().parents[1] / "sample_runs"
METRICS = [{}, {"metric": "margin"}, {"metric": "logprob"}, {"batch_size": 100}]
NAMES = ["loss", "margin", "logprob", "loss_b100"]


def manifests(run: str, folder: Path, ks: list[int]) -> dict[int, Path]:
    """A copy of sample run ``run`` under ``folder`` with one manifest per k."""
    copy = folder / run
    shutil.copytree(ROOT / run, copy, ignore=shutil.ignore_patterns("__pycache__"))
    doc = yaml.safe_load((copy / "manifest.yaml").read_text())
    section = doc.pop("eval")
    out = {}
    for k in ks:
        d = dict(doc, evals={NAMES[i]: {**section, **METRICS[i]} for i in range(k)})
        out[k] = copy / f"manifest-{k}.yaml"
        out[k].write_text(yaml.safe_dump(d, sort_keys=False))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--runs", nargs="+", default=["digits", "toxicity"])
    ap.add_argument("--estimators", nargs="+", default=["frozen", "unrolled"])
    args = ap.parse_args(argv)
    ks = [1, 2, 4]
    runtime = Runtime(device="cpu", threads=1)
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load average "
          f"{os.getloadavg()[0]:.2f}, median of {args.repeat}")
    print(f"{'run':9} {'estimator':9} " + " ".join(f"{f'k={k}':>8}" for k in ks)
          + "  " + " ".join(f"{f'{k}/1':>6}" for k in ks[1:]) + f"  {'stored k=1':>10}")
    with tempfile.TemporaryDirectory(prefix="acctattr-bench-") as tmp:
        for run in args.runs:
            paths = manifests(run, Path(tmp), ks)
            for est in args.estimators:
                stored = Path(tmp) / f"{run}-{est}-emb"
                embeddings.compute(paths[1], stored, est, runtime=runtime)
                times: dict[str, list[float]] = {}
                for _ in range(args.repeat):
                    for k in ks:
                        t0 = time.perf_counter()
                        pipeline.run(paths[k], est, runtime=runtime)
                        times.setdefault(str(k), []).append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    pipeline.run(paths[1], est, runtime=runtime, embeddings=stored)
                    times.setdefault("stored", []).append(time.perf_counter() - t0)
                med = {key: statistics.median(v) for key, v in times.items()}
                print(f"{run:9} {est:9} " + " ".join(f"{med[str(k)]:7.2f}s" for k in ks)
                      + "  " + " ".join(f"{med[str(k)] / med['1']:5.2f}x" for k in ks[1:])
                      + f"  {med['stored']:9.2f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

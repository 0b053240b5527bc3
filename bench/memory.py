"""Peak memory of `acctattr run` for eval sets of 10k and 100k examples, for every
estimator and evaluation mode: should not grow with N.

Each (estimator, evaluation, size) runs in its own child process (a fresh interpreter, so
peaks do not mix) on a synthetic two-stage SGD run: a Linear(256 -> 10) float32 model, eval
inputs [N, 256] float32 (10k: 10 MB on disk, 100k: 102 MB), and 1,024 training examples per
stage (which unrolled needs for curvature; the others do not read them). Reported per run:

- peak RSS (``VmHWM``): everything resident, including pages of the memory-mapped eval
  file that batches touched (file-backed, reclaimable by the kernel);
- peak anonymous RSS (``RssAnon`` of /proc/self/status, sampled every 2 ms): memory the
  process itself allocated, i.e. what holding the data would grow;
- both minus the same figures measured just before ``pipeline.run`` (interpreter, torch,
  acctattr imported; the synthetic run is written by the parent process).

The pipeline keeps N floats per stage (the per-example effects), not the data.

    python bench/memory.py                          # every estimator x evaluation, once
    python bench/memory.py --repeats 3              # medians of 3, and each repeat's ratios
    python bench/memory.py --estimators frozen --evaluations linear

glibc raises its mmap threshold as large blocks are freed, so freed batch buffers may stay on
the heap; anything long-lived allocated between them (the evaluator used to keep one small
result per batch) then keeps the heap from shrinking, and it grows with the number of
batches. Pin the threshold (``MALLOC_MMAP_THRESHOLD_=65536 python bench/memory.py``) to tell
that apart from acctattr's own use.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SIZES = (10_000, 100_000)
WIDTH, CLASSES = 256, 10
TRAIN = 1024  # training examples per stage (unrolled's curvature sample)
ESTIMATORS = ("naive", "frozen", "unrolled")
EVALUATIONS = ("linear", "direct")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _anon_kib() -> int:
    return _status_kib("RssAnon")


def _hwm_kib() -> int:
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, so a child would inherit
    # the parent's peak (the parent wrote the eval data); VmHWM starts afresh at exec.
    return _status_kib("VmHWM")


def _write_run(root: Path, n: int) -> Path:
    import torch
    import yaml
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    (root / "model.py").write_text(
        f"import torch\n\n\ndef build():\n    return torch.nn.Linear({WIDTH}, {CLASSES})\n")
    w = torch.randn(CLASSES, WIDTH, generator=g) * 0.05
    b = torch.zeros(CLASSES)
    stages = []
    for k, name in enumerate(["init", "a", "b"]):
        (root / name).mkdir()
        if k:
            w = w + 0.01 * torch.randn(CLASSES, WIDTH, generator=g)
            b = b + 0.01 * torch.randn(CLASSES, generator=g)
            save_file({"x": torch.randn(TRAIN, WIDTH, generator=g),
                       "y": torch.randint(0, CLASSES, (TRAIN,), generator=g)},
                      root / f"train_{name}.safetensors")
            stages.append({"name": name, "end": name,
                           "optimizer": {"type": "sgd", "steps": 10, "lr": 0.1},
                           "data": f"train_{name}.safetensors"})
        save_file({"weight": w.contiguous(), "bias": b.contiguous()},
                  root / name / "model.safetensors")
    stages[0]["start"] = "init"
    save_file({"x": torch.randn(n, WIDTH, generator=g),
               "y": torch.randint(0, CLASSES, (n,), generator=g)}, root / "eval.safetensors")
    doc = {"version": 1, "model": {"factory": "model.py:build"}, "stages": stages,
           "train": {"loss": "cross_entropy"},
           "eval": {"data": "eval.safetensors", "inputs": ["x"], "target": "y",
                    "metric": "cross_entropy", "batch_size": 256}}
    (root / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root / "manifest.yaml"


def peak_anon_during(fn):
    """Run fn() while sampling RssAnon every 2 ms.

    Returns (fn's result, RssAnon before in KiB, its peak in KiB, seconds)."""
    base = _anon_kib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _anon_kib())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    return result, base, max(peak[0], _anon_kib()), seconds


def child(manifest: Path, estimator: str, evaluate: str) -> None:
    """Measure one run in this fresh process (which made nothing else); print a JSON line."""
    import torch

    torch.set_num_threads(1)
    from acctattr import pipeline  # imported before the baseline

    base_rss = _hwm_kib()
    result, base_anon, peak_anon, seconds = peak_anon_during(
        lambda: pipeline.run(manifest, estimator, evaluate))
    print(json.dumps({
        "n": result.n_examples,
        "eval_mb": (manifest.parent / "eval.safetensors").stat().st_size / 2**20,
        "peak_rss_mb": _hwm_kib() / 1024,
        "base_rss_mb": base_rss / 1024, "peak_anon_mb": peak_anon / 1024,
        "base_anon_mb": base_anon / 1024, "seconds": seconds}))


def _measure(manifest: Path, estimator: str, evaluate: str) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", str(manifest), estimator,
                        evaluate], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        sys.exit(f"child for {estimator}/{evaluate} on {manifest} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each child; the table shows medians")
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS),
                        choices=ESTIMATORS)
    parser.add_argument("--evaluations", nargs="+", default=list(EVALUATIONS),
                        choices=EVALUATIONS)
    args = parser.parse_args(argv)
    combos = [(e, m) for e in args.estimators for m in args.evaluations]
    # runs[(estimator, evaluation)][n] = [one dict per repeat]
    runs: dict[tuple[str, str], dict[int, list[dict]]] = {c: {n: [] for n in SIZES}
                                                          for c in combos}
    with tempfile.TemporaryDirectory() as tmp:
        manifests = {}
        for n in SIZES:
            root = Path(tmp) / f"n{n}"
            root.mkdir()
            manifests[n] = _write_run(root, n)  # here: the measured child only runs acctattr
        for _ in range(args.repeats):  # repeats outermost: load drift spreads over all rows
            for c in combos:
                for n in SIZES:
                    runs[c][n].append(_measure(manifests[n], *c))
    small, big = SIZES
    first = runs[combos[0]]
    print(f"eval file: {first[small][0]['eval_mb']:.1f} MB ({small:,} examples), "
          f"{first[big][0]['eval_mb']:.1f} MB ({big:,}); "
          f"median of {args.repeats} run(s) each")
    print(f"{'estimator':>9} {'evaluate':>8} {'examples':>9} {'peak RSS':>9} {'+run':>8} "
          f"{'peak anon':>10} {'+run':>8} {'time':>6}")

    def med(rs: list[dict], key: str, minus: str | None = None) -> float:
        return statistics.median(r[key] - (r[minus] if minus else 0) for r in rs)

    for c in combos:
        for n in SIZES:
            rs = runs[c][n]
            print(f"{c[0]:>9} {c[1]:>8} {n:>9,} {med(rs, 'peak_rss_mb'):>7.1f}MB "
                  f"{med(rs, 'peak_rss_mb', 'base_rss_mb'):>6.1f}MB "
                  f"{med(rs, 'peak_anon_mb'):>8.1f}MB "
                  f"{med(rs, 'peak_anon_mb', 'base_anon_mb'):>6.1f}MB "
                  f"{med(rs, 'seconds'):>5.1f}s")
    print(f"ratio {big // small}x examples ({big:,} / {small:,}), per repeat:")
    for c in combos:
        pairs = list(zip(runs[c][small], runs[c][big], strict=True))
        rss = [b["peak_rss_mb"] / s["peak_rss_mb"] for s, b in pairs]
        anon = [b["peak_anon_mb"] / s["peak_anon_mb"] for s, b in pairs]
        print(f"{c[0]:>9} {c[1]:>8}  peak RSS {', '.join(f'{x:.2f}x' for x in rss)}; "
              f"peak anonymous RSS {', '.join(f'{x:.2f}x' for x in anon)}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main()

"""Peak memory of `acctattr run` for eval sets of 10k and 100k examples: should not grow with N.

Each size runs in its own child process (a fresh interpreter, so peaks do not mix) on a
synthetic two-stage run: a Linear(256 -> 10) float32 model, eval inputs [N, 256] float32
(10k: 10 MB on disk, 100k: 102 MB). Reported per size:

- peak RSS (``VmHWM``): everything resident, including pages of the memory-mapped eval
  file that batches touched (file-backed, reclaimable by the kernel);
- peak anonymous RSS (``RssAnon`` of /proc/self/status, sampled every 2 ms): memory the
  process itself allocated, i.e. what holding the data would grow;
- both minus the same figures measured just before ``pipeline.run`` (interpreter, torch,
  acctattr imported; the synthetic run is written by the parent process).

The pipeline keeps N floats per stage (the per-example effects), not the data.

    python bench/memory.py            # prints a table and the 100k/10k ratios

glibc raises its mmap threshold as large blocks are freed, so freed batch buffers may stay on
the heap and show as up to ~1.4x anonymous memory at 100k in some runs. Pin the threshold
(``MALLOC_MMAP_THRESHOLD_=65536 python bench/memory.py``) to see acctattr's own use:
1.00-1.03x.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SIZES = (10_000, 100_000)
WIDTH, CLASSES = 256, 10


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
            stages.append({"name": name, "end": name,
                           "optimizer": {"type": "sgd", "steps": 10, "lr": 0.1}})
        save_file({"weight": w.contiguous(), "bias": b.contiguous()},
                  root / name / "model.safetensors")
    stages[0]["start"] = "init"
    save_file({"x": torch.randn(n, WIDTH, generator=g),
               "y": torch.randint(0, CLASSES, (n,), generator=g)}, root / "eval.safetensors")
    doc = {"version": 1, "model": {"factory": "model.py:build"}, "stages": stages,
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


def child(manifest: Path) -> None:
    """Measure one run in this fresh process (which made nothing else); print a JSON line."""
    import torch

    torch.set_num_threads(1)
    from acctattr import pipeline  # imported before the baseline

    base_rss = _hwm_kib()
    result, base_anon, peak_anon, seconds = peak_anon_during(
        lambda: pipeline.run(manifest, "frozen", "linear"))
    print(json.dumps({
        "n": result.n_examples,
        "eval_mb": (manifest.parent / "eval.safetensors").stat().st_size / 2**20,
        "peak_rss_mb": _hwm_kib() / 1024,
        "base_rss_mb": base_rss / 1024, "peak_anon_mb": peak_anon / 1024,
        "base_anon_mb": base_anon / 1024, "seconds": seconds}))


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in SIZES:
            root = Path(tmp) / f"n{n}"
            root.mkdir()
            manifest = _write_run(root, n)  # here, so the measured child only runs acctattr
            p = subprocess.run([sys.executable, __file__, "--child", str(manifest)],
                               capture_output=True, text=True, check=False)
            if p.returncode != 0:
                sys.exit(f"child for n={n} failed:\n{p.stderr}")
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"{'examples':>9} {'eval file':>10} {'peak RSS':>9} {'+run':>8} "
          f"{'peak anon':>10} {'+run':>8} {'time':>6}")
    for r in rows:
        print(f"{r['n']:>9,} {r['eval_mb']:>8.1f}MB {r['peak_rss_mb']:>7.1f}MB "
              f"{r['peak_rss_mb'] - r['base_rss_mb']:>6.1f}MB {r['peak_anon_mb']:>8.1f}MB "
              f"{r['peak_anon_mb'] - r['base_anon_mb']:>6.1f}MB {r['seconds']:>5.1f}s")
    small, big = rows
    print(f"ratio {big['n'] // small['n']}x examples: peak RSS "
          f"{big['peak_rss_mb'] / small['peak_rss_mb']:.2f}x, peak anonymous RSS "
          f"{big['peak_anon_mb'] / small['peak_anon_mb']:.2f}x "
          f"(eval file {big['eval_mb'] / small['eval_mb']:.0f}x)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]))
    else:
        main()

"""Peak memory of each estimator, in copies of the model's parameters.

Unrolled simulates the runs through every later stage and keeps the simulated actual run
of one later stage for all the earlier stages it carries, so its memory grows with the
parameter count, not with the data. This writes a synthetic three-stage AdamW run of an
MLP (1024 -> 4096 -> 10, 4.2M float32 parameters, 16.8 MB), trained by torch.optim with
its state files and data, and runs each estimator in a fresh child process with a small
data sample (sample_size 64), so that activations stay small next to the parameters.

Reported per estimator: the peak anonymous RSS (RssAnon, sampled every 2 ms) above what
the process held just before ``pipeline.run``, and that divided by the parameters' bytes.

    python bench/unrolled_memory.py [--no-mmap]

--no-mmap also runs unrolled with glibc's large allocations taken from the heap instead of
fresh mmaps (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 1 GiB, set in that child only):
the simulation's whole-vector results are then reused memory rather than new page faults.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from memory import peak_anon_during  # bench/memory.py, next to this file

WIDTH, HIDDEN, CLASSES = 1024, 4096, 10
MODEL_PY = f"""import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear({WIDTH}, {HIDDEN}), torch.nn.ReLU(),
                               torch.nn.Linear({HIDDEN}, {CLASSES}))
"""


def _write_run(root: Path) -> tuple[Path, int]:
    """Three AdamW stages of 5 steps each (the second continues the first's state)."""
    import torch
    import yaml
    from safetensors.torch import save_file

    (root / "model.py").write_text(MODEL_PY)
    namespace: dict = {}
    exec(MODEL_PY, namespace)  # noqa: S102 - the model file written just above
    model = namespace["build"]()
    g = torch.Generator().manual_seed(0)
    (root / "init").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              root / "init" / "model.safetensors")
    stages, opt = [], None
    for k, name in enumerate(["a", "b", "c"]):
        x = torch.randn(256, WIDTH, generator=g)
        y = torch.randint(0, CLASSES, (256,), generator=g)
        save_file({"x": x, "y": y}, root / f"{name}.safetensors")
        continues = k == 1
        if not continues:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        assert opt is not None
        for step in range(5):
            batch = slice(step * 32, step * 32 + 32)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
        (root / name).mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  root / name / "model.safetensors")
        torch.save(opt.state_dict(), root / name / "optimizer.pt")
        stages.append({"name": name, "end": name, "data": f"{name}.safetensors",
                       "optimizer": {"type": "adamw", "steps": 5, "lr": 1e-3,
                                     "state": f"{name}/optimizer.pt", "continues": continues}})
    stages[0]["start"] = "init"
    save_file({"x": torch.randn(64, WIDTH, generator=g),
               "y": torch.randint(0, CLASSES, (64,), generator=g)}, root / "eval.safetensors")
    doc = {"version": 1, "model": {"factory": "model.py:build"}, "stages": stages,
           "eval": {"data": "eval.safetensors", "inputs": ["x"], "target": "y",
                    "metric": "cross_entropy", "batch_size": 64}}
    (root / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root / "manifest.yaml", sum(p.numel() for p in model.parameters())


def child(manifest: Path, estimator: str, no_mmap: bool = False) -> None:
    """Run one estimator in this fresh process; print a JSON line."""
    if no_mmap:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmapped blocks
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB freed in the heap
    import torch

    torch.set_num_threads(1)
    from acctattr import pipeline
    from acctattr.options import UnrolledConfig

    pipeline.check(manifest)  # imports the model factory, before the baseline
    _, base, peak, seconds = peak_anon_during(lambda: pipeline.run(
        manifest, estimator, "direct", config=UnrolledConfig(sample_size=64)))
    print(json.dumps({"estimator": estimator, "added_mb": (peak - base) / 1024,
                      "seconds": seconds}))


def main(no_mmap: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        manifest, n_params = _write_run(Path(tmp))
        param_mb = n_params * 4 / 2**20
        print(f"model: {n_params:,} float32 parameters ({param_mb:.1f} MB)")
        print(f"{'estimator':<20} {'peak anon added':>17} {'copies':>7} {'time':>6}")
        runs = [("frozen", ""), ("unrolled", "")] + ([("unrolled", "no-mmap")] if no_mmap
                                                      else [])
        for est, how in runs:
            p = subprocess.run([sys.executable, __file__, "--child", str(manifest), est, how],
                               capture_output=True, text=True, check=False)
            if p.returncode != 0:
                sys.exit(f"child for {est} failed:\n{p.stderr}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            label = f"{est} ({how})" if how else est
            print(f"{label:<20} {r['added_mb']:>15.1f}MB {r['added_mb'] / param_mb:>7.1f} "
                  f"{r['seconds']:>5.1f}s")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "no-mmap")
    else:
        main("--no-mmap" in sys.argv[1:])

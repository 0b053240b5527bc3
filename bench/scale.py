"""Time and peak memory of each estimator on staged GPT-2-style runs, against a floor.

Builds (once, in this process) staged runs of a GPT-2-style causal LM with random weights:
each stage takes a few real ``torch.optim.AdamW`` steps on small random gradients, and its
end is written as ``model.safetensors`` with the optimizer's ``state_dict()`` saved by
``torch.save`` (``optimizer.pt``); the second stage continues the first one's optimizer.
Every measurement runs in a fresh child process (``OMP_NUM_THREADS=1``, one torch thread):

- ``floor``: build the model, read every checkpoint's tensors once, and K+1 forward passes
  over the eval set at the final weights: what any attribution of K stages must do;
- each estimator: ``acctattr.pipeline.run`` (check, embeddings, evaluation), default
  evaluation (``--evaluate direct``: f(theta_T) - f(theta_T - v_k), one forward pass per
  stage, to tell the estimator's own work from the linear evaluation's JVPs).

Reported: wall time ÷ the floor's, and peak RSS (``VmHWM``: anonymous and file-backed
pages) above the process's start-up (interpreter, torch and acctattr imported) in copies of
one checkpoint file; ``anon`` is the same for anonymous memory alone (``RssAnon`` sampled
every 2 ms).

    python bench/scale.py                      # 1M, 10M, 50M; naive, frozen, unrolled (<= 10M)
    python bench/scale.py --sizes 124m         # sizes over 50M are opt-in
    python bench/scale.py --sizes 10m --stages 3,10,30 --estimators frozen
    python bench/scale.py --sizes 124m --estimators frozen --evaluate default,direct
    python bench/scale.py --sizes 1m --eval 1000,10000,100000 --estimators frozen
    python bench/scale.py --sizes 1b --dtype bf16 --estimators frozen --eval 32
    python bench/scale.py --sizes 10m --estimators unrolled --steps 16

``--steps N`` takes N AdamW steps per stage (default 3): unrolled simulates a stage in up to
flow_substeps=16 substeps, at most one per optimizer step, so 16 steps exercise the path a
real run's stage has (16 substeps) where 3 steps give 3.

``--runs DIR`` keeps the generated runs there (reused when present).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memory import _anon_kib, _hwm_kib, peak_anon_during  # bench/memory.py

# vocabulary, context, width, layers, heads
SIZES = {"1m": (2048, 64, 128, 4, 4), "10m": (8192, 64, 256, 10, 8),
         "50m": (16384, 128, 512, 13, 8), "124m": (50257, 1024, 768, 12, 12),
         "1b": (50257, 1024, 1536, 34, 16)}
DEFAULT_SIZES = ("1m", "10m", "50m")
OPT_IN = ("124m", "1b")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TOKENS = 16  # eval and training sequence length
STEPS = 3  # AdamW steps per stage (--steps)

MODEL_PY = '''"""A GPT-2-style causal LM (pre-LN blocks, tied embeddings); scores the next token
after the sequence (logits of the last position)."""
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, CTX, WIDTH, LAYERS, HEADS, DTYPE = {cfg}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.c_attn = nn.Linear(WIDTH, 3 * WIDTH)
        self.c_proj = nn.Linear(WIDTH, WIDTH)
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.c_fc = nn.Linear(WIDTH, 4 * WIDTH)
        self.mlp_proj = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, HEADS, d // HEADS).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (d // HEADS) ** 0.5
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        x = x + self.c_proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.wpe = nn.Embedding(CTX, WIDTH)
        self.h = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(WIDTH)

    def forward(self, x):
        h = self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device))
        for block in self.h:
            h = block(h)
        return F.linear(self.ln_f(h[:, -1]), self.wte.weight)


def build():
    torch.manual_seed(0)
    return GPT().to(getattr(torch, DTYPE))
'''


def _write_run(root: Path, size: str, stages: int, n_eval: int, dtype: str,
               steps: int = STEPS) -> Path:
    """A staged run under ``root`` (written once; reused when its manifest exists)."""
    manifest = root / "manifest.yaml"
    if manifest.exists():
        return manifest
    import torch
    import yaml
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    vocab, ctx, width, layers, heads = SIZES[size]
    (root / "model.py").write_text(MODEL_PY.format(
        cfg=repr((vocab, ctx, width, layers, heads, DTYPES[dtype]))))
    namespace: dict = {}
    exec((root / "model.py").read_text(), namespace)  # noqa: S102 - written just above
    torch.manual_seed(0)
    model = namespace["GPT"]().to(getattr(torch, DTYPES[dtype]))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02)
    g = torch.Generator().manual_seed(0)

    def save(name: str) -> None:
        (root / name).mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  root / name / "model.safetensors")

    save("init")
    doc_stages = []
    opt = None
    for k in range(stages):
        name = f"s{k:02d}"
        x = torch.randint(0, vocab, (32, TOKENS), generator=g)
        save_file({"x": x, "y": torch.randint(0, vocab, (32,), generator=g)},
                  root / f"{name}.safetensors")
        continues = k == 1
        if not continues:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        assert opt is not None
        for _ in range(steps):
            for p in model.parameters():
                p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(p.dtype)
            opt.step()
        for p in model.parameters():
            p.grad = None
        save(name)
        torch.save(opt.state_dict(), root / name / "optimizer.pt")
        doc_stages.append({"name": name, "end": name, "data": f"{name}.safetensors",
                           "optimizer": {"type": "adamw", "steps": steps, "lr": 1e-4,
                                         "weight_decay": 0.01, "state": f"{name}/optimizer.pt",
                                         "continues": continues}})
    doc_stages[0]["start"] = "init"
    save_file({"x": torch.randint(0, vocab, (n_eval, TOKENS), generator=g),
               "y": torch.randint(0, vocab, (n_eval,), generator=g)},
              root / "eval.safetensors")
    doc = {"version": 1, "model": {"factory": "model.py:build"}, "stages": doc_stages,
           "eval": {"data": "eval.safetensors", "inputs": ["x"], "target": "y",
                    "metric": "cross_entropy", "batch_size": 64}}
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return manifest


def _floor(manifest: Path) -> None:
    """Read every checkpoint's tensors once, then K+1 forward passes at the final weights."""
    import torch
    import yaml
    from safetensors import safe_open
    from torch.func import functional_call

    from acctattr.evaluation.model import build_model
    from acctattr.runs.manifest import Ref

    root = manifest.parent
    doc = yaml.safe_load(manifest.read_text())
    model = build_model(Ref(text="model.py:build", file=root / "model.py", module=None,
                            func="build"))
    names = [doc["stages"][0]["start"]] + [s["end"] for s in doc["stages"]]
    final: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        with safe_open(str(root / name / "model.safetensors"), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                t = f.get_tensor(key)
                if i == len(names) - 1:
                    final[key] = t
                del t
    with safe_open(str(root / "eval.safetensors"), framework="pt") as f:
        x, y = f.get_tensor("x"), f.get_tensor("y")
    with torch.no_grad():
        for _ in range(len(names)):  # K+1 passes
            for b in range(0, x.shape[0], 64):
                out = functional_call(model, final, (x[b:b + 64],))
                torch.nn.functional.cross_entropy(out.float(), y[b:b + 64], reduction="none")


def child(manifest: Path, estimator: str, evaluate: str | None = None) -> None:
    """Measure one run in this fresh process; print a JSON line."""
    import torch

    torch.set_num_threads(1)
    from acctattr import pipeline  # imported before the baseline

    base_hwm, base_anon = _hwm_kib(), _anon_kib()
    if estimator == "floor":
        _, _, peak_anon, seconds = peak_anon_during(lambda: _floor(manifest))
    else:
        _, _, peak_anon, seconds = peak_anon_during(
            lambda: pipeline.run(manifest, estimator, evaluate))
    label = estimator if evaluate is None else f"{estimator}/{evaluate}"
    print(json.dumps({"estimator": label, "seconds": seconds,
                      "peak_mb": (_hwm_kib() - base_hwm) / 1024,
                      "anon_mb": (peak_anon - base_anon) / 1024,
                      "base_mb": base_hwm / 1024}))


def measure(manifest: Path, estimator: str, evaluate: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, __file__, "--child", str(manifest), estimator,
                        *([evaluate] if evaluate else [])],
                       capture_output=True, text=True, check=False, env=env)
    if p.returncode != 0:
        label = estimator if evaluate is None else f"{estimator}/{evaluate}"
        return {"estimator": label, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(DEFAULT_SIZES),
                    help=f"comma-separated of {', '.join(SIZES)} ({', '.join(OPT_IN)}: opt-in)")
    ap.add_argument("--size", help="one size (same as --sizes SIZE)")
    ap.add_argument("--estimators", default="naive,frozen,unrolled")
    ap.add_argument("--stages", default="3", help="comma-separated stage counts")
    ap.add_argument("--eval", default="256", help="comma-separated eval-set sizes")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int, default=STEPS,
                    help="AdamW steps per stage (unrolled: one flow substep each, up to 16)")
    ap.add_argument("--evaluate", default="default",
                    help="comma-separated of default (each estimator's own), linear, direct")
    ap.add_argument("--unrolled-max", default="10m",
                    help="largest size unrolled runs at (its memory grows fastest)")
    ap.add_argument("--runs", type=Path, help="keep the generated runs in this folder")
    args = ap.parse_args()
    sizes = [args.size] if args.size else args.sizes.split(",")
    for s in sizes:
        if s not in SIZES:
            sys.exit(f"unknown size {s}; one of {', '.join(SIZES)}")
    order = list(SIZES)
    tmp = None
    if args.runs is None:
        tmp = tempfile.mkdtemp(prefix="acctattr-scale-")
    root = args.runs or Path(tmp)  # type: ignore[arg-type]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {' '.join(sys.argv)}")
    print(f"{'size':>5} {'params':>7} {'ckpt':>8} {'K':>3} {'eval':>6} {'estimator':<13} "
          f"{'time':>7} {'÷floor':>7} {'peak':>6} {'anon':>6}  (peak, anon: checkpoints)")
    try:
        for size in sizes:
            for n_stages in map(int, args.stages.split(",")):
                for n_eval in map(int, args.eval.split(",")):
                    where = root / (f"{size}-{args.dtype}-k{n_stages}-n{n_eval}"
                                    + (f"-s{args.steps}" if args.steps != STEPS else ""))
                    manifest = _write_run(where, size, n_stages, n_eval, args.dtype,
                                          args.steps)
                    ckpt = (where / "init" / "model.safetensors").stat().st_size
                    n_params = _n_params(where / "init" / "model.safetensors")
                    floor = measure(manifest, "floor")
                    rows = [floor]
                    for est in args.estimators.split(","):
                        if est == "unrolled" and order.index(size) > order.index(
                                args.unrolled_max):
                            continue
                        for ev in args.evaluate.split(","):
                            rows.append(measure(manifest, est,
                                                None if ev == "default" else ev))
                    for r in rows:
                        head = (f"{size:>5} {n_params / 1e6:>6.1f}M {ckpt / 2**20:>6.0f}MB "
                                f"{n_stages:>3} {n_eval:>6} {r['estimator']:<13}")
                        if "error" in r:
                            print(f"{head} failed: {r['error']}")
                            continue
                        ratio = r["seconds"] / floor["seconds"] if "seconds" in floor else math.nan
                        print(f"{head} {r['seconds']:>6.1f}s {ratio:>6.2f}x "
                              f"{r['peak_mb'] * 2**20 / ckpt:>6.2f} "
                              f"{r['anon_mb'] * 2**20 / ckpt:>6.2f}", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _n_params(file: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[3], *sys.argv[4:])
    else:
        main()

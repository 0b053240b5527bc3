"""The lm sample run's pipeline retrained by hand under simpler optimizer models, to find
which of Trainer's mechanisms unrolled's Adam flow (expected steps) misses (README
"Fidelity"). Prints each stage's retraining effect (mean, and per eval group) per model:

  real    AdamW on batches as Trainer (its decay groups, linear warmup, clipping at 1.0),
          dropout on; the data order is this script's own, not Trainer's
  nodrop  the same in eval mode (no dropout)
  mean    Adam's expected step: m from the stage's mean gradient (all its data), v and the
          clip factor from the batch gradient, eval mode: what the flow models
  nomom   as mean with beta1 = 0 (m_hat = g): the flow's assumption without adam_momentum

    OMP_NUM_THREADS=1 python bench/lm_replica.py real,nodrop,mean,nomom [SCALE]

About a minute per model at scale 1 for real and nodrop, 2-3 minutes for mean and nomom (a
full-data gradient per step).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_runs" / "lm"))
import make_run as M  # noqa: E402
from metric import next_token_loss  # noqa: E402


def param_groups(model, wd: float = 0.01) -> list[dict]:
    """Trainer's: weight decay on everything but biases and LayerNorm weights."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if ("bias" in n or "ln" in n) else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def run_stage(model, name: str, data: dict, mode: str, seed: int, scale: int = 1) -> None:
    from transformers import get_linear_schedule_with_warmup

    steps, batch, accum, peak, warmup = M.STAGES[name]
    steps, warmup = steps * scale, warmup * scale
    size = batch * accum
    opt = torch.optim.AdamW(param_groups(model), lr=peak, betas=(0.9, 0.999), eps=1e-8)
    schedule = get_linear_schedule_with_warmup(opt, warmup, steps)
    gen = torch.Generator().manual_seed(seed)
    ids, labels = data["input_ids"], data["labels"]
    order: list[int] = []
    params = [p for p in model.parameters() if p.requires_grad]
    index = {id(p): i for i, p in enumerate(params)}
    model.train(mode == "real")
    beta1 = 0.0 if mode == "nomom" else 0.9
    for _ in range(steps):
        while len(order) < size:
            order += torch.randperm(len(ids), generator=gen).tolist()
        idx, order = order[:size], order[size:]
        opt.zero_grad()
        model(ids[idx], labels=labels[idx]).loss.backward()
        batch_g = [p.grad.detach().clone() for p in params]
        norm = math.sqrt(sum(float(x.square().sum()) for x in batch_g))
        rho = min(1.0, 1.0 / (norm + 1e-6))  # clip_grad_norm_(max_norm=1.0)
        if mode in ("real", "nodrop"):
            for p, x in zip(params, batch_g, strict=True):
                p.grad = x * rho
            opt.step()
        else:  # m from the mean gradient, v from the batch's (both clipped alike)
            opt.zero_grad()
            model(ids, labels=labels).loss.backward()
            mean_g = [p.grad.detach().clone() for p in params]
            for group in opt.param_groups:
                lr, wd = group["lr"], group["weight_decay"]
                for p in group["params"]:
                    st = opt.state.setdefault(p, {})
                    if not st:
                        st.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                    i = index[id(p)]
                    st["step"] += 1
                    k = st["step"]
                    p.data.mul_(1 - lr * wd)
                    st["m"].mul_(beta1).add_(mean_g[i] * rho, alpha=1 - beta1)
                    st["v"].mul_(0.999).add_((batch_g[i] * rho) ** 2, alpha=0.001)
                    m_hat = st["m"] / (1 - beta1**k)
                    v_hat = st["v"] / (1 - 0.999**k)
                    p.data.add_(-lr * m_hat / (v_hat.sqrt() + 1e-8))
        schedule.step()


def pipeline(stage_data: dict, skip: str | None, mode: str, seed: int, scale: int = 1):
    model = M.build_model()
    for name in M.STAGES:
        if name != skip:
            run_stage(model, name, stage_data[name], mode, seed, scale)
    return model


def evaluate(model, ev: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return next_token_loss(model(ev["input_ids"]).logits.double(), ev["labels"])


def main() -> None:
    torch.set_num_threads(1)
    modes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["real", "nodrop", "mean", "nomom"]
    scale = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    stage_data, _ = M.make_data(scale)
    _, ev = M.make_data(1)
    for mode in modes:
        full = evaluate(pipeline(stage_data, None, mode, 0, scale), ev)
        parts = []
        for name in M.STAGES:
            e = full - evaluate(pipeline(stage_data, name, mode, 0, scale), ev)
            groups = " ".join(f"{float(e[ev['group'] == i].mean()):+.3f}" for i in range(3))
            parts.append(f"{name} {float(e.mean()):+.3f} [{groups}]")
        print(f"{mode:<7}", " | ".join(parts), flush=True)


if __name__ == "__main__":
    main()

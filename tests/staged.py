"""Tiny staged training runs written into a temporary folder, trained with real torch.optim.

The model is a float64 linear layer (weight -> "decay" group, bias -> "no decay" group, the
Hugging Face rule) and the training loss is minus the target logit, which is linear in the
parameters: later gradients do not depend on earlier stages, so the frozen estimator is
exact and retraining with a stage skipped is the ground truth to compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

N_IN, N_OUT, BATCH = 6, 3, 8

MODEL_PY = f"""import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Linear({N_IN}, {N_OUT}).double()
"""


@dataclass
class StageCfg:
    name: str
    opt: str  # sgd | adam | adamw
    steps: int
    lr: Any  # number, list, or {schedule, base, warmup, min}
    kwargs: dict = field(default_factory=dict)  # momentum, dampening, nesterov, betas, eps
    weight_decay: tuple[float, float] = (0.0, 0.0)  # decay group, no-decay group
    continues: bool = False


def lrs(cfg: StageCfg) -> list[float]:
    if isinstance(cfg.lr, (int, float)):
        return [float(cfg.lr)] * cfg.steps
    if isinstance(cfg.lr, list):
        return cfg.lr
    base, w, lo, T = cfg.lr["base"], cfg.lr.get("warmup", 0), cfg.lr.get("min", 0.0), cfg.steps
    out = []
    for s in range(T):
        if s < w:
            out.append(base * s / w)
        elif cfg.lr["schedule"] == "cosine":
            out.append(lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * (s - w) / (T - w))))
        elif cfg.lr["schedule"] == "linear":
            out.append(lo + (base - lo) * (T - s) / (T - w))
        else:
            out.append(base)
    return out


def _optimizer(cfg: StageCfg, model: torch.nn.Linear) -> torch.optim.Optimizer:
    groups = [{"params": [model.weight], "weight_decay": cfg.weight_decay[0]},
              {"params": [model.bias], "weight_decay": cfg.weight_decay[1]}]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.opt]
    return cls(groups, lr=0.0, **cfg.kwargs)


def stage_data(k: int, cfg: StageCfg) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(cfg.steps * BATCH, N_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, N_OUT, (cfg.steps * BATCH,), generator=g)
    return x, y


def train(stages: list[StageCfg], skip: int | None = None,
          out: Path | None = None) -> dict[str, torch.Tensor]:
    """Run the stages (skipping index ``skip``); with ``out``, write checkpoints and state."""
    torch.manual_seed(0)
    model = torch.nn.Linear(N_IN, N_OUT).double()
    if out is not None:
        (out / "ckpt" / "init").mkdir(parents=True, exist_ok=True)
        save_file(dict(model.state_dict()), out / "ckpt" / "init" / "model.safetensors")
    states: dict[int, dict] = {}  # optimizer state at the end of each stage that ran
    last = None  # index of the last stage that ran
    for k, cfg in enumerate(stages):
        if k == skip:
            continue
        opt = _optimizer(cfg, model)
        if cfg.continues and last is not None:
            # the state as it was at the end of the last stage that ran (SPEC section 1)
            opt.load_state_dict(states[last])
            # load_state_dict also restores the old hyperparameters; this stage keeps its own
            fresh = _optimizer(cfg, model).param_groups
            for grp, own in zip(opt.param_groups, fresh, strict=True):
                grp.update({k: v for k, v in own.items() if k != "params"})
        x, y = stage_data(k, cfg)
        for s, lr in enumerate(lrs(cfg)):
            for grp in opt.param_groups:
                grp["lr"] = lr
            xb, yb = x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH]
            loss = -model(xb).gather(1, yb[:, None]).mean()  # linear in the parameters
            opt.zero_grad()
            loss.backward()
            opt.step()
        states[k] = _copy_state(opt.state_dict())
        last = k
        if out is not None:
            d = out / "ckpt" / cfg.name
            d.mkdir(parents=True, exist_ok=True)
            save_file(dict(model.state_dict()), d / "model.safetensors")
            torch.save(opt.state_dict(), d / "optimizer.pt")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _copy_state(sd: dict) -> dict:
    return {"state": {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                          for k, v in st.items()} for i, st in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


def eval_set(n: int = 40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"x": torch.randn(n, N_IN, generator=g, dtype=torch.float64),
            "y": torch.randint(0, N_OUT, (n,), generator=g),
            "group": torch.arange(n) % 2}


LOSS_PY = """def minus_target_logit(out, y):
    return -out.gather(1, y[:, None]).squeeze(1)
"""


def write_run(root: Path, stages: list[StageCfg], metric: str = "cross_entropy",
              with_data: bool = False) -> Path:
    """Train and write a complete run (checkpoints, optimizer.pt, eval data, manifest).

    With ``with_data`` each stage's training data and the training loss go in too, so the
    unrolled estimator can run."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.py").write_text(MODEL_PY)
    train(stages, out=root)
    (root / "data").mkdir(exist_ok=True)
    save_file(eval_set(), root / "data" / "eval.safetensors")
    doc: dict[str, Any] = {"version": 1, "model": {"factory": "model.py:build"}, "stages": [],
                           "eval": {"data": "data/eval.safetensors", "inputs": ["x"],
                                    "target": "y", "group": "group", "metric": metric,
                                    "batch_size": 16}}
    for k, cfg in enumerate(stages):
        st: dict[str, Any] = {"name": cfg.name, "end": f"ckpt/{cfg.name}",
                              "optimizer": {"type": cfg.opt, "steps": cfg.steps, "lr": cfg.lr,
                                            "state": f"ckpt/{cfg.name}/optimizer.pt",
                                            "continues": cfg.continues}}
        if k == 0:
            st["start"] = "ckpt/init"
        if with_data:
            x, y = stage_data(k, cfg)
            save_file({"x": x, "y": y}, root / "data" / f"{cfg.name}.safetensors")
            st["data"] = f"data/{cfg.name}.safetensors"
        doc["stages"].append(st)
    if with_data:
        (root / "loss.py").write_text(LOSS_PY)
        doc["train"] = {"loss": "loss.py:minus_target_logit"}
    path = root / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def metric_values(state: dict[str, torch.Tensor], metric: str = "cross_entropy") -> torch.Tensor:
    ev = eval_set()
    out = ev["x"] @ state["weight"].T + state["bias"]
    if metric == "cross_entropy":
        return torch.nn.functional.cross_entropy(out, ev["y"], reduction="none")
    raise ValueError(metric)


def truth(stages: list[StageCfg]) -> dict[str, torch.Tensor]:
    """Per-example true effects f_i(theta_T) - f_i(theta_T^(-k)) by retraining."""
    final = metric_values(train(stages))
    return {cfg.name: final - metric_values(train(stages, skip=k))
            for k, cfg in enumerate(stages)}

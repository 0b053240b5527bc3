"""Helpers shared by the sample runs: staged training, checkpoints, manifest and truth.

Each sample run (``digits/``, ``toxicity/``) describes its stages as :class:`Stage` values and
its data as tensors, then hands both to :func:`train_pipeline`. The same function trains the
committed run and every counterfactual replay, so the truth is computed by exactly the code
that produced the checkpoints.

Determinism: each stage's data (selection and order) comes from its own generator seeded
from the stage index, and is stored in the order it is consumed; training runs in float32
on one thread; the learning rate is set explicitly before every step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

TRUTH_SCHEMA = "acctattr.truth/1"


# --------------------------------------------------------------------------- schedules


def lr_schedule(
    steps: int, schedule: str, base: float, warmup: int = 0, min_lr: float = 0.0
) -> list[float]:
    """Per-step learning rates, 0-indexed step s in [0, steps).

    warmup (s < W): base * s / W (step 0 has lr 0 when W > 0, as in Hugging Face).
    constant: base.  linear: min + (base - min) * (T - s) / (T - W).
    cosine: min + (base - min) * 0.5 * (1 + cos(pi * (s - W) / (T - W))).
    """
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown lr schedule {schedule!r}")
    T, W = steps, warmup
    lrs: list[float] = []
    for s in range(T):
        if s < W:
            lrs.append(base * s / W)
        elif schedule == "constant":
            lrs.append(base)
        elif schedule == "linear":
            lrs.append(min_lr + (base - min_lr) * (T - s) / (T - W))
        else:
            lrs.append(min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W))))
    return lrs


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One training stage as the manifest describes it.

    ``hparams`` holds the optimizer's per-group hyperparameters other than lr and weight
    decay (sgd: momentum, dampening, nesterov; adamw: betas, eps). ``weight_decay`` is the
    decay of parameter group 0; with ``no_decay_groups`` the second group (biases and norm
    weights, Hugging Face Trainer rule) gets 0.0.
    """

    name: str
    optimizer: str  # "sgd" | "adamw"
    steps: int
    batch_size: int
    lr: dict  # {schedule, base, warmup, min}
    weight_decay: float
    hparams: dict
    continues: bool
    checkpoints: tuple[int, ...] = ()
    no_decay_groups: bool = False

    def lrs(self) -> list[float]:
        return lr_schedule(
            self.steps, self.lr["schedule"], self.lr["base"], self.lr["warmup"], self.lr["min"]
        )


def scaled(stages: Sequence[Stage], factor: int) -> tuple[Stage, ...]:
    """The same stages trained ``factor`` times as many steps (same data, more epochs):
    steps, warmup and intermediate checkpoints multiplied, the schedule's shape kept."""
    return tuple(replace(st, steps=st.steps * factor,
                         lr={**st.lr, "warmup": st.lr["warmup"] * factor},
                         checkpoints=tuple(c * factor for c in st.checkpoints))
                 for st in stages)


def param_groups(model: nn.Module, stage: Stage) -> list[dict]:
    """Optimizer param groups, each listing parameters in ``named_parameters()`` order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not stage.no_decay_groups:
        return [{"params": [p for _, p in named], "weight_decay": stage.weight_decay}]
    # Hugging Face Trainer rule: no decay for biases and for LayerNorm parameters.
    no_decay = {n for n, _ in named if "bias" in n}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            prefix = f"{module_name}." if module_name else ""
            no_decay |= {prefix + n for n, _ in module.named_parameters(recurse=False)}
    return [
        {"params": [p for n, p in named if n not in no_decay], "weight_decay": stage.weight_decay},
        {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0},
    ]


def _group_hparams(stage: Stage) -> dict:
    if stage.optimizer == "sgd":
        return {
            "momentum": stage.hparams["momentum"],
            "dampening": stage.hparams.get("dampening", 0.0),
            "nesterov": stage.hparams.get("nesterov", False),
        }
    if stage.optimizer == "adamw":
        return {"betas": tuple(stage.hparams["betas"]), "eps": stage.hparams["eps"]}
    raise ValueError(f"unsupported optimizer {stage.optimizer!r}")


def make_optimizer(model: nn.Module, stage: Stage) -> torch.optim.Optimizer:
    groups = param_groups(model, stage)
    lr0 = stage.lrs()[0]
    if stage.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr0, **_group_hparams(stage))
    return torch.optim.AdamW(groups, lr=lr0, **_group_hparams(stage))


def _apply_stage_hparams(opt: torch.optim.Optimizer, model: nn.Module, stage: Stage) -> None:
    """A continuing stage keeps the optimizer state but trains with its own hyperparameters."""
    wanted = param_groups(model, stage)
    if len(wanted) != len(opt.param_groups):
        raise ValueError(f"stage {stage.name!r}: cannot continue an optimizer with other groups")
    expected_type = torch.optim.SGD if stage.optimizer == "sgd" else torch.optim.AdamW
    if type(opt) is not expected_type:
        raise ValueError(f"stage {stage.name!r}: cannot continue a {type(opt).__name__}")
    for group, want in zip(opt.param_groups, wanted, strict=True):
        group["weight_decay"] = want["weight_decay"]
        group.update(_group_hparams(stage))


# --------------------------------------------------------------------------- checkpoints


def save_model(model: nn.Module, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors"))


def load_model(model: nn.Module, folder: str) -> None:
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))


def save_optimizer(opt: torch.optim.Optimizer, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    torch.save(opt.state_dict(), os.path.join(folder, "optimizer.pt"))


def save_data(path: str, tensors: dict[str, torch.Tensor]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread, so float32 reductions run in the same order every time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build the model under a fixed seed without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.float()


# --------------------------------------------------------------------------- training


def train_pipeline(
    model: nn.Module,
    stages: Sequence[Stage],
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    skip: str | None = None,
    out_dir: str | None = None,
) -> nn.Module:
    """Train ``stages`` in order on ``model`` (already initialised), skipping stage ``skip``.

    Stage data ``data[name] = (inputs, y)`` is consumed in stored order, cyclically:
    batch s is rows (s*B .. s*B+B-1) mod N. Skipping a stage leaves the parameters and the
    optimizer object untouched, so the next stage starts from the previous stage's end (the
    init if the skipped stage was first) and, if it continues, from the optimizer state at the
    previous stage's end (none at all, i.e. fresh, if the skipped stage was first).

    With ``out_dir`` the run writes ``ckpt/init``, ``ckpt/<stage>`` and
    ``ckpt/<stage>-<step>`` (model.safetensors + optimizer.pt) under it.
    """
    names = [s.name for s in stages]
    if skip is not None and skip not in names:
        raise ValueError(f"unknown stage {skip!r}; stages are {names}")
    if out_dir is not None:
        save_model(model, os.path.join(out_dir, "ckpt", "init"))
    opt: torch.optim.Optimizer | None = None
    with single_thread():
        for stage in stages:
            if stage.name == skip:
                continue
            if stage.continues and opt is not None:
                _apply_stage_hparams(opt, model, stage)
            else:
                opt = make_optimizer(model, stage)
            inputs, y = data[stage.name]
            n, bsz = y.shape[0], stage.batch_size
            lrs = stage.lrs()
            model.train()
            for s in range(stage.steps):
                rows = torch.arange(s * bsz, (s + 1) * bsz) % n
                loss = F.cross_entropy(model(inputs[rows]), y[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for g in opt.param_groups:
                    g["lr"] = lrs[s]
                opt.step()
                if out_dir is not None and (s + 1) in stage.checkpoints and s + 1 < stage.steps:
                    folder = os.path.join(out_dir, "ckpt", f"{stage.name}-{s + 1}")
                    save_model(model, folder)
                    save_optimizer(opt, folder)
            if out_dir is not None:
                folder = os.path.join(out_dir, "ckpt", stage.name)
                save_model(model, folder)
                save_optimizer(opt, folder)
    model.eval()
    return model


# --------------------------------------------------------------------------- metric, truth


@torch.no_grad()
def per_example_ce(model: nn.Module, inputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (float64 [N]) of ``model`` in eval mode.

    The forward pass runs in float32 (as the model would be deployed); the log-softmax is
    taken in float64 so that truth differences are not limited by float32 rounding.
    """
    model.eval()
    with single_thread():
        logits = torch.cat([model(inputs[i : i + 256]) for i in range(0, len(y), 256)])
    return F.cross_entropy(logits.double(), y, reduction="none")


def truth_document(
    full: torch.Tensor, counterfactual: dict[str, torch.Tensor], stage_names: Sequence[str]
) -> dict:
    """The ``acctattr.truth/1`` document: effect_i = f_i(theta_T) - f_i(theta_T^(-k))."""
    stages = {}
    for name in stage_names:
        eff = full - counterfactual[name]
        stages[name] = {
            "effect": float(eff.mean()),
            "counterfactual_value": float(counterfactual[name].mean()),
            "examples": [float(v) for v in eff.tolist()],
        }
    return {
        "schema": TRUTH_SCHEMA,
        "metric": "cross_entropy",
        "higher_is_better": False,
        "n_examples": int(full.shape[0]),
        "final_value": float(full.mean()),
        "stages": stages,
    }


def write_json(path: str, doc: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, sort_keys=True, indent=1) + "\n")


def group_means(values: torch.Tensor, group: torch.Tensor) -> dict[int, float]:
    return {int(g): float(values[group == g].mean()) for g in torch.unique(group)}


# --------------------------------------------------------------------------- manifest


def _yaml_float(x: float) -> str:
    """A float PyYAML (YAML 1.1) reads back as float: '1e-08' would load as a string."""
    text = repr(float(x))
    if "e" in text and "." not in text.split("e")[0]:
        mant, exp = text.split("e")
        text = f"{mant}.0e{exp}"
    return text


def _yaml_value(x: object) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        return _yaml_float(x)
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in x) + "]"
    return str(x)


def manifest_text(
    stages: Sequence[Stage], eval_inputs: Sequence[str], title: str, eval_batch_size: int = 256
) -> str:
    """manifest.yaml for a run laid out by :func:`train_pipeline` (paths relative to it)."""
    lines = [f"# {title}", "# Generated by make_run.py; do not edit by hand.", "version: 1"]
    lines += ["model:", "  factory: model.py:build", "stages:"]
    for i, st in enumerate(stages):
        lines.append(f"  - name: {st.name}")
        if i == 0:
            lines.append("    start: ckpt/init")
        lines.append(f"    end: ckpt/{st.name}")
        lines.append("    optimizer:")
        lines.append(f"      type: {st.optimizer}")
        lines.append(f"      steps: {st.steps}")
        lr = st.lr
        lines.append(
            f"      lr: {{schedule: {lr['schedule']}, base: {_yaml_float(lr['base'])}, "
            f"warmup: {lr['warmup']}, min: {_yaml_float(lr['min'])}}}"
        )
        for key, val in _group_hparams(st).items():
            lines.append(f"      {key}: {_yaml_value(val)}")
        decay = f"      weight_decay: {_yaml_float(st.weight_decay)}"
        if st.no_decay_groups:
            decay += "  # decay group; no-decay group (biases, LayerNorm): 0.0 (optimizer.pt)"
        lines.append(decay)
        lines.append(f"      state: ckpt/{st.name}/optimizer.pt")
        lines.append(f"      continues: {_yaml_value(st.continues)}")
        lines.append(f"    data: data/{st.name}.safetensors")
        inner = [c for c in st.checkpoints if c < st.steps]
        if inner:
            items = ", ".join(f"{{step: {c}, path: ckpt/{st.name}-{c}}}" for c in inner)
            lines.append(f"    checkpoints: [{items}]")
    lines += ["train:", "  loss: cross_entropy", "replay: make_run.py:replay", "eval:"]
    lines += [
        "  data: data/eval.safetensors",
        f"  inputs: [{', '.join(eval_inputs)}]",
        "  target: y",
        "  group: group",
        "  metric: cross_entropy",
        f"  batch_size: {eval_batch_size}",
    ]
    return "\n".join(lines) + "\n"


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _load_final(build: Callable[[], nn.Module], folder: str) -> nn.Module:
    model = build()
    load_model(model, folder)
    return model.eval()


def _fmt_groups(values: torch.Tensor, group: torch.Tensor) -> str:
    means = group_means(values, group)
    return "  ".join(f"group {g}: {v:+.4f}" for g, v in means.items())


def report_and_truth(
    here: str,
    stages: Sequence[Stage],
    build: Callable[[], nn.Module],
    replay: Callable[[str | None, str], str],
    eval_set: dict[str, torch.Tensor],
    input_name: str,
    truth: bool,
) -> None:
    """Print the full run's per-group CE; with ``truth``, retrain without each stage
    (through ``replay``, checked to reproduce the committed run) and write truth.json."""
    x, y, group = eval_set[input_name], eval_set["y"], eval_set["group"]
    full = per_example_ce(_load_final(build, os.path.join(here, "ckpt", stages[-1].name)), x, y)
    print(f"full run: mean CE {float(full.mean()):.4f}  per group CE  {_fmt_groups(full, group)}")
    if not truth:
        return
    replays = os.path.join(here, "replays")
    check = per_example_ce(_load_final(build, replay(None, os.path.join(replays, "full"))), x, y)
    if not torch.equal(check, full):
        raise SystemExit("replay(None) does not reproduce the committed final checkpoint")
    counterfactual = {}
    width = max(len(s.name) for s in stages)
    for stage in stages:
        folder = replay(stage.name, os.path.join(replays, f"no-{stage.name}"))
        cf = per_example_ce(_load_final(build, folder), x, y)
        counterfactual[stage.name] = cf
        print(f"without {stage.name:>{width}}: per group CE  {_fmt_groups(cf, group)}")
        print(f"  effect {float((full - cf).mean()):+.4f}  per group  "
              f"{_fmt_groups(full - cf, group)}")
    doc = truth_document(full, counterfactual, [s.name for s in stages])
    write_json(os.path.join(here, "truth.json"), doc)

"""``acctattr init``: a manifest drafted from checkpoint folders given in training order.

Each path is a stage's end. Its format decides what can be read off it:

- Hugging Face Trainer folder: steps (trainer_state.json global_step), lr (its log), state
  (optimizer.pt), optimizer type (from optimizer.pt's param_groups);
- PEFT adapter folder: an adapter stage (no optimizer needed);
- Lightning .ckpt: steps (global_step), optimizer type and state (optimizer_states), the lr
  when no scheduler ran;
- plain weights: only the end; an ``optimizer.pt`` beside them gives type and state.

What cannot be read off the files is written as a ``TODO(acctattr): ...`` string, which
``acctattr check`` lists as a problem naming its key. Hyperparameters found in a state file
are listed in a comment only: the state file already supplies them per parameter group, and
a value written in the manifest would override every group.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from acctattr.errors import AcctattrError, CheckpointError
from acctattr.runs import formats
from acctattr.runs.checkpoints import load_torch_file
from acctattr.runs.manifest import PLACEHOLDER


def todo(what: str) -> str:
    return f"{PLACEHOLDER}: {what}"


def _optimizer_type(sd: Any, default: str | None) -> tuple[str, list[dict]]:
    """(type or placeholder, hyperparameters per group) of a torch optimizer state_dict."""
    if isinstance(sd, dict) and isinstance(sd.get("optimizer_states"), list) \
            and len(sd["optimizer_states"]) == 1:
        sd = sd["optimizer_states"][0]
    groups = sd.get("param_groups") if isinstance(sd, dict) else None
    if not isinstance(groups, list) or not groups or not isinstance(groups[0], dict):
        return todo("sgd, adam or adamw (the state file has no param_groups)"), []
    pg = groups[0]
    hp = [{k: v for k, v in g.items() if k in ("lr", "momentum", "dampening", "nesterov",
                                                 "betas", "eps", "weight_decay")}
          for g in groups]
    if "momentum" in pg:
        return "sgd", hp
    if "betas" in pg:
        if "decoupled_weight_decay" in pg:
            return ("adamw" if pg["decoupled_weight_decay"] else "adam"), hp
        return (default or todo("adam or adamw (the state file does not say)")), hp
    return todo("sgd, adam or adamw (unrecognised optimizer)"), hp


def _name(path: Path, seen: set[str]) -> str:
    base = path.parent.name if path.name.startswith("checkpoint-") else path.stem
    base = base or "stage"
    name, i = base, 2
    while name in seen:
        name, i = f"{base}-{i}", i + 1
    seen.add(name)
    return name


def scaffold(ends: list[Path], start: Path | None, root: Path) -> str:
    """The drafted manifest as YAML text; paths are written relative to ``root``."""
    def rel(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), root.resolve())).as_posix()

    notes: list[str] = []
    stages: list[dict[str, Any]] = []
    seen: set[str] = set()
    prev: Path | None = start
    for i, end in enumerate(ends):
        k = formats.kind(end)
        name = _name(end, seen)
        st: dict[str, Any] = {"name": name}
        if i == 0:
            st["start"] = rel(start) if start is not None else todo(
                "the checkpoint before the first stage (or pass --start to acctattr init)")
        if k == "missing":
            raise AcctattrError(f"acctattr init: {end} not found")
        if k == "dcp":
            raise CheckpointError(f"acctattr init: {end} is a torch.distributed.checkpoint "
                                  "folder", formats.DCP_HINT.format(src=end, dst=f"{end}.pt"))
        if k == "peft-adapter":
            st["end"] = {"adapter": rel(end)}
            notes.append(f"stage '{name}': PEFT adapter {rel(end)}; base weights stay frozen")
            stages.append(st)
            prev = end
            continue
        st["end"] = rel(end)
        opt: dict[str, Any] = {}
        if k == "hf-trainer":
            state_file = end / "optimizer.pt"
            typ, hp = (_optimizer_type(load_torch_file(state_file), "adamw")
                       if state_file.is_file() else (todo("sgd, adam or adamw"), []))
            try:
                steps: Any = formats.trainer_stage_steps(prev, end)
            except formats.FormatError as e:
                raise CheckpointError(f"acctattr init: {e}") from e
            opt = {"type": typ, "steps": steps,
                   "lr": {"trainer_state": rel(end / formats.TRAINER_STATE)}}
            if state_file.is_file():
                opt["state"] = rel(state_file)
            notes.append(f"stage '{name}': Hugging Face Trainer folder, {steps} steps")
        elif k == "lightning":
            ckpt = load_torch_file(end)
            typ, hp = _optimizer_type(ckpt, None)
            step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
            sched = ckpt.get("lr_schedulers") if isinstance(ckpt, dict) else None
            lr: Any = todo("the learning rate per step (a scheduler ran)")
            if not sched and hp and "lr" in hp[0] and len({g.get("lr") for g in hp}) == 1:
                lr = float(hp[0]["lr"])
            opt = {"type": typ,
                   "steps": step if isinstance(step, int) and step > 0 else todo(
                       "optimizer steps in the stage"),
                   "lr": lr}
            if isinstance(ckpt, dict) and ckpt.get("optimizer_states"):
                opt["state"] = rel(end)
            notes.append(f"stage '{name}': Lightning checkpoint, global_step {step} (a new "
                         "Trainer per stage assumed: steps = global_step)")
        else:
            folder = end if end.is_dir() else end.parent
            state_file = folder / "optimizer.pt"
            typ, hp = (_optimizer_type(load_torch_file(state_file), None)
                       if state_file.is_file() else (todo("sgd, adam or adamw"), []))
            opt = {"type": typ, "steps": todo("optimizer steps in the stage"),
                   "lr": todo("a number, a per-step list or {schedule, base, warmup, min}")}
            if state_file.is_file():
                opt["state"] = rel(state_file)
        for g, h in enumerate(hp):
            notes.append(f"stage '{name}': state file param group {g}: "
                         + ", ".join(f"{key}={_plain(v)}" for key, v in sorted(h.items())))
        st["optimizer"] = opt
        stages.append(st)
        prev = end

    hf_dir = next((p for p in ([start] if start else []) + ends
                   if p is not None and p.is_dir() and (p / "config.json").is_file()), None)
    model = {"hf": rel(hf_dir)} if hf_dir is not None else {
        "factory": todo("FILE.py:FUNC that builds the model (a torch.nn.Module)")}
    doc = {
        "version": 1,
        "model": model,
        "stages": stages,
        "eval": {
            "data": todo("eval data: a .safetensors file or FILE.py:FUNC yielding batches"),
            "inputs": todo("tensor name(s) given to the model"),
            "target": todo("tensor name of the target"),
        },
    }
    head = ["# Drafted by acctattr init. Replace every TODO(acctattr) value, then run",
            "# `acctattr check` on this file.", "#", "# Detected:"]
    head += [f"#   {n}" for n in notes] or ["#   nothing"]
    return "\n".join(head) + "\n" + yaml.safe_dump(doc, sort_keys=False)


def _plain(v: Any) -> str:
    if hasattr(v, "item"):
        v = v.item()
    return repr(tuple(v)) if isinstance(v, (list, tuple)) else repr(v)

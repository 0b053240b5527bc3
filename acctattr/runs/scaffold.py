"""``acctattr init``: a manifest drafted from the folders a training run left behind.

Each path given is one stage, or a folder holding several, in training order:

- a Hugging Face Trainer ``output_dir`` (``checkpoint-N/`` folders): its last checkpoint is
  the stage's end, the others its intermediate ``checkpoints:``; steps (``global_step``,
  less the start's when the run resumed from it), lr (the logged learning rates),
  ``continues: true`` when the run resumed from the start (its log_history continues the
  start's), optimizer type and state (``optimizer.pt``), batch size (``trainer_state.json``),
  ``max_grad_norm`` and gradient accumulation (``training_args.bin``, scanned, never
  unpickled). A single ``checkpoint-N`` folder works too;
- a PEFT adapter folder (``adapter_config.json``), or a Trainer ``output_dir`` of one: an
  adapter stage (no optimizer needed);
- a folder of Lightning ``.ckpt`` files (``lightning_logs/version_0/checkpoints/...``):
  the one with the largest ``global_step`` is the end, the others intermediate checkpoints;
  steps, optimizer type and state (``optimizer_states``), lr (the constant lr, or the
  per-step lrs replayed from the saved ``lr_schedulers`` state), ``continues`` when the run
  resumed from the start (an Adam step count or scheduler count that goes on from it);
- a run root holding several of the above: one stage per folder (or per user-named
  ``.ckpt``), ordered by when each stage's last checkpoint was written; a folder of plain
  weights with no optimizer state there is the first stage's start (unless ``--start``);
- plain weights: only the end; an ``optimizer.pt`` beside them gives type and state.

Stage names are folder names (a Trainer's ``checkpoint-N`` and Lightning's
``epoch=2-step=40.ckpt`` name the run, not the stage). ``model: {hf: ...}`` is the last
checkpoint folder holding a ``config.json``. What cannot be read off the files is written as
a ``TODO(acctattr): ...`` string, which ``acctattr check`` lists as a problem naming its key;
``data:`` (optional, for the unrolled estimator) is drafted as a comment. Hyperparameters
found in a state file are listed in a comment only: the state file already supplies them per
parameter group, and a value written in the manifest would override every group.

Finding the stages in the paths given is scaffold_folders.py's; this module reads each
stage's optimizer off its files and writes the draft.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from acctattr.errors import AcctattrError, CheckpointError
from acctattr.runs import formats
from acctattr.runs.checkpoints import load_torch_file
from acctattr.runs.manifest import PLACEHOLDER
from acctattr.runs.optim_state import other_optimizer
from acctattr.runs.scaffold_folders import FoundStage, chain, global_step, pick_start, stages_in
from acctattr.runs.schedules import stated_trainer_lrs

# what eval.data, the stages' data and the metric accept, written into the draft
EVAL_DATA_FORMATS = ("a .safetensors file of tensors with one row per example (the model's "
                     "inputs, the target, optionally a group id), or FILE.py:FUNC returning an "
                     "iterable of dict batches of such tensors")
DATA_COMMENT = ("# data: TRAIN.safetensors  # optional (the unrolled estimator): this stage's "
                "training examples, tensors named as eval.inputs and eval.target")
METRIC_COMMENT = "cross_entropy | margin | logprob | mse | FILE.py:FUNC"


def todo(what: str) -> str:
    return f"{PLACEHOLDER}: {what}"


# ------------------------------------------------------------------ reading a stage

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
    other = other_optimizer(groups, sd.get("state"))
    if other is not None:  # RMSprop has a momentum, NAdam betas: neither is SGD or Adam
        return todo(f"sgd, adam or adamw (the state file's optimizer is none of them: it "
                    f"holds {other})"), hp
    if "momentum" in pg:
        return "sgd", hp
    if "betas" in pg:
        if "decoupled_weight_decay" in pg:
            return ("adamw" if pg["decoupled_weight_decay"] else "adam"), hp
        return (default or todo("adam or adamw (the state file does not say)")), hp
    return todo("sgd, adam or adamw (the state file's optimizer is none of them: "
                f"param_groups keys {sorted(pg)})"), hp


def _adam_step(sd: Any) -> int | None:
    """The step count in an Adam state (the same for every parameter), if there is one."""
    if isinstance(sd, dict) and isinstance(sd.get("optimizer_states"), list) \
            and sd["optimizer_states"]:
        sd = sd["optimizer_states"][0]
    state = sd.get("state") if isinstance(sd, dict) else None
    if not isinstance(state, dict):
        return None
    for v in state.values():
        if isinstance(v, dict) and "step" in v:
            s = v["step"]
            return int(s.item() if hasattr(s, "item") else s)
    return None


# torch.optim.lr_scheduler classes recognised by their state_dict keys: (class, args)
_SCHEDULERS = (
    ("CosineAnnealingLR", ("T_max", "eta_min")),
    ("MultiStepLR", ("milestones", "gamma")),
    ("StepLR", ("step_size", "gamma")),
    ("LinearLR", ("start_factor", "end_factor", "total_iters")),
    ("ConstantLR", ("factor", "total_iters")),
    ("PolynomialLR", ("total_iters", "power")),
    ("ExponentialLR", ("gamma",)),
)


def _replay_scheduler(state: dict, calls: int) -> list[float] | None:
    """lr of param group 0 after 0..calls scheduler steps, replayed from a saved
    torch.optim.lr_scheduler state_dict; None when the class is not recognised or the
    replay does not end at the saved ``_last_lr``."""
    import torch

    keys = set(state)
    known = [(c, a) for c, a in _SCHEDULERS if set(a) <= keys]
    if not known:
        return None
    cls_name, args = known[0]
    base = state.get("base_lrs")
    last = state.get("_last_lr")
    if not isinstance(base, list) or not base or not isinstance(last, list):
        return None
    kw = {a: state[a] for a in args}
    if cls_name == "MultiStepLR":
        kw["milestones"] = sorted(
            m for m, n in dict(state["milestones"]).items() for _ in range(n))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=float(base[0]))
    sched = getattr(torch.optim.lr_scheduler, cls_name)(opt, **kw)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(calls):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    if not math.isclose(lrs[-1], float(last[0]), rel_tol=1e-9, abs_tol=1e-15):
        return None
    return lrs


def _lightning_lr(ckpt: dict, hp: list[dict], first: int, steps: int) -> tuple[Any, str]:
    """The stage's lr from a Lightning checkpoint: (manifest value, how it was found).

    ``first`` is the global step the stage started at (non-zero when it resumed)."""
    sched = ckpt.get("lr_schedulers") or []
    total = first + steps
    if not sched:
        lrs = {float(g["lr"]) for g in hp if "lr" in g}
        if len(lrs) == 1:
            return lrs.pop(), "no scheduler; the optimizer's lr"
        return todo("the learning rate (param groups have different lrs)"), ""
    if len(sched) != 1 or not isinstance(sched[0], dict):
        return todo("the learning rate per step (several schedulers ran)"), ""
    state = sched[0]
    calls = state.get("last_epoch")
    if not isinstance(calls, int) or calls <= 0:
        return todo("the learning rate per step (the scheduler state has no last_epoch)"), ""
    if calls == total:  # interval: step
        per = 1
    elif total % calls == 0:  # interval: epoch, total / calls steps per epoch
        per = total // calls
    else:
        return todo(f"the learning rate per step (the scheduler stepped {calls} times in "
                    f"{total} optimizer steps)"), ""
    replay = _replay_scheduler(state, calls)
    if replay is None:
        return todo("the learning rate per step (a scheduler acctattr cannot replay ran: "
                    f"state keys {sorted(state)})"), ""
    per_step = [float(replay[(first + s) // per]) for s in range(steps)]
    how = f"replayed from the saved scheduler state ({calls} scheduler steps)"
    if len(set(per_step)) == 1:
        return per_step[0], how
    return per_step, how


def scaffold(ends: list[Path], start: Path | None, root: Path) -> str:
    """The drafted manifest as YAML text; paths are written relative to ``root``."""
    def rel(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), root.resolve())).as_posix()

    found: list[FoundStage] = []
    starts: list[Path] = []
    for p in ends:
        in_p, cand = stages_in(p, top=True)
        found += in_p
        starts += cand
    notes: list[str] = []
    picked = pick_start(starts) if start is None else None
    if picked is not None:
        start = picked
        notes.append(f"start {rel(start)}: the run root's plain-weights checkpoint (no "
                     "optimizer state beside it)")
    elif start is None and starts:
        notes.append("start: several plain-weights checkpoints could be the start ("
                     + ", ".join(rel(q) for q in starts) + "); pass --start")
    guessed = [f for f in found if f.guessed]
    if start is not None and len(guessed) == len(found) > 1:
        chained = chain(found, start)
        if chained is not None:
            found = chained
            for f in found:
                f.how = f.how.split(" (one of")[0] + " (ordered by its weights: see order)"
            notes.append("order: the file times say nothing (within 2 s), so each next stage "
                         "is the one whose first checkpoint lies nearest (in weights) to the "
                         "previous stage's end, starting from the start")
    ends_seen: dict[Path, Path] = {} if start is None else {start.resolve(): start}
    for f in found:  # the manifest would be refused: one checkpoint, two stage boundaries
        if f.end.resolve() in ends_seen:
            raise AcctattrError(
                f"acctattr init: {f.end} is named twice (as a stage's end and as "
                f"{'--start' if ends_seen[f.end.resolve()] is start else 'another end'})",
                "name each stage's end checkpoint once, in training order")
        ends_seen[f.end.resolve()] = f.end
    seen: set[str] = set()
    stages: list[dict[str, Any]] = []
    prev: Path | None = start
    for i, f in enumerate(found):
        name, n = f.name or "stage", 2
        while name in seen:
            name, n = f"{f.name}-{n}", n + 1
        seen.add(name)
        st: dict[str, Any] = {"name": name}
        if i == 0:
            st["start"] = rel(start) if start is not None else todo(
                "the checkpoint before the first stage (or pass --start to acctattr init)")
        if f.how:
            notes.append(f"stage '{name}': {f.how}")
        if f.kind == "peft-adapter":
            st["end"] = {"adapter": rel(f.end)}
            notes.append(f"stage '{name}': PEFT adapter {rel(f.end)}; base weights stay frozen")
            stages.append(st)
            prev = f.end
            continue
        st["end"] = rel(f.end)
        if f.kind == "hf-trainer":
            opt, ckpts = _trainer_optimizer(f, prev, name, rel, notes)
        elif f.kind == "lightning":
            opt, ckpts = _lightning_optimizer(f, prev, name, rel, notes)
        else:
            folder = f.end if f.end.is_dir() else f.end.parent
            state_file = folder / "optimizer.pt"
            typ, hp = (_optimizer_type(load_torch_file(state_file), None)
                       if state_file.is_file() else (todo("sgd, adam or adamw"), []))
            _note_groups(notes, name, hp)
            opt = {"type": typ, "steps": todo("optimizer steps in the stage"),
                   "lr": todo("a number, a per-step list, {schedule: constant|linear|cosine, "
                              "base, warmup, min} or {trainer_state: PATH}")}
            if state_file.is_file():
                opt["state"] = rel(state_file)
            ckpts = []
        st["optimizer"] = opt
        if ckpts:
            st["checkpoints"] = ckpts
        stages.append(st)
        prev = f.end

    # the architecture of the final checkpoint that has one (an adapter folder has none)
    hf_dir = next((p for p in [f.end for f in reversed(found)] + ([start] if start else [])
                   if p.is_dir() and (p / "config.json").is_file()), None)
    model = {"hf": rel(hf_dir)} if hf_dir is not None else {
        "factory": todo("FILE.py:FUNC that builds the model (a torch.nn.Module)")}
    doc = {
        "version": 1,
        "model": model,
        "stages": stages,
        "eval": {
            "data": todo(f"eval data: {EVAL_DATA_FORMATS}"),
            "inputs": todo("tensor name(s) given to the model: one name -> model(x), a list "
                           "-> model(**named), e.g. [input_ids, attention_mask]"),
            "target": todo("tensor name of the target (class ids for cross_entropy)"),
        },
    }
    head = ["# Drafted by acctattr init. Replace every TODO(acctattr) value, then run",
            "# `acctattr check` on this file.", "#", "# Detected:"]
    head += [f"#   {_one_line(n)}" for n in notes] or ["#   nothing"]
    body = yaml.safe_dump(doc, sort_keys=False, width=100)
    return "\n".join(head) + "\n" + _with_comments(body)


def _one_line(text: str) -> str:
    """``text`` fit for one comment line: YAML's line breaks (a folder name may hold one)
    written as escapes, or the rest of the line would be read as YAML."""
    return re.sub("[\r\n\x85\u2028\u2029]", lambda m: repr(m.group())[1:-1], text)


def _with_comments(body: str) -> str:
    """Insert the optional ``data:`` line (commented) into every stage with an optimizer,
    and the accepted metrics and group under ``eval:``."""
    out: list[str] = []
    lines = body.splitlines()
    in_stages = False
    pending = False
    for line in lines:
        if line == "stages:":
            in_stages = True
        elif in_stages and line and (line.startswith("- name:")
                                     or not line.startswith((" ", "-"))):
            # (an empty line is inside a quoted scalar: a folder name holding a newline)
            if pending:
                out.append("  " + DATA_COMMENT)
            pending = line.startswith("- name:")
            if not line.startswith(("- ", " ")):
                in_stages = False
        if in_stages and line.startswith(("    adapter:", "  end: {adapter")):
            pending = False  # an adapter stage: nothing to simulate
        out.append(line)
        if line == "eval:":
            out.append(f"  # metric: cross_entropy  # {METRIC_COMMENT}")
            out.append("  # group: GROUP  # optional: tensor of integer group ids, "
                       "for per-group effects")
            out.append("  # batch_size: 256")
    return "\n".join(out) + "\n"


def _note_groups(notes: list[str], name: str, hp: list[dict]) -> None:
    for g, h in enumerate(hp):
        notes.append(f"stage '{name}': state file param group {g}: "
                     + ", ".join(f"{key}={_plain(v)}" for key, v in sorted(h.items())))


def _trainer_optimizer(f: FoundStage, prev: Path | None, name: str, rel: Any,
                       notes: list[str]) -> tuple[dict, list[dict]]:
    end = f.end
    state_file = end / "optimizer.pt"
    args = formats.training_args(end)
    typ, hp = (_optimizer_type(load_torch_file(state_file), "adamw")
               if state_file.is_file() else (_optim_name(args.get("optim")), []))
    unsure = None  # why the steps and continues are left to the user
    try:
        ts = formats.read_trainer_state(end)
        try:
            steps = formats.trainer_stage_steps(prev, end)
            resumed = formats.trainer_resumed(prev, end)
        except formats.AmbiguousResume as e:
            unsure, steps, resumed = str(e), ts.global_step, False
        first = formats.read_trainer_state(prev).global_step if resumed and prev else 0
    except formats.FormatError as e:
        raise CheckpointError(f"acctattr init: {e}") from e
    opt: dict[str, Any] = {"type": typ, "steps": steps if unsure is None else todo(
        f"the stage's optimizer steps and continues: {unsure}")}
    stated = None if ts.lr_points else stated_trainer_lrs(ts)
    if ts.lr_points or stated is not None:
        opt["lr"] = {"trainer_state": rel(end / formats.TRAINER_STATE)}
        if stated is not None:
            notes.append(f"stage '{name}': no learning rate logged; they follow "
                         f"training_args.bin's schedule ({stated[1]}), checked against "
                         "scheduler.pt")
    else:
        opt["lr"] = todo(f"the learning rate ({rel(end / formats.TRAINER_STATE)} logged none: "
                         "set logging_steps) as a number, a per-step list or {schedule, base, "
                         "warmup, min}")
    if state_file.is_file():
        opt["state"] = rel(state_file)
    if resumed:
        opt["continues"] = True
    if unsure is not None:
        opt["continues"] = todo("true if the run resumed its start (see steps), else false")
    clip = args.get("max_grad_norm")
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        opt["max_grad_norm"] = float(clip) if clip > 0 else None
    batch = formats.trainer_batch_size(end)
    if batch is None and isinstance(args.get("per_device_train_batch_size"), int):
        batch = args["per_device_train_batch_size"]
    if batch is not None:
        opt["batch_size"] = batch
        notes.append(f"stage '{name}': batch_size {batch} is per process; trained on several "
                     "processes (GPUs), multiply it by their number")
    accum = args.get("gradient_accumulation_steps")
    if isinstance(accum, int) and not isinstance(accum, bool) and accum > 1:
        opt["grad_accumulation"] = accum
    how = f"Hugging Face Trainer folder, {steps} steps"
    how += (f", resumed from {rel(prev)} at step {first} (its log continues there)"
            if resumed else ", a new Trainer run")
    if unsure is not None:
        how = (f"Hugging Face Trainer folder, global_step {steps}: resumed from {rel(prev)} or "
               "a new Trainer run, its files do not say (steps and continues are TODOs)")
    if "max_grad_norm" not in opt:
        how += ("; training_args.bin missing or unreadable: Trainer's max_grad_norm 1.0 is "
                "assumed and no gradient accumulation; set optimizer.max_grad_norm and "
                "grad_accumulation if the run used others")
    notes.append(f"stage '{name}': {how}")
    if "lr_scheduler_type" in args or "optim" in args:
        notes.append(f"stage '{name}': training_args.bin: optim={args.get('optim')}, "
                     f"lr_scheduler_type={args.get('lr_scheduler_type')}")
    _note_groups(notes, name, hp)
    ckpts = []
    for c in f.checkpoints if unsure is None else ():
        try:
            step = formats.read_trainer_state(c).global_step - first
        except formats.FormatError:
            continue
        if 1 <= step < steps:
            ckpts.append({"step": step, "path": rel(c)})
    return opt, ckpts


def _optim_name(optim: Any) -> str:
    """The manifest's optimizer type for TrainingArguments.optim (adamw_torch, sgd, ...)."""
    if isinstance(optim, str):
        if optim.startswith("adamw"):
            return "adamw"
        if optim == "sgd":
            return "sgd"
        return todo(f"sgd, adam or adamw (the Trainer ran optim={optim}, which acctattr does "
                    "not model)")
    return todo("sgd, adam or adamw (no optimizer.pt in the folder)")


def _lightning_optimizer(f: FoundStage, prev: Path | None, name: str, rel: Any,
                         notes: list[str]) -> tuple[dict, list[dict]]:
    ckpt = load_torch_file(f.end)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"acctattr init: {f.end}: not a Lightning checkpoint (a dict)")
    typ, hp = _optimizer_type(ckpt, None)
    step = ckpt.get("global_step")
    total = step if isinstance(step, int) else 0
    first = 0
    resumed = False
    if prev is not None and prev.is_file() and prev.suffix == ".ckpt":
        g0 = global_step(prev)
        adam = _adam_step(ckpt)
        sched = ckpt.get("lr_schedulers") or []
        calls = sched[0].get("last_epoch") if sched and isinstance(sched[0], dict) else None
        # a run that resumed from the start goes on counting from it: its Adam step count
        # or its scheduler's count includes the start's steps
        if 0 < g0 < total and (adam == total or calls == total):
            first, resumed = g0, True
        elif 0 < g0 < total and typ == "sgd":
            notes.append(f"stage '{name}': global_step {total} goes on from the start's {g0}; "
                         "if the run resumed from it (ckpt_path=), set steps: "
                         f"{total - g0} and continues: true")
    steps = total - first
    lr, how = _lightning_lr(ckpt, hp, first, steps) if steps > 0 else (todo("lr"), "")
    opt: dict[str, Any] = {
        "type": typ,
        "steps": steps if steps > 0 else todo("optimizer steps in the stage"),
        "lr": lr}
    if ckpt.get("optimizer_states"):
        opt["state"] = rel(f.end)
    if resumed:
        opt["continues"] = True
    hparams = ckpt.get("hyper_parameters")
    if isinstance(hparams, dict):
        b = hparams.get("batch_size")
        if isinstance(b, int) and not isinstance(b, bool) and b > 0:
            opt["batch_size"] = b
    notes.append(f"stage '{name}': Lightning checkpoint, global_step {step}"
                 + (f", resumed from the start at {first}" if resumed else
                    " (a new Trainer: steps = global_step)")
                 + (f"; lr {how}" if how else ""))
    _note_groups(notes, name, hp)
    ckpts = []
    for c in f.checkpoints:
        s = global_step(c) - first
        if 1 <= s < steps:
            ckpts.append({"step": s, "path": rel(c)})
    return opt, ckpts


def _plain(v: Any) -> str:
    if hasattr(v, "item"):
        v = v.item()
    return repr(tuple(v)) if isinstance(v, (list, tuple)) else repr(v)

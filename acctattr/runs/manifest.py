"""Manifest v1 (SPEC section 3): YAML -> frozen dataclasses (manifest_spec.py).

Every problem is collected and raised once as a ManifestError, so a user fixes them all in
one pass. The model, stages and optimizers are parsed here; the YAML itself is loaded by
yaml_load.py and the eval sections by evals.py. This module never imports torch:
`acctattr check` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from acctattr.errors import AcctattrError, ManifestError
from acctattr.files import path_problem, read_bytes_limited
from acctattr.runs import formats
from acctattr.runs.collector import Collector, kind_of
from acctattr.runs.evals import (
    attach_tokenizers,
    is_causal_lm,
    is_jsonl,
    parse_evals,
    parse_metric,
)
from acctattr.runs.manifest_spec import (
    CheckpointRef,
    EvalSpec,
    LrSpec,
    Manifest,
    OptimizerSpec,
    Ref,
    Stage,
)
from acctattr.runs.yaml_load import load_yaml

# the parsed manifest's dataclasses are imported from here by the rest of acctattr
__all__ = ["CheckpointRef", "EvalSpec", "LrSpec", "Manifest", "ManifestError", "OptimizerSpec",
           "Ref", "Stage", "find_placeholders", "load_manifest", "parse_manifest"]

# Resource bound: a manifest is a small hand-written file (yaml_load.py bounds what its
# aliases expand to)
MAX_MANIFEST_BYTES = 8 << 20
OPTIMIZER_TYPES = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine")

_TOP_KEYS = {"version", "model", "stages", "eval", "evals", "train", "replay"}
_MODEL_KEYS = {"factory", "hf", "class"}
_STAGE_KEYS = {"name", "start", "end", "optimizer", "data", "checkpoints", "tokenizer",
               "max_length"}
_OPT_KEYS = {
    "type", "steps", "lr", "momentum", "dampening", "nesterov", "betas", "eps",
    "weight_decay", "state", "continues", "param_names", "max_grad_norm", "batch_size",
    "grad_accumulation",
}
_SGD_ONLY = {"momentum", "dampening", "nesterov"}
_ADAM_ONLY = {"betas", "eps"}
_TRAIN_KEYS = {"loss"}
_LR_SCHEDULE_KEYS = {"schedule", "base", "warmup", "min"}


def load_manifest(path: str | Path) -> Manifest:
    """Parse and validate a manifest file; raise one ManifestError listing every problem."""
    path = Path(path)
    shown = str(path).replace("\x00", "\\0")
    problem = path_problem(path, "file")
    if problem == "not found":
        raise ManifestError(shown, [f"file not found ({path.absolute()})"])
    if problem is not None:
        raise ManifestError(shown, [problem])
    try:
        text = read_bytes_limited(path, MAX_MANIFEST_BYTES).decode("utf-8")
    except AcctattrError as e:
        raise ManifestError(shown, [e.message.removeprefix(f"{path}: ")]) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(shown, [f"cannot read the file: {e}"]) from e
    raw = load_yaml(text, shown)
    return parse_manifest(raw, path.resolve(), shown)


def parse_manifest(raw: Any, path: Path, shown: str | None = None) -> Manifest:
    """Validate an already-loaded YAML document. ``path`` anchors relative paths."""
    placeholders = find_placeholders(raw)
    if placeholders:
        raise ManifestError(shown or str(path), [
            f"{where}: still the placeholder {text!r} written by acctattr init; replace it"
            for where, text in placeholders])
    c = Collector(path.parent)
    top = c.mapping(raw, "", _TOP_KEYS, {"version", "model", "stages"})
    if "version" in top and (top["version"] != 1 or isinstance(top["version"], bool)):
        # (true == 1 in Python: a boolean is no version)
        c.add("version", f"only version 1 is supported, got {top['version']!r}")

    model = c.mapping(top.get("model", {}), "model", _MODEL_KEYS, set()) \
        if "model" in top else {}
    factory = c.ref(model["factory"], "model.factory") if "factory" in model else None
    hf = c.path(model["hf"], "model.hf") if "hf" in model else None
    hf_class = c.string(model["class"], "model.class") if "class" in model else None
    if "model" in top and ("factory" in model) == ("hf" in model):
        c.add("model", "give exactly one of 'factory' (FILE.py:FUNC) or 'hf' (a local folder "
              "with a Hugging Face config.json)")
    if "class" in model and "hf" not in model:
        c.add("model.class", "'class' only goes with 'hf'")

    causal = hf is not None and is_causal_lm(hf, hf_class)
    stages = _parse_stages(c, top.get("stages")) if "stages" in top else ()
    evals = parse_evals(c, top, causal) if isinstance(raw, dict) else ()
    stages, evals = attach_tokenizers(c, stages, evals, hf)
    ev = evals[0][1] if evals else None

    # a causal LM is trained on next-token loss; anything else defaults to cross-entropy
    train_loss: str | Ref = "next_token_loss" if causal else "cross_entropy"
    if "train" in top:
        train = c.mapping(top["train"], "train", _TRAIN_KEYS, set())
        if "loss" in train:
            train_loss = parse_metric(c, train["loss"], "train.loss") or train_loss
    replay = c.ref(top["replay"], "replay") if "replay" in top else None

    if c.problems or (factory is None and hf is None) or ev is None:
        raise ManifestError(shown or str(path), c.problems or ["incomplete manifest"])
    return Manifest(path=path, factory=factory, stages=stages, eval=ev,
                    train_loss=train_loss, replay=replay, hf=hf, hf_class=hf_class,
                    evals=evals if "evals" in top else ())


def _parse_stages(c: Collector, value: Any) -> tuple[Stage, ...]:
    if not isinstance(value, list) or not value:
        c.add("stages", f"expected a non-empty list of stages, got {kind_of(value)}")
        return ()
    out: list[Stage] = []
    seen: set[str] = set()
    ends: dict[Path, str] = {}  # each end checkpoint -> the first stage that names it
    states: dict[Path, str] = {}  # each optimizer.state file -> the first stage naming it
    prev_end: Path | None = None
    prev_adapter = False
    for i, item in enumerate(value):
        where = f"stages[{i}]"
        is_adapter = isinstance(item, dict) and isinstance(item.get("end"), dict)
        st = c.mapping(item, where, _STAGE_KEYS,
                       {"name", "end"} if is_adapter else {"name", "end", "optimizer"})
        name = c.string(st["name"], f"{where}.name") if "name" in st else None
        if name is not None:
            if name in seen:
                c.add(f"{where}.name", f"duplicate stage name {name!r}; stage names must be unique")
            seen.add(name)
            where = f"stage '{name}'"
        start = c.path(st["start"], f"{where}: start") if "start" in st else prev_end
        if "start" not in st and i == 0:
            c.add(f"{where}: start", "the first stage needs a start checkpoint "
                  "(the weights before any of its updates)")
        if is_adapter:
            em = c.mapping(st["end"], f"{where}: end", {"adapter"}, {"adapter"})
            end = c.path(em["adapter"], f"{where}: end.adapter") if "adapter" in em else None
            if end is not None and formats.kind(end) != "peft-adapter":
                c.add(f"{where}: end.adapter", f"{end} has no {formats.ADAPTER_CONFIG}; "
                      "name the folder PEFT's save_pretrained() wrote")
                end = None
        else:
            end = c.path(st["end"], f"{where}: end") if "end" in st else None
        if end is not None and end in ends:
            # a copy-pasted end: the stage would be credited with no change (or the previous
            # stage's whole change), and every later start shifts by one stage
            c.add(f"{where}: end", f"{end} is also the end of stage '{ends[end]}'; each stage "
                  "ends at the checkpoint written after its own updates")
        elif end is not None and end == start:
            c.add(f"{where}: end", f"{end} is also this stage's start; a stage ends at the "
                  "checkpoint written after its updates, not the one it began from")
        if end is not None:
            ends.setdefault(end, name or where)
        trainer = end if end is not None and (end / formats.TRAINER_STATE).is_file() else None
        if "optimizer" in st:
            opt = _parse_optimizer(c, st["optimizer"], f"{where}: optimizer",
                                   (start, trainer) if trainer else None)
        elif is_adapter:
            # the adapter's own optimizer never acts on base weights: nothing to follow
            steps = _trainer_steps(c, start, trainer, f"{where}: optimizer.steps") \
                if trainer else 0
            opt = OptimizerSpec(type="adamw", steps=steps or 0, lr=LrSpec(value=0.0))
        else:
            opt = None
        if opt is not None and opt.state is not None and opt.state in states:
            # each stage ends with its own optimizer state; a shared file makes delta_b zero
            c.add(f"{where}: optimizer.state", f"{opt.state} is also the optimizer.state of "
                  f"stage '{states[opt.state]}'; give each stage the state file written at "
                  "its own end")
        elif opt is not None and opt.state is not None:
            states[opt.state] = name or where
        if opt is not None and trainer is not None and not (is_adapter or prev_adapter) \
                and isinstance(st.get("optimizer"), dict) and "continues" not in st["optimizer"]:
            opt = _trainer_continues(c, opt, start, trainer, f"{where}: optimizer.continues",
                                     first=i == 0, told="steps" in st["optimizer"])
        if opt is not None and opt.continues and i == 0:
            c.add(f"{where}: optimizer.continues", "the first stage has no earlier optimizer "
                  "state to continue; set continues: false")
        if opt is not None and opt.continues and (is_adapter or prev_adapter):
            c.add(f"{where}: optimizer.continues", "an adapter stage's optimizer holds the "
                  "adapter's matrices, not the model's weights; a stage cannot continue it, "
                  "nor can an adapter stage continue an earlier optimizer; set continues: false")
        data = c.path(st["data"], f"{where}: data") if "data" in st else None
        tokenizer = c.path(st["tokenizer"], f"{where}: tokenizer") if "tokenizer" in st \
            else None
        max_length = c.integer(st["max_length"], f"{where}: max_length", lo=1) \
            if "max_length" in st else None
        for key in ("tokenizer", "max_length"):
            if key in st and (data is None or not is_jsonl(data)):
                c.add(f"{where}: {key}", f"'{key}' goes with JSONL text data (data: FILE.jsonl)")
        ckpts = _parse_checkpoints(c, st.get("checkpoints", []), where,
                                   opt.steps if opt else None)
        prev_end = end
        prev_adapter = is_adapter
        if name is not None and start is not None and end is not None and opt is not None:
            out.append(Stage(name, start, end, opt, data, ckpts, adapter=is_adapter,
                             tokenizer=tokenizer, max_length=max_length))
    return tuple(out)


def _parse_checkpoints(c: Collector, value: Any, where: str,
                       steps: int | None) -> tuple[CheckpointRef, ...]:
    if not isinstance(value, list):
        c.add(f"{where}: checkpoints", f"expected a list of {{step, path}}, got {kind_of(value)}")
        return ()
    out = []
    for j, item in enumerate(value):
        w = f"{where}: checkpoints[{j}]"
        m = c.mapping(item, w, {"step", "path"}, {"step", "path"})
        step = c.integer(m["step"], f"{w}.step", lo=1) if "step" in m else None
        path = c.path(m["path"], f"{w}.path") if "path" in m else None
        if step is not None and steps is not None and step >= steps:
            c.add(f"{w}.step", f"step {step} is not inside the stage's {steps} steps "
                  "(the end checkpoint is the stage's 'end')")
            step = None
        if step is not None and path is not None:
            out.append(CheckpointRef(step, path))
    steps_seen = [r.step for r in out]
    if steps_seen != sorted(set(steps_seen)):
        c.add(f"{where}: checkpoints", "steps must be strictly increasing")
    return tuple(out)


def _trainer_steps(c: Collector, start: Path | None, end: Path, where: str) -> int | None:
    """Steps from the Trainer's global_step (see formats.trainer_stage_steps)."""
    try:
        steps = formats.trainer_stage_steps(start, end)
    except formats.FormatError as e:
        c.add(where, f"cannot read the steps from the end folder's trainer_state.json: {e}")
        return None
    if steps < 1:
        c.add(where, f"{end / formats.TRAINER_STATE} says the stage took {steps} steps; "
              "give optimizer.steps")
        return None
    return steps


def _trainer_continues(c: Collector, opt: OptimizerSpec, start: Path | None, end: Path,
                       where: str, first: bool, told: bool) -> OptimizerSpec:
    """A Trainer stage that resumed its start folder (resume_from_checkpoint: the end's
    log_history continues the start's) reloaded the start's optimizer and scheduler state:
    it continues the previous stage's optimizer unless the manifest says otherwise. The
    first stage has no previous one to continue: that is refused unless the manifest says
    continues: false."""
    try:
        resumed = formats.trainer_resumed(start, end)
    except formats.AmbiguousResume as e:
        if told:  # else said once, under optimizer.steps
            c.add(where, str(e))
        return opt
    except formats.FormatError:
        return opt  # said under optimizer.steps, or the folder's own check
    if resumed and first:
        c.add(where, f"the Trainer run resumed its start {start} (resume_from_checkpoint), "
              f"so its optimizer began with the state saved there ({start}/optimizer.pt), "
              "which the first stage of a manifest cannot start from; add the stage that "
              "trained the start before this one, or set continues: false to take the "
              "optimizer as fresh (Adam's moments and step count from zero)")
        return opt
    return dataclasses.replace(opt, continues=True) if resumed else opt


def _parse_optimizer(c: Collector, value: Any, where: str,
                     trainer: tuple[Path | None, Path] | None = None) -> OptimizerSpec | None:
    """One stage's optimizer. With ``trainer`` = (start, end folder holding a Hugging Face
    trainer_state.json), steps, lr and state default to what that folder records."""
    o = c.mapping(value, where, _OPT_KEYS, {"type"} if trainer else {"type", "steps", "lr"})
    typ = o.get("type")
    if "type" in o and typ not in OPTIMIZER_TYPES:
        c.add(f"{where}.type", f"expected one of {', '.join(OPTIMIZER_TYPES)}, got {kind_of(typ)}")
        typ = None
    if typ == "sgd":
        for key in sorted(_ADAM_ONLY & o.keys()):
            c.add(f"{where}.{key}", f"'{key}' belongs to adam/adamw, not sgd")
    elif typ in ("adam", "adamw"):
        for key in sorted(_SGD_ONLY & o.keys()):
            c.add(f"{where}.{key}", f"'{key}' belongs to sgd, not {typ}")
    steps = c.integer(o["steps"], f"{where}.steps", lo=1) if "steps" in o else None
    if trainer is not None and "steps" not in o:
        steps = _trainer_steps(c, trainer[0], trainer[1], f"{where}.steps")
    lr = _parse_lr(c, o["lr"], f"{where}.lr", steps) if "lr" in o else None
    if trainer is not None and "lr" not in o:
        lr = LrSpec(trainer_state=trainer[1] / formats.TRAINER_STATE)

    def opt_num(key: str, **kw: Any) -> float | None:
        return c.number(o[key], f"{where}.{key}", **kw) if key in o else None

    momentum = opt_num("momentum", hi=1.0, hi_open=True)
    dampening = opt_num("dampening", hi=1.0)
    eps = opt_num("eps")
    if eps is not None and eps <= 0:
        c.add(f"{where}.eps", f"must be > 0, got {o['eps']!r}")
    weight_decay = opt_num("weight_decay")
    nesterov = c.boolean(o["nesterov"], f"{where}.nesterov") if "nesterov" in o else None
    continues = c.boolean(o["continues"], f"{where}.continues") if "continues" in o else False
    betas = None
    if "betas" in o:
        b = o["betas"]
        if not isinstance(b, list) or len(b) != 2:
            c.add(f"{where}.betas", f"expected a list of two numbers, got {kind_of(b)}")
        else:
            b1 = c.number(b[0], f"{where}.betas[0]", hi=1.0, hi_open=True)
            b2 = c.number(b[1], f"{where}.betas[1]", hi=1.0, hi_open=True)
            if b1 is not None and b2 is not None:
                betas = (b1, b2)
    state = c.path(o["state"], f"{where}.state") if "state" in o else None
    if trainer is not None and "state" not in o and (trainer[1] / "optimizer.pt").is_file():
        state = trainer[1] / "optimizer.pt"
    param_names = _parse_param_names(c, o["param_names"], f"{where}.param_names") \
        if "param_names" in o else None
    # what the Trainer ran with (scanned, never unpickled; {} where unreadable)
    args = formats.training_args(trainer[1]) if trainer is not None else {}
    max_grad_norm = _parse_clip(c, o, where, trainer, args)
    batch_size = _parse_batch(c, o, where, trainer, args)
    trainer_decay = None
    if trainer is not None and state is None and typ is not None and param_names is None:
        # no optimizer.pt (save_only_model): what the Trainer's optimizer held, from its
        # arguments; guessing torch's defaults would decay every parameter at 0.01
        trainer_decay, betas, eps = _trainer_hparams(c, o, where, trainer[1], args, typ,
                                                     betas, eps)
        if typ == "sgd":
            momentum, dampening, nesterov = _trainer_sgd(c, o, where, trainer[1], args,
                                                         (momentum, dampening, nesterov))
    if typ is None or steps is None or lr is None:
        return None
    return OptimizerSpec(
        type=typ, steps=steps, lr=lr, momentum=momentum, dampening=dampening,
        nesterov=nesterov, betas=betas, eps=eps, weight_decay=weight_decay, state=state,
        continues=bool(continues), param_names=param_names, max_grad_norm=max_grad_norm,
        batch_size=batch_size, trainer_decay=trainer_decay,
    )


# TrainingArguments.optim values whose optimizer is torch.optim's: the manifest type
TRAINER_OPTIMS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "sgd": "sgd"}


def _trainer_hparams(c: Collector, o: dict, where: str, end: Path, args: dict, typ: str,
                     betas: tuple[float, float] | None, eps: float | None
                     ) -> tuple[float | None, tuple[float, float] | None, float | None]:
    """(decay group's weight decay, betas, eps) of a Trainer stage whose folder has no
    optimizer.pt, from training_args.bin (adam_beta1/2, adam_epsilon, weight_decay, optim)
    where the manifest does not give them; a problem where it cannot be read."""
    file = end / "training_args.bin"
    optim = args.get("optim")
    if optim is not None and TRAINER_OPTIMS.get(optim) != typ:
        c.add(f"{where}.type", f"{file} says optim={optim!r}, "
              + (f"which is {TRAINER_OPTIMS[optim]}, not {typ}" if optim in TRAINER_OPTIMS
                 else "an optimizer acctattr does not model (it follows torch's SGD, Adam "
                 "and AdamW: Trainer optim adamw_torch, adamw_torch_fused or sgd)"))
        return None, betas, eps
    wanted = {"weight_decay": "weight_decay"} if "weight_decay" not in o else {}
    if typ != "sgd":
        if "betas" not in o:
            wanted.update(adam_beta1="betas", adam_beta2="betas")
        if "eps" not in o:
            wanted["adam_epsilon"] = "eps"
    bad = [k for k in wanted if not _plain_number(args.get(k))]
    if bad:
        keys = sorted({wanted[k] for k in bad})
        c.add(where, f"{end} has no optimizer.pt and its training_args.bin does not give "
              f"{', '.join(bad)}; set optimizer.{', optimizer.'.join(keys)} (or point "
              "optimizer.state at the run's optimizer.pt)")
        return None, betas, eps
    if "adam_beta1" in wanted:
        betas = (float(args["adam_beta1"]), float(args["adam_beta2"]))
    if "adam_epsilon" in wanted:
        eps = float(args["adam_epsilon"])
    decay = float(args["weight_decay"]) if "weight_decay" in wanted else None
    return decay, betas, eps


def _trainer_sgd(c: Collector, o: dict, where: str, end: Path, args: dict,
                 given: tuple[float | None, float | None, bool | None]
                 ) -> tuple[float | None, float | None, bool | None]:
    """(momentum, dampening, nesterov) of a Trainer's SGD without optimizer.pt: the
    manifest's, else what the Trainer passed to torch.optim.SGD from its ``optim_args``
    string ("momentum=0.9,nesterov=true"; transformers' _get_sgd), else SGD's defaults."""
    text = args.get("optim_args")
    if not text:
        return given
    if not isinstance(text, str):
        c.add(where, f"{end / 'training_args.bin'}: optim_args {text!r} is not a string; "
              "set optimizer.momentum, dampening and nesterov")
        return given
    pairs = dict(item.partition("=")[::2] for item in text.replace(" ", "").split(",") if item)
    momentum, dampening, nesterov = given
    try:
        if momentum is None and "momentum" in pairs:
            momentum = float(pairs["momentum"])
        if dampening is None and "dampening" in pairs:
            dampening = float(pairs["dampening"])
    except ValueError:
        c.add(where, f"{end / 'training_args.bin'}: optim_args {text!r} has a momentum or "
              "dampening that is not a number; set optimizer.momentum and dampening")
    if nesterov is None and "nesterov" in pairs:
        nesterov = pairs["nesterov"].lower() in ("true", "1", "yes")
    return momentum, dampening, nesterov


def _plain_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) \
        and x >= 0


# transformers.TrainingArguments.max_grad_norm's default: a stage written by Trainer clipped
# at 1.0 unless its author changed it; taken where training_args.bin (a pickle, never loaded:
# formats.training_args scans it) cannot be read
TRAINER_MAX_GRAD_NORM = 1.0


def _parse_clip(c: Collector, o: dict, where: str,
                trainer: tuple[Path | None, Path] | None, args: dict) -> float | None:
    """``max_grad_norm``: a positive threshold, or null / 0 for none. A Trainer folder without
    the key takes its training_args.bin's (Trainer clips only above 0), else Trainer's
    default."""
    if "max_grad_norm" not in o:
        if trainer is None:
            return None
        if "max_grad_norm" not in args:
            return TRAINER_MAX_GRAD_NORM
        value = args["max_grad_norm"]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or math.isnan(value):
            c.add(f"{where}.max_grad_norm", f"{trainer[1] / 'training_args.bin'} gives "
                  f"max_grad_norm {value!r}, not a number; set optimizer.max_grad_norm (null "
                  "for no clipping)")
            return None
        # Trainer clips only where max_grad_norm > 0; clipping at +inf changes nothing
        return float(value) if 0 < value < math.inf else None
    value = o["max_grad_norm"]
    if value is None:
        return None
    tau = c.number(value, f"{where}.max_grad_norm")
    return tau if tau else None


def _parse_batch(c: Collector, o: dict, where: str,
                 trainer: tuple[Path | None, Path] | None, args: dict) -> int | None:
    """Examples per optimizer step: ``batch_size`` (per step, per process) times
    ``grad_accumulation``. A Trainer folder's ``train_batch_size`` and its
    training_args.bin's ``gradient_accumulation_steps`` are the defaults."""
    batch = c.integer(o["batch_size"], f"{where}.batch_size", lo=1) if "batch_size" in o \
        else None
    accum: int | None = 1
    if "grad_accumulation" in o:
        accum = c.integer(o["grad_accumulation"], f"{where}.grad_accumulation", lo=1)
    elif trainer is not None and "gradient_accumulation_steps" in args:
        accum = c.integer(args["gradient_accumulation_steps"],
                          f"{where}.grad_accumulation ({trainer[1] / 'training_args.bin'}'s "
                          "gradient_accumulation_steps)", lo=1)
    if batch is None and trainer is not None:
        batch = formats.trainer_batch_size(trainer[1])
    if batch is None or accum is None:
        return None
    return batch * accum


def _parse_param_names(c: Collector, value: Any, where: str) -> tuple[tuple[str, ...], ...] | None:
    """A flat list (one group) or a list of lists (one per param group, state-file order)."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return (tuple(value),)
    if isinstance(value, list) and value and all(
        isinstance(g, list) and all(isinstance(v, str) for v in g) for g in value
    ):
        return tuple(tuple(g) for g in value)
    c.add(where, "expected a list of parameter names, or one such list per optimizer "
          f"param group, got {kind_of(value)}")
    return None


def _parse_lr(c: Collector, value: Any, where: str, steps: int | None) -> LrSpec | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        x = c.number(value, where)
        return None if x is None else LrSpec(value=x)
    if isinstance(value, list):
        xs = [c.number(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if steps is not None and len(value) != steps:
            c.add(where, f"the per-step list has {len(value)} values but the stage has "
                  f"steps: {steps}; give one learning rate per optimizer step")
            return None
        if any(x is None for x in xs) or not xs:
            return None
        return LrSpec(values=tuple(x for x in xs if x is not None))
    if isinstance(value, dict) and "trainer_state" in value:
        m = c.mapping(value, where, {"trainer_state"}, {"trainer_state"})
        p = c.path(m["trainer_state"], f"{where}.trainer_state")
        return None if p is None else LrSpec(trainer_state=p)
    if isinstance(value, dict):
        m = c.mapping(value, where, _LR_SCHEDULE_KEYS, {"schedule", "base"})
        sched = m.get("schedule")
        if "schedule" in m and sched not in SCHEDULES:
            c.add(f"{where}.schedule",
                  f"expected one of {', '.join(SCHEDULES)}, got {kind_of(sched)}")
            sched = None
        base = c.number(m["base"], f"{where}.base") if "base" in m else None
        lo = c.number(m.get("min", 0.0), f"{where}.min")
        warmup = c.integer(m.get("warmup", 0), f"{where}.warmup")
        if warmup is not None and steps is not None and warmup > steps:
            c.add(f"{where}.warmup", f"warmup {warmup} is longer than the stage's {steps} steps")
            warmup = None
        if sched is None or base is None or lo is None or warmup is None:
            return None
        return LrSpec(schedule=sched, base=base, warmup=warmup, min=lo)
    c.add(where, "expected a number, a list of per-step values, "
          "{schedule: constant|linear|cosine, base, warmup, min} or {trainer_state: PATH}, "
          f"got {kind_of(value)}")
    return None


PLACEHOLDER = "TODO(acctattr)"


def find_placeholders(raw: Any) -> list[tuple[str, str]]:
    """(where, text) of every ``TODO(acctattr): ...`` string ``acctattr init`` left behind.

    ``where`` names the key the way other problems do: ``model.factory``,
    ``stage 'sft': optimizer.steps``, ``eval.data``.
    """
    out: list[tuple[str, str]] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, str) and value.startswith(PLACEHOLDER):
            out.append((where, value))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}" if where and not where.endswith(": ") else f"{where}{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")

    if not isinstance(raw, dict):
        return out
    for key, value in raw.items():
        if key == "stages" and isinstance(value, list):
            for i, st in enumerate(value):
                name = st.get("name") if isinstance(st, dict) else None
                label = f"stage '{name}': " if isinstance(name, str) and \
                    not name.startswith(PLACEHOLDER) else f"stages[{i}]."
                if isinstance(st, dict):
                    for k, v in st.items():
                        walk(v, f"{label}{k}")
                else:
                    walk(st, f"stages[{i}]")
        else:
            walk(value, str(key))
    return out

"""Manifest v1 (SPEC section 3): YAML -> frozen dataclasses.

Every problem is collected and raised once as a ManifestError, so a user fixes them all in
one pass. This module never imports torch: `acctattr check` stays fast.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from acctattr.errors import AcctattrError, ManifestError
from acctattr.files import path_problem, read_bytes_limited
from acctattr.runs import formats

# Resource bounds: a manifest is a small hand-written file. Aliases are expanded when the
# document is walked, so the expanded size is what is bounded ("billion laughs").
MAX_MANIFEST_BYTES = 8 << 20
MAX_YAML_NODES = 2_000_000  # after alias expansion; a 1M-step per-step lr list fits
OPTIMIZER_TYPES = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine")
BUILTIN_METRICS = ("cross_entropy", "margin", "logprob", "mse", "next_token_loss",
                   "sequence_logprob")
# JSONL text is tokenised into these tensors (acctattr.evaluation.lm): the defaults of
# eval.inputs and eval.target for such data
JSONL_INPUTS = ("input_ids", "attention_mask")
JSONL_TARGET = "labels"


@dataclass(frozen=True)
class LrSpec:
    """One stage's learning rate: exactly one of the fields below is set."""

    value: float | None = None  # a constant number
    values: tuple[float, ...] | None = None  # one value per optimizer step
    schedule: str | None = None  # constant | linear | cosine
    base: float = 0.0
    warmup: int = 0
    min: float = 0.0
    trainer_state: Path | None = None  # Hugging Face trainer_state.json


@dataclass(frozen=True)
class OptimizerSpec:
    """How a stage's optimizer ran. ``None`` hyperparameters come from the state file."""

    type: str
    steps: int
    lr: LrSpec
    momentum: float | None = None
    dampening: float | None = None
    nesterov: bool | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    state: Path | None = None
    continues: bool = False
    # parameter names per optimizer param group, in the state file's id order
    param_names: tuple[tuple[str, ...], ...] | None = None
    # gradient-norm clipping (torch.nn.utils.clip_grad_norm_, Trainer's max_grad_norm);
    # None: no clipping
    max_grad_norm: float | None = None
    # examples per optimizer step: per-device batch × accumulation × processes
    batch_size: int | None = None


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    path: Path


@dataclass(frozen=True)
class Stage:
    name: str
    start: Path  # resolved: the previous stage's end when not given
    end: Path
    optimizer: OptimizerSpec
    data: Path | None = None
    checkpoints: tuple[CheckpointRef, ...] = ()
    # the stage trained a PEFT LoRA adapter (``end: {adapter: DIR}``); ``end`` is that folder
    # and the stage left every base weight it did not adapt untouched
    adapter: bool = False
    # JSONL ``data``: the tokenizer folder and length it is tokenised with (default: eval's)
    tokenizer: Path | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class Ref:
    """A ``FILE.py:FUNC`` (file resolved against the manifest) or ``package.module:FUNC``."""

    text: str
    file: Path | None
    module: str | None
    func: str


@dataclass(frozen=True)
class EvalSpec:
    inputs: tuple[str, ...]
    target: str
    metric: str | Ref  # a builtin name or a user function
    data: Path | None = None
    data_fn: Ref | None = None
    group: str | None = None
    batch_size: int = 256
    higher_is_better: bool | None = None  # overrides the metric's own direction
    # JSONL ``data``: the run's tokenizer folder and the length examples are truncated to
    tokenizer: Path | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class Manifest:
    path: Path
    factory: Ref | None  # None when the model is a Hugging Face folder (``hf``)
    stages: tuple[Stage, ...]
    eval: EvalSpec
    train_loss: str | Ref = "cross_entropy"
    replay: Ref | None = None
    hf: Path | None = None  # model: {hf: DIR}: built from DIR/config.json
    hf_class: str | None = None  # model.class: the transformers class to build
    # every behaviour (name, eval section) in manifest order: ``evals:`` or the one
    # ``eval:`` (named "eval"); ``eval`` above is the first
    evals: tuple[tuple[str, EvalSpec], ...] = ()

    @property
    def behaviours(self) -> tuple[tuple[str, EvalSpec], ...]:
        return self.evals or (("eval", self.eval),)

    @property
    def root(self) -> Path:
        return self.path.parent

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


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
_EVAL_KEYS = {"data", "inputs", "target", "group", "metric", "batch_size", "higher_is_better",
              "tokenizer", "max_length"}
_TRAIN_KEYS = {"loss"}
_LR_SCHEDULE_KEYS = {"schedule", "base", "warmup", "min"}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float.

    YAML 1.1, which PyYAML implements, needs a dot (``1.0e-4``); without this, ``lr: 3e-4`` or
    ``eps: 1e-8`` would be strings and rejected. YAML 1.2 and every ML config read them as floats.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


class _Collector:
    """Gathers problems while parsing; values that fail become ``None``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.problems: list[str] = []

    def add(self, where: str, msg: str) -> None:
        self.problems.append(f"{where}: {msg}" if where else msg)

    def mapping(self, value: Any, where: str, allowed: set[str], required: set[str]) -> dict:
        if not isinstance(value, dict):
            self.add(where, f"expected a mapping with keys {sorted(required) or sorted(allowed)}, "
                     f"got {_kind(value)}")
            return {}
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                self.add(where, f"unknown key {key!r}; allowed keys are "
                         f"{', '.join(sorted(allowed))}")
        for key in sorted(required):
            if key not in value:
                self.add(where, f"missing required key '{key}'")
        return {k: v for k, v in value.items() if isinstance(k, str) and k in allowed}

    def number(self, value: Any, where: str, *, lo: float | None = 0.0, hi: float | None = None,
               hi_open: bool = False) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.add(where, f"expected a number, got {_kind(value)}")
            return None
        x = float(value)
        if not math.isfinite(x):
            self.add(where, f"must be finite, got {value!r}")
            return None
        if lo is not None and x < lo:
            self.add(where, f"must be >= {lo:g}, got {value!r}")
            return None
        if hi is not None and (x > hi or (hi_open and x >= hi)):
            self.add(where, f"must be {'<' if hi_open else '<='} {hi:g}, got {value!r}")
            return None
        return x

    def integer(self, value: Any, where: str, *, lo: int = 0,
                hi: int = formats.MAX_STEPS) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(where, f"expected an integer, got {_kind(value)}")
            return None
        if value < lo:
            self.add(where, f"must be >= {lo}, got {value}")
            return None
        if value > hi:  # a count this large is a typo or garbage, and overflows indexes
            self.add(where, f"must be <= {hi:.0e}, got {value}")
            return None
        return value

    def boolean(self, value: Any, where: str) -> bool | None:
        if not isinstance(value, bool):
            self.add(where, f"expected true or false, got {_kind(value)}")
            return None
        return value

    def string(self, value: Any, where: str) -> str | None:
        if not isinstance(value, str) or not value:
            self.add(where, f"expected a non-empty string, got {_kind(value)}")
            return None
        return value

    def path(self, value: Any, where: str, *, must_exist: bool = True) -> Path | None:
        text = self.string(value, where)
        if text is None:
            return None
        if "\x00" in text:
            self.add(where, f"{text!r}: the path holds a NUL byte")
            return None
        p = Path(text) if Path(text).is_absolute() else self.root / text
        try:
            p = p.resolve()
        except (OSError, RuntimeError, ValueError):
            pass  # a symlink loop or an unusable name: path_problem below says which
        problem = path_problem(p) if must_exist else None
        if problem == "not found":
            self.add(where, f"{text} not found (looked for {p})")
            return None
        if problem is not None:
            self.add(where, f"{text}: {problem} (at {p})")
            return None
        return p

    def ref(self, value: Any, where: str) -> Ref | None:
        text = self.string(value, where)
        if text is None:
            return None
        target, sep, func = text.rpartition(":")
        if not sep or not target or not func.isidentifier():
            self.add(where, f"expected FILE.py:FUNC or package.module:FUNC, got {text!r}")
            return None
        if target.endswith(".py"):
            p = self.path(target, where)
            return None if p is None else Ref(text, p, None, func)
        if not all(part.isidentifier() for part in target.split(".")):
            self.add(where, f"{target!r} is neither a .py file nor a module name")
            return None
        return Ref(text, None, target, func)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float, str)):
        return f"{type(value).__name__} {value!r}"
    return f"a {type(value).__name__}"


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


class _YamlRefused(Exception):
    """A YAML document refused before it is built (duplicate keys, aliases, size)."""


def load_yaml(text: str, shown: str) -> Any:
    """A YAML document, safely: SafeLoader tags only, and refused (ManifestError) when a
    mapping repeats a key (the last would silently win), an alias refers to a node that
    contains it (a recursive structure), or aliases expand to more than MAX_YAML_NODES
    nodes ("billion laughs"). Checked on the node graph, before anything is built."""
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader refuses non-printable characters here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node)
        return loader.construct_document(node)
    except _YamlRefused as e:
        raise ManifestError(shown, [str(e)]) from None
    except yaml.YAMLError as e:
        detail = str(e).replace("\n", " ")
        hint = " (Python object tags such as !!python/object are never loaded)" \
            if "python/" in detail else ""
        raise ManifestError(shown, [f"not valid YAML{hint}: {detail}"]) from e
    except RecursionError as e:
        raise ManifestError(shown, ["not valid YAML: nested too deeply"]) from e
    finally:
        if loader is not None:
            loader.dispose()


def _check_nodes(root: yaml.Node) -> None:
    """Duplicate keys, recursive aliases and the expanded size, without recursion (the
    graph is walked once per distinct node; an alias is a second edge to the same node)."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            on_path.discard(key)
            total = 1 + sum(size[id(c)] for c in children)
            if total > MAX_YAML_NODES:
                raise _YamlRefused(
                    f"line {node.start_mark.line + 1}: its aliases expand to more than "
                    f"{MAX_YAML_NODES:,} values (a manifest is small; is this a 'billion "
                    "laughs' document?)")
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise _YamlRefused(f"line {node.start_mark.line + 1}: a recursive alias (a node "
                               "that contains itself); write the value out")
        on_path.add(key)
        if isinstance(node, yaml.MappingNode):
            _check_duplicates(node)
        stack.append((node, True))
        for c in children:
            if id(c) in on_path:
                raise _YamlRefused(f"line {c.start_mark.line + 1}: a recursive alias (a node "
                                   "that contains itself); write the value out")
            if id(c) not in size:
                stack.append((c, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_duplicates(node: yaml.MappingNode) -> None:
    seen: dict[str, int] = {}
    for k, _ in node.value:
        if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
            continue
        line = k.start_mark.line + 1
        if k.value in seen:
            raise _YamlRefused(f"line {line}: duplicate key {k.value!r} (also on line "
                               f"{seen[k.value]}); YAML would silently keep the last; "
                               "remove one")
        seen[k.value] = line


def parse_manifest(raw: Any, path: Path, shown: str | None = None) -> Manifest:
    """Validate an already-loaded YAML document. ``path`` anchors relative paths."""
    placeholders = find_placeholders(raw)
    if placeholders:
        raise ManifestError(shown or str(path), [
            f"{where}: still the placeholder {text!r} written by acctattr init; replace it"
            for where, text in placeholders])
    c = _Collector(path.parent)
    top = c.mapping(raw, "", _TOP_KEYS, {"version", "model", "stages"})
    if "version" in top and top["version"] != 1:
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

    causal = hf is not None and _causal_lm(hf, hf_class)
    stages = _parse_stages(c, top.get("stages")) if "stages" in top else ()
    evals = _parse_evals(c, top, causal) if isinstance(raw, dict) else ()
    stages, evals = _tokenizers(c, stages, evals, hf)
    ev = evals[0][1] if evals else None

    # a causal LM is trained on next-token loss; anything else defaults to cross-entropy
    train_loss: str | Ref = "next_token_loss" if causal else "cross_entropy"
    if "train" in top:
        train = c.mapping(top["train"], "train", _TRAIN_KEYS, set())
        if "loss" in train:
            train_loss = _metric(c, train["loss"], "train.loss") or train_loss
    replay = c.ref(top["replay"], "replay") if "replay" in top else None

    if c.problems or (factory is None and hf is None) or ev is None:
        raise ManifestError(shown or str(path), c.problems or ["incomplete manifest"])
    return Manifest(path=path, factory=factory, stages=stages, eval=ev,
                    train_loss=train_loss, replay=replay, hf=hf, hf_class=hf_class,
                    evals=evals if "evals" in top else ())


def _parse_stages(c: _Collector, value: Any) -> tuple[Stage, ...]:
    if not isinstance(value, list) or not value:
        c.add("stages", f"expected a non-empty list of stages, got {_kind(value)}")
        return ()
    out: list[Stage] = []
    seen: set[str] = set()
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
            if key in st and (data is None or not _jsonl(data)):
                c.add(f"{where}: {key}", f"'{key}' goes with JSONL text data (data: FILE.jsonl)")
        ckpts = _parse_checkpoints(c, st.get("checkpoints", []), where,
                                   opt.steps if opt else None)
        prev_end = end
        prev_adapter = is_adapter
        if name is not None and start is not None and end is not None and opt is not None:
            out.append(Stage(name, start, end, opt, data, ckpts, adapter=is_adapter,
                             tokenizer=tokenizer, max_length=max_length))
    return tuple(out)


def _parse_checkpoints(c: _Collector, value: Any, where: str,
                       steps: int | None) -> tuple[CheckpointRef, ...]:
    if not isinstance(value, list):
        c.add(f"{where}: checkpoints", f"expected a list of {{step, path}}, got {_kind(value)}")
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


def _trainer_steps(c: _Collector, start: Path | None, end: Path, where: str) -> int | None:
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


def _parse_optimizer(c: _Collector, value: Any, where: str,
                     trainer: tuple[Path | None, Path] | None = None) -> OptimizerSpec | None:
    """One stage's optimizer. With ``trainer`` = (start, end folder holding a Hugging Face
    trainer_state.json), steps, lr and state default to what that folder records."""
    o = c.mapping(value, where, _OPT_KEYS, {"type"} if trainer else {"type", "steps", "lr"})
    typ = o.get("type")
    if "type" in o and typ not in OPTIMIZER_TYPES:
        c.add(f"{where}.type", f"expected one of {', '.join(OPTIMIZER_TYPES)}, got {_kind(typ)}")
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
            c.add(f"{where}.betas", f"expected a list of two numbers, got {_kind(b)}")
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
    max_grad_norm = _parse_clip(c, o, where, trainer)
    batch_size = _parse_batch(c, o, where, trainer)
    if typ is None or steps is None or lr is None:
        return None
    return OptimizerSpec(
        type=typ, steps=steps, lr=lr, momentum=momentum, dampening=dampening,
        nesterov=nesterov, betas=betas, eps=eps, weight_decay=weight_decay, state=state,
        continues=bool(continues), param_names=param_names, max_grad_norm=max_grad_norm,
        batch_size=batch_size,
    )


# transformers.TrainingArguments.max_grad_norm's default: a stage written by Trainer clipped
# at 1.0 unless its author changed it (training_args.bin, a pickle, is never loaded)
TRAINER_MAX_GRAD_NORM = 1.0


def _parse_clip(c: _Collector, o: dict, where: str,
                trainer: tuple[Path | None, Path] | None) -> float | None:
    """``max_grad_norm``: a positive threshold, or null / 0 for none. A Trainer folder without
    the key takes Trainer's default."""
    if "max_grad_norm" not in o:
        return TRAINER_MAX_GRAD_NORM if trainer is not None else None
    value = o["max_grad_norm"]
    if value is None:
        return None
    tau = c.number(value, f"{where}.max_grad_norm")
    return tau if tau else None


def _parse_batch(c: _Collector, o: dict, where: str,
                 trainer: tuple[Path | None, Path] | None) -> int | None:
    """Examples per optimizer step: ``batch_size`` (per step, per process) times
    ``grad_accumulation``. A Trainer folder's ``train_batch_size`` is the default."""
    batch = c.integer(o["batch_size"], f"{where}.batch_size", lo=1) if "batch_size" in o \
        else None
    accum = c.integer(o["grad_accumulation"], f"{where}.grad_accumulation", lo=1) \
        if "grad_accumulation" in o else 1
    if batch is None and trainer is not None:
        batch = formats.trainer_batch_size(trainer[1])
    if batch is None or accum is None:
        return None
    return batch * accum


def _parse_param_names(c: _Collector, value: Any, where: str) -> tuple[tuple[str, ...], ...] | None:
    """A flat list (one group) or a list of lists (one per param group, state-file order)."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return (tuple(value),)
    if isinstance(value, list) and value and all(
        isinstance(g, list) and all(isinstance(v, str) for v in g) for g in value
    ):
        return tuple(tuple(g) for g in value)
    c.add(where, "expected a list of parameter names, or one such list per optimizer "
          f"param group, got {_kind(value)}")
    return None


def _parse_lr(c: _Collector, value: Any, where: str, steps: int | None) -> LrSpec | None:
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
                  f"expected one of {', '.join(SCHEDULES)}, got {_kind(sched)}")
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
          f"got {_kind(value)}")
    return None


def _metric(c: _Collector, value: Any, where: str) -> str | Ref | None:
    if isinstance(value, str) and value in BUILTIN_METRICS:
        return value
    if isinstance(value, str) and ":" in value:
        return c.ref(value, where)
    c.add(where, f"expected one of {', '.join(BUILTIN_METRICS)} or FILE.py:FUNC, "
          f"got {_kind(value)}")
    return None


def _parse_evals(c: _Collector, top: dict,
                 causal: bool = False) -> tuple[tuple[str, EvalSpec], ...]:
    """The behaviours: ``eval:`` (one, named "eval") or ``evals:`` (name -> eval section),
    each with the defaults of language models (_parse_eval_text)."""
    if ("eval" in top) == ("evals" in top):
        c.add("", "give exactly one of 'eval' (one eval section) or 'evals' (a mapping of "
              "behaviour name -> eval section)" if "eval" in top else
              "missing required key 'eval' (or 'evals', several named eval sections)")
        return ()
    if "eval" in top:
        ev = _parse_eval_text(c, top["eval"], causal)
        return (("eval", ev),) if ev is not None else ()
    value = top["evals"]
    if not isinstance(value, dict) or not value:
        c.add("evals", f"expected a mapping of behaviour name -> eval section, got "
              f"{_kind(value)}")
        return ()
    out = []
    for name, section in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            c.add("evals", f"behaviour name {name!r}: use letters, digits, '_', '.', '-'")
            continue
        ev = _parse_eval_text(c, section, causal, f"evals.{name}")
        if ev is not None:
            out.append((name, ev))
    return tuple(out) if len(out) == len(value) else ()


def _parse_eval(c: _Collector, value: Any, where: str = "eval") -> EvalSpec | None:
    e = c.mapping(value, where, _EVAL_KEYS, {"data", "inputs", "target"})
    data: Path | None = None
    data_fn: Ref | None = None
    if "data" in e:
        d = e["data"]
        if isinstance(d, str) and ":" in d and d.rpartition(":")[0].endswith(".py"):
            data_fn = c.ref(d, f"{where}.data")
        else:
            data = c.path(d, f"{where}.data")
    inputs: tuple[str, ...] | None = None
    if "inputs" in e:
        v = e["inputs"]
        if isinstance(v, str) and v:
            inputs = (v,)
        elif isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
            if len(set(v)) != len(v):
                c.add(f"{where}.inputs", "tensor names must be unique")
            inputs = tuple(v)
        else:
            c.add(f"{where}.inputs", f"expected a list of tensor names, got {_kind(v)}")
    target = c.string(e["target"], f"{where}.target") if "target" in e else None
    group = c.string(e["group"], f"{where}.group") if "group" in e else None
    metric = _metric(c, e.get("metric", "cross_entropy"), f"{where}.metric")
    batch = c.integer(e.get("batch_size", 256), f"{where}.batch_size", lo=1)
    hib = c.boolean(e["higher_is_better"], f"{where}.higher_is_better") \
        if "higher_is_better" in e else None
    if (data is None and data_fn is None) or inputs is None or target is None \
            or metric is None or batch is None:
        return None
    return EvalSpec(inputs=inputs, target=target, metric=metric, data=data, data_fn=data_fn,
                    group=group, batch_size=batch, higher_is_better=hib)


def _parse_eval_text(c: _Collector, value: Any, causal: bool = False,
                     where: str = "eval") -> EvalSpec | None:
    """An eval section (_parse_eval) with the defaults of language models: JSONL text data
    (``data: FILE.jsonl``, tokenised with ``tokenizer`` to ``max_length``) is tokenised into
    input_ids, attention_mask and labels, the defaults of inputs and target; a causal LM's
    default metric is next_token_loss."""
    if not isinstance(value, dict):
        return _parse_eval(c, value, where)
    section = dict(value)
    d = section.get("data")
    text = isinstance(d, str) and d.endswith(".jsonl")
    raw_tok, raw_len = section.pop("tokenizer", None), section.pop("max_length", None)
    tokenizer = c.path(raw_tok, f"{where}.tokenizer") if raw_tok is not None else None
    max_length = c.integer(raw_len, f"{where}.max_length", lo=1) if raw_len is not None \
        else None
    for key, got in (("tokenizer", raw_tok), ("max_length", raw_len)):
        if got is not None and not text:
            c.add(f"{where}.{key}", f"'{key}' goes with JSONL text data (data: FILE.jsonl)")
    if text:
        section.setdefault("inputs", list(JSONL_INPUTS))
        section.setdefault("target", JSONL_TARGET)
    if causal:
        section.setdefault("metric", "next_token_loss")
    ev = _parse_eval(c, section, where)
    if ev is None:
        return None
    if text:
        for key, names in (("inputs", ev.inputs), ("target", (ev.target,))):
            unknown = [n for n in names if n not in (*JSONL_INPUTS, JSONL_TARGET)]
            if unknown:
                c.add(f"{where}.{key}", f"JSONL text is tokenised into input_ids, "
                      f"attention_mask and labels; there is no {unknown[0]!r}")
    return replace(ev, tokenizer=tokenizer, max_length=max_length)


def _jsonl(path: Path) -> bool:
    return path.suffix == ".jsonl"


# files a tokenizer's save_pretrained() writes (any one will do)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _tokenizer_folder(folder: Path) -> Path | None:
    """``folder`` when it holds a saved tokenizer (a Trainer folder given one does)."""
    return folder if any((folder / f).is_file() for f in _TOKENIZER_FILES) else None


def _tokenizers(c: _Collector, stages: tuple[Stage, ...],
                evals: tuple[tuple[str, EvalSpec], ...], hf: Path | None
                ) -> tuple[tuple[Stage, ...], tuple[tuple[str, EvalSpec], ...]]:
    """JSONL eval data without a tokenizer takes the model.hf folder's own tokenizer files;
    a stage's JSONL data takes its own, else the first behaviour's (_stage_tokenizer)."""
    own = _tokenizer_folder(hf) if hf is not None else None
    out = []
    for name, ev in evals:
        if ev.data is not None and _jsonl(ev.data) and ev.tokenizer is None:
            where = "eval" if name == "eval" else f"evals.{name}"
            if own is None:
                c.add(f"{where}.tokenizer", f"{where}.data {ev.data.name} is JSONL text and "
                      "needs the run's tokenizer folder (tokenizer: DIR); model.hf holds no "
                      "tokenizer files")
            ev = replace(ev, tokenizer=own)
        out.append((name, ev))
    first = out[0][1] if out else None
    return tuple(_stage_tokenizer(c, s, first, own) for s in stages), tuple(out)


def _stage_tokenizer(c: _Collector, stage: Stage, ev: EvalSpec | None,
                     own: Path | None) -> Stage:
    """A stage with JSONL data gets its tokenizer and max_length: its own, else eval's, else
    the model.hf folder's tokenizer."""
    if stage.data is None or not _jsonl(stage.data):
        return stage
    tokenizer = stage.tokenizer or (ev.tokenizer if ev is not None else None) or own
    if tokenizer is None:
        c.add(f"stage '{stage.name}': tokenizer", f"data {stage.data.name} is JSONL text and "
              "needs the run's tokenizer folder (tokenizer: DIR here or under eval)")
    max_length = stage.max_length if stage.max_length is not None else \
        (ev.max_length if ev is not None else None)
    return replace(stage, tokenizer=tokenizer, max_length=max_length)


def _causal_lm(folder: Path, cls: str | None) -> bool:
    """Whether model.hf is a causal LM: its class (model.class, else config.json's
    architectures[0]) is a *ForCausalLM or *LMHeadModel."""
    name = cls
    if name is None:
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False  # building the model reports an unreadable config
        archs = config.get("architectures") if isinstance(config, dict) else None
        name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) \
            else None
    return name is not None and name.endswith(("ForCausalLM", "LMHeadModel"))


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

"""Optimizer state files -> named tensors and hyperparameters per parameter group.

A torch ``optimizer.state_dict()`` keys its state by integer ids, numbered group by group in
the order the groups' ``params`` lists were given. We map ids to parameter names by:

1. ``optimizer.param_names`` in the manifest, when given (one list per group);
2. one group: the model's trainable ``named_parameters()`` order;
3. two groups: the Hugging Face Trainer rule -- group 0 "decay" (every trainable parameter
   except biases and the parameters of norm layers), group 1 "no decay" (the rest), each
   in ``named_parameters()`` order.

Every mapped tensor is shape-checked; anything that does not fit is an error that says how
to state the mapping in the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from acctattr import heap
from acctattr.errors import CheckpointError
from acctattr.runs.checkpoints import (
    StateDictReader,
    check_dense,
    drop_range,
    extremes,
    file_offset,
    load_torch_file_mapped,
    load_torch_meta,
    open_checkpoint,
    read_at,
)
from acctattr.runs.manifest import OptimizerSpec

# State tensors each optimizer keeps per parameter.
STATE_NAMES = {"sgd": ("momentum_buffer",),
               "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"),
               "adamw": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")}
# Beyond these, a state value is garbage rather than a training statistic: a first moment
# (momentum buffer, exp_avg) is a running mean of gradients, a second moment of their squares.
MAX_FIRST_MOMENT = 1e15
MAX_SECOND_MOMENT = 1e30
MAX_STEP = 10**12
_SECOND = ("exp_avg_sq", "max_exp_avg_sq")
_HINT = ("state the mapping in the manifest: optimizer.param_names: a list of parameter "
         "names per param group, in the order they were passed to the optimizer")


@dataclass(frozen=True)
class GroupHparams:
    """One optimizer parameter group: its parameters and hyperparameters."""

    names: tuple[str, ...]
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    # Adam's amsgrad divides by the running maximum of exp_avg_sq (max_exp_avg_sq); maximize
    # ascends the training objective. Read from param_groups; amsgrad also from the state
    # holding max_exp_avg_sq (a safetensors state file has no param_groups).
    amsgrad: bool = False
    maximize: bool = False


@dataclass
class OptimizerState:
    """Hyperparameters per group and, when a state file was read, per-parameter state.

    The state tensors stay in the file until asked for, and nothing of the file is held
    open: ``at`` gives each tensor's dtype, shape and byte offset in a ``torch.save`` file
    (read there by plain reads on every call), ``keys`` the names of a safetensors state
    file's tensors in ``reader`` (its handle released after the load-time checks). Only
    where offsets cannot be found (a legacy, non-zip file; a non-contiguous tensor) are
    ``tensors`` kept: views into the memory-mapped file (their pages given back after each
    read), or the loaded tensors.
    """

    groups: list[GroupHparams]
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    step: int | None = None  # the optimizer's step count at the end of the stage (Adam)
    source: Path | None = None
    reader: StateDictReader | None = None
    keys: dict[str, dict[str, str]] = field(default_factory=dict)
    mapped: bool = False  # ``tensors`` lie in a read-only private mapping of the file
    span: tuple[int, int] = (0, 0)  # the addresses those tensors span in it
    # param -> state name -> (dtype, shape, byte offset in ``source``)
    at: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...], int]]] = field(
        default_factory=dict)

    def group_of(self) -> dict[str, int]:
        return {n: i for i, g in enumerate(self.groups) for n in g.names}

    def params(self) -> set[str]:
        """The parameters the file holds state tensors for."""
        return set(self.at) | set(self.tensors) | set(self.keys)

    def held(self) -> int:
        """How many of the file's tensors (views or loaded), open handles and parsed
        headers this state holds: 0 after ``release`` unless the file could not be read in
        place."""
        return sum(len(per) for per in self.tensors.values()) + (
            self.reader.held() if self.reader is not None else 0)

    def release(self) -> None:
        """Close a safetensors state file's handle (opened again when next read)."""
        if self.reader is not None:
            self.reader.release()

    def tensor(self, param: str, state_name: str, start: int | None = None,
               stop: int | None = None) -> torch.Tensor | None:
        """One state tensor (or flat elements start..stop of it) in fresh memory, float32
        (float64 kept); None where the file has none."""
        place = self.at.get(param, {}).get(state_name)
        if place is not None and self.source is not None:
            dtype, shape, offset = place
            n = math.prod(shape)
            a, b = (0, n) if start is None else (start, min(n, n if stop is None else stop))
            size = torch.empty((), dtype=dtype).element_size()
            got = read_at(self.source, dtype, offset + a * size, max(b - a, 0))
            if start is None:
                got = got.reshape(shape)
            # fresh memory: float32 and float64 as read, other dtypes promoted to float32
            return got if got.dtype in (torch.float32, torch.float64) else got.float()
        key = self.keys.get(param, {}).get(state_name)
        if key is not None and self.reader is not None:
            if start is None:
                return self.reader.get(key)
            return self.reader.get(key).reshape(-1)[start:stop] if stop is None else \
                self.reader.get_flat(key, start, stop)
        t = self.tensors.get(param, {}).get(state_name)
        if t is None:
            return None
        src = t if start is None else t.reshape(-1)[start:stop]
        out = src.to(torch.float64 if src.dtype == torch.float64 else torch.float32, copy=True)
        if self.mapped:  # with the pages the kernel mapped around them (fault-around)
            a = src.data_ptr()
            b = a + src.numel() * src.element_size()
            drop_range(max(self.span[0], a - _AROUND), min(self.span[1], b + _AROUND))
        return out


def default_groups(trainable: list[str], spec: OptimizerSpec) -> list[list[str]]:
    """Group membership when no state file says otherwise."""
    if spec.param_names is not None:
        return [list(g) for g in spec.param_names]
    return [list(trainable)]


def hf_groups(trainable: list[str], no_decay: set[str]) -> list[list[str]]:
    """The Hugging Face Trainer split: decay first, then no-decay."""
    return [[n for n in trainable if n not in no_decay], [n for n in trainable if n in no_decay]]


def _merge(spec: OptimizerSpec, names: list[str], pg: dict | None,
           amsgrad: bool = False) -> GroupHparams:
    """Hyperparameters of one group: manifest value, else state file value, else torch default
    (``amsgrad``: the state holds max_exp_avg_sq for this group's parameters)."""
    pg = pg or {}
    adamw = spec.type == "adamw"

    def pick(manifest_value, key, default):
        if manifest_value is not None:
            return manifest_value
        v = pg.get(key, default)
        return v if not isinstance(v, torch.Tensor) else v.item()

    betas = spec.betas if spec.betas is not None else tuple(pg.get("betas", (0.9, 0.999)))
    return GroupHparams(
        names=tuple(names),
        weight_decay=float(pick(spec.weight_decay, "weight_decay", 0.01 if adamw else 0.0)),
        momentum=float(pick(spec.momentum, "momentum", 0.0)),
        dampening=float(pick(spec.dampening, "dampening", 0.0)),
        nesterov=bool(pick(spec.nesterov, "nesterov", False)),
        beta1=float(betas[0]),
        beta2=float(betas[1]),
        eps=float(pick(spec.eps, "eps", 1e-8)),
        amsgrad=amsgrad or bool(pg.get("amsgrad", False)),
        maximize=bool(pg.get("maximize", False)),
    )


def load_optimizer_state(spec: OptimizerSpec, stage: str,
                         trainable: dict[str, tuple[int, ...]],
                         no_decay: set[str]) -> OptimizerState:
    """Read a stage's optimizer state (if any) and merge its hyperparameters with the manifest.

    Args:
        spec: the stage's optimizer spec from the manifest.
        stage: the stage's name, for messages.
        trainable: trainable parameter name -> shape, in ``named_parameters()`` order.
        no_decay: names of biases and norm-layer parameters (for the two-group rule).
    """
    names = list(trainable)
    if spec.state is None and spec.trainer_decay is not None and spec.param_names is None:
        # a Trainer stage saved without optimizer.pt: the Trainer's own two groups
        groups = hf_groups(names, no_decay)
        return OptimizerState([_merge(spec, g, {"weight_decay": wd})
                               for g, wd in zip(groups, (spec.trainer_decay, 0.0),
                                                strict=True)])
    if spec.state is None:
        groups = default_groups(names, spec)
        _check_cover(groups, trainable, stage, "optimizer.param_names")
        return OptimizerState([_merge(spec, g, None) for g in groups])
    if spec.state.suffix == ".safetensors":
        return _from_safetensors(spec, stage, trainable)
    return _from_torch(spec, stage, trainable, no_decay)


def _check_cover(groups: list[list[str]], trainable: dict[str, tuple[int, ...]], stage: str,
                 key: str) -> None:
    flat = [n for g in groups for n in g]
    unknown = sorted(set(flat) - set(trainable))
    missing = sorted(set(trainable) - set(flat))
    if unknown or missing or len(flat) != len(set(flat)):
        raise CheckpointError(
            f"stage '{stage}': {key} does not cover the model's trainable parameters exactly "
            f"(unknown: {unknown[:5]}, missing: {missing[:5]})", _HINT)


def _from_torch(spec: OptimizerSpec, stage: str, trainable: dict[str, tuple[int, ...]],
                no_decay: set[str]) -> OptimizerState:
    file = spec.state
    assert file is not None
    where = f"stage '{stage}': optimizer.state {file}"
    try:
        sd, mapped = load_torch_file_mapped(file)
    except CheckpointError as e:  # said of the file alone: name the stage and key too
        raise e.within(f"stage '{stage}': optimizer.state") from e
    lightning = isinstance(sd, dict) and isinstance(sd.get("optimizer_states"), list)
    if lightning:
        # a PyTorch Lightning .ckpt: one state_dict() per optimizer
        if len(sd["optimizer_states"]) != 1:
            raise CheckpointError(f"{where} holds {len(sd['optimizer_states'])} optimizers' "
                                  "states; acctattr follows a stage with one optimizer",
                                  "save the state of the optimizer that trained the stage "
                                  "with torch.save(optimizer.state_dict(), path)")
        sd = sd["optimizer_states"][0]
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise CheckpointError(f"{where} is not a torch optimizer state_dict() "
                              "(no 'state' and 'param_groups')",
                              "save it with torch.save(optimizer.state_dict(), path)")
    pgs = sd["param_groups"]
    if not isinstance(pgs, list) or not all(isinstance(g, dict) and "params" in g for g in pgs):
        raise CheckpointError(f"{where}: 'param_groups' is malformed",
                              "it must be a list of dicts, each with a 'params' list")
    for i, g in enumerate(pgs):
        if not isinstance(g["params"], (list, tuple)) or not all(
                isinstance(p, int) and not isinstance(p, bool) for p in g["params"]):
            raise CheckpointError(f"{where}: param_groups[{i}].params is not a list of "
                                  "integer parameter ids",
                                  "save it with torch.save(optimizer.state_dict(), path)")
    if not isinstance(sd["state"], dict) or not all(
            isinstance(e, dict) and all(isinstance(k, str) for k in e)
            for e in sd["state"].values()):
        raise CheckpointError(f"{where}: 'state' is not a mapping of parameter id -> "
                              "{state name: tensor}",
                              "save it with torch.save(optimizer.state_dict(), path)")
    _check_type(spec, stage, file, pgs, sd["state"])
    _check_one_lr(pgs, where)
    ids = [list(g["params"]) for g in pgs]
    listed = {p for g in ids for p in g}
    stray = sorted(map(repr, (k for k in sd["state"] if k not in listed)))
    if stray:  # its tensors would be dropped silently and their parameters taken as unstepped
        raise CheckpointError(f"{where}: 'state' has entries for parameter id(s) "
                              f"{', '.join(stray[:5])} that no param group lists",
                              "save it with torch.save(optimizer.state_dict(), path)")
    names = list(trainable)
    n_ids = sum(len(g) for g in ids)
    if spec.param_names is not None:
        groups = [list(g) for g in spec.param_names]
        how = "optimizer.param_names"
        if [len(g) for g in groups] != [len(g) for g in ids]:
            raise CheckpointError(
                f"{where} has groups of sizes {[len(g) for g in ids]} but optimizer.param_names "
                f"lists {[len(g) for g in groups]} names", _HINT)
    elif len(ids) == 1:
        groups, how = [names], "the model's trainable parameter order"
        if n_ids != len(names):
            raise CheckpointError(
                f"{where} has {n_ids} tensors but the model has {len(names)} trainable "
                "parameters", _HINT)
    elif len(ids) == 2:
        groups, how = hf_groups(names, no_decay), "the Hugging Face decay/no-decay rule"
        if [len(g) for g in groups] != [len(g) for g in ids]:
            raise CheckpointError(
                f"{where} has 2 param groups of sizes {[len(g) for g in ids]}; the Hugging Face "
                f"decay/no-decay rule gives {[len(g) for g in groups]}", _HINT)
    else:
        raise CheckpointError(f"{where} has {len(ids)} param groups; acctattr maps one group "
                              "(model order) or two (Hugging Face decay/no-decay) by itself", _HINT)
    _check_cover(groups, trainable, stage, how)
    state = sd["state"]
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    step: int | None = None
    entry: dict = {}
    value: object = None
    for gids, gnames in zip(ids, groups, strict=True):
        for pid, name in zip(gids, gnames, strict=True):
            entry = state.get(pid, {})
            for key, value in entry.items():
                if key == "step" and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    value = torch.tensor(float(value))
                if key == "step" and not isinstance(value, torch.Tensor):
                    # skipped, the step would silently become the manifest's count
                    raise CheckpointError(f"{where}: state 'step' of '{name}' is {value!r}, "
                                          "not a number", "use the file the optimizer saved")
                if not isinstance(value, torch.Tensor):
                    continue
                check_dense(value, f"{where}: state '{key}' of param id {pid}")
                if key == "step":
                    step = _step(value, f"{where}: state 'step' of '{name}'")
                    continue
                if tuple(value.shape) != trainable[name]:
                    raise CheckpointError(
                        f"{where}: state '{key}' of param id {pid} has shape "
                        f"{tuple(value.shape)} but {how} maps it to '{name}' of shape "
                        f"{trainable[name]}", _HINT)
                _check_moment(value, key, f"{where}: state '{key}' of '{name}'",
                              f"{where}: state '{key}' of '{name}' has NaN or Inf values")
                tensors.setdefault(name, {})[key] = value
    if spec.type != "sgd":
        _check_adam_moments(tensors, groups, pgs, where)
    _check_file_hparams(spec, pgs, where)
    groups_h = [_merge(spec, g, pg, _has_max(tensors, g))
                for g, pg in zip(groups, pgs, strict=True)]
    at = _offsets(file, tensors, ids, groups, lightning) if mapped else None
    if at is not None:  # read in place from now on: the file's mapping is let go
        del sd, state, entry, value  # every reference to the mapped tensors
        tensors.clear()
        heap.trim()  # what unpickling and the checks freed, before the next file is opened
        return OptimizerState(groups_h, {}, step, file, at=at)
    span = _span(tensors)
    if mapped:  # read once for the checks above; read again when used
        drop_range(*span)
    heap.trim()
    return OptimizerState(groups_h, tensors, step, file, mapped=mapped, span=span)


def _offsets(file: Path, tensors: dict[str, dict[str, torch.Tensor]], ids: list[list[int]],
             groups: list[list[str]], lightning: bool
             ) -> dict[str, dict[str, tuple[torch.dtype, tuple[int, ...], int]]] | None:
    """Where each state tensor's data lies in the ``torch.save`` file (dtype, shape, byte
    offset), from the file loaded again on the meta device (no data read); None where any
    tensor's cannot be found (then the mapped views are kept)."""
    meta = load_torch_meta(file)
    if lightning and isinstance(meta, dict):
        meta = (meta.get("optimizer_states") or [None])[0]
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
        return None
    at: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...], int]]] = {}
    for gids, gnames in zip(ids, groups, strict=True):
        for pid, name in zip(gids, gnames, strict=True):
            for key, t in tensors.get(name, {}).items():
                m = meta["state"].get(pid, {})
                offset = file_offset(file, m.get(key) if isinstance(m, dict) else None, t)
                if offset is None:
                    return None
                at.setdefault(name, {})[key] = (t.dtype, tuple(t.shape), offset)
    return at


# the kernel maps up to 64 KiB around a faulting page (fault_around_bytes)
_AROUND = 1 << 16


def _span(tensors: dict[str, dict[str, torch.Tensor]]) -> tuple[int, int]:
    """The lowest and highest address the tensors' data occupy."""
    ends = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
            for per in tensors.values() for t in per.values() if t.numel()]
    return (min(a for a, _ in ends), max(b for _, b in ends)) if ends else (0, 0)


def _step(value: torch.Tensor, where: str) -> int:
    """Adam's step count: one finite, whole number in [1, MAX_STEP]."""
    if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
        raise CheckpointError(f"{where} is not one number (shape {tuple(value.shape)}, "
                              f"{value.dtype})", "use the file the optimizer saved")
    x = float(value.item())
    if not math.isfinite(x) or x != int(x) or not 1 <= x <= MAX_STEP:
        raise CheckpointError(f"{where} is {x:g}; Adam's step count is a whole number from 1 "
                              f"to {MAX_STEP:.0e} (its bias correction divides by "
                              "1 - beta^step)", "use the file the optimizer saved")
    return int(x)


def _check_moment(value: torch.Tensor, key: str, where: str,
                  nonfinite: str | None = None) -> None:
    """A moment must be a floating tensor in a plausible range; a second moment (a mean of
    squared gradients) is never negative. With ``nonfinite`` (the message), NaN or Inf
    values are refused too. One pass over the tensor (checkpoints.extremes), no temporary
    of its size."""
    if not value.is_floating_point():
        raise CheckpointError(f"{where} has dtype {str(value.dtype).removeprefix('torch.')}, "
                              "not floating point", "use the file the optimizer saved")
    if value.numel() == 0:
        return
    low, high = extremes(value)
    if nonfinite is not None and not (math.isfinite(low) and math.isfinite(high)):
        raise CheckpointError(nonfinite, "use a state file from before divergence")
    if key in _SECOND:
        if low < 0:
            raise CheckpointError(f"{where} has negative values (down to {low:.3g}); a "
                                  "second moment is a running mean of squared gradients",
                                  "use the file the optimizer saved")
        limit = MAX_SECOND_MOMENT
    else:
        limit = MAX_FIRST_MOMENT
    big = max(-low, high)  # max |x|, NaN where any element is (then not > limit)
    if big > limit:
        raise CheckpointError(f"{where} reaches {big:.3g}, beyond {limit:.0e}: not a "
                              "training statistic (a corrupted or diverged state)",
                              "use a state file from before divergence")


def _check_adam_moments(tensors: dict[str, dict[str, torch.Tensor]], groups: list[list[str]],
                        pgs: list[dict], where: str) -> None:
    """torch's Adam keeps exp_avg and exp_avg_sq (and max_exp_avg_sq with amsgrad) for every
    parameter it stepped: a stepped parameter lacking one is a damaged file, refused here
    rather than when an estimator first needs the tensor (check passed, run failed)."""
    for names, pg in zip(groups, pgs, strict=True):
        need = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if pg.get("amsgrad") is True
                                            else ())
        for name in names:
            held = tensors.get(name, {})  # none: a parameter Adam never stepped
            lacking = [k for k in need if held and k not in held]
            if lacking:
                raise CheckpointError(
                    f"{where}: the state of '{name}' has {', '.join(sorted(held))} but no "
                    f"{' or '.join(lacking)}; Adam keeps {', '.join(need)} for every "
                    "parameter it stepped", "use the file the optimizer saved")


def _has_max(tensors: dict[str, dict[str, torch.Tensor]] | dict[str, dict[str, str]],
             names: list[str]) -> bool:
    return any("max_exp_avg_sq" in tensors.get(n, {}) for n in names)


# key -> (low, low is open, high, high is open) for hyperparameters read from param_groups.
_RANGES = {"weight_decay": (0.0, False, None, False), "momentum": (0.0, False, 1.0, True),
           "dampening": (0.0, False, 1.0, False), "eps": (0.0, True, None, False)}

# flags read from param_groups (None, as torch may store, is false)
_FLAGS = ("nesterov", "amsgrad", "maximize")


def _check_file_hparams(spec: OptimizerSpec, pgs: list[dict], where: str) -> None:
    """Refuse negative, out-of-range or non-finite hyperparameters that the run would use.

    Only values the manifest does not override are checked (the manifest's own are checked
    when it is parsed); every bad value of every group is listed at once.
    """
    problems: list[str] = []

    def check(key: str, value: object, rng: tuple[float, bool, float | None, bool]) -> None:
        lo, lo_open, hi, hi_open = rng
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key} is {value!r}, expected a number")
            return
        x = float(value)
        if not math.isfinite(x) or x < lo or (lo_open and x == lo) or (
                hi is not None and (x >= hi if hi_open else x > hi)):
            if hi is None:
                want = f"{'>' if lo_open else '>='} {lo:g}"
            else:
                want = f"in [{lo:g}, {hi:g}{')' if hi_open else ']'}"
            problems.append(f"{key} is {value!r}, must be finite and {want}")

    for i, pg in enumerate(pgs):
        for key, rng in _RANGES.items():
            if key in pg and getattr(spec, key) is None:
                check(f"param_groups[{i}].{key}", pg[key], rng)
        for key in _FLAGS:  # bool("false") is True: a flag must be one
            if key in pg and getattr(spec, key, None) is None \
                    and not (pg[key] is None or isinstance(pg[key], bool)):
                problems.append(f"param_groups[{i}].{key} is {pg[key]!r}, expected true or "
                                "false")
        if "betas" in pg and spec.betas is None:
            b = pg["betas"]
            if not isinstance(b, (list, tuple)) or len(b) != 2:
                problems.append(f"param_groups[{i}].betas is {b!r}, expected two numbers")
            else:
                for j, bj in enumerate(b):
                    check(f"param_groups[{i}].betas[{j}]", bj, (0.0, False, 1.0, True))
    if problems:
        raise CheckpointError(
            f"{where}: " + "; ".join(problems),
            "the state file's hyperparameters are used where the manifest gives none: fix "
            "the file, or set the value in the stage's optimizer section of the manifest")


# What only other optimizers keep (torch.optim's and transformers' Adafactor, which a
# Trainer runs for optim=rmsprop, adagrad, adafactor, ...): per-parameter state names and
# param_groups keys. A file holding one was not written by SGD, Adam or AdamW, whatever
# else it holds (RMSprop with momentum keeps a momentum_buffer, NAdam an exp_avg).
_OTHER_STATE = {"square_avg": "RMSprop or Adadelta", "sum": "Adagrad",
                "acc_delta": "Adadelta", "exp_inf": "Adamax", "mu_product": "NAdam",
                "exp_avg_sq_row": "Adafactor", "exp_avg_sq_col": "Adafactor",
                "RMS": "Adafactor", "ax": "ASGD", "eta": "ASGD", "prev": "Rprop",
                "step_size": "Rprop", "grad_avg": "RMSprop (centered)"}
_OTHER_GROUP_KEYS = {"alpha": "RMSprop", "centered": "RMSprop", "lr_decay": "Adagrad",
                     "initial_accumulator_value": "Adagrad", "rho": "Adadelta",
                     "momentum_decay": "NAdam", "clip_threshold": "Adafactor",
                     "decay_rate": "Adafactor", "relative_step": "Adafactor",
                     "lambd": "ASGD", "etas": "Rprop", "step_sizes": "Rprop"}
_KNOWN_STATE = {"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"}


def other_optimizer(pgs: object, state: object) -> str | None:
    """What in a torch optimizer state_dict shows that neither SGD nor Adam/AdamW wrote
    it (state names or param_groups keys that only other optimizers keep, with the
    optimizer they belong to), or None where nothing does."""
    keys = {k for entry in (state.values() if isinstance(state, dict) else ())
            if isinstance(entry, dict) for k in entry if isinstance(k, str)}
    group_keys = {k for g in (pgs if isinstance(pgs, list) else ()) if isinstance(g, dict)
                  for k in g if isinstance(k, str)}
    found = [f"state '{k}' ({_OTHER_STATE.get(k, 'not SGD, Adam or AdamW')})"
             for k in sorted(keys - _KNOWN_STATE)]
    found += [f"param_groups key '{k}' ({_OTHER_GROUP_KEYS[k]})"
              for k in sorted(group_keys & _OTHER_GROUP_KEYS.keys())]
    return ", ".join(found) if found else None


def _check_one_lr(pgs: list[dict], where: str) -> None:
    """Refuse param groups that trained at different learning rates (a custom optimizer
    given to a Trainer with a lower lr for the embeddings, say): every estimator applies
    the stage's one lr per step to every parameter. The schedule's base lr of each group
    (``initial_lr``, which an lr scheduler adds) is compared where every group has one,
    else its last ``lr``; groups without parameters do not count."""
    groups = [g for g in pgs if g["params"]]
    key = "initial_lr" if groups and all("initial_lr" in g for g in groups) else "lr"
    lrs = []
    for g in groups:
        value = g.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lrs.append(float(value))
    if lrs and any(not math.isclose(lr, lrs[0], rel_tol=1e-9, abs_tol=0.0) for lr in lrs):
        raise CheckpointError(
            f"{where}: its param groups trained at different learning rates ({key} "
            f"{', '.join(f'{lr:g}' for lr in lrs)}); acctattr applies one lr per step to "
            "every parameter",
            "acctattr cannot follow per-group learning rates: train the stage with one "
            "learning rate for every param group (as the Trainer's own optimizer does)")


def _check_type(spec: OptimizerSpec, stage: str, file: Path, pgs: list[dict],
                state: dict) -> None:
    """Refuse a state file written by another optimizer than the manifest says: another
    type of the three, Adam's coupled decay for adamw or AdamW's decoupled one for adam,
    or an optimizer acctattr does not model at all (RMSprop, Adagrad, Adafactor, ...),
    whose state would otherwise be dropped and its parameters taken as Adam's."""
    other = other_optimizer(pgs, state)
    if other is not None:
        raise CheckpointError(
            f"stage '{stage}': optimizer.state {file} was not written by SGD, Adam or "
            f"AdamW: it holds {other}; optimizer.type {spec.type} would misread it",
            "acctattr follows torch.optim.SGD, Adam and AdamW only (a Trainer's optim "
            "adamw_torch, adamw_torch_fused or sgd); retrain the stage with one of them")
    decoupled = {bool(g["decoupled_weight_decay"]) for g in pgs
                 if isinstance(g.get("decoupled_weight_decay"), bool)}
    if spec.type in ("adam", "adamw") and len(decoupled) == 1 \
            and decoupled != {spec.type == "adamw"}:
        wrote = "AdamW (decoupled_weight_decay true)" if True in decoupled else \
            "Adam (decoupled_weight_decay false)"
        raise CheckpointError(
            f"stage '{stage}': optimizer.state {file} was written by {wrote}, but "
            f"optimizer.type is {spec.type}",
            "set optimizer.type to the optimizer that wrote the file (a Trainer's "
            "adamw_* optims write AdamW's)")
    keys = {k for entry in state.values() if isinstance(entry, dict) for k in entry}
    looks_adam = "exp_avg" in keys or any("betas" in g for g in pgs)
    looks_sgd = "momentum_buffer" in keys or any("dampening" in g for g in pgs)
    if (spec.type == "sgd" and looks_adam) or (spec.type != "sgd" and looks_sgd):
        other = "Adam/AdamW" if looks_adam else "SGD"
        raise CheckpointError(
            f"stage '{stage}': optimizer.state {file} was written by {other}, "
            f"but optimizer.type is {spec.type}",
            "set optimizer.type to the optimizer that wrote the file, or point "
            "optimizer.state at the right file")


def _from_safetensors(spec: OptimizerSpec, stage: str,
                      trainable: dict[str, tuple[int, ...]]) -> OptimizerState:
    """A safetensors state file with keys ``<param>.<state_name>`` (hyperparameters from YAML)."""
    assert spec.state is not None
    try:
        reader: StateDictReader = open_checkpoint(spec.state)
    except CheckpointError as e:
        raise e.within(f"stage '{stage}': optimizer.state") from e
    where = f"stage '{stage}': optimizer.state {spec.state}"
    keys: dict[str, dict[str, str]] = {}
    step: int | None = None
    allowed = STATE_NAMES[spec.type]
    for key in reader.names():
        param, _, state_name = key.rpartition(".")
        if param not in trainable or state_name not in allowed:
            raise CheckpointError(
                f"{where}: key '{key}' is not <trainable parameter>.<state> with state one of "
                f"{', '.join(allowed)}", "name keys like 'layer.weight.exp_avg'")
        if state_name == "step":
            step = _step(reader.get(key), f"{where}: '{key}'")
            continue
        value = reader.get(key)  # checked here, read again (from the file) when used
        if tuple(value.shape) != trainable[param]:
            raise CheckpointError(f"{where}: '{key}' has shape {tuple(value.shape)}, "
                                  f"parameter '{param}' has {trainable[param]}")
        _check_moment(value, state_name, f"{where}: '{key}'")
        del value
        keys.setdefault(param, {})[state_name] = key
    groups = default_groups(list(trainable), spec)
    _check_cover(groups, trainable, stage, "optimizer.param_names")
    reader.release()  # checked: opened again when read
    return OptimizerState([_merge(spec, g, None, _has_max(keys, g)) for g in groups],
                          {}, step, spec.state, reader=reader, keys=keys)

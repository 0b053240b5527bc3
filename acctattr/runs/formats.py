"""The checkpoint layouts people actually have, recognised from their files; no torch here.

- Hugging Face Trainer folders (``checkpoint-N/``: weights, ``optimizer.pt``,
  ``trainer_state.json``, ``training_args.bin``): steps and per-step learning rates come
  from ``trainer_state.json``. ``training_args.bin`` is a pickle of arbitrary objects; it is
  never opened.
- PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).
- PyTorch Lightning ``.ckpt`` files and torch.distributed.checkpoint folders (``.metadata``).

This module only reads JSON and file names, so ``manifest.py`` (which never imports torch)
can use it to fill in what a Trainer folder already says.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAINER_STATE = "trainer_state.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DCP_METADATA = ".metadata"
# transformers >= 4.51 (PR #36973) logs the lr the step just used; older versions logged the
# lr of the next step.
_LR_FIX_VERSION = (4, 51)


MAX_STEPS = 10**12  # optimizer steps in a stage; more is a corrupted count, not a run


class FormatError(ValueError):
    """A file of a known layout that cannot be read; the message names the file."""


def kind(path: Path) -> str:
    """What a checkpoint path is: one of ``hf-trainer``, ``peft-adapter``, ``lightning``,
    ``dcp``, ``hf-model``, ``weights`` (any other folder or file), ``missing``."""
    from acctattr.files import path_problem

    if path_problem(path) is not None:
        return "missing"
    if path.is_file():
        return "lightning" if path.suffix == ".ckpt" else "weights"
    if (path / DCP_METADATA).is_file():
        return "dcp"
    if (path / ADAPTER_CONFIG).is_file():
        return "peft-adapter"
    if (path / TRAINER_STATE).is_file():
        return "hf-trainer"
    if (path / "config.json").is_file():
        return "hf-model"
    return "weights"


def _read_json(path: Path) -> Any:
    from acctattr.files import path_problem

    problem = path_problem(path, "file")
    if problem is not None:
        raise FormatError(f"{path}: {problem}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: not readable JSON ({e})") from e


@dataclass(frozen=True)
class TrainerState:
    """What a Hugging Face ``trainer_state.json`` says about the run that wrote it."""

    path: Path
    global_step: int
    log_history: tuple[dict, ...]
    # (0-indexed global step whose update used this lr, lr), from log_history
    lr_points: tuple[tuple[int, float], ...]
    # "used" (transformers >= 4.51), "next" (older) or "unknown" (no version beside the
    # file: lr_points then follow the older rule until schedules.settle_convention decides)
    lr_convention: str
    # the Trainer run's planned length (its schedule's), where the file says
    max_steps: int | None = None


def read_trainer_state(path: Path) -> TrainerState:
    """Read ``trainer_state.json`` (a file, or the folder holding it).

    The step a logged ``learning_rate`` belongs to depends on the transformers version that
    wrote it (``config.json``'s ``transformers_version`` in the same folder): from 4.51 the
    entry logged at global step N is the lr of 0-indexed step N-1 (the step just taken);
    before, it was the lr of step N (the next one). Where no version is known the points
    follow the older rule and ``lr_convention`` is "unknown" (schedules.settle_convention
    decides it from scheduler.pt and the named schedule, or refuses).
    """
    file = path / TRAINER_STATE if path.is_dir() else path
    doc = _read_json(file)
    if not isinstance(doc, dict):
        raise FormatError(f"{file}: expected a JSON object")
    step = doc.get("global_step")
    history = doc.get("log_history", [])
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise FormatError(f"{file}: no integer global_step")
    if step > MAX_STEPS:
        raise FormatError(f"{file}: global_step {step} is more than {MAX_STEPS:.0e}")
    if not isinstance(history, list):
        raise FormatError(f"{file}: log_history is not a list")
    history = [h for h in history if isinstance(h, dict)]
    convention = "unknown"
    version = transformers_version(file.parent)
    if version is not None:
        convention = "used" if version >= _LR_FIX_VERSION else "next"
    shift = 1 if convention == "used" else 0
    points: dict[int, float] = {}
    for h in history:
        if "learning_rate" not in h or "step" not in h:
            continue
        at = h["step"]
        # the Trainer logs whole steps 0..global_step; anything else is not its file
        if not isinstance(at, int) or isinstance(at, bool) or not 0 <= at <= step:
            raise FormatError(f"{file}: log_history entry with learning_rate has step {at!r}, "
                              f"not a whole number from 0 to global_step {step}")
        value = h["learning_rate"]
        try:
            if isinstance(value, bool):
                raise TypeError("a boolean")
            lr = float(value)
        except (TypeError, ValueError) as e:
            raise FormatError(f"{file}: learning_rate {value!r} at step {at} is not a "
                              "number") from e
        if not math.isfinite(lr) or lr < 0:
            raise FormatError(f"{file}: learning_rate {lr!r} at step {at} is not "
                              "a finite number >= 0")
        seen = points.setdefault(at - shift, lr)
        if not math.isclose(seen, lr, rel_tol=1e-9, abs_tol=0.0):
            raise FormatError(f"{file}: log_history gives step {at} two learning rates, "
                              f"{seen!r} and {lr!r}")
    planned = doc.get("max_steps")
    if not isinstance(planned, int) or isinstance(planned, bool) or not \
            0 < planned <= MAX_STEPS:
        planned = None
    return TrainerState(file, step, tuple(history), tuple(points.items()), convention, planned)


def trainer_batch_size(folder: Path) -> int | None:
    """``train_batch_size`` (examples per forward pass) from ``folder/trainer_state.json``,
    if it records one; None where it does not or cannot be read."""
    try:
        doc = _read_json(folder / TRAINER_STATE)
    except FormatError:
        return None
    value = doc.get("train_batch_size") if isinstance(doc, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


def transformers_version(folder: Path) -> tuple[int, int] | None:
    """(major, minor) of ``transformers_version`` in ``folder/config.json``; None where there
    is no config.json or it names no version. A config.json that cannot be read, or a version
    that is not one, is a FormatError: guessing would shift every logged lr by a step."""
    from acctattr.files import path_problem

    cfg = folder / "config.json"
    if path_problem(cfg) == "not found":
        return None
    doc = _read_json(cfg)
    if not isinstance(doc, dict):
        raise FormatError(f"{cfg}: expected a JSON object")
    text = doc.get("transformers_version")
    if text is None:
        return None
    try:
        major, minor = (int(x) for x in str(text).split(".")[:2])
    except ValueError:
        major = minor = -1
    if not isinstance(text, str) or major < 0 or minor < 0:
        raise FormatError(f"{cfg}: transformers_version {text!r} is not a version like "
                          "'4.51.0' (it decides which step each logged learning_rate belongs "
                          "to)")
    return major, minor


class AmbiguousResume(FormatError):
    """A Trainer folder that may have resumed its start or started anew from its weights,
    with nothing in either trainer_state.json to tell which."""


def trainer_resumed(start: Path | None, end: Path) -> bool:
    """Whether the Trainer run that wrote ``end`` resumed from ``start`` (``resume_from_
    checkpoint``, or the same run going on): its global_step is further on and its
    log_history continues the start's. A resumed run also reloaded the start's optimizer
    and scheduler state.

    Where the start logged nothing (``logging_steps`` beyond its step), a run that logged
    at or before the start's step is a new one; else two checkpoints of one ``output_dir``
    are taken as one run, and checkpoints of two are refused (AmbiguousResume): a new
    Trainer of global_step(end) steps from the start's weights and a resumed one of the
    difference leave the same files."""
    if start is None or not start.is_dir() or not (start / TRAINER_STATE).is_file():
        return False
    last = read_trainer_state(end)
    first = read_trainer_state(start)
    n = len(first.log_history)
    if not 0 < first.global_step < last.global_step:
        return False
    if n > 0:
        return list(last.log_history[:n]) == list(first.log_history)
    if any(isinstance(h.get("step"), int) and h["step"] <= first.global_step
           for h in last.log_history):
        return False  # a new run logged from its own first steps
    if start.resolve().parent == end.resolve().parent:
        return True
    raise AmbiguousResume(
        f"{last.path}: cannot tell whether this run resumed {start} (resume_from_checkpoint: "
        f"{last.global_step - first.global_step} steps from there, with that folder's "
        f"optimizer state) or a new Trainer started from its weights ({last.global_step} "
        f"steps, a fresh optimizer): {first.path} logged nothing to compare (logging_steps "
        "beyond its step); set the stage's optimizer.steps and optimizer.continues")


def trainer_stage_steps(start: Path | None, end: Path) -> int:
    """Optimizer steps a stage took, from its start and end ``trainer_state.json``.

    A stage resumed from its start checkpoint (the end's log_history continues the start's)
    took ``global_step(end) - global_step(start)`` steps; a stage run by a new Trainer starts
    counting at 0 again and took ``global_step(end)`` steps.
    """
    last = read_trainer_state(end)
    if trainer_resumed(start, end):
        assert start is not None
        return last.global_step - read_trainer_state(start).global_step
    return last.global_step


def trainer_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The ``checkpoint-N`` folders a Trainer ``output_dir`` holds, as (N, folder) by N."""
    out = []
    if folder.is_dir():
        for sub in folder.iterdir():
            head, _, tail = sub.name.partition("-")
            if head == "checkpoint" and tail.isdigit() and sub.is_dir():
                out.append((int(tail), sub))
    return sorted(out)


# TrainingArguments fields acctattr init reads from training_args.bin
TRAINING_ARGS_KEYS = ("max_grad_norm", "per_device_train_batch_size",
                      "gradient_accumulation_steps", "optim", "lr_scheduler_type",
                      "learning_rate", "warmup_steps", "warmup_ratio", "lr_scheduler_kwargs",
                      "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                      "optim_args")


TRAINING_ARGS_LIMIT = 1 << 24  # bytes; a real training_args.bin is a few kB


def training_args(folder: Path) -> dict[str, Any]:
    """Plain values of a few TrainingArguments fields in ``folder/training_args.bin``.

    The file is a pickle (inside torch.save's zip) of a TrainingArguments object; loading it
    would run code. It is never unpickled: its opcodes are only scanned (``pickletools``)
    for a field name followed directly by a number, a string, None or a flat dict (string
    keys, such values: ``lr_scheduler_kwargs``), or by an enum (``lr_scheduler_type``,
    ``optim``: a class reference, then its string value). Anything unreadable gives an
    empty dict.
    """
    import io
    import pickletools
    import zipfile

    from acctattr.files import path_problem

    file = folder / "training_args.bin"
    # a FIFO or device would block the read; a real one is a few kB (its pickle too, even
    # where a hostile zip would inflate it)
    if path_problem(file, "file") is not None or file.stat().st_size > TRAINING_ARGS_LIMIT:
        return {}
    try:
        raw = file.read_bytes()
        if zipfile.is_zipfile(io.BytesIO(raw)):
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                if z.getinfo(name).file_size > TRAINING_ARGS_LIMIT:
                    return {}
                raw = z.read(name)
        codes = [(op, arg) for op, arg, _ in pickletools.genops(io.BytesIO(raw))]
        ops = [(op.name, arg) for op, arg in codes]
    except Exception:
        return {}
    out: dict[str, Any] = {}
    followed: set[str] = set()
    skip = {"MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"}
    for i, (name, arg) in enumerate(ops):
        if not (name.endswith("UNICODE") and arg in TRAINING_ARGS_KEYS) or arg in out:
            continue
        j = i + 1
        while j < len(ops) and ops[j][0] in skip:
            j += 1
        if j >= len(ops):
            continue
        vname, value = ops[j]
        if vname == "GLOBAL":
            # an enum member (torch.save's protocol 2): its class, then its value
            j += 1
            while j < len(ops) and ops[j][0] in skip:
                j += 1
            if j < len(ops) and ops[j][0].endswith("UNICODE"):
                out[arg] = ops[j][1]
            continue
        if vname in ("BINFLOAT", "FLOAT") or vname.startswith("BININT") or vname == "INT":
            out[arg] = value
        elif vname.endswith("UNICODE"):
            out[arg] = value
        elif vname == "NONE":
            out[arg] = None
        elif vname == "EMPTY_DICT" and arg not in followed:
            # {} or a dict whose items follow: read where it is flat (string keys, plain
            # values). Followed once per field: a hostile file repeating it would cost a
            # pass over the rest of the file each time
            followed.add(arg)
            try:
                items = _dict_items(codes, j + 1, skip)
            except Exception:  # a stream pickletools parsed but no pickle machine would run
                items = None
            if items is not None:
                out[arg] = items
    return out


_NOT_PLAIN = object()


def _dict_items(codes: list[tuple[Any, Any]], k: int, skip: set[str]) -> dict[str, Any] | None:
    """The items a pickle puts into the dict that an EMPTY_DICT just before ``codes[k]``
    pushed, followed on the pickle machine's stack (each opcode's stack effect, from
    pickletools) until the dict is taken off it: a SETITEM with a key and a value right
    above it, or a SETITEMS whose MARK lies right above it, fills it. Empty where nothing
    does; None where a key is not a string, a value is not plain (a nested object, a memo
    reference) or the stream cannot be followed."""
    import pickletools

    items: dict[str, Any] = {}
    above: list[Any] = []  # what lies on the stack above the dict: plain values or marks
    mark = pickletools.markobject
    for op, arg in codes[k:]:
        if op.name in skip:
            continue
        if op.name == "SETITEM" and len(above) == 2:
            key, value = above
            if not isinstance(key, str) or value is _NOT_PLAIN or key in items:
                return None
            items[key] = value
            above.clear()
            continue
        if op.name == "SETITEMS" and above and above[0] is mark:
            pairs = above[1:]
            keys = pairs[::2]
            if len(pairs) % 2 or mark in pairs or _NOT_PLAIN in pairs[1::2] \
                    or not all(isinstance(key, str) and key not in items for key in keys) \
                    or len(set(keys)) != len(keys):
                return None
            items.update(zip(keys, pairs[1::2], strict=True))
            above.clear()
            continue
        before = op.stack_before
        if mark in before:
            if mark not in above:
                return items  # the dict is below this opcode's mark: taken off, done
            at = len(above) - 1 - above[::-1].index(mark)
            del above[at:]
            pops = before.index(mark)
        else:
            pops = len(before)
        if pops > len(above):
            return items  # the dict itself is taken off the stack: done
        del above[len(above) - pops:]
        for after in op.stack_after:
            if after is mark:
                above.append(mark)
            else:
                v = _plain_value(op.name, arg)
                above.append(_NOT_PLAIN if len(op.stack_after) > 1 else v)
    return None


def _plain_value(name: str, arg: Any) -> Any:
    """The value one pickle opcode pushes, where it is a plain string, number, bool or
    None; _NOT_PLAIN otherwise."""
    if name.endswith("UNICODE") or name in ("BINFLOAT", "FLOAT", "LONG1", "INT") \
            or name.startswith("BININT"):
        return arg
    return {"NEWTRUE": True, "NEWFALSE": False, "NONE": None}.get(name, _NOT_PLAIN)


def describe_folder(folder: Path) -> str:
    """What a folder that holds no weights of its own does hold, for error messages: its
    Trainer ``checkpoint-N`` folders, Lightning ``.ckpt`` files, adapter or state files."""
    if not folder.is_dir():
        return ""
    parts = []
    ckpts = trainer_checkpoints(folder)
    if ckpts:
        names = ", ".join(p.name for _, p in ckpts[-3:])
        parts.append(f"{len(ckpts)} Trainer checkpoint folder(s) ({names}): name one of them, "
                     f"e.g. {ckpts[-1][1]}")
    lightning = sorted(p for p in folder.rglob("*.ckpt") if p.is_file())
    if lightning:
        names = ", ".join(str(p.relative_to(folder)) for p in lightning[:3])
        parts.append(f"{len(lightning)} Lightning .ckpt file(s) ({names}): name the file")
    if not parts:
        files = sorted(p.name for p in folder.iterdir())[:8]
        parts.append("it holds " + (", ".join(files) if files else "nothing"))
    return "; ".join(parts)


def adapter_weights(folder: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise FormatError(f"{folder}: an adapter folder needs {' or '.join(ADAPTER_WEIGHTS)}")


@dataclass(frozen=True)
class LoraConfig:
    """The parts of a PEFT ``adapter_config.json`` that decide the merged delta."""

    path: Path
    r: int
    alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]


_MERGE_HINT = ("merge it into the model with peft's merge_and_unload(), save the merged model "
               "(save_pretrained) and name that folder as the stage's end instead")


def read_lora_config(folder: Path) -> LoraConfig:
    """Read and check a PEFT LoRA adapter config; refuse what a merged delta cannot express."""
    file = folder / ADAPTER_CONFIG
    doc = _read_json(file)
    if not isinstance(doc, dict):
        raise FormatError(f"{file}: expected a JSON object")
    peft_type = doc.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise FormatError(f"{file}: peft_type {peft_type!r} is not supported (only LORA); "
                          f"{_MERGE_HINT}")
    refuse = {
        "use_dora": "DoRA rescales each merged weight by a learned magnitude",
        "modules_to_save": "modules_to_save trains whole modules besides the adapter",
        "lora_bias": "lora_bias trains a bias beside the adapter",
        "target_parameters": "target_parameters puts LoRA on bare parameters",
        "layer_replication": "layer_replication changes the model's layers",
        "trainable_token_indices": "trainable_token_indices trains embedding rows",
    }
    for key, why in refuse.items():
        if doc.get(key):
            raise FormatError(f"{file}: {key} is set ({why}); acctattr reads plain LoRA "
                              f"adapters only; {_MERGE_HINT}")
    if doc.get("bias", "none") != "none":
        raise FormatError(f"{file}: bias is {doc['bias']!r} (the adapter also trained biases); "
                          f"acctattr reads plain LoRA adapters (bias: none) only; {_MERGE_HINT}")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = doc.get(key) or {}
        if not isinstance(patterns, dict):
            raise FormatError(f"{file}: {key} is {type(patterns).__name__}, not an object "
                              "(module pattern -> value)")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:  # PEFT matches these as regular expressions
                raise FormatError(f"{file}: {key} key {pattern!r} is not a regular "
                                  f"expression ({e})") from e
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(doc.get(key, False), bool):  # bool("false") is True
            raise FormatError(f"{file}: {key} is {doc[key]!r}, not true or false")
    alpha = doc.get("lora_alpha")
    try:
        config = LoraConfig(
            path=file, r=int(doc["r"]), alpha=float(doc["r"] if alpha is None else alpha),
            use_rslora=doc.get("use_rslora", False),
            fan_in_fan_out=doc.get("fan_in_fan_out", False),
            rank_pattern={str(k): int(v) for k, v in (doc.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v)
                           for k, v in (doc.get("alpha_pattern") or {}).items()})
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{file}: malformed LoRA config ({type(e).__name__}: {e})") from e
    alphas = [("lora_alpha", config.alpha),
              *((f"alpha_pattern[{k!r}]", v) for k, v in config.alpha_pattern.items())]
    for key, alpha in alphas:
        if not math.isfinite(alpha):
            raise FormatError(f"{file}: {key} is {alpha!r}, not a finite number (it scales "
                              "every merged delta)")
    return config


DCP_HINT = ("convert it to a single file first (only for a checkpoint you trust: the converter "
            "unpickles the .metadata file): python -m torch.distributed.checkpoint.format_utils "
            "dcp_to_torch {src} {dst}, then name {dst} in the manifest")

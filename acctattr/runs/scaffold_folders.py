"""What ``acctattr init`` finds in the folders a training run left behind: the stages a
path holds (Hugging Face Trainer output_dirs, PEFT adapter folders, Lightning .ckpt files
or folders of them, run roots with one folder per stage, plain weights), their order, and
the start checkpoint among plain weights. scaffold.py reads each stage's optimizer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acctattr.errors import AcctattrError, CheckpointError
from acctattr.runs import formats
from acctattr.runs.checkpoints import load_torch_file

_LIGHTNING_AUTO = re.compile(r"^(last|(epoch=\d+)?-?(step=\d+)?)(-v\d+)?$")


_LIGHTNING_DIRS = re.compile(r"^(checkpoints|lightning_logs|version_\d+)$")


_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


_NOT_WEIGHTS = ("optim", "scheduler", "rng_state", "training_args", "scaler")


@dataclass
class FoundStage:
    """One stage found on disk: its end and the intermediate checkpoints of the same run."""

    name: str
    end: Path
    kind: str
    checkpoints: list[Path] = field(default_factory=list)
    how: str = ""
    guessed: bool = False  # ordered by file times that say nothing (a copy, a checkout)


def _mtime(path: Path) -> float:
    """When a checkpoint was finished: its newest file's modification time."""
    if path.is_file():
        return path.stat().st_mtime
    times = [p.stat().st_mtime for p in path.iterdir() if p.is_file()]
    return max(times, default=path.stat().st_mtime)


def _has_weights(folder: Path) -> bool:
    """Whether a folder holds a model's weights by name (not any lone .safetensors file,
    which in a run root is as likely the eval data)."""
    from acctattr.runs.checkpoints import _FOLDER_FILES

    return any((folder / n).is_file() for n in _FOLDER_FILES)


def _is_weights_file(p: Path) -> bool:
    """A file that can be a start checkpoint: a state dict of floating tensors (data files
    hold integer labels or ids)."""
    if not p.is_file() or p.suffix not in _WEIGHT_SUFFIXES \
            or any(w in p.name for w in _NOT_WEIGHTS):
        return False
    if p.suffix != ".safetensors":
        return True
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception:
        return False
    return bool(dtypes) and dtypes <= {"F16", "BF16", "F32", "F64"}


def _lightning_name(ckpt: Path, top: Path) -> str:
    """A stage name for a .ckpt: its stem when the user named it, else the nearest folder
    that is not one Lightning made (checkpoints, lightning_logs, version_N)."""
    if not _LIGHTNING_AUTO.match(ckpt.stem) or not ckpt.stem:
        return ckpt.stem
    p = ckpt.parent
    while _LIGHTNING_DIRS.match(p.name) and p != top and p.parent != p:
        p = p.parent
    return p.name if not _LIGHTNING_DIRS.match(p.name) else ckpt.stem


def global_step(ckpt: Path) -> int:
    doc = load_torch_file(ckpt)
    step = doc.get("global_step") if isinstance(doc, dict) else None
    return step if isinstance(step, int) else 0


def _lightning_stages(files: list[Path], top: Path) -> list[FoundStage]:
    """Group .ckpt files by stage name; each group's largest global_step is its end."""
    groups: dict[str, list[Path]] = {}
    for f in sorted(files):
        groups.setdefault(_lightning_name(f, top), []).append(f)
    out = []
    for name, group in groups.items():
        by_step: dict[int, Path] = {}
        # for equal steps keep the auto-named file over last.ckpt, then the newer one
        for f in sorted(group, key=lambda f: (f.stem.startswith("last"), -_mtime(f))):
            by_step.setdefault(global_step(f), f)
        steps = sorted(by_step)
        out.append(FoundStage(name, by_step[steps[-1]], "lightning",
                          [by_step[s] for s in steps[:-1] if s > 0],
                          f"Lightning checkpoint {by_step[steps[-1]].name}"))
    return out


def _trainer_stage(folder: Path, name: str) -> FoundStage:
    ckpts = formats.trainer_checkpoints(folder)
    end = ckpts[-1][1]
    if (folder / formats.TRAINER_STATE).is_file() and _has_weights(folder):
        try:  # a final save_model()/save_state() beyond the last checkpoint
            if formats.read_trainer_state(folder).global_step > ckpts[-1][0]:
                end = folder
        except formats.FormatError:
            pass
    k = formats.kind(end)
    inner = [p for _, p in ckpts if p != end] if k == "hf-trainer" else []
    return FoundStage(name, end, k, inner,
                  f"Trainer output_dir, {len(ckpts)} checkpoint folder(s), end {end.name}")


def stages_in(path: Path, top: bool) -> tuple[list[FoundStage], list[Path]]:
    """The stages a path holds, and the plain-weight checkpoints that could be a start."""
    k = formats.kind(path)
    if k == "missing":
        raise AcctattrError(f"acctattr init: {path} not found")
    if k == "dcp":
        raise CheckpointError(f"acctattr init: {path} is a torch.distributed.checkpoint "
                              "folder", formats.DCP_HINT.format(src=path, dst=f"{path}.pt"))
    if path.is_file():
        if k == "lightning":
            return _lightning_stages([path], Path(path.resolve().anchor)), []
        return [FoundStage(path.stem, path, k)], []
    name = path.name
    if re.fullmatch(r"checkpoint-\d+", name):  # a Trainer checkpoint names its run
        name = path.parent.name
    if formats.trainer_checkpoints(path):
        return [_trainer_stage(path, name)], []
    if k in ("peft-adapter", "hf-trainer", "hf-model") or _has_weights(path):
        return [FoundStage(name, path, k)], []
    files = sorted(p for p in path.iterdir() if p.is_file())
    subs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    stages: list[FoundStage] = []
    starts = [p for p in files if _is_weights_file(p)]
    nested = [p for p in path.rglob("*.ckpt") if p.is_file()]
    if nested and not any(formats.trainer_checkpoints(s) for s in subs):
        # a folder of Lightning checkpoints: one stage per run folder or user-named file
        stages = _lightning_stages(nested, path)
    elif top:
        for sub in subs:
            found, _ = stages_in(sub, top=False)
            for st in found:
                if st.kind in ("hf-model", "weights") and not _has_state(st.end):
                    starts.append(st.end)
                else:
                    stages.append(st)
        stages += _lightning_stages([f for f in files if f.suffix == ".ckpt"], path)
    if not stages and top and len(starts) > 1:
        # only plain weights (save_pretrained / save_model folders): the oldest is the start
        starts.sort(key=lambda q: (_mtime(q), q.name))
        stages = [FoundStage(q.stem if q.is_file() else q.name, q, formats.kind(q))
                  for q in starts[1:]]
        starts = starts[:1]
    if not stages:
        lone = sorted(path.glob("*.safetensors"))
        if len(lone) == 1 and not subs:
            return [FoundStage(name, path, "weights")], []
        if not top:
            return [], []
        raise AcctattrError(
            f"acctattr init: found no checkpoints to draft stages from in {path} "
            f"({formats.describe_folder(path)})",
            "name each stage's end checkpoint (a Trainer output_dir or checkpoint-N folder, "
            "a PEFT adapter folder, a Lightning .ckpt, a folder of weights)")
    if len(stages) > 1:
        numbers = [_number(st.name) for st in stages]
        if None not in numbers and len(set(numbers)) == len(numbers):
            order = "by the numbers in their names"
            stages.sort(key=lambda st: _number(st.name) or 0)
        else:
            order = "by when each last checkpoint was written"
            times = [_mtime(st.end) for st in stages]
            stages.sort(key=lambda st: (_mtime(st.end), st.name))
            if max(times) - min(times) < 2.0:
                for st in stages:
                    st.guessed = True
                order += (", but those times are within 2 s of each other (a copy or a "
                          "checkout?): the order is a guess, put the stages in training order")
        for st in stages:
            st.how = (st.how or formats.kind(st.end)) + \
                f" (one of {len(stages)} stages in {path.name}/, ordered {order})"
    return stages, starts


def _fingerprint(path: Path) -> dict[str, Any] | None:
    """A few thousand weights of a checkpoint (the first elements of its first floating
    tensors by name), to tell which checkpoint another started from; None if unreadable."""
    import torch

    from acctattr.runs.checkpoints import open_checkpoint

    try:
        reader = open_checkpoint(path)
        out = {}
        for name in sorted(reader.names())[:64]:
            t = reader.get(name, check_finite=False)
            if t.is_floating_point():
                out[name] = t.reshape(-1)[:4096].to(torch.float64).clone()
        return out or None
    except (CheckpointError, OSError, RuntimeError):
        return None


def chain(stages: list[FoundStage], start: Path) -> list[FoundStage] | None:
    """Stages in training order by their weights: from the start, each next stage is the one
    whose earliest checkpoint (first intermediate, else its end) is nearest to the current
    end. None when a stage is not plain weights or a checkpoint cannot be read."""
    if any(st.kind not in ("hf-trainer", "hf-model", "weights") for st in stages):
        return None
    current = _fingerprint(start)
    firsts = {id(st): _fingerprint(st.checkpoints[0] if st.checkpoints else st.end)
              for st in stages}
    ends = {id(st): _fingerprint(st.end) for st in stages}
    if current is None or any(v is None for v in [*firsts.values(), *ends.values()]):
        return None

    def distance(a: dict[str, Any], b: dict[str, Any]) -> float:
        keys = sorted(set(a) & set(b))
        if not keys or any(a[k].shape != b[k].shape for k in keys):
            return float("inf")
        return float(sum(((a[k] - b[k]) ** 2).sum() for k in keys))

    left, out = list(stages), []
    while left:
        fp = current
        best = min(left, key=lambda st: distance(fp, firsts[id(st)]))  # type: ignore[arg-type]
        out.append(best)
        left.remove(best)
        current = ends[id(best)]
    return out


def _number(name: str) -> int | None:
    """The number a stage folder is named by (01-pretrain, stage2), if any."""
    found = re.search(r"\d+", name)
    return int(found.group()) if found else None


_START_NAMES = re.compile(r"(init|base|start|pretrained|original|before)", re.IGNORECASE)


def pick_start(starts: list[Path]) -> Path | None:
    """The run root's start checkpoint among plain-weight candidates: the only one; else the
    only one named like a start (init, base, ...); else the only folder (a loose float
    .safetensors file may be data)."""
    if len(starts) == 1:
        return starts[0]
    for pick in ([q for q in starts if _START_NAMES.search(q.name)],
                 [q for q in starts if q.is_dir()]):
        if len(pick) == 1:
            return pick[0]
    return None


def _has_state(end: Path) -> bool:
    folder = end if end.is_dir() else end.parent
    return end.is_dir() and (folder / "optimizer.pt").is_file()

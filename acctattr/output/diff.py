"""Comparing two result JSONs (SPEC section 5) stage by stage and group by group.

Pure Python: reads the documents ``acctattr run --format json`` writes, matches stages by
name, and says how each stage's effect and harm moved. Rendering lives in report.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acctattr.errors import AcctattrError

EFFECTS_SCHEMA = "acctattr.effects/1"
_HINT = "pass files written by `acctattr run --format json` (schema acctattr.effects/1)"


@dataclass(frozen=True)
class StageDoc:
    """One stage as read from a result JSON."""

    name: str
    effect: float
    verdict: str
    effect_se: float  # NaN when the file has none (older files) or it was undefined
    groups: dict[str, float] | None


@dataclass(frozen=True)
class ResultDoc:
    """The parts of a result JSON that a diff needs."""

    path: str
    metric: str
    higher_is_better: bool
    estimator: str
    evaluate: str
    n_examples: int
    final_value: float
    stages: tuple[StageDoc, ...]  # in the file's order (ranked)

    def harm(self, effect: float) -> float:
        return -effect if self.higher_is_better else effect


@dataclass(frozen=True)
class GroupChange:
    old: float | None  # None: the group is absent on that side
    new: float | None
    change: float | None  # new − old, when both exist


@dataclass(frozen=True)
class StageChange:
    """A stage present in both results."""

    name: str
    old_effect: float
    new_effect: float
    change: float  # new − old effect
    harm_growth: float  # harm(new) − harm(old): > 0 means the stage now hurts more
    old_verdict: str
    new_verdict: str
    old_se: float
    new_se: float
    groups: dict[str, GroupChange] | None


@dataclass(frozen=True)
class Diff:
    """Everything a diff report needs."""

    old: ResultDoc
    new: ResultDoc
    stages: tuple[StageChange, ...]  # largest harm growth first
    only_old: tuple[StageDoc, ...]  # stages only in OLD (removed)
    only_new: tuple[StageDoc, ...]  # stages only in NEW (added; never gated)
    warnings: tuple[str, ...]
    threshold: float | None = None  # --fail-on-growth

    @property
    def metric(self) -> str:
        return self.new.metric

    @property
    def worst(self) -> StageChange | None:
        """The stage whose harm grew the most (None when no stage is in both)."""
        return self.stages[0] if self.stages else None

    @property
    def undefined(self) -> tuple[StageChange, ...]:
        """Stages in both results whose harm growth is NaN or infinite (an effect written as
        null): a gate cannot show they stayed below the threshold, so it trips on them."""
        return tuple(c for c in self.stages if not math.isfinite(c.harm_growth))

    @property
    def tripped(self) -> bool:
        w = self.worst
        if self.threshold is None or w is None:
            return False
        return bool(self.undefined) or w.harm_growth > self.threshold


def _bad(path: str, what: str) -> AcctattrError:
    return AcctattrError(f"{path}: {what}", _HINT)


def _number(path: str, where: str, x: Any, nullable: bool = True) -> float:
    if x is None and nullable:
        return math.nan  # report._num writes NaN and infinities as null
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise _bad(path, f"{where} is {json.dumps(x)[:40]}, not a number")
    return float(x)


def parse(doc: Any, path: str) -> ResultDoc:
    """Validate a decoded result JSON; raise AcctattrError naming the first bad field."""
    if not isinstance(doc, dict):
        raise _bad(path, f"the top level is a JSON {type(doc).__name__}, not an object")
    schema = doc.get("schema")
    if schema != EFFECTS_SCHEMA:
        raise _bad(path, f"schema is {json.dumps(schema)}, expected \"{EFFECTS_SCHEMA}\"")
    metric, est = doc.get("metric"), doc.get("estimator")
    if not (isinstance(metric, dict) and isinstance(metric.get("name"), str)
            and isinstance(metric.get("higher_is_better"), bool)):
        raise _bad(path, "metric must be {\"name\": str, \"higher_is_better\": bool}")
    if not (isinstance(est, dict) and isinstance(est.get("name"), str)
            and isinstance(est.get("evaluate"), str)):
        raise _bad(path, "estimator must be {\"name\": str, \"evaluate\": str}")
    n = doc.get("n_examples")
    if isinstance(n, bool) or not isinstance(n, int):
        raise _bad(path, "n_examples must be an integer")
    final = _number(path, "final_value", doc.get("final_value"))
    raw = doc.get("stages")
    if not isinstance(raw, list):
        raise _bad(path, "stages must be a list")
    stages: list[StageDoc] = []
    seen: set[str] = set()
    for i, s in enumerate(raw):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str):
            raise _bad(path, f"stages[{i}] must be an object with a string name")
        name = s["name"]
        if name in seen:
            raise _bad(path, f"stage '{name}' appears twice")
        seen.add(name)
        where = f"stage '{name}'"
        if "effect" not in s:
            raise _bad(path, f"{where} has no effect")
        groups = s.get("groups")
        if groups is not None and not isinstance(groups, dict):
            raise _bad(path, f"{where}: groups must be an object")
        stages.append(StageDoc(
            name=name,
            effect=_number(path, f"{where}: effect", s["effect"]),
            verdict=str(s.get("verdict", "")),
            effect_se=_number(path, f"{where}: effect_se", s.get("effect_se")),
            groups=None if groups is None else {
                str(g): _number(path, f"{where}: groups.{g}", v) for g, v in groups.items()},
        ))
    return ResultDoc(path, metric["name"], metric["higher_is_better"], est["name"],
                     est["evaluate"], n, final, tuple(stages))


def load(path: str | Path) -> ResultDoc:
    """Read and validate a result JSON file (exit 2 on anything unreadable or off-schema)."""
    shown = str(path)
    from acctattr.files import check_file, path_problem

    if path_problem(path, "any") not in (None, "not found"):
        check_file(path)  # a FIFO, device, symlink loop, NUL byte or too long a name
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise AcctattrError(f"{shown}: file not found", _HINT) from e
    except IsADirectoryError as e:
        raise AcctattrError(f"{shown}: is a folder, not a result JSON file", _HINT) from e
    except (OSError, UnicodeDecodeError) as e:
        raise AcctattrError(f"{shown}: cannot read the file ({e})", _HINT) from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(shown, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") \
            from e
    except RecursionError as e:
        raise _bad(shown, "not valid JSON (nested too deeply)") from e
    try:
        return parse(doc, shown)
    except RecursionError as e:
        raise _bad(shown, "nested too deeply") from e


def compare(old: ResultDoc, new: ResultDoc, threshold: float | None = None) -> Diff:
    """Match stages by name and measure how each one's effect and harm moved."""
    if (old.metric, old.higher_is_better) != (new.metric, new.higher_is_better):
        def say(d: ResultDoc) -> str:
            return f"{d.metric} ({'higher' if d.higher_is_better else 'lower'} is better)"
        raise AcctattrError(
            f"{old.path} measures {say(old)} but {new.path} measures {say(new)}",
            "effects on different metrics are in different units; compare results of the "
            "same eval metric")
    if threshold is not None and not math.isfinite(threshold):
        raise AcctattrError(f"--fail-on-growth {threshold}: must be a finite number")
    warnings = []
    if (old.estimator, old.evaluate) != (new.estimator, new.evaluate):
        warnings.append(f"the results come from different estimators (old {old.estimator}/"
                        f"{old.evaluate}, new {new.estimator}/{new.evaluate}); part of every "
                        "change is the estimator's")
    if old.n_examples != new.n_examples:
        warnings.append(f"the eval sets differ in size (old {old.n_examples}, new "
                        f"{new.n_examples} examples); effects are means over different sets")
    olds = {s.name: s for s in old.stages}
    news = {s.name: s for s in new.stages}
    changes = []
    for s in new.stages:
        o = olds.get(s.name)
        if o is None:
            continue
        groups = None
        if o.groups is not None or s.groups is not None:
            og, ng = o.groups or {}, s.groups or {}
            groups = {g: GroupChange(og.get(g), ng.get(g),
                                     ng[g] - og[g] if g in og and g in ng else None)
                      for g in sorted(set(og) | set(ng))}
        changes.append(StageChange(
            name=s.name, old_effect=o.effect, new_effect=s.effect,
            change=s.effect - o.effect, harm_growth=new.harm(s.effect) - old.harm(o.effect),
            old_verdict=o.verdict, new_verdict=s.verdict, old_se=o.effect_se,
            new_se=s.effect_se, groups=groups))
    changes.sort(key=lambda c: (-c.harm_growth if not math.isnan(c.harm_growth) else math.inf,
                                c.name))
    return Diff(old, new, tuple(changes),
                only_old=tuple(s for s in old.stages if s.name not in news),
                only_new=tuple(s for s in new.stages if s.name not in olds),
                warnings=tuple(warnings), threshold=threshold)

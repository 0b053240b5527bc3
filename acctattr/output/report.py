"""Rendering results: the rich table, JSON (SPEC section 5), markdown, diffs.

With progress.py, the only module that imports rich. Depends on the result dataclasses
only (Result, Gate, Diff). Plots live in plots.py so that matplotlib stays an optional extra.
"""

from __future__ import annotations

import json
from io import StringIO
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from acctattr.output.text import printable
from acctattr.results import Result, StageEffect, Validation

if TYPE_CHECKING:
    from acctattr.output.diff import Diff, StageDoc
    from acctattr.output.gates import Gate, GateCheck

SCHEMA = "acctattr.effects/1"
DIFF_SCHEMA = "acctattr.diff/1"
_BAR = 12


def _num(x: float) -> float | None:
    """Stable float formatting: 10 significant digits, so noise below that never shows."""
    if x != x or x in (float("inf"), float("-inf")):
        return None
    return float(f"{x:.10g}")


def to_dict(result: Result, gate: Gate | None = None) -> dict[str, Any]:
    """The JSON document as an ordered dict (field order is part of the contract).

    Fields added after SPEC section 5 come after the ones it fixes: per stage
    ``effect_se``, ``groups_se`` (with groups), ``position``, ``evaluate`` and
    ``out_of_range``; at the end ``gate`` (when asked) and ``warnings`` (when any).
    """
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "metric": {"name": result.metric, "higher_is_better": result.higher_is_better},
        "estimator": {"name": result.estimator, "evaluate": result.evaluate,
                      **({"reason": result.estimator_note} if result.estimator_note else {})},
        "n_examples": result.n_examples,
        "final_value": _num(result.final_value),
        "stages": [],
    }
    for s in result.stages:
        row: dict[str, Any] = {
            "name": s.name, "rank": s.rank, "effect": _num(s.effect), "verdict": s.verdict,
            "share": _num(s.share), "counterfactual_value": _num(s.counterfactual_value),
        }
        if s.groups is not None:
            row["groups"] = {g: _num(v) for g, v in s.groups.items()}
        row["effect_se"] = _num(s.effect_se)
        if s.groups_se is not None:
            row["groups_se"] = {g: _num(v) for g, v in s.groups_se.items()}
        row["position"] = s.position
        row["evaluate"] = s.evaluate
        row["out_of_range"] = s.out_of_range
        doc["stages"].append(row)
    if result.examples is not None:
        doc["examples"] = [
            {"index": e.index, **({"group": e.group} if e.group is not None else {}),
             "effects": {k: _num(v) for k, v in e.effects.items()}}
            for e in result.examples
        ]
    if gate is not None:
        doc["gate"] = gate_dict(gate)
    if result.warnings:
        doc["warnings"] = list(result.warnings)
    return doc


def _check_dict(c: GateCheck) -> dict[str, Any]:
    doc = {"stage": c.stage, "group": c.group, "harm": _num(c.harm), "se": _num(c.se),
           "bound": _num(c.bound), "tripped": c.tripped}
    if c.reason is not None:  # fail closed: the check tripped on undefined numbers
        doc["reason"] = c.reason
    return doc


def gate_dict(gate: Gate) -> dict[str, Any]:
    """The ``gate`` object: what was asked, the deciding check, and every check."""
    return {
        "threshold": _num(gate.threshold), "confidence": _num(gate.confidence),
        "z": _num(gate.z), "stage": gate.stage, "group": gate.group,
        "tripped": gate.tripped, "worst": _check_dict(gate.worst),
        "checks": [_check_dict(c) for c in gate.checks],
    }


def to_json(result: Result, gate: Gate | None = None) -> str:
    return json.dumps(to_dict(result, gate), indent=2, allow_nan=False) + "\n"


def _evaluation_text(result: Result) -> str:
    """'evaluation linear (the last stage direct, which is exact there)' and the like."""
    used = {s.evaluate for s in result.stages if s.evaluate}
    if used <= {result.evaluate}:
        return f"evaluation {result.evaluate}"
    return f"evaluation {result.evaluate} (the last stage direct, which is exact there)"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:+.4g}"


def _se(x: float | None) -> str:
    """A standard error, two significant digits ("n/a" when undefined)."""
    return "n/a" if x is None or x != x else f"{x:.2g}"


def _direction(higher_is_better: bool) -> str:
    return "higher is better" if higher_is_better else "lower is better"


def _group_names(result: Result) -> list[str]:
    return list(result.stages[0].groups or {}) if result.stages else []


def _group_cell(s: StageEffect, g: str) -> str:
    se = (s.groups_se or {}).get(g)
    return f"{_fmt((s.groups or {})[g])} ±{_se(se)}"


def _bar(share: float) -> str:
    """The share as a bar of up to _BAR blocks; none where the share shows as 0%."""
    if f"{share:.0%}" == "0%":
        return ""
    return "█" * max(1, round(share * _BAR))


def _num_column(table: Table, header: str, cells: list[str]) -> None:
    """A right-aligned number column that a narrow terminal can never cut or wrap."""
    width = max([len(header), *(len(c) for c in cells)])
    table.add_column(header, justify="right", no_wrap=True, min_width=width)


def to_table(result: Result, *, color: bool | None = None, width: int | None = None) -> str:
    """The ranked table as text (ANSI colours only when ``color`` and a terminal allow).

    Numbers are never cut: where the table does not fit ``width``, the share bar goes
    first, then the per-group effects move to a table of their own below."""
    direction = _direction(result.higher_is_better)
    title = (f"Stage effects on {printable(result.metric)} ({direction}): final "
             f"{result.final_value:.4g} over {result.n_examples} examples")
    caption = (f"estimator {result.estimator}, {_evaluation_text(result)}. effect = "
               "final value minus the value had the stage never run; ± one standard "
               "error over eval examples")
    group_names = _group_names(result)
    layouts = [(True, True), (False, True)]
    if group_names:
        layouts += [(True, False), (False, False)]
    tables: list[Table] = []
    for bar, inline in layouts:
        tables = _stage_tables(result, title, caption, group_names, bar, inline)
        if width is None or all(_natural(t) <= width for t in tables):
            break
    return "".join(_render(t, color, width) for t in tables)


def _natural(table: Table) -> int:
    return Console(file=StringIO(), width=1000, markup=False).measure(table).maximum


def _stage_tables(result: Result, title: str, caption: str, group_names: list[str],
                  bar: bool, inline: bool) -> list[Table]:
    table = Table(title=title, caption=caption)
    stages = result.stages
    _num_column(table, "rank", [str(s.rank) for s in stages])
    # a stage's name is never cut, however narrow the terminal
    table.add_column("stage", no_wrap=True,
                     min_width=max((len(printable(s.name)) for s in stages), default=5))
    _num_column(table, "effect", [_fmt(s.effect) for s in stages])
    _num_column(table, "±", [_se(s.effect_se) for s in stages])
    _num_column(table, "share", [f"{s.share:.0%}" for s in stages])
    table.add_column("verdict", no_wrap=True)
    if bar:
        table.add_column("", no_wrap=True)
    if inline:
        for g in group_names:
            _num_column(table, f"group {printable(g)}", [_group_cell(s, g) for s in stages])
    for s in stages:
        style = {"hurt": "red", "helped": "green"}.get(s.verdict, "")
        cells: list[str | Text] = [str(s.rank), printable(s.name), _fmt(s.effect),
                                   _se(s.effect_se),
                                   f"{s.share:.0%}", Text(s.verdict, style=style)]
        if bar:
            cells.append(Text(_bar(s.share), style=style))
        if inline:
            cells += [_group_cell(s, g) for g in group_names]
        table.add_row(*cells)
    if inline or not group_names:
        return [table]
    groups = Table(title="Effects by eval group (± one standard error)")
    groups.add_column("stage", no_wrap=True,
                      min_width=max((len(printable(s.name)) for s in stages), default=5))
    for g in group_names:
        _num_column(groups, f"group {printable(g)}", [_group_cell(s, g) for s in stages])
    for s in stages:
        groups.add_row(printable(s.name), *[_group_cell(s, g) for g in group_names])
    return [table, groups]


def _render(table: Table, color: bool | None, width: int | None) -> str:
    """The table as text at its natural width (no wrapped cells), at most ``width``."""
    natural = _natural(table)
    buf = StringIO()
    console = Console(file=buf, force_terminal=bool(color), no_color=not color,
                      width=min(natural, width) if width else natural, highlight=False,
                      markup=False)  # user strings ('[red]' in a stage name) stay text
    console.print(table)
    return buf.getvalue()


# ---------------------------------------------------------------- markdown

def _md_cell(text: str) -> str:
    """A table cell: pipes escaped, newlines flattened, controls shown as escapes and
    ``<`` ``>`` as entities, so no name becomes HTML (GitHub-flavoured markdown)."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return printable(text).replace("<", "&lt;").replace(">", "&gt;")


def _md_table(header: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    """GFM table lines; ``align`` holds "l" or "r" per column."""
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


def _md_verdict(verdict: str) -> str:
    return f"**{verdict}**" if verdict == "hurt" else verdict


def md_gate_line(text: str, tripped: bool) -> str:
    return f"{'❌' if tripped else '✅'} **{text}**"


def to_markdown(result: Result, gate: Gate | None = None) -> str:
    """A GitHub-flavoured report: heading, ranked table with ± and verdicts, gate outcome.

    Made for a pull-request comment or ``$GITHUB_STEP_SUMMARY``.
    """
    from acctattr.output.gates import describe

    groups = _group_names(result)
    header = ["rank", "stage", "effect", "±", "share", "verdict"]
    header += [f"group {g}" for g in groups]
    align = ["r", "l", "r", "r", "r", "l"] + ["r"] * len(groups)
    rows = []
    for s in result.stages:
        row = [str(s.rank), s.name, _fmt(s.effect), _se(s.effect_se), f"{s.share:.0%}",
               _md_verdict(s.verdict)]
        row += [_group_cell(s, g) for g in groups]
        rows.append(row)
    out = [f"### Stage effects on {_md_cell(result.metric)} "
           f"({_direction(result.higher_is_better)})",
           "",
           f"Final value **{result.final_value:.4g}** over {result.n_examples} examples; "
           f"estimator `{result.estimator}`, {_evaluation_text(result)}. "
           "effect = final value minus the value had the stage never run; "
           "± = one standard error over eval examples.",
           "", *_md_table(header, align, rows)]
    if gate is not None:
        out += ["", md_gate_line(_md_cell(describe(gate, result.metric)), gate.tripped)]
    for w in result.warnings:
        out += ["", f"> warning: {_md_cell(w)}"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- diff

def _stage_doc(s: StageDoc) -> dict[str, Any]:
    return {"name": s.name, "effect": _num(s.effect), "verdict": s.verdict}


def diff_dict(d: Diff) -> dict[str, Any]:
    """The diff as an ordered dict (``"schema": "acctattr.diff/1"``)."""
    side = {
        k: {"path": r.path, "estimator": {"name": r.estimator, "evaluate": r.evaluate},
            "n_examples": r.n_examples, "final_value": _num(r.final_value)}
        for k, r in (("old", d.old), ("new", d.new))
    }
    doc: dict[str, Any] = {
        "schema": DIFF_SCHEMA,
        "metric": {"name": d.new.metric, "higher_is_better": d.new.higher_is_better},
        **side,
        "final_value_change": _num(d.new.final_value - d.old.final_value),
        "stages": [],
        "only_old": [_stage_doc(s) for s in d.only_old],
        "only_new": [_stage_doc(s) for s in d.only_new],
    }
    for c in d.stages:
        row: dict[str, Any] = {
            "name": c.name, "old_effect": _num(c.old_effect), "new_effect": _num(c.new_effect),
            "change": _num(c.change), "harm_growth": _num(c.harm_growth),
            "old_verdict": c.old_verdict, "new_verdict": c.new_verdict,
            "old_se": _num(c.old_se), "new_se": _num(c.new_se),
        }
        if c.groups is not None:
            row["groups"] = {g: {"old": None if v.old is None else _num(v.old),
                                 "new": None if v.new is None else _num(v.new),
                                 "change": None if v.change is None else _num(v.change)}
                             for g, v in c.groups.items()}
        doc["stages"].append(row)
    if d.threshold is not None:
        w = d.worst
        doc["gate"] = {"threshold": _num(d.threshold), "tripped": d.tripped,
                       "stage": None if w is None else w.name,
                       "harm_growth": None if w is None else _num(w.harm_growth)}
        if d.undefined:  # fail closed: the gate tripped on a stage it could not check
            doc["gate"]["stage"] = d.undefined[0].name
            doc["gate"]["harm_growth"] = None
            doc["gate"]["reason"] = (f"stage '{d.undefined[0].name}' has an undefined "
                                     "effect in the old or new result")
    return doc


def diff_to_json(d: Diff) -> str:
    return json.dumps(diff_dict(d), indent=2, allow_nan=False) + "\n"


def describe_growth(d: Diff) -> str:
    """The --fail-on-growth outcome in words."""
    w = d.worst
    if w is None:
        return (f"gate passed: no stage is in both results, so no harm could grow by more "
                f"than {d.threshold:g}")
    if d.tripped and d.undefined:
        u = d.undefined[0]
        return (f"gate tripped (fail closed): stage '{printable(u.name)}': its effect is "
                f"undefined (null, NaN or infinite) in the old or new result, so the growth "
                f"of its harm is unknown; a gate cannot pass on numbers it cannot check")
    if d.tripped:
        more = sum(c.harm_growth > (d.threshold or 0) for c in d.stages) - 1
        extra = f" (and {more} more)" if more else ""
        return (f"gate tripped: stage '{w.name}' now makes {d.metric} worse by "
                f"{w.harm_growth:+.4g} more than before (> {d.threshold:g}){extra}")
    return (f"gate passed: no stage's harm to {d.metric} grew by more than {d.threshold:g} "
            f"(largest: '{w.name}', {w.harm_growth:+.4g})")


def _diff_rows(d: Diff, groups: list[str]) -> list[list[str]]:
    rows = []
    for c in d.stages:
        verdict = c.new_verdict if c.old_verdict == c.new_verdict else \
            f"{c.old_verdict} → {c.new_verdict}"
        row = [printable(c.name), _fmt(c.old_effect), _fmt(c.new_effect), _fmt(c.change),
               _fmt(c.harm_growth), verdict]
        for g in groups:
            v = (c.groups or {}).get(g)
            row.append(_fmt(v.change) if v is not None and v.change is not None else "n/a")
        rows.append(row)
    for s in d.only_new:
        rows.append([printable(s.name), "—", _fmt(s.effect), "new stage", "", s.verdict]
                    + [""] * len(groups))
    for s in d.only_old:
        rows.append([printable(s.name), _fmt(s.effect), "—", "removed", "", s.verdict]
                    + [""] * len(groups))
    return rows


def _diff_groups(d: Diff) -> list[str]:
    return sorted({g for c in d.stages for g in (c.groups or {})})


_DIFF_HEADER = ["stage", "old effect", "new effect", "change", "harm growth", "verdict"]


def _diff_caption(d: Diff) -> str:
    return (f"final value {d.old.final_value:.4g} → {d.new.final_value:.4g} "
            f"({_fmt(d.new.final_value - d.old.final_value)}); harm growth > 0: the stage "
            "now makes the metric worse by that much more")


def diff_to_table(d: Diff, *, color: bool | None = None, width: int | None = None) -> str:
    """The diff as a rich table (largest harm growth first)."""
    groups = _diff_groups(d)
    table = Table(title=printable(f"Stage effects on {d.metric} "
                                  f"({_direction(d.new.higher_is_better)}): {d.old.path} → "
                                  f"{d.new.path}"), caption=_diff_caption(d))
    for i, h in enumerate(_DIFF_HEADER + [f"group {g} change" for g in groups]):
        table.add_column(h, justify="left" if i in (0, 5) else "right")
    for row in _diff_rows(d, groups):
        grew = row[4].startswith("+") and row[4] != "+0"
        table.add_row(*row, style="red" if grew and color else None)
    return _render(table, color, width)


def diff_to_markdown(d: Diff) -> str:
    """The diff as a GitHub-flavoured table, with the gate outcome when one was asked."""
    groups = _diff_groups(d)
    header = _DIFF_HEADER + [f"group {g} change" for g in groups]
    align = ["l", "r", "r", "r", "r", "l"] + ["r"] * len(groups)
    out = [f"### Stage effects on {_md_cell(d.metric)} "
           f"({_direction(d.new.higher_is_better)}): "
           f"`{_md_cell(str(d.old.path))}` → `{_md_cell(str(d.new.path))}`", "",
           _diff_caption(d) + ".", "",
           *_md_table(header, align, _diff_rows(d, groups))]
    if d.threshold is not None:
        out += ["", md_gate_line(describe_growth(d), d.tripped)]
    for w in d.warnings:
        out += ["", f"> warning: {w}"]
    return "\n".join(out) + "\n"


def validation_dict(v: Validation) -> dict[str, Any]:
    return {
        "schema": "acctattr.validation/1",
        "metric": v.metric,
        "n_examples": v.n_examples,
        "replay": v.replay,
        "retrain_seconds": _num(v.retrain_seconds),
        "results": [
            {"estimator": f.estimator, "evaluate": f.evaluate, "ranking_ok": f.ranking_ok,
             "seconds": _num(f.seconds) if f.seconds is not None else None,
             "stages": [{"name": s.stage, "pearson": _num(s.pearson),
                         "spearman": _num(s.spearman), "effect": _num(s.effect),
                         "true_effect": _num(s.true_effect), "sign_ok": s.sign_ok}
                        for s in f.stages]}
            for f in v.results],
    }


def validation_to_json(v: Validation) -> str:
    return json.dumps(validation_dict(v), indent=2, allow_nan=False) + "\n"


def validation_to_table(v: Validation, *, color: bool | None = None,
                        width: int | None = None) -> str:
    """One row per (estimator, evaluation, stage): correlations, effects, sign, ranking."""
    table = Table(title=printable(f"Fidelity against retraining ({v.replay}) on {v.metric}, "
                                  f"{v.n_examples} examples"),
                  caption=f"retraining every counterfactual took {v.retrain_seconds:.1f} s; "
                          "seconds = estimator time for all stages")
    for col, just in (("estimator", "left"), ("evaluate", "left"), ("stage", "left"),
                      ("pearson", "right"), ("spearman", "right"), ("effect", "right"),
                      ("truth", "right"), ("sign", "left"), ("ranking", "left"),
                      ("seconds", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for f in v.results:
        for i, s in enumerate(f.stages):
            first = i == 0
            table.add_row(f.estimator if first else "", f.evaluate if first else "",
                          printable(s.stage),
                          f"{s.pearson:.3f}", f"{s.spearman:.3f}", _fmt(s.effect),
                          _fmt(s.true_effect), "ok" if s.sign_ok else "WRONG",
                          ("ok" if f.ranking_ok else "WRONG") if first else "",
                          f"{f.seconds:.2f}" if first and f.seconds is not None else "")
        table.add_section()
    return _render(table, color, width)


# ---------------------------------------------------------------- several behaviours

SCHEMA_BEHAVIOURS = "acctattr.effects/2"


def _behaviours(result: Result) -> list[tuple[str, Result]]:
    return list(result.behaviours or [("eval", result)])


def _training_order(result: Result) -> list[StageEffect]:
    return sorted(result.stages, key=lambda s: s.position)


def behaviours_to_dict(result: Result, gates: dict[str, Gate] | None = None,
                       gate_behaviour: str | None = None) -> dict[str, Any]:
    """Several behaviours (``evals:``) as one ``acctattr.effects/2`` document: the estimator,
    ``behaviours`` (name -> that behaviour's ``acctattr.effects/1`` document, exactly as a
    run with that eval section alone would write it, its gate inside), ``summary`` (per stage
    in training order, its effect and verdict on each behaviour) and, when a gate was asked,
    ``gate`` (the behaviour asked, null: all; tripped on any)."""
    first = to_dict(result)
    doc: dict[str, Any] = {
        "schema": SCHEMA_BEHAVIOURS,
        "estimator": first["estimator"],
        "behaviours": {name: to_dict(r, (gates or {}).get(name))
                       for name, r in _behaviours(result)},
        "summary": [],
    }
    by_name = {name: {s.name: s for s in r.stages} for name, r in _behaviours(result)}
    for s in _training_order(result):
        doc["summary"].append({
            "stage": s.name, "position": s.position,
            "effects": {b: _num(by_name[b][s.name].effect) for b in by_name},
            "verdicts": {b: by_name[b][s.name].verdict for b in by_name}})
    if gates:
        doc["gate"] = {"behaviour": gate_behaviour,
                       "tripped": any(g.tripped for g in gates.values())}
    return doc


def behaviours_to_json(result: Result, gates: dict[str, Gate] | None = None,
                       gate_behaviour: str | None = None) -> str:
    return json.dumps(behaviours_to_dict(result, gates, gate_behaviour), indent=2,
                      allow_nan=False) + "\n"


def behaviours_to_table(result: Result, *, color: bool | None = None,
                        width: int | None = None) -> str:
    """One ranked table per behaviour (headed by its name), then a stage × behaviour
    summary: each stage's effect and verdict on each behaviour, in training order."""
    parts = []
    for name, r in _behaviours(result):
        parts.append(f"behaviour {name}\n" + to_table(r, color=color, width=width))
    table = Table(title="Stage × behaviour: effect (verdict)",
                  caption="effect = final value minus the value had the stage never run, "
                          "in each behaviour's metric")
    table.add_column("stage", no_wrap=True)
    for name, r in _behaviours(result):
        table.add_column(f"{name}\n{r.metric} ({_direction(r.higher_is_better)})",
                         justify="right")
    by_name = [{s.name: s for s in r.stages} for _, r in _behaviours(result)]
    for s in _training_order(result):
        cells: list[str | Text] = [s.name]
        for stages in by_name:
            e = stages[s.name]
            style = {"hurt": "red", "helped": "green"}.get(e.verdict, "")
            cells.append(Text(f"{_fmt(e.effect)} ({e.verdict})", style=style))
        table.add_row(*cells)
    parts.append(_render(table, color, width))
    return "\n".join(parts)


def behaviours_to_markdown(result: Result, gates: dict[str, Gate] | None = None) -> str:
    """Each behaviour's markdown report under its name, then the stage × behaviour table."""
    out = []
    for name, r in _behaviours(result):
        out.append(f"## Behaviour `{name}`\n\n" + to_markdown(r, (gates or {}).get(name)))
    names = [n for n, _ in _behaviours(result)]
    by_name = [{s.name: s for s in r.stages} for _, r in _behaviours(result)]
    rows = [[s.name, *(f"{_fmt(st[s.name].effect)} ({_md_verdict(st[s.name].verdict)})"
                       for st in by_name)] for s in _training_order(result)]
    out.append("\n".join(["### Stage × behaviour", "",
                          *_md_table(["stage", *names], ["l"] + ["r"] * len(names), rows)])
               + "\n")
    return "\n".join(out)

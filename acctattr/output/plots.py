"""Figures of a Result (PNG or SVG), behind the optional extra ``acctattr[plot]``.

One figure: a waterfall on the left (each stage's bar runs from its counterfactual value,
the metric had the stage never run, to the final value), and, when the result has groups,
a stage × group heat map of effects on the right. matplotlib is imported only here and
only when a plot is asked for; it renders with the Agg backend (no display needed).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from acctattr.errors import AcctattrError
from acctattr.output.atomic import atomic_file
from acctattr.results import Result

SUFFIXES = (".png", ".svg")
DPI = 120
HURT, HELPED, NEUTRAL = "#c0392b", "#2e8b57", "#7f8c8d"
_INSTALL = "install the plot extra: pip install 'acctattr[plot]' (or pip install matplotlib)"


def check_target(path: Path) -> None:
    """Fail before any computing: a known suffix, an existing folder, matplotlib present."""
    if path.suffix.lower() not in SUFFIXES:
        raise AcctattrError(f"--plot {path}: unknown image type {path.suffix or '(none)'!r}",
                            "name a .png or .svg file")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise AcctattrError(f"--plot {path}: folder {folder} does not exist")
    _pyplot()


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise AcctattrError("--plot needs matplotlib, which is not installed", _INSTALL) from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_size(result: Result) -> tuple[float, float]:
    """(width, height) in inches: wider with groups, taller with more stages."""
    k = len(result.stages)
    groups = result.stages[0].groups if result.stages else None
    height = max(4.0, 1.6 + 0.55 * k)
    width = 7.0 if not groups else 7.0 + max(4.0, 0.9 * len(groups) + 2.5)
    return width, height


def _colour(result: Result, effect: float) -> str:
    harm = result.harm(effect)
    return HURT if harm > 0 else HELPED if harm < 0 else NEUTRAL


def _waterfall(ax: Any, result: Result, z: float) -> None:
    stages = sorted(result.stages, key=lambda s: (s.position, s.rank))  # training order
    final = result.final_value
    y = list(range(len(stages)))
    for i, s in enumerate(stages):
        cf = s.counterfactual_value
        ax.barh(i, s.effect, left=cf, height=0.55, color=_colour(result, s.effect),
                edgecolor="black", linewidth=0.6)
        if not math.isnan(s.effect_se) and s.effect_se > 0:
            ax.errorbar(cf, i, xerr=z * s.effect_se, fmt="none", ecolor="black",
                        capsize=4, linewidth=1)
        ax.plot([cf], [i], marker="o", color="black", markersize=4)
    ax.use_sticky_edges = False  # bars pin the view to their base; keep a margin
    ax.margins(x=0.12)
    lo, hi = ax.get_xlim()
    for i, s in enumerate(stages):
        # The effect's value inside its bar, or just outside the counterfactual end
        # (beyond the error bar) when the bar is too short to hold it.
        if abs(s.effect) > 0.12 * (hi - lo):
            ax.text(s.counterfactual_value + s.effect / 2, i, f"{s.effect:+.3g}", ha="center",
                    va="center", fontsize=9, color="white")
        else:
            out = -1 if s.effect > 0 else 1
            err = 0.0 if math.isnan(s.effect_se) else z * s.effect_se
            ax.text(s.counterfactual_value + out * (err + 0.01 * (hi - lo)), i,
                    f"{s.effect:+.3g}", ha="right" if out < 0 else "left", va="center",
                    fontsize=9)
    ax.axvline(final, color="black", linestyle="--", linewidth=1)
    ax.annotate(f"final {final:.4g}", xy=(final, 1.0), xycoords=("data", "axes fraction"),
                xytext=(3, -12), textcoords="offset points", fontsize=9)
    ax.set_yticks(y, [s.name for s in stages])
    ax.set_ylim(len(stages) - 0.4, -0.6)  # first stage on top
    ax.set_ylabel("stage (training order)")
    direction = "higher is better" if result.higher_is_better else "lower is better"
    ax.set_xlabel(f"{result.metric} ({direction})")
    ax.set_title("Had the stage never run (●) → final value", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(color=HURT, label="hurt"), Patch(color=HELPED, label="helped")]
    ax.legend(handles=handles, loc="best", fontsize=9, framealpha=0.9)


def _heatmap(fig: Any, ax: Any, result: Result) -> None:
    from matplotlib.colors import TwoSlopeNorm

    stages = sorted(result.stages, key=lambda s: (s.position, s.rank))
    groups = list(stages[0].groups or {})
    values = [[(s.groups or {})[g] for g in groups] for s in stages]
    peak = max((abs(v) for row in values for v in row if not math.isnan(v)), default=0.0)
    peak = peak or 1.0
    # Red is always "hurt": positive effects are harmful on a lower-is-better metric.
    cmap = "RdBu" if result.higher_is_better else "RdBu_r"
    image = ax.imshow(values, cmap=cmap, norm=TwoSlopeNorm(0.0, -peak, peak), aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:+.3g}", ha="center", va="center", fontsize=9,
                    color="white" if abs(v) > 0.6 * peak else "black")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yticks(range(len(stages)), [s.name for s in stages])
    ax.set_xlabel("eval group")
    ax.set_ylabel("stage (training order)")
    ax.set_title("Effect per group", fontsize=11)
    bar = fig.colorbar(image, ax=ax, shrink=0.9)
    bar.set_label(f"effect on {result.metric} (red: hurt)")


def render(result: Result, path: Path, confidence: float = 0.95) -> None:
    """Draw the figure and write it atomically to ``path`` (.png or .svg).

    Error bars on the counterfactual end span ± z_C standard errors of the effect.
    """
    check_target(path)
    if not result.stages:
        raise AcctattrError(f"--plot {path}: the result has no stages to draw")
    plt = _pyplot()
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)  # two-sided interval for the bars
    width, height = figure_size(result)
    has_groups = bool(result.stages[0].groups)
    fig = plt.figure(figsize=(width, height), dpi=DPI, layout="constrained")
    try:
        if has_groups:
            ax1, ax2 = fig.subplots(1, 2, width_ratios=[7.0, width - 7.0])
            _waterfall(ax1, result, z)
            _heatmap(fig, ax2, result)
        else:
            _waterfall(fig.subplots(), result, z)
        direction = "higher is better" if result.higher_is_better else "lower is better"
        fig.suptitle(f"Stage effects on {result.metric} ({direction})\n{result.n_examples} "
                     f"eval examples, estimator {result.estimator}; error bars: "
                     f"{confidence:.0%} interval over eval examples", fontsize=11)
        with warnings.catch_warnings():  # undefined (NaN) effects draw as gaps, silently
            warnings.simplefilter("ignore", RuntimeWarning)
            _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig: Any, path: Path) -> None:
    """Render to a temporary file in the target folder, then rename over ``path``."""
    with atomic_file(path, "--plot", binary=True) as fh:
        fig.savefig(fh, format=path.suffix.lower().lstrip("."), dpi=DPI,
                    metadata={"Software": None} if path.suffix.lower() == ".png" else
                    {"Date": None, "Creator": None})

"""The two figures of the study: the effective-robustness scatter and the scaling-law plot.

Both write a PNG (matplotlib, Agg backend, no display needed) and return its path. They read
the same dicts that go to ``metrics/*.json``, so a plot can be redrawn from the metrics alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: pipelines and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from clipshift.methods.robustness import from_axis, to_axis  # noqa: E402
from clipshift.methods.scaling_laws import (  # noqa: E402
    fit_power_law,
    holdout_error,
    predict,
    prediction_band,
)

DPI = 120

#: Fixed colours/markers for the model kinds the pipeline produces; others get the next colour.
KIND_STYLE = {
    "baseline": ("#7f7f7f", "o"),
    "external": ("#bdbdbd", "."),
    "zeroshot": ("#1f77b4", "*"),
    "finetuned": ("#d62728", "s"),
    "wiseft": ("#2ca02c", "o"),
    "soup": ("#9467bd", "D"),
    "linear": ("#ff7f0e", "^"),
}
_EXTRA_COLOURS = ["#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939"]
_POOL_LINESTYLES = ["-", "-.", ":", (0, (5, 2, 1, 2))]

#: Percent tick sets, finest first; the finest one that fits ≤ 8 ticks in the range is used.
_TICK_LEVELS = [
    list(range(1, 100)),
    [1, *range(5, 100, 5), 99],
    [1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98, 99],
    [1, 5, 10, 30, 50, 70, 90, 95, 99],
    [0.1, 1, 10, 50, 90, 99, 99.9],
]


def _kind_style(kind: str | None, extra: dict[str, tuple[str, str]]) -> tuple[str, str]:
    key = str(kind)
    if key in KIND_STYLE:
        return KIND_STYLE[key]
    if key not in extra:
        extra[key] = (_EXTRA_COLOURS[len(extra) % len(_EXTRA_COLOURS)], "o")
    return extra[key]


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# effective robustness


def _percent_ticks(lo: float, hi: float, transform: str) -> tuple[list[float], list[str]]:
    """Tick positions (axis units) and % labels at round accuracies inside [lo, hi]."""
    plo, phi = float(from_axis(lo, transform)) * 100, float(from_axis(hi, transform)) * 100
    chosen: list[float] = []
    for level in _TICK_LEVELS:
        inside = [p for p in level if plo <= p <= phi]
        if len(inside) <= 8:
            chosen = inside
            break
    positions = [float(to_axis(p / 100, transform)) for p in chosen]
    return positions, [f"{p:g}" for p in chosen]


def _axis_range(values: np.ndarray) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    pad = max(0.15 * (hi - lo), 0.25)
    return lo - pad, hi + pad


def _model_points(summary: Mapping[str, Any], shift: str) -> dict[str, dict[str, Any]]:
    """Per model: the line's x accuracy (ID, or ID on a subset shift's classes: the fit's
    ``x``) and shift accuracy (the shift mean for ``shift == "avg"``)."""
    x_set = summary["baseline_fit"][shift].get("x")
    points = {}
    for mid, rec in summary["models"].items():
        y = rec["ood_accuracy_avg"] if shift == "avg" else rec["accuracy"][shift]
        x = rec["accuracy"][x_set] if x_set else rec["id_accuracy"]
        points[mid] = {**rec, "x": x, "y": y}
    return points


def _draw_wiseft(ax: plt.Axes, points: dict, transform: str, extra: dict) -> set[str]:
    """One α-curve per pool, with α labels at both ends and the middle; returns drawn ids."""
    curves: dict[str, list[tuple[float, str]]] = {}
    for mid, p in points.items():
        if p.get("wise_alpha") is not None:
            curves.setdefault(str(p.get("pool")), []).append((float(p["wise_alpha"]), mid))
    drawn: set[str] = set()
    for i, (pool, members) in enumerate(sorted(curves.items())):
        members.sort()
        ids = [mid for _, mid in members]
        zx = to_axis([points[m]["x"] for m in ids], transform)
        zy = to_axis([points[m]["y"] for m in ids], transform)
        colour = KIND_STYLE["wiseft"][0]
        style = _POOL_LINESTYLES[i % len(_POOL_LINESTYLES)]
        ax.plot(zx, zy, ls=style, color=colour, lw=1.8, zorder=3, label=f"WiSE-FT α-curve ({pool})")
        ax.scatter(zx, zy, s=22, color=colour, zorder=4)
        # Highlight the ends: α=min is the zero-shot model, α=max the fine-tuned one.
        for j, kind, size in [(0, "zeroshot", 260), (-1, "finetuned", 110)]:
            colour_j, marker = KIND_STYLE[kind]
            ax.scatter(zx[j], zy[j], s=size, marker=marker, color=colour_j, edgecolor="black",
                       linewidth=0.8, zorder=6)  # fmt: skip
        for j in sorted({0, len(ids) // 2, len(ids) - 1}):
            ax.annotate(
                f"α={members[j][0]:g}",
                (zx[j], zy[j]),
                xytext=(6, 6),
                textcoords="offset points",
                fontsize=8,
                zorder=7,
            )
        ax.annotate(
            pool,
            (zx[-1], zy[-1]),
            xytext=(6, -12),
            textcoords="offset points",
            fontsize=8,
            style="italic",
            color=colour,
        )
        drawn.update(ids)
    return drawn


def _draw_kinds(ax: plt.Axes, points: dict, skip: set[str], transform: str, extra: dict) -> None:
    kinds: dict[str, list[str]] = {}
    for mid, p in points.items():
        kinds.setdefault(str(p.get("kind")), []).append(mid)
    for kind, ids in sorted(kinds.items()):
        colour, marker = _kind_style(kind, extra)
        big = kind in ("zeroshot", "finetuned")
        rest = [m for m in ids if m not in skip]
        if rest:
            ax.scatter(
                to_axis([points[m]["x"] for m in rest], transform),
                to_axis([points[m]["y"] for m in rest], transform),
                s=200 if big else 36,
                marker=marker,
                color=colour,
                zorder=5,
                edgecolor="black" if big else "none",
                linewidth=0.8,
                label=kind,
            )
        elif big:  # drawn as a curve end: still give the kind its legend entry
            ax.scatter(
                [],
                [],
                s=200,
                marker=marker,
                color=colour,
                edgecolor="black",
                linewidth=0.8,
                label=kind,
            )


def plot_effective_robustness(
    summary: Mapping[str, Any], shift: str, path: str | Path, transform: str | None = None
) -> Path:
    """ID vs shift accuracy on ``transform``-scaled axes, with y=x, the baseline line, every
    model kind and the WiSE-FT α-curves; ``shift="avg"`` plots the mean over shifts.

    The axes must be those the line was fitted in, so ``transform`` defaults to the fit's own
    and any other value is refused.
    """
    if shift not in summary["baseline_fit"]:
        raise KeyError(
            f"no baseline fit for {shift!r}; choose one of {sorted(summary['baseline_fit'])}"
        )
    fit = summary["baseline_fit"][shift]
    fitted = fit.get("transform", "logit")
    if transform is not None and transform != fitted:
        raise ValueError(
            f"the baseline line was fitted on {fitted} axes, cannot draw it on {transform} axes; "
            f"re-run summarise(..., transform={transform!r}) or plot with transform={fitted!r}"
        )
    transform = fitted
    points = _model_points(summary, shift)
    zx = to_axis([p["x"] for p in points.values()], transform)
    zy = to_axis([p["y"] for p in points.values()], transform)
    xlim, ylim = _axis_range(zx), _axis_range(zy)

    fig, ax = plt.subplots(figsize=(8.2, 5.6))
    diag = np.linspace(min(xlim[0], ylim[0]), max(xlim[1], ylim[1]), 50)
    ax.plot(diag, diag, ls="--", color="0.55", lw=1, label="y = x", zorder=1)
    line_x = np.linspace(*xlim, 50)
    ax.plot(
        line_x,
        fit["slope"] * line_x + fit["intercept"],
        color="black",
        lw=1.4,
        zorder=2,
        label=f"baseline fit (R²={fit['r2']:.2f})",
    )
    extra: dict[str, tuple[str, str]] = {}
    on_curve = _draw_wiseft(ax, points, transform, extra)
    _draw_kinds(ax, points, on_curve, transform, extra)

    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    for set_ticks, set_labels, lim in [
        (ax.set_xticks, ax.set_xticklabels, xlim),
        (ax.set_yticks, ax.set_yticklabels, ylim),
    ]:
        positions, labels = _percent_ticks(*lim, transform)
        set_ticks(positions)
        set_labels(labels)
    ax.grid(True, color="0.92", zorder=0)
    name = "mean over shifts" if shift == "avg" else shift
    x_name = f" ({fit['x']})" if fit.get("x") else ""  # a subset shift: ID on its classes
    ax.set_xlabel(f"reference (ID) accuracy{x_name}, % ({transform} scale)")
    ax.set_ylabel(f"accuracy on {name}, % ({transform} scale)")
    ax.set_title(
        f"Effective robustness: {name}\nbaseline fit R² = {fit['r2']:.3f}, slope {fit['slope']:.2f}"
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# scaling


_X_LABELS = {
    "flops": "training compute (FLOPs)",
    "samples": "samples seen",
    "params": "parameters",
}


def _group_runs(runs: Sequence[Mapping[str, Any]], fit: Mapping[str, Any]) -> list[Mapping]:
    """The runs of the fit's group (pool/task/... keys the fit records and the runs carry)."""
    keys = [k for k in ("pool", "task") if k in fit and all(k in r for r in runs)]
    return [r for r in runs if all(r[k] == fit[k] for k in keys)]


def _fit_dict(fit: Any) -> dict[str, Any]:
    return fit.to_dict() if hasattr(fit, "to_dict") else dict(fit)


def plot_scaling(
    runs: Sequence[Mapping[str, Any]],
    fit: Mapping[str, Any] | Any,
    x_key: str,
    y_key: str,
    path: str | Path,
    as_error: bool = True,
    bootstrap: int = 1000,
    seed: int = 0,
) -> Path:
    """Error vs ``x_key`` on log-log axes: runs, the fitted law extrapolated one decade, the
    95 % bootstrap band, and the largest-x run(s) marked with the hold-out fit's prediction.

    ``fit`` is a :class:`~clipshift.methods.scaling_laws.PowerLawFit` or a
    ``metrics/scaling.json`` entry; with ``as_error`` the plotted error is 1 − run[y_key], as
    in ``fit_scaling_table``.
    """
    fit = _fit_dict(fit)
    group = _group_runs(runs, fit)
    x = np.array([float(r[x_key]) for r in group])
    y = np.array([1.0 - float(r[y_key]) if as_error else float(r[y_key]) for r in group])
    irreducible = fit.get("E_inf") is not None
    grid = np.geomspace(x.min() / 1.5, x.max() * 10, 200)
    inside = grid <= x.max()

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    lo, hi = prediction_band(x, y, grid, irreducible, bootstrap, seed)
    ax.fill_between(grid, lo, hi, color="#1f77b4", alpha=0.18, lw=0, label="95% bootstrap band")
    curve = predict(fit, grid)
    label = f"$E = {fit['A']:.3g}\\,x^{{{fit['exponent']:.3f}}}$"
    if irreducible:
        label = label[:-1] + f" + {fit['E_inf']:.3g}$"
    if fit.get("ci95", {}).get("exponent"):
        a_lo, a_hi = fit["ci95"]["exponent"]
        label += f"\nα 95% CI [{a_lo:.3f}, {a_hi:.3f}]"
    ax.plot(grid[inside], curve[inside], color="#1f77b4", lw=1.8, label=label)
    ax.plot(grid[~inside], curve[~inside], color="#1f77b4", lw=1.8, ls="--", label="extrapolation")
    # Keep the data in view: bootstrap bands of a 3-parameter law can be wild far out.
    shown = np.concatenate([y, curve])
    ax.set_ylim(shown.min() / 1.25, shown.max() * 1.25)
    top = x == x.max()
    ax.scatter(x[~top], y[~top], color="black", s=30, zorder=5, label="runs")
    _mark_holdout(ax, x, y, top, irreducible)

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(_X_LABELS.get(x_key, x_key))
    ax.set_ylabel(f"error (1 − {y_key})" if as_error else y_key)
    where = " / ".join(str(fit[k]) for k in ("task", "pool") if k in fit)
    ax.set_title(
        f"Scaling {where}: error vs {_X_LABELS.get(x_key, x_key)}\n"
        f"R² (log space) = {fit['r2']:.3f}, n = {len(group)}"
    )
    # Error spans well under a decade: label the minor ticks too, as plain numbers.
    plain = FuncFormatter(lambda value, _: f"{value:.2g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(True, which="major", color="0.88")
    ax.grid(True, which="minor", axis="y", color="0.94")
    ax.legend(fontsize=8, framealpha=0.9)
    return _save(fig, path)


def _mark_holdout(ax: plt.Axes, x: np.ndarray, y: np.ndarray, top: np.ndarray, irr: bool) -> None:
    """The largest-x run(s), hollow, and what a fit without them predicted there."""
    ax.scatter(
        x[top],
        y[top],
        s=70,
        facecolor="none",
        edgecolor="#d62728",
        linewidth=1.6,
        zorder=6,
        label="held-out run(s) (largest x)",
    )
    try:
        result = holdout_error(x, y, irr)
    except ValueError:
        return  # too few distinct x without the largest: nothing to extrapolate from
    sub = fit_power_law(x[~top], y[~top], irr, bootstrap=0)
    seg = np.geomspace(x[~top].max(), x.max(), 30)
    ax.plot(seg, predict(sub, seg), color="#d62728", lw=1, ls=":", zorder=4)
    ax.scatter(
        [result["x"]],
        [result["pred"]],
        marker="x",
        s=70,
        color="#d62728",
        zorder=7,
        label=f"hold-out prediction (rel. error {result['rel_error']:.1%})",
    )

"""Power-law scaling fits: E = A·x^exponent (+ E_inf), with bootstrap CIs and a hold-out check.

Following Kaplan et al. (2020) and Cherti et al. (2023), error E (1 − accuracy, or
1 − recall@k) is modelled as a power law in compute, samples seen or parameters. Without an
irreducible term the fit is ordinary least squares of log E on log x (closed form). With one,
``scipy.optimize.least_squares`` minimises the same log-space residuals
log E − log(A·x^exponent + E_inf) with E_inf ∈ [0, min E). Working in log space weighs every
point by its *relative* error, as the scaling-law literature does. R² is reported in log-E
space for both models.

Cherti et al. (2023) fit the *compute-Pareto frontier*: the runs that no cheaper run beats
(:func:`pareto_frontier`), since a run with a poorly chosen size for its compute says little
about what compute buys. :func:`fit_frontier_table` fits those; :func:`fit_scaling_table` fits
every run (kept as the secondary view).

Confidence intervals are percentile bootstrap intervals over resampled points. Resamples with
no more distinct x values than the model has parameters are dropped (when the data allow):
they are interpolated exactly and would only add arbitrary extrapolations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import least_squares
from scipy.special import expit, logit

from clipshift.errors import DataError

log = logging.getLogger(__name__)

#: Candidate E_inf values for the initial grid, as fractions of min(y).
_E_GRID = np.concatenate([[0.0], 1.0 - np.geomspace(1.0, 1e-3, 40)[1:]])
#: E_inf stays strictly below min(y) so log(y - E_inf) stays finite.
_E_MARGIN = 1e-9


@dataclass
class PowerLawFit:
    """E = A·x^exponent (+ E_inf). ``ci95`` maps each parameter to [lo, hi] (None if unknown)."""

    A: float
    exponent: float
    E_inf: float | None
    r2: float
    ci95: dict[str, list[float] | None]
    n: int
    #: Bootstrap draws of (log A, exponent, E_inf), for prediction bands; not serialised.
    draws: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "A": self.A,
            "exponent": self.exponent,
            "E_inf": self.E_inf,
            "r2": self.r2,
            "ci95": self.ci95,
            "n": self.n,
        }


# --------------------------------------------------------------------------------------------
# single fits on log-space data


def _as_positive(values: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"a power law needs finite positive {name}, got {arr.tolist()}")
    return arr


def _ols(lx: np.ndarray, ly: np.ndarray) -> tuple[float, float]:
    """Closed-form least squares ly = c + exponent·lx; returns (c = log A, exponent)."""
    dx = lx - lx.mean()
    exponent = float(dx @ (ly - ly.mean()) / (dx @ dx))
    return float(ly.mean() - exponent * lx.mean()), exponent


def _log_model(params: np.ndarray, lx: np.ndarray) -> np.ndarray:
    c, exponent, e_inf = params
    return np.log(np.exp(c + exponent * lx) + e_inf)


def _grid_init(lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
    """Best (log A, exponent, E_inf) over a grid of E_inf, each with the closed-form power law."""
    e_inf = _E_GRID[:, None] * np.exp(ly).min()  # (grid, 1)
    ly_e = np.log(np.exp(ly)[None, :] - e_inf)  # the pure law fitted to y - E_inf, per row
    dx = lx - lx.mean()
    exponent = (ly_e - ly_e.mean(axis=1, keepdims=True)) @ dx / (dx @ dx)
    c = ly_e.mean(axis=1) - exponent * lx.mean()
    pred = np.log(np.exp(c[:, None] + exponent[:, None] * lx[None, :]) + e_inf)
    best = int(np.argmin(((ly[None, :] - pred) ** 2).sum(axis=1)))
    return np.array([c[best], exponent[best], e_inf[best, 0]])


def _log_model_jac(params: np.ndarray, lx: np.ndarray) -> np.ndarray:
    """Jacobian of the residual ly - log(A x^exponent + E_inf) in (log A, exponent, E_inf)."""
    c, exponent, e_inf = params
    power = np.exp(c + exponent * lx)
    total = power + e_inf
    return -np.stack([power / total, power * lx / total, 1.0 / total], axis=1)


def _fit_irreducible(lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
    upper = float(np.exp(ly).min()) * (1 - _E_MARGIN)
    x0 = _grid_init(lx, ly)
    x0[2] = min(max(x0[2], 0.0), upper * (1 - 1e-6))
    result = least_squares(
        lambda p: ly - _log_model(p, lx),
        x0,
        jac=lambda p: _log_model_jac(p, lx),
        bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, upper]),
        xtol=1e-14,
        ftol=1e-14,
        gtol=1e-14,
        max_nfev=2000,
    )
    return result.x


def _fit_params(lx: np.ndarray, ly: np.ndarray, irreducible: bool) -> np.ndarray:
    """(log A, exponent, E_inf) for one data set; E_inf is 0 for the pure law."""
    if irreducible:
        return _fit_irreducible(lx, ly)
    c, exponent = _ols(lx, ly)
    return np.array([c, exponent, 0.0])


def _refit_fast(lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
    """Irreducible refit for bootstrap resamples, a few times faster than the bounded solver.

    E_inf = min(y)·sigmoid(u) keeps the bound without a bounded solver, so MINPACK's
    Levenberg-Marquardt (``method="lm"``, C code) applies; stopped at 1e-8, since percentiles
    do not need the last digits. The start comes from the resample's own E_inf grid, kept off
    the sigmoid's flat tails (where the relative-cost stopping rule would halt it at once).
    """
    ceiling = float(np.exp(ly).min())
    start = _grid_init(lx, ly)
    u0 = logit(np.clip(start[2] / ceiling, 1e-3, 1 - 1e-3))

    def residual(q: np.ndarray) -> np.ndarray:
        return ly - _log_model(np.array([q[0], q[1], ceiling * expit(q[2])]), lx)

    def jacobian(q: np.ndarray) -> np.ndarray:
        s = expit(q[2])
        jac = _log_model_jac(np.array([q[0], q[1], ceiling * s]), lx)
        jac[:, 2] *= ceiling * s * (1 - s)  # chain rule through the sigmoid
        return jac

    q0 = np.array([start[0], start[1], u0])
    q = least_squares(residual, q0, jac=jacobian, method="lm", xtol=1e-8, ftol=1e-8, gtol=1e-8).x
    return np.array([q[0], q[1], ceiling * expit(q[2])])


def _min_distinct(irreducible: bool) -> int:
    return 3 if irreducible else 2


# --------------------------------------------------------------------------------------------
# bootstrap


def _bootstrap(
    lx: np.ndarray, ly: np.ndarray, irreducible: bool, n_boot: int, seed: int, start: np.ndarray
) -> np.ndarray:
    """(log A, exponent, E_inf) refitted on ``n_boot`` resamples of the points."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, lx.size, size=(n_boot, lx.size))
    # A resample with exactly as many distinct x as parameters is interpolated exactly, which
    # makes wild, meaningless extrapolations; ask for one spare x when the data has one.
    need = min(_min_distinct(irreducible) + 1, np.unique(lx).size)
    keep = np.array([np.unique(lx[i]).size >= need for i in idx], dtype=bool)
    idx = idx[keep]
    if not irreducible:
        # Vectorised closed form: one slope per resample row.
        bx, by = lx[idx], ly[idx]
        dx = bx - bx.mean(axis=1, keepdims=True)
        exponent = (dx * (by - by.mean(axis=1, keepdims=True))).sum(1) / (dx * dx).sum(1)
        c = by.mean(axis=1) - exponent * bx.mean(axis=1)
        return np.stack([c, exponent, np.zeros_like(c)], axis=1)
    draws = [_refit_fast(lx[i], ly[i]) for i in idx]
    return np.array(draws).reshape(-1, 3)


def _percentile_ci(values: np.ndarray) -> list[float] | None:
    if values.size < 10:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


# --------------------------------------------------------------------------------------------
# public API


def fit_power_law(
    x: ArrayLike,
    y: ArrayLike,
    irreducible: bool = False,
    bootstrap: int = 1000,
    seed: int = 0,
) -> PowerLawFit:
    """Fit E = A·x^exponent (+ E_inf when ``irreducible``); ``bootstrap=0`` skips the CIs."""
    xs, ys = _as_positive(x, "x"), _as_positive(y, "y")
    if xs.size != ys.size:
        raise ValueError(f"x has {xs.size} values but y has {ys.size}")
    need = _min_distinct(irreducible)
    if np.unique(xs).size < need:
        raise ValueError(
            f"fitting {'A·x^exponent + E_inf' if irreducible else 'A·x^exponent'} needs at least "
            f"{need} distinct x values, got {np.unique(xs).tolist()}; add runs of other sizes"
        )
    lx, ly = np.log(xs), np.log(ys)
    params = _fit_params(lx, ly, irreducible)
    resid = ly - _log_model(params, lx)
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    ss_res = float(resid @ resid)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float(ss_res < 1e-12)
    draws = _bootstrap(lx, ly, irreducible, bootstrap, seed, params) if bootstrap > 0 else None
    ci95: dict[str, list[float] | None] = {"A": None, "exponent": None}
    if irreducible:
        ci95["E_inf"] = None
    if draws is not None:
        ci95["A"] = _percentile_ci(np.exp(draws[:, 0]))
        ci95["exponent"] = _percentile_ci(draws[:, 1])
        if irreducible:
            ci95["E_inf"] = _percentile_ci(draws[:, 2])
    return PowerLawFit(
        A=float(np.exp(params[0])),
        exponent=float(params[1]),
        E_inf=float(params[2]) if irreducible else None,
        r2=float(r2),
        ci95=ci95,
        n=int(xs.size),
        draws=draws,
    )


def _get(fit: PowerLawFit | Mapping[str, Any], key: str) -> Any:
    return getattr(fit, key) if isinstance(fit, PowerLawFit) else fit[key]


def predict(fit: PowerLawFit | Mapping[str, Any], x: Any) -> Any:
    """A·x^exponent + E_inf at ``x`` (scalar in, float out); accepts a fit or its dict."""
    e_inf = _get(fit, "E_inf") or 0.0
    out = _get(fit, "A") * np.power(np.asarray(x, dtype=float), _get(fit, "exponent")) + e_inf
    return float(out) if np.ndim(out) == 0 else out


def prediction_band(
    x: ArrayLike,
    y: ArrayLike,
    x_grid: ArrayLike,
    irreducible: bool = False,
    bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise 95 % bootstrap band (lo, hi) of the fitted law on ``x_grid``."""
    fit = fit_power_law(x, y, irreducible, bootstrap, seed)
    grid = np.log(np.asarray(x_grid, dtype=float))
    if fit.draws is None or len(fit.draws) < 10:
        mid = predict(fit, np.exp(grid))
        return mid, mid
    curves = np.exp(fit.draws[:, :1] + fit.draws[:, 1:2] * grid[None, :]) + fit.draws[:, 2:]
    lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
    return lo, hi


def holdout_error(x: ArrayLike, y: ArrayLike, irreducible: bool = False) -> dict:
    """Fit without the largest-x point(s), extrapolate to it, report the relative error.

    When several runs share the largest x (e.g. two sample counts at the largest model), all
    of them are held out and compared with their mean, so the hold-out is a real extrapolation.
    Returns ``{"x", "true", "pred", "rel_error"}``; raises ValueError if too few points remain.
    """
    xs, ys = _as_positive(x, "x"), _as_positive(y, "y")
    top = xs == xs.max()
    fit = fit_power_law(xs[~top], ys[~top], irreducible, bootstrap=0)
    true = float(ys[top].mean())
    pred = float(predict(fit, float(xs.max())))
    return {"x": float(xs.max()), "true": true, "pred": pred, "rel_error": abs(pred - true) / true}


# --------------------------------------------------------------------------------------------
# the compute-Pareto frontier

#: Fewest frontier points for a bootstrap CI of R²: with 4 there are only 35 distinct
#: resamples, most of them degenerate, and the interval would be an artefact of that.
MIN_CI_POINTS = 5


def pareto_frontier(x: ArrayLike, y: ArrayLike) -> np.ndarray:
    """Indices (by increasing x) of the points no other point dominates: point i is on the
    frontier unless some j has x_j <= x_i and y_j < y_i (less or equal compute, lower error)."""
    xs, ys = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if xs.size != ys.size:
        raise ValueError(f"x has {xs.size} values but y has {ys.size}")
    dominated = ((xs[None, :] <= xs[:, None]) & (ys[None, :] < ys[:, None])).any(axis=1)
    keep = np.flatnonzero(~dominated)
    return keep[np.lexsort((ys[keep], xs[keep]))]


def r2_bootstrap_ci(
    x: ArrayLike, y: ArrayLike, irreducible: bool, n_boot: int, seed: int
) -> list[float] | None:
    """95 % percentile interval of the fit's R² over resampled points (None below
    :data:`MIN_CI_POINTS` points or when too few resamples are usable)."""
    xs, ys = _as_positive(x, "x"), _as_positive(y, "y")
    if xs.size < MIN_CI_POINTS or n_boot <= 0:
        return None
    lx, ly = np.log(xs), np.log(ys)
    rng = np.random.default_rng(seed)
    need = min(_min_distinct(irreducible) + 1, np.unique(lx).size)
    values = []
    for idx in rng.integers(0, xs.size, size=(n_boot, xs.size)):
        bx, by = lx[idx], ly[idx]
        ss_tot = float(((by - by.mean()) ** 2).sum())
        if np.unique(bx).size < need or ss_tot <= 0:
            continue  # an exact interpolation or a flat resample: R² says nothing
        resid = by - _log_model(_fit_params(bx, by, irreducible), bx)
        values.append(1.0 - float(resid @ resid) / ss_tot)
    return _percentile_ci(np.array(values))


def frontier_r2(x: ArrayLike, y: ArrayLike, irreducible: bool = False) -> float:
    """R² (log-E space) of the power law refitted to the Pareto frontier of (x, y); NaN when
    the frontier has too few distinct x values to fit or is flat."""
    xs, ys = _as_positive(x, "x"), _as_positive(y, "y")
    front = pareto_frontier(xs, ys)
    lx, ly = np.log(xs[front]), np.log(ys[front])
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    if np.unique(lx).size < _min_distinct(irreducible) or ss_tot <= 0:
        return float("nan")
    resid = ly - _log_model(_fit_params(lx, ly, irreducible), lx)
    return 1.0 - float(resid @ resid) / ss_tot


def replicate_frontier_r2(
    x: ArrayLike, y_replicates: ArrayLike, irreducible: bool = False
) -> np.ndarray:
    """:func:`frontier_r2` of each row of ``y_replicates`` ``(B, n)`` against the shared x: the
    frontier is re-drawn per replicate, since which runs are on it is part of what varies."""
    ys = np.asarray(y_replicates, dtype=float)
    return np.array([frontier_r2(x, row, irreducible) for row in ys])


def fit_frontier(
    x: ArrayLike, y: ArrayLike, irreducible: bool = False, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The power law fitted to the Pareto frontier of (x, y): the fit's fields, its
    ``holdout_rel_error`` (fit without the largest-x frontier point, predict it), ``r2_ci95``
    (bootstrap over frontier points, None when too few) and ``frontier`` (indices into x)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    front = pareto_frontier(xs, ys)
    fx, fy = xs[front], ys[front]
    fit = fit_power_law(fx, fy, irreducible, bootstrap, seed)
    try:
        holdout: float | None = holdout_error(fx, fy, irreducible)["rel_error"]
    except ValueError:
        holdout = None  # too few frontier points left once the largest is held out
    return {
        **fit.to_dict(),
        "holdout_rel_error": holdout,
        "r2_ci95": r2_bootstrap_ci(fx, fy, irreducible, bootstrap, seed),
        "frontier": [int(i) for i in front],
    }


# --------------------------------------------------------------------------------------------
# the metrics/scaling.json contract


def _group_name(group: Mapping[str, Any], group_by: Sequence[str], x_key: str) -> str:
    # task first, then pool, then anything else: "zeroshot/diverse/vs_flops".
    order = sorted(group_by, key=lambda k: {"task": 0, "pool": 1}.get(k, 2))
    return "/".join([*(str(group[k]) for k in order), f"vs_{x_key}"])


def _require(runs: Sequence[Mapping[str, Any]], keys: Iterable[str]) -> None:
    for i, run in enumerate(runs):
        missing = [k for k in keys if k not in run]
        if missing:
            raise DataError(f"scaling run {i} ({dict(run)}) lacks {missing}; record them per run")


def _one_fit(
    runs: Sequence[Mapping[str, Any]],
    x_key: str,
    y_key: str,
    as_error: bool,
    irreducible: bool,
    bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    x = np.array([float(r[x_key]) for r in runs])
    v = np.array([float(r[y_key]) for r in runs])
    y = 1.0 - v if as_error else v
    fit = fit_power_law(x, y, irreducible, bootstrap, seed)
    try:
        holdout = holdout_error(x, y, irreducible)["rel_error"]
    except ValueError:
        holdout = None  # too few distinct x left once the largest is held out
    return {**fit.to_dict(), "holdout_rel_error": holdout}


def fit_scaling_table(
    runs: Sequence[Mapping[str, Any]],
    y_key: str,
    x_keys: Sequence[str] = ("flops", "samples", "params"),
    group_by: Sequence[str] = ("pool", "task"),
    irreducible: bool = False,
    bootstrap: int = 1000,
    seed: int = 0,
    as_error: bool = True,
) -> dict[str, Any]:
    """One power law per group (pool × task) and per x key, as ``metrics/scaling.json``.

    Each run is a flat dict, e.g. ``{"pool": "diverse", "task": "zeroshot", "flops": 3e12,
    "samples": 6000, "params": 1.2e6, "accuracy": 0.41}``. With ``as_error`` the fitted
    quantity is 1 − run[y_key] (accuracy or recall@k → error). Fits are named
    ``<task>/<pool>/vs_<x_key>``; groups with too few distinct x values are skipped with a
    logged warning. ``holdout_rel_error`` is None when the hold-out fit is impossible.
    """
    rows = [dict(r) for r in runs]
    _require(rows, [*group_by, *x_keys, y_key])
    groups: dict[tuple, list[dict]] = {}
    for run in rows:
        groups.setdefault(tuple(run[k] for k in group_by), []).append(run)
    fits: dict[str, Any] = {}
    for key in sorted(groups, key=lambda t: tuple(map(str, t))):
        group = dict(zip(group_by, key, strict=True))
        for x_key in x_keys:
            name = _group_name(group, group_by, x_key)
            try:
                entry = _one_fit(groups[key], x_key, y_key, as_error, irreducible, bootstrap, seed)
            except ValueError as err:
                log.warning("skipping scaling fit %s: %s", name, err)
                continue
            fits[name] = {**entry, "x": x_key, **{k: group[k] for k in group_by}}
    return {"fits": fits, "runs": rows}


def fit_frontier_table(
    runs: Sequence[Mapping[str, Any]],
    y_key: str,
    x_key: str = "flops",
    group_by: Sequence[str] = ("pool", "task"),
    id_key: str = "run",
    irreducible: bool = False,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """One frontier fit (:func:`fit_frontier`) of error = 1 − run[y_key] on run[x_key] per
    group, named ``<task>/<pool>/vs_<x_key>``, with ``frontier_runs`` (the runs' ``id_key``,
    cheapest first) and ``n_runs`` (all runs of the group). Groups whose frontier is too short
    to fit are skipped with a logged warning."""
    rows = [dict(r) for r in runs]
    _require(rows, [*group_by, x_key, y_key, id_key])
    groups: dict[tuple, list[dict]] = {}
    for run in rows:
        groups.setdefault(tuple(run[k] for k in group_by), []).append(run)
    fits: dict[str, Any] = {}
    for key in sorted(groups, key=lambda t: tuple(map(str, t))):
        group, members = dict(zip(group_by, key, strict=True)), groups[key]
        name = _group_name(group, group_by, x_key)
        x = np.array([float(r[x_key]) for r in members])
        y = 1.0 - np.array([float(r[y_key]) for r in members])
        try:
            entry = fit_frontier(x, y, irreducible, bootstrap, seed)
        except ValueError as err:
            log.warning("skipping frontier fit %s: %s", name, err)
            continue
        front = entry.pop("frontier")
        fits[name] = {
            **entry,
            "x": x_key,
            "frontier_runs": [members[i][id_key] for i in front],
            "n_runs": len(members),
            **group,
        }
    return fits

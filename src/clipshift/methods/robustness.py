"""Effective robustness: the baseline line and every model's distance above it.

Following Taori et al. (2020) and Miller et al. (2021), models trained only on the reference
distribution lie on one line when in-distribution (ID) accuracy is plotted against accuracy
under a shift, both axes logit- (or probit-) scaled. We fit that line by least squares in the
transformed space, and a model's *effective robustness* (ER) is its shift accuracy minus the
line's prediction at its own ID accuracy, in accuracy fractions (0.05 = five points).

All accuracies here are fractions in [0, 1].
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import norm

from clipshift.errors import DataError

Transform = Literal["logit", "probit"]

#: Accuracies are clipped to [EPS, 1 - EPS] before transforming, because logit(0) and
#: logit(1) are infinite. 1e-3 is about one example on the built-in world's 1000-image test
#: sets: a 0 % or 100 % model is treated as "one example away", which keeps it from
#: dominating a least-squares fit while leaving every real accuracy untouched.
EPS = 1e-3

#: Prefix of the model ids that external baseline rows get in :func:`summarise`.
EXTERNAL_PREFIX = "external/"


@dataclass(frozen=True)
class BaselineFit:
    """transform(ood) ≈ slope · transform(id) + intercept, fitted on ``n`` baseline models."""

    slope: float
    intercept: float
    r2: float
    transform: str
    n: int

    def to_dict(self) -> dict[str, Any]:
        """The metrics-contract view (no ``n``)."""
        out = asdict(self)
        out.pop("n")
        return out


# --------------------------------------------------------------------------------------------
# transforms


def _check_transform(transform: str) -> None:
    if transform not in ("logit", "probit"):
        raise ValueError(f"transform must be 'logit' or 'probit', got {transform!r}")


def to_axis(acc: Any, transform: str = "logit") -> np.ndarray:
    """Accuracy fraction(s) → transformed axis value(s), after clipping to [EPS, 1 - EPS]."""
    _check_transform(transform)
    p = np.clip(np.asarray(acc, dtype=float), EPS, 1.0 - EPS)
    if transform == "logit":
        return np.log(p) - np.log1p(-p)
    return norm.ppf(p)


def from_axis(z: Any, transform: str = "logit") -> np.ndarray:
    """Inverse of :func:`to_axis` (without the clipping, which cannot be undone)."""
    _check_transform(transform)
    z = np.asarray(z, dtype=float)
    if transform == "logit":
        return 1.0 / (1.0 + np.exp(-z))
    return norm.cdf(z)


def _scalar_or_array(value: np.ndarray, like: Any) -> Any:
    """Return a float when the caller passed a scalar, an array otherwise."""
    return float(value) if np.ndim(like) == 0 else value


# --------------------------------------------------------------------------------------------
# the line


def fit_baseline(
    id_acc: ArrayLike, ood_acc: ArrayLike, transform: Transform = "logit"
) -> BaselineFit:
    """Least-squares line of transform(ood) on transform(id); R² is in the transformed space."""
    x = to_axis(id_acc, transform).ravel()
    y = to_axis(ood_acc, transform).ravel()
    if x.shape != y.shape:
        raise ValueError(f"id_acc has {x.size} values but ood_acc has {y.size}; pair them up")
    if x.size < 2:
        raise ValueError(
            f"a baseline line needs at least 2 models, got {x.size}; add baseline models"
        )
    if np.ptp(x) == 0:
        raise ValueError(
            "all baseline models have the same ID accuracy, so no line can be fitted; "
            "add baselines of different strength (size, epochs or data fraction)"
        )
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss_res = float(resid @ resid)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    # A flat, perfectly fitted line has ss_tot == 0; call that R² = 1 rather than NaN.
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float(ss_res < 1e-12)
    return BaselineFit(float(slope), float(intercept), float(r2), transform, int(x.size))


def predict_ood(fit: BaselineFit, id_acc: Any) -> Any:
    """The baseline line's shift accuracy (fraction) at the given ID accuracy."""
    z = fit.slope * to_axis(id_acc, fit.transform) + fit.intercept
    return _scalar_or_array(from_axis(z, fit.transform), id_acc)


def effective_robustness(fit: BaselineFit, id_acc: Any, ood_acc: Any) -> Any:
    """Shift accuracy minus the line's prediction, in accuracy fractions (vectorised)."""
    er = np.asarray(ood_acc, dtype=float) - np.asarray(predict_ood(fit, id_acc), dtype=float)
    return _scalar_or_array(er, er)


# --------------------------------------------------------------------------------------------
# external testbeds (e.g. numbers copied from a paper)


def _parse_float(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(
            f"{where}: {text!r} is not a number; write accuracies as 0.73 or 73"
        ) from None
    if not math.isfinite(value):
        raise DataError(f"{where}: {text!r} is not a finite number; fill in the accuracy")
    return value


def load_external_baselines(csv_path: str | Path, shifts: Iterable[str]) -> dict[str, list]:
    """Read external baseline models from a CSV.

    Columns: ``model``, ``id`` (or ``id_accuracy``) and one column per shift name; extra columns
    are ignored. Accuracies may be fractions or percents: if any accuracy in the file is above
    1, the whole file is read as percents and divided by 100 (deciding per file, not per cell,
    so a 0.9 % model in a percent file is not misread as 90 %).

    Returns ``{"model": [...], "id": [...], <shift>: [...]}`` with fractions.
    """
    path = Path(csv_path)
    shifts = list(shifts)
    if not path.is_file():
        raise DataError(
            f"external baselines CSV {path} does not exist; fix evaluate.external_baselines"
        )
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    id_col = "id" if "id" in columns else "id_accuracy"
    missing = [c for c in ["model", id_col, *shifts] if c not in columns]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {missing} (it has {columns}); add them: 'model', "
            f"'id' (or 'id_accuracy') and one column per shift {shifts}"
        )
    if not rows:
        raise DataError(f"{path} has a header but no rows; add at least one baseline model")
    table: dict[str, list] = {"model": [r["model"] for r in rows]}
    for key, col in [("id", id_col)] + [(s, s) for s in shifts]:
        table[key] = [
            _parse_float(r[col], f"{path} row {i + 2} column {col!r}") for i, r in enumerate(rows)
        ]
    values = np.array([table[k] for k in ["id", *shifts]], dtype=float)
    if values.min() < 0 or values.max() > 100:
        raise DataError(f"{path} has accuracies outside [0, 100]; write fractions or percents")
    if values.max() > 1:
        for key in ["id", *shifts]:
            table[key] = [v / 100.0 for v in table[key]]
    return table


# --------------------------------------------------------------------------------------------
# the metrics contract


def _accuracy(models: Mapping[str, Mapping[str, Any]], model_id: str, dataset: str) -> float:
    acc = models[model_id].get("accuracy", {})
    if dataset not in acc:
        raise DataError(
            f"model {model_id!r} has no accuracy on {dataset!r} (it has {sorted(acc)}); "
            "evaluate it on every shift before summarising"
        )
    return float(acc[dataset])


def _external_models(external: Mapping[str, list], id_dataset: str, shifts: list[str]) -> dict:
    """External rows as model records, so they are plotted and reported like any other model."""
    out = {}
    for i, name in enumerate(external["model"]):
        accuracy = {id_dataset: float(external["id"][i])}
        accuracy.update({s: float(external[s][i]) for s in shifts})
        out[f"{EXTERNAL_PREFIX}{name}"] = {"kind": "external", "accuracy": accuracy}
    return out


def _baseline_points(
    models: Mapping[str, Mapping[str, Any]],
    baseline_ids: list[str],
    id_dataset: str,
    shifts: list[str],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    unknown = [b for b in baseline_ids if b not in models]
    if unknown:
        raise DataError(
            f"baseline model(s) {unknown} are not among the evaluated models {sorted(models)}"
        )
    x = np.array([_accuracy(models, b, id_dataset) for b in baseline_ids])
    ys = {s: np.array([_accuracy(models, b, s) for b in baseline_ids]) for s in shifts}
    ys["avg"] = np.mean([ys[s] for s in shifts], axis=0)
    return x, ys


def summarise(
    models: Mapping[str, Mapping[str, Any]],
    id_dataset: str,
    shifts: Sequence[str],
    baseline_ids: Sequence[str],
    transform: Transform = "logit",
    external: Mapping[str, list] | None = None,
    external_mode: Literal["join", "replace"] = "join",
) -> dict[str, Any]:
    """Fit the baseline line per shift (and on the shift average) and report every model's ER.

    ``models``: ``{model_id: {"accuracy": {dataset: acc}, "kind": str, "pool"?: str,
    "wise_alpha"?: float}}``. ``external`` (from :func:`load_external_baselines`) joins the baseline
    models (``external_mode="join"``) or replaces them (``"replace"``); its rows also appear in
    ``models`` as ``external/<name>`` with kind ``"external"``. ``baseline_fit["avg"]`` is the
    line of mean shift accuracy on ID accuracy; a model's ``effective_robustness_avg`` is the
    mean of its per-shift ERs.
    """
    shifts = list(shifts)
    if not shifts:
        raise DataError("no shift datasets to summarise; add shift styles or shift sources")
    if external_mode not in ("join", "replace"):
        raise DataError(f"external_mode must be 'join' or 'replace', got {external_mode!r}")
    if external_mode == "replace" and external is None:
        raise DataError(
            "external_mode='replace' needs an external baselines CSV; "
            "set evaluate.external_baselines"
        )
    ext_models = _external_models(external, id_dataset, shifts) if external is not None else {}
    all_models = {**models, **ext_models}
    fit_ids = [] if external_mode == "replace" else list(baseline_ids)
    fit_ids += list(ext_models)
    x, ys = _baseline_points(all_models, fit_ids, id_dataset, shifts)
    try:
        fits = {name: fit_baseline(x, y, transform) for name, y in ys.items()}
    except ValueError as err:
        raise DataError(
            f"cannot fit the baseline line from models {fit_ids}: {err} "
            "(finetune.baselines or evaluate.external_baselines provide baselines)"
        ) from err
    return {
        "models": {
            mid: _model_record(mid, rec, id_dataset, shifts, fits)
            for mid, rec in all_models.items()
        },
        "baseline_fit": {name: fit.to_dict() for name, fit in fits.items()},
    }


def _model_record(
    model_id: str,
    rec: Mapping[str, Any],
    id_dataset: str,
    shifts: list[str],
    fits: Mapping[str, BaselineFit],
) -> dict[str, Any]:
    acc = rec.get("accuracy", {})
    missing = [d for d in [id_dataset, *shifts] if d not in acc]
    if missing:
        raise DataError(
            f"model {model_id!r} has no accuracy on {missing}; evaluate it on the "
            "reference test set and every shift"
        )
    id_acc = float(acc[id_dataset])
    er = {s: float(effective_robustness(fits[s], id_acc, float(acc[s]))) for s in shifts}
    wise_alpha = rec.get("wise_alpha")
    return {
        "kind": rec.get("kind"),
        "pool": rec.get("pool"),
        "wise_alpha": None if wise_alpha is None else float(wise_alpha),
        "accuracy": {k: float(v) for k, v in acc.items()},
        "id_accuracy": id_acc,
        "ood_accuracy_avg": float(np.mean([acc[s] for s in shifts])),
        "effective_robustness": er,
        "effective_robustness_avg": float(np.mean(list(er.values()))),
    }

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
from dataclasses import asdict, dataclass, field
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


def fit_lines(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed-form least squares of y on x along the last axis, batched over the leading ones
    (one line per bootstrap replicate): ``(slope, intercept, r2)``, each of shape ``x.shape[:-1]``.
    R² of a flat, perfectly fitted line is 1 (not NaN); a degenerate x gives NaN."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    dx = x - x.mean(axis=-1, keepdims=True)
    dy = y - y.mean(axis=-1, keepdims=True)
    sxx = (dx * dx).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(sxx > 0, (dx * dy).sum(axis=-1) / np.where(sxx > 0, sxx, 1.0), np.nan)
    intercept = y.mean(axis=-1) - slope * x.mean(axis=-1)
    resid = y - (slope[..., None] * x + intercept[..., None])
    ss_res = (resid * resid).sum(axis=-1)
    ss_tot = (dy * dy).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(
            ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), (ss_res < 1e-12) * 1.0
        )
    return slope, intercept, np.where(np.isnan(slope), np.nan, r2)


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
    slope, intercept, r2 = fit_lines(x, y)
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


def class_subset_id(id_dataset: str, shift: str) -> str:
    """Name of the accuracy on the reference set restricted to ``shift``'s classes (scored
    over those classes): the x axis of a class-subset shift such as ImageNet-R."""
    return f"{id_dataset}-on-{shift}-classes"


def load_external_baselines(
    csv_path: str | Path, shifts: Iterable[str], subset_shifts: Iterable[str] = ()
) -> dict[str, list]:
    """Read external baseline models from a CSV.

    Columns: ``model``, ``id`` (or ``id_accuracy``) and one column per shift name; for each of
    ``subset_shifts``, an optional ``id-on-<shift>-classes`` column (ID accuracy on that
    shift's classes, :func:`class_subset_id`) is read when present. Other columns
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
    subset_cols = [class_subset_id("id", s) for s in subset_shifts]
    keys = [("id", id_col)] + [(c, c) for c in [*shifts, *subset_cols] if c in columns]
    table: dict[str, list] = {"model": [r["model"] for r in rows]}
    for key, col in keys:
        table[key] = [
            _parse_float(r[col], f"{path} row {i + 2} column {col!r}") for i, r in enumerate(rows)
        ]
    values = np.array([table[k] for k, _ in keys], dtype=float)
    if values.min() < 0 or values.max() > 100:
        raise DataError(f"{path} has accuracies outside [0, 100]; write fractions or percents")
    if values.max() > 1:
        for key, _ in keys:
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
    subset = {class_subset_id(id_dataset, s): class_subset_id("id", s) for s in shifts}
    columns = {id_dataset: "id", **{s: s for s in shifts}}
    columns.update({name: key for name, key in subset.items() if key in external})
    out = {}
    for i, name in enumerate(external["model"]):
        accuracy = {dataset: float(external[key][i]) for dataset, key in columns.items()}
        out[f"{EXTERNAL_PREFIX}{name}"] = {"kind": "external", "accuracy": accuracy}
    return out


# --------------------------------------------------------------------------------------------
# shift groups

#: How a shift relates to pretraining, from its dataset.json ``extra.shift_group``: a natural
#: shift whose style some pretraining pool covers (its drawings unseen), a natural shift whose
#: style no pool covers, or a synthetic change of the reference images (corruptions).
SHIFT_GROUPS = ("natural-covered", "natural-unseen", "synthetic")
NATURAL_GROUPS = ("natural-covered", "natural-unseen")
#: An untagged shift (an external dataset, a world built before the tags) counts as natural
#: and unseen: the tag that claims nothing about what pretraining covered.
DEFAULT_SHIFT_GROUP = "natural-unseen"
#: The headline group: every natural shift, as Taori et al. (2020) report ER over natural shifts.
NATURAL = "natural"
#: The line of the mean over all shifts (``baseline_fit["avg"]``).
AVG = "avg"
GROUP_PREFIX = "group:"


def group_shifts(
    shifts: Sequence[str], shift_groups: Mapping[str, str] | None = None
) -> dict[str, list[str]]:
    """Group name → its shifts, for each non-empty tag group and ``natural`` (both natural
    tags); shifts missing from ``shift_groups`` get :data:`DEFAULT_SHIFT_GROUP`."""
    tags = {s: (shift_groups or {}).get(s, DEFAULT_SHIFT_GROUP) for s in shifts}
    bad = {s: g for s, g in tags.items() if g not in SHIFT_GROUPS}
    if bad:
        raise DataError(
            f"shift dataset(s) {bad} have an unknown shift_group; dataset.json extra.shift_group "
            f"must be one of {list(SHIFT_GROUPS)}"
        )
    out = {g: [s for s in shifts if tags[s] == g] for g in SHIFT_GROUPS}
    out[NATURAL] = [s for s in shifts if tags[s] in NATURAL_GROUPS]
    return {g: members for g, members in out.items() if members}


# --------------------------------------------------------------------------------------------
# the study: which accuracies, which line, and every derived number as arrays


@dataclass
class Study:
    """Everything the summary is computed from. Rows are ``models`` (external ones included),
    columns ``datasets`` = [ID set, *shifts, ID set on each subset shift's classes].
    ``fit_models`` (ordered by ID accuracy) define the lines; ``excluded`` are baselines left
    out for being too close to chance. ``subset_shifts`` cover part of the classes: their
    line's x axis is the ID accuracy on their classes (:func:`class_subset_id`)."""

    records: dict[str, dict[str, Any]]
    id_dataset: str
    shifts: list[str]
    groups: dict[str, list[str]]
    fit_models: list[str]
    excluded: list[str]
    min_id_accuracy: float
    chance: float | None
    exclusion_note: str | None
    transform: str
    subset_shifts: list[str] = field(default_factory=list)

    @property
    def models(self) -> list[str]:
        return list(self.records)

    @property
    def datasets(self) -> list[str]:
        subset = [class_subset_id(self.id_dataset, s) for s in self.subset_shifts]
        return [self.id_dataset, *self.shifts, *subset]

    def x_dataset(self, key: str) -> str:
        """The x axis of line ``key``: a subset shift's own classes, else the whole ID set
        (the shift-average and group lines mix shifts, so they keep the whole ID set)."""
        if key in self.subset_shifts:
            return class_subset_id(self.id_dataset, key)
        return self.id_dataset

    @property
    def lines(self) -> dict[str, list[str]]:
        """Line key → the shifts whose mean accuracy it fits: each shift alone, ``avg`` (all)
        and ``group:<name>`` per shift group (Taori et al.'s line on group-mean accuracy)."""
        out = {s: [s] for s in self.shifts}
        out[AVG] = list(self.shifts)
        out.update({GROUP_PREFIX + g: members for g, members in self.groups.items()})
        return out

    def table(self) -> np.ndarray:
        """``(M, K)`` plain accuracies."""
        return np.array(
            [[float(self.records[m]["accuracy"][d]) for d in self.datasets] for m in self.models]
        )


@dataclass
class Analysis:
    """Every derived number of a :class:`Study`, with a leading replicate axis ``B`` (1 for
    the point estimate): ``id_acc`` and ``ood[key]``/``er[key]``/``x[key]`` (the line's x
    axis accuracy, ``id_acc`` but for subset shifts) are ``(B, M)``, the line parameters per
    key ``(B,)``."""

    models: list[str]
    id_acc: np.ndarray
    ood: dict[str, np.ndarray]
    er: dict[str, np.ndarray]
    slope: dict[str, np.ndarray]
    intercept: dict[str, np.ndarray]
    r2: dict[str, np.ndarray]
    x: dict[str, np.ndarray] = field(default_factory=dict)

    def row(self, model: str) -> int:
        if model not in self.models:
            raise KeyError(f"model {model!r} is not in the study")
        return self.models.index(model)


def analyse(table: np.ndarray, study: Study) -> Analysis:
    """Fit every line on the study's fit models and compute every ER, for each replicate of
    ``table`` (``(M, K)`` or ``(B, M, K)``): vectorised, so 1000 replicates take milliseconds."""
    acc = np.asarray(table, dtype=float)
    acc = acc[None] if acc.ndim == 2 else acc
    t = study.transform
    rows = [study.models.index(m) for m in study.fit_models]
    col = {d: i for i, d in enumerate(study.datasets)}
    id_acc = acc[:, :, 0]
    out = Analysis(study.models, id_acc, {}, {}, {}, {}, {})
    for key, members in study.lines.items():
        out.x[key] = acc[:, :, col[study.x_dataset(key)]]
        zx = to_axis(out.x[key], t)
        ood = acc[:, :, [col[s] for s in members]].mean(axis=-1)
        slope, intercept, r2 = fit_lines(zx[:, rows], to_axis(ood, t)[:, rows])
        predicted = from_axis(slope[:, None] * zx + intercept[:, None], t)
        out.ood[key], out.er[key] = ood, ood - predicted
        out.slope[key], out.intercept[key], out.r2[key] = slope, intercept, r2
    return out


def _fit_set(
    records: Mapping[str, Mapping[str, Any]],
    candidates: list[str],
    id_dataset: str,
    min_id: float,
) -> tuple[list[str], list[str], str | None]:
    """(fitted ordered by ID accuracy, excluded, note): baselines below ``min_id`` leave the
    fit, unless that would leave fewer than two (tiny test worlds, where 5× chance is ~1)."""

    def id_of(m: str) -> float:
        return _accuracy(records, m, id_dataset)

    keep = [m for m in candidates if id_of(m) >= min_id]
    excluded = [m for m in candidates if id_of(m) < min_id]
    note = None
    if excluded and len(keep) < 2:
        note = (
            f"only {len(keep)} of {len(candidates)} baselines reach ID accuracy {min_id:.4f}; "
            "the exclusion rule was not applied (the line needs two)"
        )
        keep, excluded = list(candidates), []
    return sorted(keep, key=id_of), sorted(excluded, key=id_of), note


def build_study(
    models: Mapping[str, Mapping[str, Any]],
    id_dataset: str,
    shifts: Sequence[str],
    baseline_ids: Sequence[str],
    transform: Transform = "logit",
    external: Mapping[str, list] | None = None,
    external_mode: Literal["join", "replace"] = "join",
    *,
    shift_groups: Mapping[str, str] | None = None,
    num_classes: int | None = None,
    min_chance_multiple: float = 0.0,
    subset_shifts: Sequence[str] = (),
) -> Study:
    """Check the inputs and decide which models define the line (see :func:`summarise`)."""
    shifts = list(shifts)
    unknown_subset = [s for s in subset_shifts if s not in shifts]
    if unknown_subset:
        raise DataError(f"subset shift(s) {unknown_subset} are not among the shifts {shifts}")
    _check_transform(transform)
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
    records = {mid: dict(rec) for mid, rec in {**models, **ext_models}.items()}
    candidates = [] if external_mode == "replace" else list(baseline_ids)
    candidates += list(ext_models)
    unknown = [b for b in candidates if b not in records]
    if unknown:
        raise DataError(
            f"baseline model(s) {unknown} are not among the evaluated models {sorted(records)}"
        )
    chance = 1.0 / num_classes if num_classes else None
    min_id = min_chance_multiple * chance if chance else 0.0
    fitted, excluded, note = _fit_set(records, candidates, id_dataset, min_id)
    try:
        x = [_accuracy(records, m, id_dataset) for m in fitted]
        fit_baseline(x, [_accuracy(records, m, shifts[0]) for m in fitted], transform)
    except ValueError as err:
        raise DataError(
            f"cannot fit the baseline line from models {fitted}: {err} "
            "(finetune.baselines or evaluate.external_baselines provide baselines)"
        ) from err
    needed = [id_dataset, *shifts, *(class_subset_id(id_dataset, s) for s in subset_shifts)]
    for mid, rec in records.items():
        missing = [d for d in needed if d not in rec.get("accuracy", {})]
        if missing:
            raise DataError(
                f"model {mid!r} has no accuracy on {missing}; evaluate it on the reference "
                "test set (and on each subset shift's classes) and on every shift"
            )
    groups = group_shifts(shifts, shift_groups)
    return Study(
        records, id_dataset, shifts, groups, fitted, excluded, min_id, chance, note, transform,
        list(subset_shifts),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# the metrics contract


def _ci(boot: np.ndarray) -> np.ndarray:
    """``(2, ...)`` 2.5 / 97.5 percentiles over the replicate axis."""
    with np.errstate(invalid="ignore"):
        return np.nanpercentile(boot, [2.5, 97.5], axis=0)


def residual_signs(study: Study, point: Analysis, key: str) -> str:
    """'+'/'-' per fitted baseline, by increasing ID accuracy: the residual of its shift
    accuracy from the line in the transformed space (a run of one sign = curvature)."""
    rows = [study.models.index(m) for m in study.fit_models]
    t = study.transform
    z = point.slope[key][0] * to_axis(point.x[key][0, rows], t) + point.intercept[key][0]
    resid = to_axis(point.ood[key][0, rows], t) - z
    return "".join("+" if r > 1e-9 else "-" if r < -1e-9 else "0" for r in resid)


def _fit_entry(study: Study, point: Analysis, boot: Analysis | None, key: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "slope": float(point.slope[key][0]),
        "intercept": float(point.intercept[key][0]),
        "r2": float(point.r2[key][0]),
        "transform": study.transform,
        "x": study.x_dataset(key),
        "n": len(study.fit_models),
        "residual_signs": residual_signs(study, point, key),
    }
    if boot is not None:
        entry["r2_ci95"] = [float(v) for v in _ci(boot.r2[key])]
    return entry


def _model_record(
    study: Study, mid: str, point: Analysis, cis: Mapping[str, np.ndarray] | None
) -> dict[str, Any]:
    rec, i = study.records[mid], point.row(mid)
    acc = rec["accuracy"]
    er = {s: float(point.er[s][0, i]) for s in study.shifts}
    wise_alpha = rec.get("wise_alpha")
    out = {
        "kind": rec.get("kind"),
        "pool": rec.get("pool"),
        "wise_alpha": None if wise_alpha is None else float(wise_alpha),
        "accuracy": {k: float(v) for k, v in acc.items()},
        "id_accuracy": float(acc[study.id_dataset]),
        "ood_accuracy_avg": float(np.mean([acc[s] for s in study.shifts])),
        "effective_robustness": er,
        "effective_robustness_avg": float(np.mean(list(er.values()))),
        "ood_accuracy_group": {g: float(point.ood[GROUP_PREFIX + g][0, i]) for g in study.groups},
        "effective_robustness_group": {
            g: float(point.er[GROUP_PREFIX + g][0, i]) for g in study.groups
        },
        "extrapolated": mid not in study.fit_models
        and float(acc[study.id_dataset]) > _max_fit_id(study),
    }
    if cis is not None:

        def pair(key: str) -> list[float]:
            return [float(cis[key][0, i]), float(cis[key][1, i])]

        out["ci95"] = {
            "id_accuracy": pair("id"),
            "ood_accuracy_avg": pair("ood:" + AVG),
            "effective_robustness": {s: pair("er:" + s) for s in study.shifts},
            "effective_robustness_avg": pair("er_avg"),
            "effective_robustness_group": {g: pair("er:" + GROUP_PREFIX + g) for g in study.groups},
        }
    return out


def _max_fit_id(study: Study) -> float:
    return max(float(study.records[m]["accuracy"][study.id_dataset]) for m in study.fit_models)


def _model_cis(study: Study, boot: Analysis) -> dict[str, np.ndarray]:
    """Per-model interval arrays ``(2, M)``, computed once for all models."""
    cis = {"id": _ci(boot.id_acc), "ood:" + AVG: _ci(boot.ood[AVG])}
    for key in [*study.shifts, *(GROUP_PREFIX + g for g in study.groups)]:
        cis["er:" + key] = _ci(boot.er[key])
    cis["er_avg"] = _ci(np.mean([boot.er[s] for s in study.shifts], axis=0))
    return cis


def study_summary(study: Study, point: Analysis, boot: Analysis | None = None) -> dict[str, Any]:
    """The metrics-contract dict of a study; with ``boot`` (an :func:`analyse` of bootstrap
    replicates) every model's ID accuracy and ERs and every line's R² get a ``ci95``."""
    cis = _model_cis(study, boot) if boot is not None else None
    models = {mid: _model_record(study, mid, point, cis) for mid in study.models}
    baselines: dict[str, Any] = {
        "fitted": study.fit_models,
        "excluded": study.excluded,
        "chance": study.chance,
        "min_id_accuracy": study.min_id_accuracy,
        "max_id_accuracy": _max_fit_id(study),
        "extrapolated": sorted(m for m, r in models.items() if r["extrapolated"]),
    }
    if study.exclusion_note:
        baselines["note"] = study.exclusion_note
    return {
        "models": models,
        "baseline_fit": {key: _fit_entry(study, point, boot, key) for key in [*study.shifts, AVG]},
        "group_fit": {g: _fit_entry(study, point, boot, GROUP_PREFIX + g) for g in study.groups},
        "groups": study.groups,
        "baselines": baselines,
    }


def summarise(
    models: Mapping[str, Mapping[str, Any]],
    id_dataset: str,
    shifts: Sequence[str],
    baseline_ids: Sequence[str],
    transform: Transform = "logit",
    external: Mapping[str, list] | None = None,
    external_mode: Literal["join", "replace"] = "join",
    **study_options: Any,
) -> dict[str, Any]:
    """Fit the baseline line per shift, on the shift average and per shift group, and report
    every model's ER (point estimates; the evaluate stage adds bootstrap intervals).

    ``models``: ``{model_id: {"accuracy": {dataset: acc}, "kind": str, "pool"?: str,
    "wise_alpha"?: float}}``. ``external`` (from :func:`load_external_baselines`) joins the
    baseline models (``external_mode="join"``) or replaces them (``"replace"``); its rows also
    appear in ``models`` as ``external/<name>`` with kind ``"external"``.
    ``baseline_fit["avg"]`` is the line of mean shift accuracy on ID accuracy; a model's
    ``effective_robustness_avg`` is the mean of its per-shift ERs, while
    ``effective_robustness_group[g]`` is its ER on group g's mean accuracy against the line
    fitted to the baselines' group means (``group_fit[g]``; ``natural`` = both natural tags).
    ``study_options`` (keyword only): ``shift_groups`` ({shift: tag}, default
    :data:`DEFAULT_SHIFT_GROUP`), ``num_classes`` and ``min_chance_multiple`` (baselines with
    ID accuracy below multiple / num_classes leave the fit), ``subset_shifts`` (shifts over a
    class subset, each fitted against ID accuracy on its classes: every model's ``accuracy``
    then holds :func:`class_subset_id` entries; ``baseline_fit[s]["x"]`` names each x axis).
    """
    study = build_study(
        models, id_dataset, shifts, baseline_ids, transform, external, external_mode,
        **study_options,
    )  # fmt: skip
    return study_summary(study, analyse(study.table(), study))

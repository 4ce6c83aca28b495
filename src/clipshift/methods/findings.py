"""The study's claims, each one number with a class-bootstrap 95 % interval.

A finding is a function of an :class:`~clipshift.methods.robustness.Analysis` (replicate axis
first), so its value (the point analysis) and its interval (the bootstrap replicates) come
from the same code. ERs are over shift *groups* (Taori et al.: ER of the group-mean shift
accuracy against the line fitted to the baselines' group means); the headline group is
``natural``. Entries are ``{"statement", "value", "ci95": [lo, hi], ...evidence}``; the report
stage adds each one's criterion and verdict (``clipshift.stages.report``).

Model names are the finetune stage's: ``zeroshot-<pool>``, the end-to-end WiSE-FT curve
``wiseft-<pool>-a<α>`` (α = 0 is the zero-shot model, α = 1 the end-to-end fine-tune, the
α chosen on val is ``selected["wiseft_end-to-end"]``) and Fang et al.'s supervised control
``supervised-<pool>``. A finding whose models or shifts are absent is left out, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from clipshift.methods.bootstrap import ci95
from clipshift.methods.robustness import GROUP_PREFIX, NATURAL, Analysis, Study

log = logging.getLogger(__name__)

DIVERSE, NARROW = "diverse", "narrow"
COVERED, UNSEEN = "natural-covered", "natural-unseen"
#: The paper's fixed mixing weight, reported beside the α chosen on val (Wortsman et al. 2022).
FIXED_ALPHA = 0.5

Stat = Callable[[Analysis], np.ndarray]


def _entry(statement: str, stat: Stat, point: Analysis, boot: Analysis, **extra: Any) -> dict:
    return {
        "statement": statement,
        "value": float(stat(point)[0]),
        "ci95": ci95(stat(boot)),
        **extra,
    }


def _er(model: str, key: str) -> Stat:
    return lambda a: a.er[key][:, a.row(model)]


def _er_diff(first: str, second: str, key: str) -> Stat:
    return lambda a: a.er[key][:, a.row(first)] - a.er[key][:, a.row(second)]


def _per_shift(study: Study, group: str, stat_of: Callable[[str], Stat], point: Analysis) -> dict:
    """The same statistic on each shift of the group alone (point values, evidence)."""
    return {s: float(stat_of(s)(point)[0]) for s in study.groups[group]}


def _extrapolated(study: Study, *models: str) -> list[str]:
    """Models whose ID accuracy is above every fitted baseline's: their ER extrapolates."""
    top = max(float(study.records[m]["accuracy"][study.id_dataset]) for m in study.fit_models)
    return [
        m
        for m in models
        if m not in study.fit_models and float(study.records[m]["accuracy"][study.id_dataset]) > top
    ]


def end_to_end_curve(study: Study) -> dict[float, str]:
    """α → model id of the end-to-end WiSE-FT curve (kind wiseft, variant end-to-end)."""
    curve = {}
    for mid, rec in study.records.items():
        if rec.get("kind") == "wiseft" and (rec.get("variant") or "end-to-end") == "end-to-end":
            curve[float(rec["wise_alpha"])] = mid
    return dict(sorted(curve.items()))


class _Findings:
    """Collects the entries; a finding that cannot be computed is logged and left out."""

    def __init__(self, study: Study, point: Analysis, boot: Analysis) -> None:
        self.study, self.point, self.boot = study, point, boot
        self.out: dict[str, dict] = {}

    def missing(self, finding: str, models: Sequence[str] = (), groups: Sequence[str] = ()) -> bool:
        absent = [m for m in models if m not in self.study.records]
        empty = [g for g in groups if g not in self.study.groups]
        if absent or empty:
            why = [f"model(s) {absent} not evaluated"] if absent else []
            why += [f"no shift tagged {empty}"] if empty else []
            log.warning("finding %s left out: %s", finding, "; ".join(why))
        return bool(absent or empty)

    def add(self, finding: str, statement: str, stat: Stat, **extra: Any) -> None:
        self.out[finding] = _entry(statement, stat, self.point, self.boot, **extra)

    def er_finding(self, finding: str, statement: str, model: str, group: str) -> None:
        if self.missing(finding, [model], [group]):
            return
        self.add(
            finding,
            statement,
            _er(model, GROUP_PREFIX + group),
            group=group,
            model=model,
            per_shift=_per_shift(self.study, group, lambda s: _er(model, s), self.point),
            extrapolated=_extrapolated(self.study, model),
        )

    def er_difference(
        self, finding: str, statement: str, first: str, second: str, group: str = NATURAL
    ) -> None:
        if self.missing(finding, [first, second], [group]):
            return
        self.add(
            finding,
            statement,
            _er_diff(first, second, GROUP_PREFIX + group),
            group=group,
            models=[first, second],
            er={m: float(_er(m, GROUP_PREFIX + group)(self.point)[0]) for m in (first, second)},
            per_shift=_per_shift(
                self.study, group, lambda s: _er_diff(first, second, s), self.point
            ),
            extrapolated=_extrapolated(self.study, first, second),
        )


def _baselines_on_line(f: _Findings) -> None:
    if f.missing("baselines_on_line", groups=[NATURAL]):
        return
    shifts = f.study.groups[NATURAL]
    f.add(
        "baselines_on_line",
        "The reference-only baselines lie on one logit line: the smallest R² of the baseline "
        "fit over the natural shifts",
        lambda a: np.min([a.r2[s] for s in shifts], axis=0),
        per_shift={s: float(f.point.r2[s][0]) for s in shifts},
        n_baselines=len(f.study.fit_models),
        excluded=f.study.excluded,
    )


def _wiseft_gain(curve: dict[float, str], alpha: float) -> tuple[Stat, Stat]:
    """(OOD(α) − max(OOD(0), OOD(1)), ID(α) − ID(1)) on natural shifts, as statistics."""
    key = GROUP_PREFIX + NATURAL
    mid, zero, one = curve[alpha], curve[min(curve)], curve[max(curve)]

    def gain(a: Analysis) -> np.ndarray:
        ends = np.maximum(a.ood[key][:, a.row(zero)], a.ood[key][:, a.row(one)])
        return a.ood[key][:, a.row(mid)] - ends

    def id_gain(a: Analysis) -> np.ndarray:
        return a.id_acc[:, a.row(mid)] - a.id_acc[:, a.row(one)]

    return gain, id_gain


def _wiseft_beats_both(f: _Findings, selected: Mapping[str, str]) -> None:
    curve = end_to_end_curve(f.study)
    chosen = selected.get("wiseft_end-to-end")
    if f.missing("wiseft_beats_both", groups=[NATURAL]):
        return
    if chosen is None or len(curve) < 2 or {0.0, 1.0} - set(curve):
        log.warning("finding wiseft_beats_both left out: no end-to-end curve with α=0, 1, chosen")
        return
    alpha = float(f.study.records[chosen]["wise_alpha"])
    gain, id_gain = _wiseft_gain(curve, alpha)
    extra: dict[str, Any] = {
        "alpha": alpha,
        "model": chosen,
        "id_gain": float(id_gain(f.point)[0]),
        "id_gain_ci95": ci95(id_gain(f.boot)),
    }
    if FIXED_ALPHA in curve:
        fixed_gain, fixed_id = _wiseft_gain(curve, FIXED_ALPHA)
        extra["fixed_alpha"] = {
            "alpha": FIXED_ALPHA,
            "value": float(fixed_gain(f.point)[0]),
            "ci95": ci95(fixed_gain(f.boot)),
            "id_gain": float(fixed_id(f.point)[0]),
            "id_gain_ci95": ci95(fixed_id(f.boot)),
        }
    f.add(
        "wiseft_beats_both",
        "WiSE-FT of the end-to-end fine-tune, α chosen on val, beats both ends out of "
        "distribution: OOD(α*) − max(OOD(α=0), OOD(α=1)), mean over natural shifts",
        gain,
        **extra,
    )


def compute_findings(
    study: Study, point: Analysis, boot: Analysis, selected: Mapping[str, str]
) -> dict[str, dict]:
    """Every finding the evaluate stage can compute, keyed by its ID."""
    f = _Findings(study, point, boot)
    curve = end_to_end_curve(study)
    zs = f"zeroshot-{DIVERSE}"
    _baselines_on_line(f)
    f.er_finding(
        "zeroshot_above_line",
        f"The {DIVERSE}-pool zero-shot CLIP is above the baseline line on natural shifts whose "
        "style a pretraining pool covers (ER)",
        zs,
        COVERED,
    )
    if curve and 1.0 in curve:
        f.er_difference(
            "finetune_loses_robustness",
            "End-to-end fine-tuning loses effective robustness: ER(zero-shot) − ER(fine-tuned), "
            "natural shifts",
            zs,
            curve[1.0],
        )
    else:
        log.warning("finding finetune_loses_robustness left out: no end-to-end α=1 model")
    _wiseft_beats_both(f, selected)
    f.er_difference(
        "diverse_beats_narrow",
        f"Pretraining on the {DIVERSE} pool buys more effective robustness than on the {NARROW} "
        f"pool at equal compute: ER({DIVERSE} zero-shot) − ER({NARROW} zero-shot), natural shifts",
        zs,
        f"zeroshot-{NARROW}",
    )
    f.er_difference(
        "language_not_the_cause",
        f"Language supervision is not the cause (Fang et al.): ER(supervised on {DIVERSE}) − "
        f"ER(CLIP on {DIVERSE}), natural shifts",
        f"supervised-{DIVERSE}",
        zs,
    )
    f.er_finding(
        "unseen_style_robustness",
        f"ER of the {DIVERSE}-pool zero-shot CLIP on natural shifts whose style no pool covers",
        zs,
        UNSEEN,
    )
    return f.out

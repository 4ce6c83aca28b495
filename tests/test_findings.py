"""The study's findings on a toy family whose answers are known by construction."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from clipshift.methods.bootstrap import PerClassCounts, replicate_table
from clipshift.methods.findings import compute_findings, end_to_end_curve
from clipshift.methods.robustness import analyse, build_study, from_axis, study_summary

SHIFTS = ["s-cov", "s-syn", "s-uns"]
TAGS = {"s-cov": "natural-covered", "s-uns": "natural-unseen", "s-syn": "synthetic"}
DATASETS = ["test", *SHIFTS]


def _lift(model: str) -> float:
    """Logit lift above the baseline line on natural shifts (the construction's truth)."""
    if model.startswith("wiseft-diverse-a"):
        alpha = float(model.removeprefix("wiseft-diverse-a"))
        return 1.5 * (1 - alpha) + 2.0 * alpha * (1 - alpha)  # α=0.5 beats both ends
    return {"zeroshot-diverse": 1.5, "zeroshot-narrow": 0.3, "supervised-diverse": 1.5}.get(
        model, 0.0
    )


def _theta(model: str) -> float:
    if model.startswith("wiseft-diverse-a"):
        return -0.5 + 2.5 * float(model.removeprefix("wiseft-diverse-a"))
    return {"zeroshot-diverse": -0.5, "zeroshot-narrow": 1.0, "supervised-diverse": -0.5}[model]


def toy_study(supervised: bool = True, classes: int = 100, per_class: int = 20):
    """Baselines on shift logit = 0.7·θ − 1.2 (per class, shared class difficulty), and the
    named models of the study with the natural-shift lifts of :func:`_lift`."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 0.7, (len(DATASETS), classes))
    thetas = {f"baseline-{i:02d}": t for i, t in enumerate(np.linspace(-1.2, 2.4, 10))}
    others = ["zeroshot-diverse", "zeroshot-narrow"] + [
        f"wiseft-diverse-a{a:g}" for a in (0, 0.5, 1)
    ]
    others += ["supervised-diverse"] if supervised else []
    thetas.update({m: _theta(m) for m in others})
    records, correct = {}, []
    for name, theta in thetas.items():
        lift = _lift(name)
        logits = [theta] + [
            0.7 * theta - 1.2 + (0.0 if TAGS[s] == "synthetic" else lift) for s in SHIFTS
        ]
        rows = rng.binomial(per_class, from_axis(np.array(logits)[:, None] + difficulty))
        correct.append(rows)
        rec = {"kind": "baseline" if name.startswith("baseline") else "x"}
        rec["accuracy"] = dict(zip(DATASETS, rows.sum(1) / (per_class * classes), strict=True))
        if name.startswith("wiseft"):
            rec.update(kind="wiseft", variant="end-to-end", wise_alpha=float(name.split("-a")[1]))
        records[name] = rec
    total = np.full((len(DATASETS), classes), per_class)
    counts = PerClassCounts(list(thetas), DATASETS, np.stack(correct), total)
    base = [m for m in records if m.startswith("baseline")]
    study = build_study(records, "test", SHIFTS, base, shift_groups=TAGS, num_classes=classes)
    point = analyse(study.table(), study)
    boot = analyse(replicate_table(counts, study.table(), study.models, DATASETS, 500, 0), study)
    return study, point, boot


SELECTED = {"wiseft_end-to-end": "wiseft-diverse-a0.5"}


def test_every_finding_matches_the_construction():
    study, point, boot = toy_study()
    findings = compute_findings(study, point, boot, SELECTED)
    summary = study_summary(study, point, boot)
    er = {m: r["effective_robustness_group"] for m, r in summary["models"].items()}
    assert set(findings) == {
        "baselines_on_line",
        "zeroshot_above_line",
        "finetune_loses_robustness",
        "wiseft_beats_both",
        "diverse_beats_narrow",
        "language_not_the_cause",
        "unseen_style_robustness",
    }
    for entry in findings.values():
        assert set(entry) >= {"statement", "value", "ci95"}
        assert entry["ci95"][0] <= entry["ci95"][1]
    r2 = {s: summary["baseline_fit"][s]["r2"] for s in ("s-cov", "s-uns")}
    assert findings["baselines_on_line"]["value"] == pytest.approx(min(r2.values()))
    assert findings["baselines_on_line"]["per_shift"] == pytest.approx(r2)
    assert findings["baselines_on_line"]["value"] > 0.9

    above = findings["zeroshot_above_line"]
    assert above["value"] == pytest.approx(er["zeroshot-diverse"]["natural-covered"])
    assert above["value"] > 0.05 and above["ci95"][0] > 0  # lifted 1.5 logits
    assert findings["unseen_style_robustness"]["value"] == pytest.approx(
        er["zeroshot-diverse"]["natural-unseen"]
    )
    lost = findings["finetune_loses_robustness"]
    assert lost["models"] == ["zeroshot-diverse", "wiseft-diverse-a1"]
    assert lost["value"] == pytest.approx(
        er["zeroshot-diverse"]["natural"] - er["wiseft-diverse-a1"]["natural"]
    )
    assert lost["ci95"][0] > 0
    assert findings["diverse_beats_narrow"]["ci95"][0] > 0  # lifts 1.5 vs 0.3
    same = findings["language_not_the_cause"]  # the same lift: a CI around 0
    assert same["ci95"][0] < 0 < same["ci95"][1]


def test_wiseft_gain_is_ood_at_the_chosen_alpha_minus_the_better_end():
    study, point, boot = toy_study()
    wise = compute_findings(study, point, boot, SELECTED)["wiseft_beats_both"]
    acc = {m: study.records[m]["accuracy"] for m in end_to_end_curve(study).values()}

    def natural(m):
        return (acc[m]["s-cov"] + acc[m]["s-uns"]) / 2

    ends = max(natural("wiseft-diverse-a0"), natural("wiseft-diverse-a1"))
    assert wise["value"] == pytest.approx(natural("wiseft-diverse-a0.5") - ends)
    assert wise["value"] > 0 and wise["ci95"][0] > 0  # the construction's middle wins
    assert wise["alpha"] == 0.5 and wise["model"] == "wiseft-diverse-a0.5"
    gain = acc["wiseft-diverse-a0.5"]["test"] - acc["wiseft-diverse-a1"]["test"]
    assert wise["id_gain"] == pytest.approx(gain) and gain < 0
    assert wise["fixed_alpha"]["value"] == pytest.approx(wise["value"])  # α* is 0.5 here
    # α* = 1: the fine-tuned end itself, so the gain is ≤ 0 and ID gain is 0
    at_one = compute_findings(study, point, boot, {"wiseft_end-to-end": "wiseft-diverse-a1"})
    assert at_one["wiseft_beats_both"]["value"] <= 0
    assert at_one["wiseft_beats_both"]["id_gain"] == 0.0


def test_findings_without_their_models_or_shifts_are_left_out_with_a_warning(caplog):
    study, point, boot = toy_study(supervised=False)
    with caplog.at_level(logging.WARNING):
        findings = compute_findings(study, point, boot, SELECTED)
    assert "language_not_the_cause" not in findings
    assert "finding language_not_the_cause left out" in caplog.text
    assert "supervised-diverse" in caplog.text
    # no style-covered shift: the covered-style finding cannot be computed
    study.groups.pop("natural-covered")
    assert "zeroshot_above_line" not in compute_findings(study, point, boot, SELECTED)

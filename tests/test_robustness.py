"""Baseline fits, effective robustness, external baselines and the metrics contract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipshift.errors import DataError
from clipshift.methods.bootstrap import PerClassCounts, replicate_table
from clipshift.methods.robustness import (
    EPS,
    EXTERNAL_PREFIX,
    BaselineFit,
    analyse,
    build_study,
    effective_robustness,
    fit_baseline,
    fit_lines,
    from_axis,
    load_external_baselines,
    predict_ood,
    study_summary,
    summarise,
    to_axis,
)

SHIFTS = ["shift-a", "shift-b"]


def _on_line(id_acc, slope, intercept, transform="logit"):
    return from_axis(slope * to_axis(id_acc, transform) + intercept, transform)


@pytest.mark.parametrize("transform", ["logit", "probit"])
def test_transform_round_trip(transform):
    p = np.linspace(0.01, 0.99, 50)
    np.testing.assert_allclose(from_axis(to_axis(p, transform), transform), p, atol=1e-12)


def test_clipping_keeps_extremes_finite():
    z = to_axis([0.0, 1.0])
    assert np.all(np.isfinite(z))
    np.testing.assert_allclose(z, to_axis([EPS, 1 - EPS]))


def test_unknown_transform_is_refused():
    with pytest.raises(ValueError, match="logit"):
        to_axis(0.5, "arcsin")


@pytest.mark.parametrize("transform", ["logit", "probit"])
def test_fit_recovers_noise_free_line(transform):
    id_acc = np.linspace(0.2, 0.9, 7)
    ood = _on_line(id_acc, 0.8, -0.5, transform)
    fit = fit_baseline(id_acc, ood, transform)
    assert fit.slope == pytest.approx(0.8, abs=1e-6)
    assert fit.intercept == pytest.approx(-0.5, abs=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert (fit.n, fit.transform) == (7, transform)
    np.testing.assert_allclose(predict_ood(fit, id_acc), ood, atol=1e-9)


def test_r2_drops_with_noise():
    rng = np.random.default_rng(0)
    id_acc = np.linspace(0.2, 0.9, 30)
    ood = from_axis(0.8 * to_axis(id_acc) - 0.5 + rng.normal(0, 0.3, 30))
    assert 0.3 < fit_baseline(id_acc, ood).r2 < 0.99


def test_effective_robustness_sign_and_shape():
    fit = BaselineFit(slope=1.0, intercept=-1.0, r2=1.0, transform="logit", n=5)
    on_line = float(_on_line(0.6, 1.0, -1.0))
    assert effective_robustness(fit, 0.6, on_line) == pytest.approx(0.0, abs=1e-12)
    above = effective_robustness(fit, 0.6, on_line + 0.1)
    below = effective_robustness(fit, 0.6, on_line - 0.1)
    assert isinstance(above, float)
    assert above == pytest.approx(0.1) and below == pytest.approx(-0.1)
    er = effective_robustness(fit, np.array([0.5, 0.7]), np.array([0.9, 0.01]))
    assert er.shape == (2,) and er[0] > 0 > er[1]


@pytest.mark.parametrize(
    "id_acc, ood, match",
    [
        ([0.5], [0.3], "at least 2"),
        ([0.5, 0.5], [0.3, 0.2], "same ID accuracy"),
        ([0.5, 0.6], [0.3], "pair them"),
    ],
)
def test_fit_baseline_errors(id_acc, ood, match):
    with pytest.raises(ValueError, match=match):
        fit_baseline(id_acc, ood)


# --------------------------------------------------------------------------------------------
# external CSV


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_external_fractions(tmp_path):
    csv = _write(
        tmp_path / "ext.csv", "model,id,shift-a,shift-b,notes\nm1,0.5,0.3,0.2,x\nm2,0.7,0.5,0.4,y\n"
    )
    table = load_external_baselines(csv, SHIFTS)
    assert table == {
        "model": ["m1", "m2"],
        "id": [0.5, 0.7],
        "shift-a": [0.3, 0.5],
        "shift-b": [0.2, 0.4],
    }


def test_external_percent_detection_and_id_accuracy_alias(tmp_path):
    csv = _write(
        tmp_path / "ext.csv", "model,id_accuracy,shift-a,shift-b\nm1,50,30,0.9\nm2,70,50,40\n"
    )
    table = load_external_baselines(csv, SHIFTS)
    # One value above 1 makes the whole file percents, including the 0.9 (= 0.009).
    assert table["id"] == [0.5, 0.7]
    assert table["shift-b"] == pytest.approx([0.009, 0.4])


def test_external_missing_columns_are_named(tmp_path):
    csv = _write(tmp_path / "ext.csv", "model,acc,shift-a\nm1,0.5,0.3\n")
    with pytest.raises(DataError, match=r"\['id_accuracy', 'shift-b'\]"):
        load_external_baselines(csv, SHIFTS)


def test_external_bad_values(tmp_path):
    csv = _write(tmp_path / "ext.csv", "model,id,shift-a,shift-b\nm1,0.5,oops,0.2\n")
    with pytest.raises(DataError, match="row 2 column 'shift-a'"):
        load_external_baselines(csv, SHIFTS)
    csv = _write(tmp_path / "ext2.csv", "model,id,shift-a,shift-b\nm1,150,3,2\n")
    with pytest.raises(DataError, match="outside"):
        load_external_baselines(csv, SHIFTS)
    with pytest.raises(DataError, match="does not exist"):
        load_external_baselines(tmp_path / "nope.csv", SHIFTS)


# --------------------------------------------------------------------------------------------
# summarise


def _models():
    models = {}
    for i, acc in enumerate(np.linspace(0.3, 0.8, 5)):
        models[f"base{i}"] = {
            "kind": "baseline",
            "accuracy": {
                "test": acc,
                "shift-a": float(_on_line(acc, 0.9, -1.0)),
                "shift-b": float(_on_line(acc, 0.7, -1.5)),
            },
        }
    for alpha in (0.0, 0.5, 1.0):
        models[f"wise{alpha}"] = {
            "kind": "wiseft",
            "pool": "diverse",
            "wise_alpha": alpha,
            "accuracy": {"test": 0.5 + 0.3 * alpha, "shift-a": 0.45, "shift-b": 0.3},
        }
    return models


def test_summarise_contract():
    models = _models()
    out = summarise(models, "test", SHIFTS, [m for m in models if m.startswith("base")])
    json.dumps(out, allow_nan=False)  # plain JSON, no NaN
    assert set(out) == {"models", "baseline_fit", "group_fit", "groups", "baselines"}
    assert set(out["baseline_fit"]) == {*SHIFTS, "avg"}
    for fit in [*out["baseline_fit"].values(), *out["group_fit"].values()]:
        assert set(fit) == {"slope", "intercept", "r2", "transform", "x", "n", "residual_signs"}
        assert fit["x"] == "test"  # no subset shift: every line is on the whole ID set
    # untagged shifts are natural and unseen; "natural" is every natural shift
    assert out["groups"] == {"natural-unseen": SHIFTS, "natural": SHIFTS}
    assert out["baseline_fit"]["shift-a"]["slope"] == pytest.approx(0.9, abs=1e-6)
    rec = out["models"]["wise0.5"]
    assert set(rec) == {
        "kind",
        "pool",
        "wise_alpha",
        "accuracy",
        "id_accuracy",
        "ood_accuracy_avg",
        "effective_robustness",
        "effective_robustness_avg",
        "ood_accuracy_group",
        "effective_robustness_group",
        "extrapolated",
    }
    assert (rec["kind"], rec["pool"], rec["wise_alpha"], rec["id_accuracy"]) == (
        "wiseft",
        "diverse",
        0.5,
        0.65,
    )
    assert rec["ood_accuracy_avg"] == pytest.approx(0.375)
    assert set(rec["effective_robustness"]) == set(SHIFTS)
    assert rec["effective_robustness_avg"] == pytest.approx(
        np.mean(list(rec["effective_robustness"].values()))
    )
    assert rec["effective_robustness"]["shift-a"] > 0  # 0.45 is far above the line at 0.65
    assert out["models"]["base2"]["effective_robustness"]["shift-a"] == pytest.approx(0, abs=1e-9)
    assert out["models"]["base0"]["pool"] is None and out["models"]["base0"]["wise_alpha"] is None


def test_summarise_external_join_and_replace():
    models = _models()
    base = [m for m in models if m.startswith("base")]
    # External models on a different line (intercept -0.5) pull the joined fit up.
    ids = [0.4, 0.6, 0.75]
    ext = {
        "model": ["e1", "e2", "e3"],
        "id": ids,
        "shift-a": [float(_on_line(a, 0.9, -0.5)) for a in ids],
        "shift-b": [float(_on_line(a, 0.7, -1.5)) for a in ids],
    }
    alone = summarise(models, "test", SHIFTS, base)["baseline_fit"]["shift-a"]["intercept"]
    joined = summarise(models, "test", SHIFTS, base, external=ext)
    replaced = summarise(models, "test", SHIFTS, base, external=ext, external_mode="replace")
    assert alone < joined["baseline_fit"]["shift-a"]["intercept"] < -0.5 + 1e-9
    assert replaced["baseline_fit"]["shift-a"]["intercept"] == pytest.approx(-0.5, abs=1e-6)
    assert joined["models"][f"{EXTERNAL_PREFIX}e2"]["kind"] == "external"
    assert f"{EXTERNAL_PREFIX}e1" in replaced["models"] and "base0" in replaced["models"]


def test_summarise_errors():
    models = _models()
    with pytest.raises(DataError, match="not among"):
        summarise(models, "test", SHIFTS, ["base0", "ghost"])
    with pytest.raises(DataError, match="at least 2"):
        summarise(models, "test", SHIFTS, ["base0"])
    with pytest.raises(DataError, match="needs an external"):
        summarise(models, "test", SHIFTS, ["base0", "base1"], external_mode="replace")
    del models["wise1.0"]["accuracy"]["shift-b"]
    with pytest.raises(DataError, match="wise1.0"):
        summarise(models, "test", SHIFTS, ["base0", "base1"])


# --------------------------------------------------------------------------------------------
# batched fits, baselines that define a line, shift groups


def test_batched_fits_equal_one_fit_per_row():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0.1, 0.9, (7, 9)), rng.uniform(0.05, 0.6, (7, 9))
    slope, intercept, r2 = fit_lines(to_axis(x), to_axis(y))
    for i in range(7):
        fit = fit_baseline(x[i], y[i])
        assert (slope[i], intercept[i], r2[i]) == pytest.approx(
            (fit.slope, fit.intercept, fit.r2), abs=1e-12
        )
        np.testing.assert_allclose(fit.slope, np.polyfit(to_axis(x[i]), to_axis(y[i]), 1)[0])
    assert np.isnan(fit_lines(np.ones((1, 3)), np.arange(3.0)[None])[0][0])  # flat x: no line


def _family(extra=()):
    """Baselines on slope 0.6 / intercept -1.9 (logit), plus (id, shift-a, shift-b) extras."""
    models = {}
    for i, acc in enumerate(np.linspace(0.2, 0.8, 6)):
        ood = float(_on_line(acc, 0.6, -1.9))
        models[f"base{i}"] = {"kind": "baseline", "accuracy": {"test": acc, "shift-a": ood,
                                                               "shift-b": ood}}  # fmt: skip
    for name, (i, a, b) in extra:
        models[name] = {"kind": "baseline", "accuracy": {"test": i, "shift-a": a, "shift-b": b}}
    return models


def test_near_chance_baselines_leave_the_fit_and_the_true_slope_returns():
    # ID 1.1 % and 3.6 % of 100 classes, shift accuracy on a floor above the line: a tilt
    models = _family([("chance0", (0.011, 0.03, 0.03)), ("chance1", (0.036, 0.03, 0.03))])
    ids = list(models)
    tilted = summarise(models, "test", SHIFTS, ids)
    assert tilted["baseline_fit"]["shift-a"]["slope"] < 0.55  # pulled down by the two
    assert tilted["baselines"]["excluded"] == []
    out = summarise(models, "test", SHIFTS, ids, num_classes=100, min_chance_multiple=5)
    fit = out["baseline_fit"]["shift-a"]
    assert fit["slope"] == pytest.approx(0.6, abs=1e-9) and fit["n"] == 6
    base = out["baselines"]
    assert base["excluded"] == ["chance0", "chance1"]
    assert base["chance"] == 0.01 and base["min_id_accuracy"] == pytest.approx(0.05)
    assert base["fitted"] == [f"base{i}" for i in range(6)]  # ordered by ID accuracy
    # a world too small for the rule (5 × chance > every baseline) keeps all, and says so
    small = summarise(models, "test", SHIFTS, ids, num_classes=4, min_chance_multiple=5)
    assert small["baselines"]["excluded"] == [] and "not applied" in small["baselines"]["note"]


def test_residual_signs_follow_id_order_and_show_curvature():
    # logit(shift) = 0.5·x + x²/4 at x = -2..2: a convex family, residuals + - - - +
    x = np.arange(-2.0, 3.0)
    models = {}
    for i, xi in enumerate(x[::-1]):  # inserted in reverse ID order
        acc = {"test": float(from_axis(xi)), "shift-a": float(from_axis(0.5 * xi + xi**2 / 4))}
        acc["shift-b"] = float(from_axis(0.5 * xi))
        models[f"b{i}"] = {"kind": "baseline", "accuracy": acc}
    out = summarise(models, "test", SHIFTS, list(models))
    assert out["baseline_fit"]["shift-a"]["residual_signs"] == "+---+"
    assert out["baseline_fit"]["shift-b"]["residual_signs"] == "00000"  # on the line


def test_models_above_the_best_baseline_are_flagged_as_extrapolated():
    models = _family([])
    models["strong"] = {"kind": "finetuned", "accuracy": {"test": 0.9, "shift-a": 0.5,
                                                          "shift-b": 0.5}}  # fmt: skip
    models["inside"] = {"kind": "zeroshot", "accuracy": {"test": 0.5, "shift-a": 0.3,
                                                         "shift-b": 0.3}}  # fmt: skip
    out = summarise(models, "test", SHIFTS, [f"base{i}" for i in range(6)])
    assert out["models"]["strong"]["extrapolated"] is True
    assert out["models"]["inside"]["extrapolated"] is False
    assert out["baselines"]["extrapolated"] == ["strong"]
    assert out["baselines"]["max_id_accuracy"] == pytest.approx(0.8)


def test_group_er_is_taori_style_on_group_means():
    shifts = ["s-cov", "s-uns", "s-syn"]
    tags = {"s-cov": "natural-covered", "s-syn": "synthetic"}  # s-uns untagged: unseen
    rng = np.random.default_rng(2)
    models = {
        f"m{i}": {
            "kind": "baseline" if i < 6 else "zeroshot",
            "accuracy": {
                "test": rng.uniform(0.2, 0.9),
                **{s: rng.uniform(0.05, 0.6) for s in shifts},
            },
        }
        for i in range(8)
    }
    base = [f"m{i}" for i in range(6)]
    out = summarise(models, "test", shifts, base, shift_groups=tags)
    assert out["groups"] == {
        "natural-covered": ["s-cov"],
        "natural-unseen": ["s-uns"],
        "synthetic": ["s-syn"],
        "natural": ["s-cov", "s-uns"],
    }
    natural = ["s-cov", "s-uns"]
    mean = {m: np.mean([r["accuracy"][s] for s in natural]) for m, r in models.items()}
    fit = fit_baseline([models[b]["accuracy"]["test"] for b in base], [mean[b] for b in base])
    rec = out["models"]["m7"]
    assert rec["ood_accuracy_group"]["natural"] == pytest.approx(mean["m7"])
    assert rec["effective_robustness_group"]["natural"] == pytest.approx(
        effective_robustness(fit, rec["id_accuracy"], mean["m7"])
    )
    assert out["group_fit"]["natural"]["slope"] == pytest.approx(fit.slope)
    # a one-shift group's line is that shift's line
    assert rec["effective_robustness_group"]["synthetic"] == pytest.approx(
        rec["effective_robustness"]["s-syn"]
    )
    with pytest.raises(DataError, match="unknown shift_group"):
        summarise(models, "test", shifts, base, shift_groups={"s-cov": "natural"})


# --------------------------------------------------------------------------------------------
# the phenomenon, with class-bootstrap intervals


def _latent_family(classes: int = 100, per_class: int = 10):
    """Per-class counts of a model family (shared class difficulty, binomial images):
    baselines whose shift logit is 0.7·θ − 1.2 per class, one model 1.0 logit above, one on."""
    rng = np.random.default_rng(0)
    d_id, d_shift = rng.normal(0, 0.8, classes), rng.normal(0, 0.8, classes)
    thetas = {f"base{i}": t for i, t in enumerate(np.linspace(-1.0, 2.0, 8))}
    thetas.update({"above": 0.5, "on": 0.7})
    correct, accuracy = [], {}
    for name, theta in thetas.items():
        lift = 1.0 if name == "above" else 0.0
        p_id = from_axis(theta + d_id)
        p_shift = from_axis(0.7 * theta - 1.2 + lift + d_shift)
        rows = rng.binomial(per_class, np.stack([p_id, p_shift]))
        correct.append(rows)
        acc = rows.sum(1) / (per_class * classes)
        accuracy[name] = dict(zip(["test", "shift-a"], acc, strict=True))
    counts = PerClassCounts(
        list(thetas), ["test", "shift-a"], np.stack(correct), np.full((2, classes), per_class)
    )
    records = {m: {"kind": "baseline" if m.startswith("base") else "x", "accuracy": a}
               for m, a in accuracy.items()}  # fmt: skip
    return records, counts


def test_a_model_above_the_line_has_er_with_ci_above_zero_and_one_on_it_contains_zero():
    records, counts = _latent_family()
    study = build_study(records, "test", ["shift-a"], [m for m in records if "base" in m])
    point = analyse(study.table(), study)
    replicates = replicate_table(counts, study.table(), study.models, study.datasets, 1000, 0)
    out = study_summary(study, point, analyse(replicates, study))
    assert out["baseline_fit"]["shift-a"]["r2"] > 0.95
    above, on = out["models"]["above"], out["models"]["on"]
    er, (lo, hi) = (
        above["effective_robustness"]["shift-a"],
        above["ci95"]["effective_robustness"]["shift-a"],
    )
    assert er > 0.1 and lo > 0
    er, (lo, hi) = (
        on["effective_robustness"]["shift-a"],
        on["ci95"]["effective_robustness"]["shift-a"],
    )
    assert abs(er) < 0.02 and lo < 0 < hi
    lo, hi = out["baseline_fit"]["shift-a"]["r2_ci95"]
    assert 0.8 < lo <= hi <= 1.0

"""Baseline fits, effective robustness, external baselines and the metrics contract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipshift.errors import DataError
from clipshift.methods.robustness import (
    EPS,
    EXTERNAL_PREFIX,
    BaselineFit,
    effective_robustness,
    fit_baseline,
    from_axis,
    load_external_baselines,
    predict_ood,
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
    assert set(out) == {"models", "baseline_fit"}
    assert set(out["baseline_fit"]) == {*SHIFTS, "avg"}
    for fit in out["baseline_fit"].values():
        assert set(fit) == {"slope", "intercept", "r2", "transform"}
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

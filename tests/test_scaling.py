"""Power-law fits, bootstrap CIs, hold-out extrapolation and the scaling.json contract."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from clipshift.errors import DataError
from clipshift.methods.scaling_laws import (
    MIN_CI_POINTS,
    PowerLawFit,
    fit_frontier,
    fit_frontier_table,
    fit_power_law,
    fit_scaling_table,
    frontier_r2,
    holdout_error,
    pareto_frontier,
    predict,
    prediction_band,
    r2_bootstrap_ci,
    replicate_frontier_r2,
)
from clipshift.stages.scaling import zeroshot_r2_class_ci

X = np.geomspace(1e9, 1e13, 8)


def test_pure_law_exact():
    fit = fit_power_law(X, 3.0 * X**-0.12, bootstrap=200)
    assert fit.A == pytest.approx(3.0, rel=1e-6)
    assert fit.exponent == pytest.approx(-0.12, abs=1e-6)
    assert fit.E_inf is None and fit.n == 8 and fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert set(fit.ci95) == {"A", "exponent"}
    lo, hi = fit.ci95["exponent"]  # noise-free: every resample gives the same line
    assert hi - lo < 1e-9 and lo == pytest.approx(-0.12, abs=1e-6)


def test_pure_law_noisy_truth_inside_ci():
    rng = np.random.default_rng(1)
    x = np.repeat(X, 3)
    y = 3.0 * x**-0.12 * np.exp(rng.normal(0, 0.05, x.size))
    fit = fit_power_law(x, y, bootstrap=1000, seed=0)
    assert fit.ci95["exponent"][0] < -0.12 < fit.ci95["exponent"][1]
    assert fit.ci95["A"][0] < 3.0 < fit.ci95["A"][1]
    assert fit.ci95["exponent"][1] - fit.ci95["exponent"][0] < 0.05  # informative, not vacuous
    assert fit_power_law(x, y, bootstrap=1000, seed=0).ci95 == fit.ci95  # seeded


def test_irreducible_exact_recovers_e_inf():
    y = 2.0 * X**-0.2 + 0.15
    fit = fit_power_law(X, y, irreducible=True, bootstrap=0)
    assert fit.E_inf == pytest.approx(0.15, abs=1e-6)
    assert fit.A == pytest.approx(2.0, rel=1e-5)
    assert fit.exponent == pytest.approx(-0.2, abs=1e-6)
    assert fit.ci95 == {"A": None, "exponent": None, "E_inf": None}


def test_irreducible_noisy_ci_and_pure_law_misses():
    rng = np.random.default_rng(2)
    x = np.repeat(X, 3)
    y = (2.0 * x**-0.2 + 0.15) * np.exp(rng.normal(0, 0.01, x.size))
    fit = fit_power_law(x, y, irreducible=True, bootstrap=300)
    assert fit.ci95["E_inf"][0] < 0.15 < fit.ci95["E_inf"][1]
    assert fit.ci95["exponent"][0] < -0.2 < fit.ci95["exponent"][1]
    assert 0 <= fit.E_inf < y.min()
    # On curved data the irreducible model explains more than the straight log-log line.
    assert fit.r2 > fit_power_law(x, y, bootstrap=0).r2


def test_predict_scalar_array_and_dict():
    fit = fit_power_law(X, 3.0 * X**-0.12, bootstrap=0)
    assert isinstance(predict(fit, 1e10), float)
    assert predict(fit, 1e10) == pytest.approx(3.0 * 1e10**-0.12)
    np.testing.assert_allclose(predict(fit.to_dict(), X), 3.0 * X**-0.12, rtol=1e-9)
    assert predict({"A": 1.0, "exponent": -1.0, "E_inf": 0.5}, 2.0) == pytest.approx(1.0)


def test_prediction_band_brackets_fit():
    rng = np.random.default_rng(3)
    y = 3.0 * X**-0.12 * np.exp(rng.normal(0, 0.05, X.size))
    grid = np.geomspace(1e9, 1e14, 20)
    lo, hi = prediction_band(X, y, grid, bootstrap=300)
    mid = predict(fit_power_law(X, y, bootstrap=0), grid)
    assert np.all(lo <= mid) and np.all(mid <= hi)
    rel_width = np.log(hi / lo)
    assert rel_width[-1] > 2 * rel_width.min()  # much wider a decade out than mid-data


@pytest.mark.parametrize("irreducible", [False, True])
def test_holdout_exact_law_is_zero(irreducible):
    y = 2.0 * X**-0.2 + (0.15 if irreducible else 0.0)
    out = holdout_error(X, y, irreducible)
    assert out["x"] == X.max() and out["true"] == pytest.approx(y[-1])
    assert out["rel_error"] < 1e-6


def test_holdout_holds_out_every_tie_at_the_top():
    x = np.array([1.0, 2.0, 4.0, 8.0, 8.0])
    y = np.array([1.0, 0.5, 0.25, 0.1, 0.15])  # mean at x=8 is 0.125 = the law's value
    out = holdout_error(x, y)
    assert out["true"] == pytest.approx(0.125) and out["rel_error"] < 1e-9


def test_fit_errors():
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1, 2, 3], [0.5, 0.0, 0.2])
    with pytest.raises(ValueError, match="3 distinct"):
        fit_power_law([1, 2, 2], [0.5, 0.4, 0.3], irreducible=True)
    with pytest.raises(ValueError, match="2 distinct"):
        holdout_error([1, 1, 2], [0.5, 0.4, 0.3])


def _runs():
    runs = []
    for pool, a in [("diverse", 2.0), ("narrow", 3.0)]:
        for task, scale in [("zeroshot", 1.0), ("retrieval", 0.8)]:
            for params in (1e5, 4e5, 1.6e6):
                for samples in (1e4, 4e4):
                    flops = 6.0 * params * samples
                    err = scale * a * flops**-0.1
                    runs.append(
                        {
                            "pool": pool,
                            "task": task,
                            "flops": flops,
                            "samples": samples,
                            "params": params,
                            "accuracy": 1.0 - err,
                        }
                    )
    return runs


def test_scaling_table_contract(caplog):
    with caplog.at_level(logging.WARNING, logger="clipshift.methods.scaling_laws"):
        table = fit_scaling_table(_runs(), "accuracy", bootstrap=100)
    json.dumps(table, allow_nan=False)
    assert set(table) == {"fits", "runs"} and len(table["runs"]) == 24
    assert len(table["fits"]) == 2 * 2 * 3
    fit = table["fits"]["zeroshot/diverse/vs_flops"]
    assert set(fit) == {
        "A",
        "exponent",
        "E_inf",
        "r2",
        "ci95",
        "holdout_rel_error",
        "x",
        "pool",
        "task",
        "n",
    }
    assert (fit["x"], fit["pool"], fit["task"], fit["n"]) == ("flops", "diverse", "zeroshot", 6)
    assert fit["exponent"] == pytest.approx(-0.1, abs=1e-6)  # error = 1 - accuracy is the law
    assert fit["A"] == pytest.approx(2.0, rel=1e-5)
    assert fit["holdout_rel_error"] < 1e-6
    assert table["fits"]["retrieval/narrow/vs_flops"]["A"] == pytest.approx(2.4, rel=1e-5)
    # Two distinct sample counts: a fit, but no hold-out left to fit.
    assert table["fits"]["zeroshot/diverse/vs_samples"]["holdout_rel_error"] is None
    assert not caplog.records


def test_scaling_table_irreducible_skips_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="clipshift.methods.scaling_laws"):
        table = fit_scaling_table(
            _runs(), "accuracy", x_keys=("samples",), irreducible=True, bootstrap=10
        )
    assert table["fits"] == {}
    assert "zeroshot/diverse/vs_samples" in caplog.text


def test_scaling_table_missing_key():
    runs = _runs()
    del runs[3]["params"]
    with pytest.raises(DataError, match="params"):
        fit_scaling_table(runs, "accuracy")


def test_fit_to_dict_drops_draws():
    fit = fit_power_law(X, 3.0 * X**-0.12, bootstrap=50)
    assert isinstance(fit, PowerLawFit) and fit.draws is not None
    assert "draws" not in fit.to_dict()


# --------------------------------------------------------------------------------------------
# the compute-Pareto frontier (Cherti et al. 2023)

#: Frontier runs on E = 2·C^-0.1 exactly, and runs each dominated by a cheaper, better one.
FRONT_X = np.geomspace(1e10, 1e13, 6)
FRONT_Y = 2.0 * FRONT_X**-0.1
# each: more compute than a frontier run and 30 % more error than it (an off-size model)
OFF_X = np.concatenate([FRONT_X[[0, 2, 4]] * 1.5, FRONT_X[[5]]])
OFF_Y = np.concatenate([FRONT_Y[[0, 2, 4]], FRONT_Y[[5]]]) * 1.3


def _mixed():
    x = np.concatenate([OFF_X, FRONT_X])
    y = np.concatenate([OFF_Y, FRONT_Y])
    return x, y


def test_frontier_keeps_exactly_the_undominated_runs():
    x, y = _mixed()
    front = pareto_frontier(x, y)
    assert sorted(front.tolist()) == list(range(4, 10))  # every off-size run is out
    assert np.all(np.diff(x[front]) > 0)  # cheapest first
    # the literal rule: a run is out iff some run with <= compute has a lower error
    for i in range(x.size):
        beaten = any(x[j] <= x[i] and y[j] < y[i] for j in range(x.size))
        assert beaten == (i not in front)


def test_frontier_ties_and_a_single_best_run():
    # equal compute: the higher error is dominated; equal compute and error: both stay
    assert pareto_frontier([1, 1, 2], [0.5, 0.6, 0.4]).tolist() == [0, 2]
    assert sorted(pareto_frontier([1, 1], [0.5, 0.5]).tolist()) == [0, 1]
    # the cheapest run is best: nothing else is on the frontier
    assert pareto_frontier([1, 2, 3], [0.1, 0.2, 0.3]).tolist() == [0]


def test_frontier_fit_recovers_the_law_that_all_runs_miss():
    x, y = _mixed()
    fit = fit_frontier(x, y, bootstrap=200)
    assert fit["exponent"] == pytest.approx(-0.1, abs=1e-9)
    assert fit["A"] == pytest.approx(2.0, rel=1e-8)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12) and fit["n"] == 6
    assert fit["holdout_rel_error"] < 1e-9
    lo, hi = fit["r2_ci95"]  # noise-free frontier: every resample fits exactly
    assert lo == pytest.approx(1.0, abs=1e-9) and hi == pytest.approx(1.0, abs=1e-9)
    everything = fit_power_law(x, y, bootstrap=0)
    assert everything.r2 < 0.8 and everything.A < 1.95  # the off-size runs drag it off


def test_frontier_holdout_error_on_synthetic_data():
    # the largest-compute frontier run sits 10 % above the law the others follow exactly
    y = FRONT_Y.copy()
    y[-1] *= 1.10
    fit = fit_frontier(FRONT_X, y, bootstrap=0)
    assert fit["holdout_rel_error"] == pytest.approx(0.1 / 1.1, rel=1e-9)  # |pred - obs| / obs
    assert fit["r2_ci95"] is None  # bootstrap=0


def test_r2_ci_needs_enough_points_and_brackets_noisy_r2():
    rng = np.random.default_rng(4)
    x = np.geomspace(1e10, 1e13, 8)
    y = 2.0 * x**-0.1 * np.exp(rng.normal(0, 0.03, x.size))
    lo, hi = r2_bootstrap_ci(x, y, False, 500, 0)
    assert 0.0 < lo < fit_power_law(x, y, bootstrap=0).r2 <= hi <= 1.0
    few = MIN_CI_POINTS - 1
    assert r2_bootstrap_ci(x[:few], y[:few], False, 500, 0) is None


def test_frontier_table_names_runs_and_groups():
    x, y = _mixed()
    runs = [
        {"pool": pool, "task": "zeroshot", "run": f"r{i}", "flops": xi, "accuracy": 1 - yi}
        for pool in ("diverse", "narrow")
        for i, (xi, yi) in enumerate(zip(x, y, strict=True))
    ]
    fits = fit_frontier_table(runs, "accuracy", bootstrap=50)
    json.dumps(fits, allow_nan=False)
    assert set(fits) == {"zeroshot/diverse/vs_flops", "zeroshot/narrow/vs_flops"}
    fit = fits["zeroshot/diverse/vs_flops"]
    assert fit["frontier_runs"] == [f"r{i}" for i in range(4, 10)]
    assert fit["n"] == 6 and fit["n_runs"] == 10 and fit["pool"] == "diverse"
    assert fit["exponent"] == pytest.approx(-0.1, abs=1e-9)


def _runs_with_class_counts(seed: int = 0, classes: int = 100, per_class: int = 10) -> list:
    """Five runs whose error follows 2·C^-0.1 in expectation, scored on a balanced test set."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, flops in enumerate(np.geomspace(1e10, 1e13, 5)):
        p_correct = 1.0 - 2.0 * flops**-0.1
        correct = rng.binomial(per_class, p_correct, size=classes)
        rows.append({
            "run": f"r{i}", "pool": "diverse", "flops": float(flops),
            "zeroshot_accuracy": correct.sum() / (classes * per_class),
            "zeroshot_per_class": {"correct": correct.tolist(), "total": [per_class] * classes},
        })  # fmt: skip
    return rows


def test_frontier_r2_refits_the_frontier_of_each_replicate():
    x, y = _mixed()
    assert frontier_r2(x, y) == pytest.approx(1.0, abs=1e-12)  # off-size runs are ignored
    assert np.isnan(frontier_r2([1.0, 2.0, 3.0], [0.1, 0.2, 0.3]))  # one frontier run
    noisy = y * np.exp(np.random.default_rng(0).normal(0, 0.05, y.size))
    per_rep = replicate_frontier_r2(x, np.stack([y, noisy]))
    assert per_rep[0] == pytest.approx(1.0, abs=1e-12) and per_rep[1] < 1.0
    assert per_rep[1] == pytest.approx(fit_frontier(x, noisy, bootstrap=0)["r2"])


def test_class_bootstrap_ci_of_the_frontier_r2():
    rows = _runs_with_class_counts()
    point = fit_frontier(
        [r["flops"] for r in rows], [1 - r["zeroshot_accuracy"] for r in rows], bootstrap=0
    )["r2"]
    lo, hi = zeroshot_r2_class_ci(rows, 500, 0)
    assert lo < point <= hi <= 1.0 and hi - lo < 0.5
    assert zeroshot_r2_class_ci(rows, 500, 0) == [lo, hi]  # seeded
    assert zeroshot_r2_class_ci(rows, 0, 0) is None
    older = [dict(r) for r in rows]
    del older[2]["zeroshot_per_class"]  # an evaluation from before the counts were stored
    assert zeroshot_r2_class_ci(older, 500, 0) is None
    # a test set 10× larger per class measures every run more precisely: a tighter interval
    lo_big, hi_big = zeroshot_r2_class_ci(_runs_with_class_counts(per_class=100), 500, 0)
    assert hi_big - lo_big < hi - lo

"""The class-level bootstrap: per-class counts, class draws, intervals that cover the truth."""

from __future__ import annotations

import numpy as np
import pytest

from clipshift.methods.bootstrap import (
    PerClassCounts,
    ci95,
    class_weights,
    from_predictions,
    read_counts,
    replicate_table,
    resampled_accuracy,
    write_counts,
)


def counts_of(correct, total, models=None, datasets=None) -> PerClassCounts:
    correct, total = np.asarray(correct), np.asarray(total)
    models = models or [f"m{i}" for i in range(correct.shape[0])]
    datasets = datasets or [f"d{j}" for j in range(correct.shape[1])]
    return PerClassCounts(models, datasets, correct, total)


def test_class_draws_are_seeded_and_draw_every_class_count_times():
    w = class_weights(50, 400, seed=3)
    assert w.shape == (400, 50) and np.all(w.sum(axis=1) == 50)
    assert np.array_equal(w, class_weights(50, 400, seed=3))
    assert not np.array_equal(w, class_weights(50, 400, seed=4))
    assert w.mean() == pytest.approx(1.0) and 0.8 < w.var() < 1.2  # multinomial: var ≈ 1


def test_accuracy_is_count_weighted_per_class():
    # one model, one dataset, 3 classes of unequal size
    counts = counts_of([[[1, 4, 0]]], [[2, 4, 4]])
    assert counts.accuracy()[0, 0] == pytest.approx(5 / 10)
    # a draw of class 1 twice and class 2 once: (2·4 + 0) / (2·4 + 4)
    acc = resampled_accuracy(counts, np.array([[0, 2, 1]]))
    assert acc[0, 0, 0] == pytest.approx(8 / 12)


def test_a_class_subset_dataset_is_nan_when_none_of_its_classes_is_drawn():
    counts = counts_of([[[1, 0, 0]]], [[2, 0, 0]])  # only class 0 has examples
    acc = resampled_accuracy(counts, np.array([[0, 3, 0], [3, 0, 0]]))
    assert np.isnan(acc[0, 0, 0]) and acc[1, 0, 0] == 0.5
    assert ci95([np.nan, 0.5, 0.5]) == [0.5, 0.5]


def test_identical_classes_give_a_zero_width_interval():
    """Degenerate case, exact: every class 3 of 5 right → every replicate is 0.6."""
    counts = counts_of(np.full((1, 1, 40), 3), np.full((1, 40), 5))
    table = replicate_table(counts, counts.accuracy(), ["m0"], ["d0"], 300, seed=0)
    assert table.shape == (300, 1, 1)
    np.testing.assert_allclose(table, 0.6)
    assert ci95(table[:, 0, 0]) == pytest.approx([0.6, 0.6])


def test_models_without_counts_stay_fixed_and_rows_follow_the_requested_order():
    counts = counts_of([[[1, 2]], [[2, 0]]], [[2, 2]], models=["a", "b"], datasets=["test"])
    point = np.array([[0.75], [0.5], [0.9]])  # rows: b, a, external
    table = replicate_table(counts, point, ["b", "a", "ext"], ["test"], 200, seed=1)
    assert np.all(table[:, 2, 0] == 0.9)
    draws = class_weights(2, 200, seed=1)
    np.testing.assert_allclose(table[:, 0, 0], (2 * draws[:, 0]) / (2 * draws.sum(1)))
    np.testing.assert_allclose(table[:, 1, 0], (draws[:, 0] + 2 * draws[:, 1]) / (2 * draws.sum(1)))


def test_counts_from_predictions_and_their_file_round_trip(tmp_path):
    labels = {"test": np.array([0, 0, 1, 2, 2, 2]), "shift": np.array([1, 1, 2])}
    preds = {
        "m": {"test": np.array([0, 1, 1, 2, 0, 2]), "shift": np.array([1, 0, 2])},
        "k": {"test": np.zeros(6, int), "shift": np.full(3, 1)},
    }
    counts = from_predictions(preds, labels, num_classes=4)
    assert counts.models == ["k", "m"] and counts.datasets == ["shift", "test"]
    np.testing.assert_array_equal(counts.total, [[0, 2, 1, 0], [2, 1, 3, 0]])
    np.testing.assert_array_equal(counts.correct[1], [[0, 1, 1, 0], [1, 1, 2, 0]])
    np.testing.assert_array_equal(counts.correct[0], [[0, 2, 0, 0], [2, 0, 0, 0]])
    first = write_counts(tmp_path / "a" / "per_class.json", counts).read_bytes()
    again = read_counts(tmp_path / "a" / "per_class.json")
    assert write_counts(tmp_path / "b.json", again).read_bytes() == first  # same bytes
    np.testing.assert_array_equal(again.correct, counts.correct)
    with pytest.raises(ValueError, match="more correct"):
        counts_of([[[3]]], [[2]])


def _simulate(rng, classes: int, per_class: int, shift: float = 0.0):
    """A class universe: each class's logit difficulty ~ N(0, 1); two models share it."""
    difficulty = rng.normal(0, 1, classes)
    p = 1 / (1 + np.exp(-(0.4 + difficulty)))
    q = 1 / (1 + np.exp(-(0.4 + shift + difficulty)))
    correct = np.stack([rng.binomial(per_class, p), rng.binomial(per_class, q)])[:, None, :]
    return counts_of(correct, np.full((1, classes), per_class))


def _population_accuracy(shift: float = 0.0) -> float:
    z = np.random.default_rng(123).normal(0, 1, 2_000_000)
    return float(np.mean(1 / (1 + np.exp(-(0.4 + shift + z)))))


def test_intervals_cover_the_population_accuracy_about_95_percent_of_the_time():
    """Simulated family: 100 classes drawn from a universe, 10 images each. Over 300 studies
    the 95 % interval of the accuracy, and of a paired difference, holds the truth ~95 %."""
    rng = np.random.default_rng(0)
    truth = _population_accuracy()
    truth_diff = _population_accuracy(0.3) - truth
    hits = hits_diff = 0
    widths = []
    trials = 300
    for trial in range(trials):
        counts = _simulate(rng, classes=100, per_class=10, shift=0.3)
        table = replicate_table(counts, counts.accuracy(), ["m0", "m1"], ["d0"], 400, trial)
        lo, hi = ci95(table[:, 0, 0])
        hits += lo <= truth <= hi
        dlo, dhi = ci95(table[:, 1, 0] - table[:, 0, 0])
        hits_diff += dlo <= truth_diff <= dhi
        # the same difference if each model had its own class draws (not paired)
        point = counts.accuracy()
        other = replicate_table(counts, point, ["m0", "m1"], ["d0"], 400, 10_000 + trial)
        ulo, uhi = ci95(other[:, 1, 0] - table[:, 0, 0])
        widths.append((dhi - dlo, uhi - ulo))
    assert 0.90 <= hits / trials <= 0.99
    assert 0.90 <= hits_diff / trials <= 0.99
    # pairing: the models share class difficulty, and the shared draw cancels it
    paired, unpaired = np.mean(widths, axis=0)
    assert paired < 0.8 * unpaired

"""Class-level bootstrap: confidence intervals that resample the task's classes.

Every evaluation set of a task shares its classes, and images of one class are not
independent draws (in the built-in world they are re-renders of one drawing; in ImageNet and
its shifts, one synset's photos, renditions and sketches). The class is the unit sampled from
a larger universe, so a replicate draws the task's classes with replacement and recomputes
every accuracy from per-class counts. The same draw serves every model and dataset of a
replicate (a *paired* bootstrap): differences between models and between shifts keep their
correlation, which is what makes a difference of ERs tighter than either ER. Intervals are
the 2.5 / 97.5 percentiles over replicates.

Accuracies are count-weighted: a replicate's accuracy on a dataset is
``Σ_c w_c · correct_c / Σ_c w_c · total_c`` (``w_c`` = times class c was drawn), which equals
the plain accuracy for the all-ones draw and handles unbalanced classes and datasets covering
a class subset (their other classes have total 0).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipshift.errors import DataError
from clipshift.io_utils import temp_path

FORMAT = "clipshift-per-class/1"


@dataclass(frozen=True)
class PerClassCounts:
    """Correct predictions per (model, dataset, class) and examples per (dataset, class)."""

    models: list[str]
    datasets: list[str]
    correct: np.ndarray  # int (M, D, C)
    total: np.ndarray  # int (D, C)

    def __post_init__(self) -> None:
        m, d = len(self.models), len(self.datasets)
        if self.correct.ndim != 3 or self.correct.shape[:2] != (m, d):
            raise ValueError(f"correct must be ({m}, {d}, C), got {self.correct.shape}")
        if self.total.shape != (d, self.correct.shape[2]):
            shape = (d, self.correct.shape[2])
            raise ValueError(f"total must be {shape}, got {self.total.shape}")
        if np.any(self.correct > self.total[None]):
            raise ValueError("a class has more correct predictions than examples")

    @property
    def num_classes(self) -> int:
        return int(self.correct.shape[2])

    def accuracy(self) -> np.ndarray:
        """Plain accuracies ``(M, D)`` (every class drawn once)."""
        return resampled_accuracy(self, np.ones((1, self.num_classes)))[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "num_classes": self.num_classes,
            "total": {d: self.total[j].tolist() for j, d in enumerate(self.datasets)},
            "correct": {
                m: {d: self.correct[i, j].tolist() for j, d in enumerate(self.datasets)}
                for i, m in enumerate(self.models)
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerClassCounts:
        if data.get("format") != FORMAT:
            raise DataError(f"per-class counts have format {data.get('format')!r}, not {FORMAT}")
        datasets = sorted(data["total"])
        models = sorted(data["correct"])
        total = np.array([data["total"][d] for d in datasets], dtype=np.int64)
        correct = np.array(
            [[data["correct"][m][d] for d in datasets] for m in models], dtype=np.int64
        ).reshape(len(models), len(datasets), total.shape[1])
        return cls(models, datasets, correct, total)


def from_predictions(
    preds: Mapping[str, Mapping[str, np.ndarray]],
    labels: Mapping[str, np.ndarray],
    num_classes: int,
) -> PerClassCounts:
    """Counts from ``preds[model][dataset]`` (predicted class per example) and true labels."""
    models, datasets = sorted(preds), sorted(labels)
    total = np.stack([np.bincount(labels[d], minlength=num_classes) for d in datasets])
    correct = np.zeros((len(models), len(datasets), num_classes), dtype=np.int64)
    for i, m in enumerate(models):
        for j, d in enumerate(datasets):
            hit = np.asarray(labels[d])[np.asarray(preds[m][d]) == np.asarray(labels[d])]
            correct[i, j] = np.bincount(hit, minlength=num_classes)
    return PerClassCounts(models, datasets, correct, total.astype(np.int64))


def write_counts(path: str | Path, counts: PerClassCounts) -> Path:
    """Compact, sorted JSON: the same counts always give the same bytes (a DVC out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.write_text(json.dumps(counts.to_dict(), sort_keys=True, separators=(",", ":")) + "\n")
    tmp.replace(path)
    return path


def read_counts(path: str | Path) -> PerClassCounts:
    return PerClassCounts.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------------------------
# replicates


def class_weights(num_classes: int, replicates: int, seed: int) -> np.ndarray:
    """``(replicates, C)``: how often each class is drawn when drawing C classes with
    replacement (a multinomial draw is exactly that, without materialising the indices)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_classes, np.full(num_classes, 1.0 / num_classes), size=replicates)


def resampled_accuracy(counts: PerClassCounts, weights: np.ndarray) -> np.ndarray:
    """``(B, M, D)`` accuracies under class weights ``(B, C)``; NaN where a replicate drew
    none of a dataset's classes (possible only for class-subset datasets)."""
    w = np.asarray(weights, dtype=float)
    hits = np.einsum("bc,mdc->bmd", w, counts.correct)
    seen = np.einsum("bc,dc->bd", w, counts.total)[:, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(seen > 0, hits / np.where(seen > 0, seen, 1.0), np.nan)


def replicate_table(
    counts: PerClassCounts,
    point: np.ndarray,
    models: Sequence[str],
    datasets: Sequence[str],
    replicates: int,
    seed: int,
) -> np.ndarray:
    """``(B, M, K)`` accuracies of ``models`` × ``datasets`` over ``replicates`` class draws.

    ``point`` ``(M, K)`` holds the plain accuracies: rows of models without per-class counts
    (external baselines copied from a paper) stay fixed at them in every replicate.
    """
    missing = [d for d in datasets if d not in counts.datasets]
    if missing:
        raise DataError(f"no per-class counts for dataset(s) {missing}")
    weights = class_weights(counts.num_classes, replicates, seed)
    table = resampled_accuracy(counts, weights)
    cols = [counts.datasets.index(d) for d in datasets]
    out = np.broadcast_to(np.asarray(point, dtype=float), (replicates, *np.shape(point))).copy()
    row_of = {m: i for i, m in enumerate(counts.models)}
    for i, m in enumerate(models):
        if m in row_of:
            out[:, i, :] = table[:, row_of[m], cols]
    return out


def ci95(samples: Any) -> list[float]:
    """2.5 and 97.5 percentiles over the first axis (replicates), NaNs ignored."""
    lo, hi = np.nanpercentile(np.asarray(samples, dtype=float), [2.5, 97.5], axis=0)
    return [float(lo), float(hi)]

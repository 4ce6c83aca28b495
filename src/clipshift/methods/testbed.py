"""The ImageNet testbed of Taori et al. (2020) as built-in external baselines.

``evaluate.external_baselines: imagenet-testbed`` reads the testbed's top-1 table shipped in
``clipshift/refdata`` (338 models; provenance and MIT notice beside it) and turns it into the
same table :func:`clipshift.methods.robustness.load_external_baselines` returns for a CSV, so
a user who evaluates one fine-tuned ImageNet model gets its effective robustness on every
shift against the testbed's line, with no baseline training.

**Which testbed models define the line.** Rows labelled ``STANDARD`` in the testbed's own
``model_type`` column: models trained on ImageNet's training set alone, with neither extra
data nor a robustness intervention. They are the models the testbed's papers fit the baseline
on (Taori et al. 2020, "standard models"; Miller et al. 2021, "Accuracy on the Line", fit the
trend on models trained on the reference distribution). Left out: ``MORE_DATA`` (extra data)
and ``ROBUST_INTV`` / ``LP_ADV`` (robustness interventions): these are what effective
robustness is measured *of*, so fitting on them would hide it; ``LOW_ACCURACY_CNN``
(ImageNet-trained, but on subsamples or stopped after a few epochs: median ImageNet accuracy
17 %, where the logit-linear trend bends and near-chance points tilt the line); and the
one-model classical types (nearest neighbours, random forests, linear pixels, random
features). A model lacking a value the user's shifts need (five ``STANDARD`` models have no
ImageNet-R numbers) is left out of every line, so all lines rest on the same models and the
shift-average and group lines have every shift.

**Axes.** ImageNet-R, -A and ObjectNet cover 200 / 200 / 113 ImageNet classes and are scored
over those classes only; their line is drawn against ImageNet accuracy on the same classes
(the testbed's ``val-on-…-classes`` columns), as in the testbed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import get_args

from clipshift.config import TESTBED, TestbedShiftName
from clipshift.errors import DataError
from clipshift.methods.robustness import class_subset_id

__all__ = [
    "BASELINE_MODEL_TYPE",
    "SHIFTS",
    "TESTBED",
    "baseline_rows",
    "load_testbed_baselines",
    "map_shifts",
    "read_testbed",
]

CSV_NAME = "imagenet_testbed_top1.csv"
#: The testbed's label of models trained on ImageNet alone (see the module docstring).
BASELINE_MODEL_TYPE = "STANDARD"
#: The testbed's ImageNet (validation set) column: the x axis of full-label-space shifts.
ID_COLUMN = "val"


@dataclass(frozen=True)
class TestbedShift:
    """A shift's accuracy column and, for a class-subset shift, the column of ImageNet
    accuracy on its classes (its x axis); ``None`` for a shift over all 1000 classes."""

    column: str
    id_column: str | None = None


#: The testbed shifts a user's shift datasets can be mapped to (``evaluate.testbed_shifts``).
#: ImageNetV2 is its matched-frequency set in the ``format-val`` encoding, which the testbed's
#: papers plot (re-encoded like ImageNet val, so JPEG settings do not count as a shift).
SHIFTS: dict[str, TestbedShift] = {
    "imagenet-v2": TestbedShift("imagenetv2-matched-frequency-format-val"),
    "imagenet-sketch": TestbedShift("imagenet-sketch"),
    "imagenet-r": TestbedShift("imagenet-r", "val-on-imagenet-r-classes"),
    "objectnet": TestbedShift("objectnet-1.0-beta", "val-on-objectnet-classes"),
    "imagenet-a": TestbedShift("imagenet-a", "val-on-imagenet-a-classes"),
}
assert set(SHIFTS) == set(get_args(TestbedShiftName)), "config.TestbedShiftName is stale"


def read_testbed() -> list[dict[str, str]]:
    """Every row of the shipped table (strings; accuracies in percent, '' = not evaluated)."""
    text = resources.files("clipshift").joinpath("refdata", CSV_NAME).read_text("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def baseline_rows(rows: Iterable[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """The rows that define the line: the testbed's ``STANDARD`` models."""
    return [r for r in rows if r["model_type"] == BASELINE_MODEL_TYPE]


def map_shifts(shifts: Sequence[str], mapping: Mapping[str, str]) -> dict[str, str]:
    """Each shift dataset → its testbed shift: ``mapping`` (``evaluate.testbed_shifts``)
    first, else the dataset's own name when it is a testbed shift name."""
    stray = sorted(set(mapping) - set(shifts))
    if stray:
        raise DataError(
            f"evaluate.testbed_shifts maps {stray}, which are not shift datasets "
            f"(the shifts are {list(shifts)}); fix the names"
        )
    out = {s: mapping.get(s, s) for s in shifts}
    unmapped = [s for s, t in out.items() if t not in SHIFTS]
    if unmapped:
        raise DataError(
            f"shift dataset(s) {unmapped} have no ImageNet-testbed counterpart; name each in "
            f"evaluate.testbed_shifts (dataset name: one of {sorted(SHIFTS)}), or name the "
            "dataset after one of them in fetch.sources"
        )
    return out


def _check_subsets(mapped: Mapping[str, str], subset_shifts: Iterable[str]) -> None:
    """A shift is scored over a class subset exactly when its testbed counterpart is."""
    subset = set(subset_shifts)
    for shift, name in mapped.items():
        partial = SHIFTS[name].id_column is not None
        if partial and shift not in subset:
            raise DataError(
                f"shift '{shift}' is matched with the testbed's {name}, which is scored over its "
                "own classes only, but the dataset covers every class (no extra.class_subset); "
                "fetch it with a class_map so that only its present folders count"
            )
        if not partial and shift in subset:
            raise DataError(
                f"shift '{shift}' covers a subset of the classes, but the testbed's {name} is "
                "scored over all 1000; map it to the right testbed shift in "
                "evaluate.testbed_shifts"
            )


def _percent(text: str, model: str, column: str) -> float:
    try:
        return float(text) / 100.0
    except ValueError:
        raise DataError(
            f"testbed row {model!r} column {column!r}: {text!r} is not a number"
        ) from None


def load_testbed_baselines(
    shifts: Sequence[str],
    mapping: Mapping[str, str] | None = None,
    subset_shifts: Iterable[str] = (),
) -> dict[str, list]:
    """The testbed's baseline models as an external-baselines table (fractions):
    ``{"model", "id", <shift>…, class_subset_id("id", <subset shift>)…}``, one entry per
    ``STANDARD`` model with a value in every column the shifts need.

    ``subset_shifts``: the user's shifts scored over a class subset; they must be exactly
    those matched with ImageNet-R, -A or ObjectNet.
    """
    mapped = map_shifts(shifts, mapping or {})
    _check_subsets(mapped, subset_shifts)
    columns = {"id": ID_COLUMN} | {s: SHIFTS[t].column for s, t in mapped.items()}
    for s, t in mapped.items():
        id_column = SHIFTS[t].id_column
        if id_column is not None:
            columns[class_subset_id("id", s)] = id_column
    rows = [r for r in baseline_rows(read_testbed()) if all(r[c] for c in columns.values())]
    table: dict[str, list] = {"model": [r["model"] for r in rows]}
    for key, column in columns.items():
        table[key] = [_percent(r[column], r["model"], column) for r in rows]
    return table
